"""What every stage module declares: a `Stage` (config class, run, structural replay, summary,
terminal view), the option groups configs share, and the plain tables views return.

Nothing here imports torch: the command line builds `--help` from the stage configs, so stage
modules import their heavy layers inside the functions that run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from d2d.errors import D2DError
from d2d.options import LoopConfig, check_doc_split


@dataclass
class Table:
    """A table as plain text cells: the terminal draws it with rich, the report as HTML."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    styles: list[str | None] = field(default_factory=list)  # per row: None, "bold", "chosen"
    left: tuple[str, ...] = ()  # columns aligned left (the rest right)

    def add(self, *cells, style: str | None = None) -> None:
        self.rows.append([str(c) for c in cells])
        self.styles.append(style)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def agreement_text(depth: dict) -> str:
    """The causal decision's agreement with top-k (measured under top-k) or with the batch
    quantile that threshold routing trained with (measured under the causal decision)."""
    if depth.get("predictor_accuracy") is not None:
        return f"{pct(depth['predictor_accuracy'])} (top-k)"
    if depth.get("training_agreement") is not None:
        return f"{pct(depth['training_agreement'])} (training's batch quantile)"
    return ""


def change(drop: float) -> str:
    """A quality change as a signed percentage (runaway values capped)."""
    return f"{100 * drop:+.1f}%" if abs(drop) < 10 else (">+999%" if drop > 0 else "<-999%")


def thin(rows: list[dict], n: int) -> list[dict]:
    """At most about n rows of a training history, evenly spaced, the last one kept."""
    if len(rows) <= n:
        return rows
    stride = math.ceil(len(rows) / n)
    return rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])


class Record(dict):
    """A stage's lineage record (JSON-able), carrying the artifact's metadata after the stage
    (`meta`) for views that show more than the record (the calibration table)."""

    meta: dict | None = None


def _none(*args):
    return None


@dataclass(frozen=True)
class Stage:
    """One pipeline stage, as the registry (d2d.stages) lists it.

    run(art, cfg, progress[, out]) -> (metrics, structure): changes art in place; `structure` is
    what `replay(model, structure)` needs to rebuild the change on a new model (no data);
    summary(record) -> one line for `d2d inspect`; view(record) -> tables and lines for the
    terminal; about(meta) -> {key: facts} that `d2d inspect` adds to its description, and
    about_lines(description) -> the lines it prints of them (none where its key is absent).
    """

    name: str
    config_cls: type
    run: Callable
    help: str = ""
    requires: tuple[str, ...] = ()  # stages the input must have gone through
    must_precede: tuple[str, ...] = ()  # stages the input must not have gone through yet
    writes_artifact: bool = True
    takes_out: bool = False  # the stage writes beside its output (checkpoints)
    replay: Callable | None = None
    summary: Callable[[dict], str] = lambda record: ""
    view: Callable[[Record], list] = lambda record: []
    about: Callable[[dict], dict | None] = _none
    about_lines: Callable[[dict], list[str]] = lambda described: []


# --- option groups the stage configs share -------------------------------------------------


@dataclass
class DataFields:
    """Which text a stage reads and how it is cut into sequences."""

    data: str = field(
        default="bbc-news",
        metadata={"help": "Text: files, a folder, a table (json/csv/parquet) or an alias."},
    )
    doc_split: str = field(
        default="auto",
        metadata={
            "help": "Documents of a text file: line (one a line), paragraph (blank-line "
            "separated), file (the whole file), auto (lines when most are short, else "
            "paragraphs)."
        },
    )
    seq_len: int = field(default=256, metadata={"help": "Tokens per sequence."})
    bf16: bool = field(
        default=True,
        metadata={"help": "bf16 autocast where the hardware runs it natively (else fp32)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data split (and init)."})

    def __post_init__(self):
        check_doc_split(self.doc_split)
        if self.seq_len < 2:
            raise D2DError(f"seq-len must be >= 2, got {self.seq_len}")


@dataclass
class SampleFields(DataFields):
    """DataFields plus how many tokens to measure on."""

    tokens: int = field(default=8192, metadata={"help": "Tokens to measure on."})

    def __post_init__(self):
        if self.tokens < 1:
            raise D2DError(f"tokens must be >= 1, got {self.tokens}")
        super().__post_init__()


@dataclass
class TrainFields(DataFields):
    """The fine-tuning options every training stage shares (sparsify, mod)."""

    steps: int = field(default=200, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per optimizer step."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    lr: float = field(default=5e-5, metadata={"help": "Peak learning rate (AdamW)."})
    warmup: float = field(default=0.05, metadata={"help": "Fraction of steps of lr warm-up."})
    decay: str = field(default="cosine", metadata={"help": "lr decay: cosine, linear, constant."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    clip: float = field(default=1.0, metadata={"help": "Gradient norm clip (0: off)."})
    eval_every: int = field(
        default=0, metadata={"help": "Held-out evaluation every N steps (0: at the end only)."}
    )
    eval_tokens: int = field(default=8192, metadata={"help": "Held-out tokens per evaluation."})
    checkpoint_every: int = field(
        default=0, metadata={"help": "Checkpoint every N steps, for --resume (0: none)."}
    )
    checkpoint_dir: str = field(
        default="", metadata={"help": "Checkpoint folder (default: OUT.checkpoints beside OUT)."}
    )
    resume: bool = field(default=False, metadata={"help": "Continue from the latest checkpoint."})

    def __post_init__(self):
        if self.eval_tokens < 1:
            raise D2DError(f"eval-tokens must be >= 1, got {self.eval_tokens}")
        super().__post_init__()
        self.loop(None)  # the training loop's own checks

    def loop(self, out) -> LoopConfig:
        """The training loop's settings: the fields both share, and the checkpoint folder for
        output `out`."""
        shared = {
            f.name: getattr(self, f.name) for f in fields(LoopConfig) if hasattr(self, f.name)
        }
        return LoopConfig(**{**shared, "checkpoint_dir": self.checkpoints(out)})

    def checkpoints(self, out) -> str | None:
        """The checkpoint folder: --checkpoint-dir, else OUT.checkpoints beside the output."""
        if self.checkpoint_dir:
            return self.checkpoint_dir
        if out is None:
            return None
        out = Path(out)
        return str(out.parent / f"{out.name}.checkpoints")


@dataclass
class DistillFields(TrainFields):
    """TrainFields plus distillation to the frozen input model (sparsify, mod)."""

    distill: bool = field(
        default=False,
        metadata={
            "help": "Add the KL divergence to the frozen input model's output distribution "
            "beside the training loss (keeps a fine-tune on little data close to the model "
            "it started from)."
        },
    )
    distill_weight: float = field(default=1.0, metadata={"help": "Weight of the distillation KL."})

    def __post_init__(self):
        at_least(self, 0, "distill_weight")
        super().__post_init__()


def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise D2DError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def at_least(cfg, minimum: float, *names: str) -> None:
    for n in names:
        if getattr(cfg, n) < minimum:
            raise D2DError(f"{n.replace('_', '-')} must be >= {minimum:g}, got {getattr(cfg, n)}")


def corpus_of(cfg):
    """The corpus a DataFields config names (its documents split as it says)."""
    from d2d.data import load_corpus

    return load_corpus(cfg.data, getattr(cfg, "doc_split", "auto"))
