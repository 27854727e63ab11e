"""Option parsing and the training loop's settings: plain values, validated, no heavy imports
(the command line builds its help from configs that use these)."""

from __future__ import annotations

from dataclasses import dataclass

from d2d.errors import D2DError

LR_DECAYS = ("cosine", "linear", "constant")
# what a document of a text file is (d2d.data): see its module doc
DOC_SPLITS = ("auto", "line", "paragraph", "file")


def check_doc_split(value: str) -> str:
    if value not in DOC_SPLITS:
        raise D2DError(f"doc-split must be one of {', '.join(DOC_SPLITS)}, got {value!r}")
    return value


@dataclass
class LoopConfig:
    """What the shared training loop (d2d/train.py) needs; stages build it from their config."""

    steps: int
    batch_size: int  # examples per optimizer step, over all processes and micro-batches
    lr: float
    grad_accum: int = 1
    warmup: float = 0.05  # fraction of steps with a linear learning-rate warm-up
    decay: str = "cosine"
    weight_decay: float = 0.0
    clip: float = 1.0
    seed: int = 0
    bf16: bool = True
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 0  # 0: no checkpoints
    checkpoint_dir: str | None = None
    resume: bool = False

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise D2DError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or self.clip < 0 or self.weight_decay < 0:
            raise D2DError("lr must be > 0, clip and weight-decay >= 0")
        if self.decay not in LR_DECAYS:
            raise D2DError(f"decay must be one of {', '.join(LR_DECAYS)}, got {self.decay!r}")
        if not 0 <= self.warmup < 1:
            raise D2DError(f"warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if self.batch_size % self.grad_accum:
            raise D2DError(
                f"batch-size {self.batch_size} is not a multiple of grad-accum {self.grad_accum}"
            )
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise D2DError("eval-every and checkpoint-every must be >= 0")


def parse_layers(spec: str, n_layers: int) -> list[int]:
    if spec.strip() == "all":
        return list(range(n_layers))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            a, _, b = part.strip().partition("-")
            lo, hi = int(a), int(b) if b else int(a)
            out.update(range(lo, hi + 1))
    except ValueError:
        raise D2DError(f"bad layer list {spec!r}: use 'all' or e.g. '0-5,8'") from None
    bad = [i for i in out if i < 0 or i >= n_layers]
    if bad:
        raise D2DError(f"layer {bad[0]} does not exist: this model has {n_layers} layers")
    return sorted(out)


def parse_taus(spec: str) -> list[float]:
    try:
        taus = sorted({float(t) for t in str(spec).split(",") if t.strip()})
    except ValueError:
        raise D2DError(f"bad tau list {spec!r}: use numbers like 0,0.05,0.1") from None
    if not taus:
        raise D2DError("the tau list is empty: give at least one tau in [0, 1]")
    for t in taus:
        if not 0.0 <= t <= 1.0:
            raise D2DError(f"tau must be in [0, 1], got {t}")
    return taus


def parse_budgets(spec: str) -> list[float]:
    """FFN FLOPs budgets (fractions in (0, 1]), largest first."""
    try:
        out = sorted({float(b) for b in str(spec).split(",") if b.strip()}, reverse=True)
    except ValueError:
        raise D2DError(f"bad budget list {spec!r}: use fractions like 0.9,0.5,0.2") from None
    if not out or not all(0.0 < b <= 1.0 for b in out):
        raise D2DError(f"budgets must be fractions in (0, 1], got {spec!r}")
    return out


def parse_int_list(spec: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in str(spec).split(",") if v.strip()]
    except ValueError:
        raise D2DError(f"bad {what} list {spec!r}: use integers like 1,16,512") from None
    if not vals or any(v < 1 for v in vals):
        raise D2DError(f"{what} must be integers >= 1, got {spec!r}")
    return vals
