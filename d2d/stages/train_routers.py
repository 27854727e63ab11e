"""`train-routers`: per layer, a small MLP learns each expert's output norm (d2d.routers)."""

from __future__ import annotations

from dataclasses import dataclass, field

from d2d.errors import D2DError
from d2d.stages.base import SampleFields, Stage, Table, at_least, one_of, pct


@dataclass
class TrainRoutersConfig(SampleFields):
    tokens: int = field(default=32768, metadata={"help": "Training tokens to capture."})
    steps: int = field(
        default=1500, metadata={"help": "Optimizer steps (every layer's router takes each)."}
    )
    batch_size: int = field(default=512, metadata={"help": "Tokens per router step."})
    lr: float = field(default=2e-3, metadata={"help": "Peak learning rate (cosine decay)."})
    hidden: int = field(default=64, metadata={"help": "Router hidden width."})
    attention_hidden: int | None = field(
        default=None,
        metadata={
            "help": "Router hidden width of the attention projections' experts (default: "
            "--hidden; their MLPs are smaller than the FFNs, so a router costs them more)."
        },
    )
    heldout_tokens: int = field(default=4096, metadata={"help": "Held-out tokens for metrics."})
    loss: str = field(
        default="mse",
        metadata={
            "help": "Router loss: mse (of the output norms) or log (of log(norm + 1% of the "
            "layer's mean norm): every expert's relative error counts alike)."
        },
    )
    skip_positions: int = field(
        default=1,
        metadata={
            "help": "Leading positions left out of training: calibrate keeps "
            "them dense (their norms are outliers that swamp the MSE)."
        },
    )

    def __post_init__(self):
        at_least(self, 0, "skip_positions")
        one_of("loss", self.loss, ("mse", "log"))  # d2d.routers.ROUTER_LOSSES
        at_least(self, 1, "steps", "batch_size", "hidden", "heldout_tokens")
        if self.attention_hidden is not None:
            at_least(self, 1, "attention_hidden")
        if not self.lr > 0:
            raise D2DError(f"lr must be > 0, got {self.lr}")
        super().__post_init__()


def run(art, cfg: TrainRoutersConfig, progress):
    from d2d.routers import train_routers

    structure = {"hidden": cfg.hidden}
    if cfg.attention_hidden is not None:
        structure["attention_hidden"] = cfg.attention_hidden
    return train_routers(art.model, art.tokenizer, cfg, progress), structure


def replay(model, structure: dict) -> None:
    from d2d.nn.structure import attach_routers, moe_layers

    attach_routers(moe_layers(model), structure["hidden"], structure.get("attention_hidden"))


def summary(record: dict) -> str:
    structure = record.get("structure") or {}
    hidden = structure.get("hidden")
    if structure.get("attention_hidden") is not None:
        hidden = f"{hidden}, projections {structure['attention_hidden']}"
    return f"mean held-out R^2 {record['metrics']['mean_r2']:.3f} (hidden {hidden})"


def view(record: dict) -> list:
    m = record["metrics"]
    t = Table(
        f"routers ({m['train_tokens']} training tokens, {m['heldout_tokens']} held-out)",
        ["layer", "train MSE", "held-out R^2", "norm captured @25%"],
    )
    for i, v in m["per_layer"].items():
        t.add(i, f"{v['train_mse']:.4g}", f"{v['r2']:.3f}", pct(v["capture_25"]))
    t.add("mean", "", f"{m['mean_r2']:.3f}", pct(m["mean_capture_25"]), style="bold")
    return [t]


STAGE = Stage(
    "train-routers",
    TrainRoutersConfig,
    run,
    help="Train per-layer routers that predict each expert's output norm.",
    requires=("convert",),
    replay=replay,
    summary=summary,
    view=view,
)
