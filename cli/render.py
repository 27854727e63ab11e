"""Rich rendering: progress bars from the library's callback, and the tables and lines a
stage's view returns (one renderer for every stage)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table as RichTable

from d2d.stages import STAGES
from d2d.stages.base import Table
from d2d.stages.calibrate import calibration_table

console = Console()
err_console = Console(stderr=True)


class RichProgress:
    """A progress callback that draws one bar per task name."""

    def __init__(self):
        self._p = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, int] = {}
        # without a terminal (a log file, CI) live bars are not drawn: print a plain line per
        # task every LOG_EVERY seconds and when it completes
        self._plain = not console.is_terminal
        self._last: dict[str, float] = {}

    LOG_EVERY = 30.0

    def __enter__(self):
        if not self._plain:
            self._p.start()
        return self

    def __exit__(self, *exc):
        if not self._plain:
            self._p.stop()
        return False

    def pause(self):
        if not self._plain:
            self._p.stop()

    def resume(self):
        if not self._plain:
            self._p.start()

    def __call__(self, task: str, completed: int, total: int, **info: float) -> None:
        text = "  ".join(f"{k}={v:.4g}" for k, v in info.items())
        if self._plain:
            now = time.monotonic()
            if completed >= total or now - self._last.get(task, -1e9) >= self.LOG_EVERY:
                self._last[task] = now
                console.print(f"{task}: {completed}/{total} {text}", highlight=False)
            return
        if task not in self._tasks:
            self._tasks[task] = self._p.add_task(task, total=total, info=text)
        self._p.update(self._tasks[task], completed=completed, total=total, info=text)


STYLES = {"bold": "bold", "chosen": "bold green"}


def rich_table(t: Table) -> RichTable:
    rt = RichTable(title=t.title)
    for c in t.columns:
        rt.add_column(c, justify="left" if c in t.left else "right", no_wrap=c in t.left)
    for cells, style in zip(t.rows, t.styles, strict=True):
        rt.add_row(*cells, style=STYLES.get(style))
    return rt


def show(items: list) -> None:
    """Print a view: Tables as rich tables, strings as plain lines."""
    for it in items:
        if isinstance(it, Table):
            console.print(rich_table(it))
        else:
            console.print(it, highlight=False, markup=False)


def print_record(stage: str, rec: dict, out) -> None:
    show(STAGES[stage].view(rec))
    where = f" -> {out}" if out and STAGES[stage].writes_artifact else ""
    console.print(
        f"[dim]{stage} took {rec.get('seconds', 0):.1f}s, peak memory "
        f"{rec.get('peak_rss_mb', 0):.0f} MB{where}[/]"
    )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def print_inspect(d: dict) -> None:
    """The terminal view of `d2d inspect`: what the artifact is, how it was made, its routing."""
    from d2d.nn.policy import label  # torch: only when inspecting

    m, w = d["model"], d["weights"]
    kind = "d2d artifact" if d["artifact"] else "model folder (not a d2d artifact)"
    console.print(f"[bold]{d['path']}[/]: {kind}")
    console.print(
        f"  model: {m['architecture']} ({m['model_type']}), {m['layers']} layers, hidden "
        f"{m['hidden']}, FFN {m['ffn']}, activation {m['activation']}"
    )
    dtypes = ", ".join(
        f"{k} {v / w['parameters']:.0%}" if v >= 0.01 * w["parameters"] else f"{k} <1%"
        for k, v in w["dtypes"].items()
    )
    console.print(
        f"  weights: {w['parameters'] / 1e6:.2f}M parameters in {w['tensors']} tensors "
        f"({dtypes}); model.safetensors {_size(w['file_bytes'])}, folder {_size(d['size_bytes'])}"
    )
    if not d["artifact"]:
        return
    b = d["base"]
    console.print(
        f"  base: {b.get('source')} ({b.get('model_class')}, {b.get('task')}); format "
        f"{d['format_version']}, d2d {d['d2d_version']}, "
        + ", ".join(f"{k} {v}" for k, v in d["versions"].items())
    )
    t = Table("lineage", ["#", "stage", "finished", "time", "peak memory", "outcome"])
    t.left = ("stage", "finished", "outcome")
    for i, s in enumerate(d["stages"]):
        secs, mem = s.get("seconds"), s.get("peak_rss_mb")
        t.add(
            i,
            s["stage"],
            (s.get("finished") or "")[:16].replace("T", " "),
            f"{secs:.1f}s" if isinstance(secs, (int, float)) else "",
            f"{mem:.0f} MB" if isinstance(mem, (int, float)) else "",
            s["summary"],
        )
    console.print(rich_table(t))
    for spec in STAGES.values():  # what each stage adds ("moe", "mod")
        for line in spec.about_lines(d):
            console.print(line, highlight=False)
    pol = d.get("routing")
    if d.get("mod") and not pol and not d.get("moe"):
        return
    console.print(
        f"  routing: {label(pol)}, dense positions {pol.get('dense_positions', 0)}"
        if pol
        else "  routing: none chosen (run d2d calibrate)",
        highlight=False,
    )
    cal = d.get("calibration")
    if cal:
        console.print(
            rich_table(
                calibration_table(cal, f"calibration ({cal['tokens']} tokens, {cal['split']})")
            )
        )
