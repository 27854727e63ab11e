"""Stage configs: small dataclasses, validated on construction, serialised into d2d.json.

Field docs (metadata "help") become the CLI's --help text. This module imports nothing heavy,
so that the command line starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from d2d.errors import D2DError

LAYER_RULES = ("tau", "threshold", "topk")
DEFAULT_TAUS = "0,0.005,0.01,0.02,0.03,0.05,0.075,0.1,0.15,0.2,0.3,0.5,1"
DEFAULT_BUDGETS = "0.95,0.9,0.85,0.8,0.7,0.6,0.5,0.4,0.3,0.2"


TASKS = ("auto", "causal-lm", "classification")
PENALTIES = ("hoyer", "l1")
WEIGHT_SCHEDULES = ("linear", "constant")
LR_DECAYS = ("cosine", "linear", "constant")


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


@dataclass
class TrainFields:
    """The fine-tuning options every training stage shares (sparsify, mod)."""

    steps: int = field(default=200, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per optimizer step."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per sequence."})
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
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast where supported."})
    seed: int = field(default=0, metadata={"help": "Seed of data split, order and init."})

    def __post_init__(self):
        if self.eval_tokens < 1:
            raise D2DError(f"eval-tokens must be >= 1, got {self.eval_tokens}")
        if self.seq_len < 2:
            raise D2DError(f"seq-len must be >= 2, got {self.seq_len}")
        self.loop(None)  # the training loop's own checks

    def loop(self, out) -> LoopConfig:
        """The training loop's settings: the fields both configs share, and the checkpoint
        folder for output `out`."""
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
class SparsifyConfig(TrainFields):
    data: str = field(default="bbc-news", metadata={"help": "Training text (files or alias)."})
    task: str = field(
        default="auto",
        metadata={
            "help": "auto (from model and data), causal-lm, or classification "
            "(adds a head to a bare encoder; labels from the data)."
        },
    )
    penalty: str = field(
        default="hoyer", metadata={"help": "Sparsity penalty: hoyer (square Hoyer) or l1."}
    )
    weight: float = field(default=0.01, metadata={"help": "Penalty weight (0: plain fine-tune)."})
    schedule: str = field(
        default="linear", metadata={"help": "Penalty weight schedule: linear warm-up or constant."}
    )
    weight_warmup: float = field(
        default=0.2, metadata={"help": "Fraction of steps to reach the full penalty weight."}
    )
    relu: bool = field(
        default=False,
        metadata={"help": "Swap the FFN activation for ReLU first (exact zeros)."},
    )

    def __post_init__(self):
        for name, allowed in (
            ("task", TASKS),
            ("penalty", PENALTIES),
            ("schedule", WEIGHT_SCHEDULES),
        ):
            if getattr(self, name) not in allowed:
                raise D2DError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.weight < 0:
            raise D2DError(f"weight must be >= 0, got {self.weight}")
        if not 0 <= self.weight_warmup <= 1:
            raise D2DError(f"weight-warmup must be in [0, 1], got {self.weight_warmup}")
        super().__post_init__()


PREDICTORS = ("aux-loss", "mlp")


@dataclass
class ModConfig(TrainFields):
    data: str = field(default="bbc-news", metadata={"help": "Training text (files or alias)."})
    capacity: float = field(
        default=0.125, metadata={"help": "Fraction of a sequence's tokens a routed block takes."}
    )
    every: int = field(
        default=2, metadata={"help": "Route every N-th block (the 2nd, 4th, ... for 2)."}
    )
    layers: str = field(
        default="", metadata={"help": "Blocks to route instead, e.g. '1,3,5' (not block 0)."}
    )
    sink: int = field(
        default=1,
        metadata={"help": "Leading positions every routed block processes (attention sink)."},
    )
    anneal: float = field(
        default=0.3,
        metadata={"help": "Fraction of the steps over which capacity falls from 1.0 to its value."},
    )
    predictor: str = field(
        default="mlp",
        metadata={
            "help": "Causal decision for generation: aux-loss (BCE on the router) or mlp (a "
            "small predictor on stop-gradient inputs)."
        },
    )
    aux_weight: float = field(
        default=0.1, metadata={"help": "Weight of the BCE loss that trains the causal decision."}
    )
    router_lr: float = field(
        default=2e-3,
        metadata={
            "help": "Peak learning rate of the new routers and predictors (the model's own "
            "weights use --lr)."
        },
    )

    def __post_init__(self):
        if not 0.0 < self.capacity <= 1.0:
            raise D2DError(f"capacity must be in (0, 1], got {self.capacity}")
        if self.every < 1:
            raise D2DError(f"every must be >= 1, got {self.every}")
        if self.sink < 0:
            raise D2DError(f"sink must be >= 0, got {self.sink}")
        if not 0.0 <= self.anneal <= 1.0:
            raise D2DError(f"anneal must be in [0, 1], got {self.anneal}")
        if self.predictor not in PREDICTORS:
            raise D2DError(
                f"predictor must be one of {', '.join(PREDICTORS)}, got {self.predictor!r}"
            )
        if self.aux_weight < 0:
            raise D2DError(f"aux-weight must be >= 0, got {self.aux_weight}")
        if not self.router_lr > 0:
            raise D2DError(f"router-lr must be > 0, got {self.router_lr}")
        super().__post_init__()

    def capacity_at(self, step: int) -> float:
        """Capacity for optimizer step `step`: linear from 1.0 to `capacity` over the first
        `anneal` of the steps, so that the dense model is not shocked."""
        span = self.anneal * self.steps
        if span <= 0 or step >= span:
            return self.capacity
        return 1.0 - (1.0 - self.capacity) * step / span


@dataclass
class ConvertConfig:
    n_experts: int | None = field(
        default=None, metadata={"help": "Experts per FFN (must divide the FFN width)."}
    )
    expert_size: int = field(
        default=16, metadata={"help": "Neurons per expert, used when n_experts is not given."}
    )
    layers: str = field(
        default="all", metadata={"help": "Layers to convert: 'all' or a list like '0-5,8'."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the clustering."})

    def __post_init__(self):
        if self.n_experts is not None and self.n_experts < 1:
            raise D2DError(f"n_experts must be >= 1, got {self.n_experts}")
        if self.expert_size < 1:
            raise D2DError(f"expert_size must be >= 1, got {self.expert_size}")
        parse_layers(self.layers, 10**6)  # syntax check


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


@dataclass
class TrainRoutersConfig:
    data: str = field(default="bbc-news", metadata={"help": "Training text (files or alias)."})
    tokens: int = field(default=32768, metadata={"help": "Training tokens to capture."})
    seq_len: int = field(default=256, metadata={"help": "Tokens per sequence."})
    steps: int = field(
        default=1500, metadata={"help": "Optimizer steps (every layer's router takes each)."}
    )
    batch_size: int = field(default=512, metadata={"help": "Tokens per router step."})
    lr: float = field(default=2e-3, metadata={"help": "Peak learning rate (cosine decay)."})
    hidden: int = field(default=64, metadata={"help": "Router hidden width."})
    heldout_tokens: int = field(default=4096, metadata={"help": "Held-out tokens for metrics."})
    skip_positions: int = field(
        default=1,
        metadata={
            "help": "Leading positions left out of training: calibrate keeps "
            "them dense (their norms are outliers that swamp the MSE)."
        },
    )
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast for the capture pass."})
    seed: int = field(default=0, metadata={"help": "Seed for data split and init."})

    def __post_init__(self):
        if self.skip_positions < 0:
            raise D2DError(f"skip-positions must be >= 0, got {self.skip_positions}")
        for name in ("tokens", "seq_len", "steps", "batch_size", "hidden", "heldout_tokens"):
            if getattr(self, name) < 1:
                raise D2DError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise D2DError(f"lr must be > 0, got {self.lr}")


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


def parse_rules(spec: str) -> list[str]:
    rules = [r.strip() for r in str(spec).split(",") if r.strip()]
    bad = [r for r in rules if r not in LAYER_RULES]
    if bad or not rules:
        raise D2DError(f"bad per-layer rule list {spec!r}: use some of {', '.join(LAYER_RULES)}")
    return rules


@dataclass
class CalibrateConfig:
    data: str = field(default="bbc-news", metadata={"help": "Calibration text (files or alias)."})
    taus: str = field(default=DEFAULT_TAUS, metadata={"help": "Global tau grid, comma-separated."})
    target_flops: float | None = field(
        default=None, metadata={"help": "Choose the best quality at <= this FFN FLOPs fraction."}
    )
    max_quality_drop: float | None = field(
        default=None,
        metadata={
            "help": "Choose the fewest FLOPs whose quality drop <= this (0.02 = 2%). "
            "Default when no target is given: 0.02."
        },
    )
    per_layer: bool = field(
        default=True, metadata={"help": "Also calibrate per-layer rules (allocated budgets)."}
    )
    layer_rules: str = field(
        default="tau,threshold,topk",
        metadata={
            "help": "Per-layer rules: tau (dynamic-k), threshold (absolute predicted "
            "norm), topk (fixed k per layer)."
        },
    )
    budgets: str = field(
        default=DEFAULT_BUDGETS,
        metadata={"help": "FFN FLOPs budgets of the per-layer rules, comma-separated."},
    )
    dense_sink: int = field(
        default=1, metadata={"help": "Leading positions of each sequence that run every expert."}
    )
    seq_len: int = field(default=512, metadata={"help": "Tokens per sequence."})
    tokens: int = field(default=8192, metadata={"help": "Calibration tokens."})
    sensitivity_tokens: int = field(
        default=2048, metadata={"help": "Tokens for the per-layer sensitivity pass."}
    )
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast for forward passes."})
    seed: int = field(default=0, metadata={"help": "Seed of the data split."})

    def __post_init__(self):
        parse_taus(self.taus)
        parse_rules(self.layer_rules)
        parse_budgets(self.budgets)
        if self.target_flops is not None and not 0.0 < self.target_flops <= 1.0:
            raise D2DError(f"target-flops must be in (0, 1], got {self.target_flops}")
        if self.max_quality_drop is not None and self.max_quality_drop < 0:
            raise D2DError(f"max-quality-drop must be >= 0, got {self.max_quality_drop}")
        if self.target_flops is not None and self.max_quality_drop is not None:
            raise D2DError("give --target-flops or --max-quality-drop, not both")
        if self.dense_sink < 0 or self.seq_len < 2 or self.tokens < 1:
            raise D2DError("dense-sink must be >= 0, seq-len >= 2 and tokens >= 1")


@dataclass
class EvalConfig:
    data: str = field(default="bbc-news", metadata={"help": "Held-out text (files or alias)."})
    tau: float | None = field(
        default=None, metadata={"help": "Evaluate at this global tau instead of the chosen one."}
    )
    seq_len: int = field(default=512, metadata={"help": "Tokens per sequence."})
    tokens: int = field(default=12288, metadata={"help": "Held-out tokens."})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast for forward passes."})
    seed: int = field(default=0, metadata={"help": "Seed of the data split."})

    def __post_init__(self):
        if self.tau is not None and not 0.0 <= self.tau <= 1.0:
            raise D2DError(f"tau must be in [0, 1], got {self.tau}")
        if self.seq_len < 2 or self.tokens < 1:
            raise D2DError("seq-len must be >= 2 and tokens >= 1")


def parse_int_list(spec: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in str(spec).split(",") if v.strip()]
    except ValueError:
        raise D2DError(f"bad {what} list {spec!r}: use integers like 1,16,512") from None
    if not vals or any(v < 1 for v in vals):
        raise D2DError(f"{what} must be integers >= 1, got {spec!r}")
    return vals


@dataclass
class BenchConfig:
    data: str = field(
        default="bbc-news", metadata={"help": "Text for real hidden states and prompts."}
    )
    taus: str = field(
        default="",
        metadata={"help": "Global taus to measure (default: the calibrated routing), e.g. 0.1,0.3"},
    )
    token_counts: str = field(
        default="1,16,512,4096", metadata={"help": "Token counts for the one-layer benchmark."}
    )
    layer: int = field(default=-1, metadata={"help": "Layer to benchmark (-1: the middle one)."})
    model: bool = field(default=True, metadata={"help": "Also time the whole model."})
    prompt_len: int = field(default=512, metadata={"help": "Prompt tokens for prefill timing."})
    decode_batch: str = field(default="1,8", metadata={"help": "Batch sizes for decode timing."})
    decode_prompt: int = field(default=32, metadata={"help": "Prompt tokens before decoding."})
    new_tokens: int = field(default=32, metadata={"help": "Tokens decoded per measurement."})
    reps: int = field(default=10, metadata={"help": "Timed repetitions (medians are reported)."})
    warmup: int = field(default=2, metadata={"help": "Untimed repetitions first."})
    threads: int = field(default=0, metadata={"help": "torch threads (0: torch's default)."})
    seed: int = field(default=0, metadata={"help": "Seed of the data split."})

    def __post_init__(self):
        if self.taus:
            parse_taus(self.taus)
        parse_int_list(self.token_counts, "token-counts")
        parse_int_list(self.decode_batch, "decode-batch")
        for name in ("prompt_len", "decode_prompt", "new_tokens", "reps"):
            if getattr(self, name) < 1:
                raise D2DError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0:
            raise D2DError("warmup and threads must be >= 0")
