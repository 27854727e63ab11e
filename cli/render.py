"""Rich rendering: progress bars from the library's callback, and per-stage summary tables."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _policy(p: dict) -> str:
    from d2d.moe.routing import describe

    return describe(p)


def _row_label(r: dict) -> str:
    from d2d.moe.routing import describe_row

    return describe_row(r)


def _change(drop: float) -> str:
    return f"{100 * drop:+.1f}%" if abs(drop) < 10 else (">+999%" if drop > 0 else "<-999%")


def calibration_table(cal: dict, title: str = "calibration") -> Table:
    """Rows: routing (per-layer rules @ their FLOPs budget), FLOPs fractions, quality."""
    t = Table(title=f"{title}; FLOPs as a fraction of dense")
    t.add_column("")
    t.add_column("routing", no_wrap=True)
    for c in ("FFN", "model", cal["metric"], "change"):
        t.add_column(c, justify="right", no_wrap=True)
    for j, r in enumerate(cal["rows"]):
        mark = "->" if j == cal.get("choice") else ""
        t.add_row(
            mark,
            _row_label(r),
            _pct(r["ffn_fraction"]),
            _pct(r["model_fraction"]),
            f"{r['quality']:.4g}",
            _change(r["drop"]),
            style="bold green" if mark else None,
        )
    return t


def sparsity_table(m: dict) -> Table:
    """Per layer: fraction of exact zeros and of near zeros (< 1% of the token's max), before
    and after fine-tuning."""
    b, a = m["sparsity_before"], m["sparsity_after"]
    t = Table(title="FFN activation sparsity on held-out tokens (zeros / |a| < 1% of token max)")
    t.add_column("layer", justify="right")
    for c in ("zeros before", "zeros after", "near-zero before", "near-zero after"):
        t.add_column(c, justify="right")
    for i in b["layers"]:
        lb, la = b["layers"][i], a["layers"][i]
        t.add_row(
            i, _pct(lb["zero"]), _pct(la["zero"]), _pct(lb["near_zero"]), _pct(la["near_zero"])
        )
    t.add_row(
        "mean",
        _pct(b["zero"]),
        _pct(a["zero"]),
        _pct(b["near_zero"]),
        _pct(a["near_zero"]),
        style="bold",
    )
    return t


def print_record(stage: str, rec: dict, out) -> None:
    m = rec.get("metrics", {})
    if stage == "sparsify":
        console.print(sparsity_table(m))
        head = " (new head: before = untrained)" if m.get("head") == "new" else ""
        console.print(
            f"[bold]sparsify[/]: {m['task']}, {m['tokens_seen']} training tokens; held-out "
            f"{m['metric']} {m['quality_before']:.4g} -> {m['quality_after']:.4g}{head}"
        )
    elif stage == "convert":
        console.print(
            f"[bold]convert[/]: {m['converted_layers']} layers, {m['n_experts']} experts "
            f"of {m['expert_size']} neurons each"
        )
    elif stage == "train-routers":
        t = Table(
            title=f"routers ({m['train_tokens']} training tokens, {m['heldout_tokens']} held-out)"
        )
        for c in ("layer", "train MSE", "held-out R^2", "norm captured @25%"):
            t.add_column(c, justify="right")
        for i, v in m["per_layer"].items():
            t.add_row(i, f"{v['train_mse']:.4g}", f"{v['r2']:.3f}", _pct(v["capture_25"]))
        t.add_row("mean", "", f"{m['mean_r2']:.3f}", _pct(m["mean_capture_25"]), style="bold")
        console.print(t)
    elif stage == "calibrate":
        meta = Path(out) / "d2d.json" if out else None
        if meta is not None and meta.is_file():
            cal = json.loads(meta.read_text()).get("calibration")
            if cal:
                console.print(calibration_table(cal, f"calibration ({cal['tokens']} tokens)"))
        console.print(
            f"[bold]calibrate[/]: chose {m['rule']} at {_pct(m['ffn_fraction'])} of FFN "
            f"FLOPs, {m['metric']} {m['quality']:.4g} (dense {m['dense_quality']:.4g}, "
            f"{100 * m['drop']:+.2f}%)"
        )
    elif stage == "eval":
        routing = [] if m.get("mod") and m["policy"].get("rule") == "all" else [m["policy"]]
        routing = [f"routing: {_policy(p)}" for p in routing]
        if m.get("mod"):
            routing.append(f"MoD capacity {m['mod']['capacity']:g}")
        t = Table(title=f"held-out evaluation ({m['tokens']} tokens), {', '.join(routing)}")
        depth = any("depth" in r for r in m["rows"])
        cols = ["model", m["rows"][0]["metric"], "change", "FFN FLOPs", "model FLOPs"]
        cols += ["blocks run", "causal accuracy"] if depth else []
        for c in cols + ["time"]:
            t.add_column(c, justify="right")
        for r in m["rows"]:
            d = r.get("depth") or {}
            acc = d.get("predictor_accuracy")
            extra = [_pct(d.get("block_fraction", 1.0)), "" if acc is None else _pct(acc)]
            t.add_row(
                r["model"],
                f"{r['quality']:.4g}",
                _change(r["drop"]),
                _pct(r["ffn_fraction"]),
                _pct(r["model_fraction"]),
                *(extra if depth else []),
                f"{r['seconds']:.1f}s",
            )
        console.print(t)
    elif stage == "bench":
        print_bench(m)
    elif stage == "mod":
        t = Table(
            title=f"held-out perplexity, capacity {m['capacity']:g} on blocks "
            f"{','.join(str(i) for i in m['routed_layers'])}"
        )
        cols = ("routing", "perplexity", "blocks run", "routed blocks run", "model FLOPs")
        for c in cols + ("causal accuracy",):
            t.add_column(c, justify="right")
        t.add_row("dense", f"{m['dense_perplexity']:.4g}", "100.0%", "100.0%", "100.0%", "")
        for mode, label in (("topk", "top-k"), ("causal", "causal predictor")):
            r = m[mode]
            acc = r.get("predictor_accuracy")
            t.add_row(
                label,
                f"{r['perplexity']:.4g}",
                _pct(r["block_fraction"]),
                _pct(r["routed_block_fraction"]),
                _pct(r["model_fraction"]) if "model_fraction" in r else "",
                "" if acc is None else _pct(acc),
            )
        console.print(t)
    where = f" -> {out}" if out and stage not in ("eval", "bench") else ""
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
    t = Table(title="lineage")
    for c in ("#", "stage", "finished", "time", "peak memory", "outcome"):
        t.add_column(c, justify="right" if c in ("#", "time", "peak memory") else "left")
    for i, s in enumerate(d["stages"]):
        secs = s.get("seconds")
        mem = s.get("peak_rss_mb")
        t.add_row(
            str(i),
            s["stage"],
            (s.get("finished") or "")[:16].replace("T", " "),
            f"{secs:.1f}s" if isinstance(secs, (int, float)) else "",
            f"{mem:.0f} MB" if isinstance(mem, (int, float)) else "",
            s["summary"],
        )
    console.print(t)
    moe = d.get("moe")
    if moe:
        layers = moe["layers"] or []
        r = moe["routers"]
        routers = (
            "none (run d2d train-routers)"
            if r is None
            else f"MLP hidden {r['hidden']}, mean held-out R^2 {r['mean_r2']:.3f}"
            if isinstance(r.get("mean_r2"), (int, float))
            else f"MLP hidden {r['hidden']}"
        )
        console.print(
            f"  experts: {len(layers)} layers x {moe['n_experts']} experts of "
            f"{moe['expert_size']} neurons ({w['experts_parameters'] / 1e6:.2f}M parameters); "
            f"routers: {routers} ({w['routers_parameters'] / 1e6:.3f}M parameters)"
        )
    mod = d.get("mod")
    if mod:
        pred = "MLP predictor" if mod["predictor"] == "mlp" else "the router's sign"
        console.print(
            f"  Mixture-of-Depths: blocks {','.join(str(i) for i in mod['layers'] or [])} routed "
            f"at capacity {mod['capacity']:g} (top-k), sink {mod.get('sink') or 0}; generation "
            f"decides causally ({pred})"
        )
    pol = d.get("routing")
    if mod and not pol and not d.get("moe"):
        return
    console.print(
        f"  routing: {_policy(pol)}, dense positions {pol.get('dense_positions', 0)}"
        if pol
        else "  routing: none chosen (run d2d calibrate)"
    )
    cal = d.get("calibration")
    if cal:
        console.print(
            calibration_table(cal, f"calibration ({cal['tokens']} tokens, {cal['split']})")
        )


def _layer_table(lay: dict) -> None:
    t = Table(
        title=f"one FFN layer (layer {lay['layer']}: {lay['n_experts']} experts of "
        f"{lay['expert_size']}); medians, converted / dense"
    )
    for c in ("tokens", "routing", "FLOPs", "time", "time / FLOPs", "dense", "d2d"):
        t.add_column(c, justify="left" if c == "routing" else "right")
    for r in lay["rows"]:
        t.add_row(
            str(r["tokens"]),
            r["routing"],
            _pct(r["flops_fraction"]),
            _pct(r["time_fraction"]),
            f"{r['time_fraction'] / r['flops_fraction']:.2f}",
            f"{r['dense_ms']:.3f} ms",
            f"{r['d2d_ms']:.3f} ms",
        )
    console.print(t)


def print_bench(m: dict) -> None:
    """d2d bench: time ratios (converted / dense) beside FLOPs fractions, and the machine."""
    lay = m["layer"]
    if lay:
        _layer_table(lay)
    if m["model"]:
        t = Table(title="whole model (fp32); speed-up = dense time / converted time")
        for c in ("measure", "routing", "FFN FLOPs", "model FLOPs", "dense", "d2d", "speed-up"):
            t.add_column(c, justify="left" if c in ("measure", "routing") else "right")
        for r in m["model"]:
            t.add_row(
                r["measure"],
                r["routing"],
                _pct(r["ffn_flops_fraction"]),
                _pct(r["model_flops_fraction"]),
                f"{r['dense']:.1f} {r['unit']}",
                f"{r['d2d']:.1f} {r['unit']}",
                f"{r['speedup']:.2f}x",
            )
        console.print(t)
    mem, mach = m["memory"], m["machine"]
    console.print(
        f"memory: tensors {mem['tensor_bytes'] / 2**20:.1f} MB = {mem['ratio']:.3f} x the dense "
        f"model's ({mem['dense_tensor_bytes'] / 2**20:.1f} MB; routers, predictors and the "
        "neuron permutation are the difference)"
    )
    console.print(
        f"[dim]machine: {mach['cpu']}, {mach['torch_threads']} torch threads of "
        f"{mach['cpu_count']} CPUs, torch {mach['torch']}, sparse kernel: "
        f"{mach['sparse_kernel']}[/]"
    )
