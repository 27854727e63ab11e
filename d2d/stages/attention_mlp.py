"""`attention-mlp`: replace attention projections by trained two-layer ReLU MLPs (D2DMoE's
conversion of multi-head attention, step 1; d2d.nn.projection).

Each chosen projection's inputs and outputs are captured on training tokens (the rest of the
model frozen), its MLP starts as the projection itself where the width allows, and every MLP
is trained on its own projection's data at once: relative squared error plus, optionally, the
square-Hoyer penalty on its hidden activations (as sparsify uses), so that few neurons fire.
The replacement is an approximation: the stage reports each projection's held-out relative
error, the share of its hidden activations that are zero, and the model's quality before and
after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from d2d.errors import D2DError
from d2d.options import parse_layers
from d2d.stages.base import SampleFields, Stage, Table, at_least, pct


@dataclass
class AttentionMLPConfig(SampleFields):
    projections: str = field(
        default="all",
        metadata={
            "help": "Projections to replace: all, or names (q,k,v,o; GPT-2: qkv,o) separated "
            "by commas."
        },
    )
    layers: str = field(default="all", metadata={"help": "Layers: 'all' or a list like '0-5,8'."})
    width: float = field(
        default=2.0,
        metadata={
            "help": "Hidden width of each MLP as a multiple of its projection's output (2 or "
            "more starts it as the projection exactly; below 2 as its best approximation of "
            "rank width x output / 2)."
        },
    )
    tokens: int = field(default=8192, metadata={"help": "Training tokens to capture."})
    heldout_tokens: int = field(
        default=2048, metadata={"help": "Held-out tokens for the relative errors."}
    )
    eval_tokens: int = field(default=4096, metadata={"help": "Held-out tokens for quality."})
    steps: int = field(default=300, metadata={"help": "Optimizer steps (all MLPs at once)."})
    batch_size: int = field(default=256, metadata={"help": "Tokens per step."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate (cosine decay)."})
    weight: float = field(
        default=0.0,
        metadata={"help": "Square-Hoyer penalty weight on the MLPs' hidden activations."},
    )

    def __post_init__(self):
        if not self.width > 0:
            raise D2DError(f"width must be > 0, got {self.width}")
        at_least(self, 1, "steps", "batch_size", "heldout_tokens", "eval_tokens")
        at_least(self, 0, "weight")
        if not self.lr > 0:
            raise D2DError(f"lr must be > 0, got {self.lr}")
        parse_layers(self.layers, 10**6)
        super().__post_init__()

    def names(self) -> list[str] | None:
        if self.projections.strip() == "all":
            return None
        return [n.strip() for n in self.projections.split(",") if n.strip()]


class _ProjectionTask:
    """Every replacement MLP on its own projection's captured data, for the shared loop."""

    def __init__(self, data: dict, weight: float):
        self.data, self.weight = data, weight

    @property
    def n_examples(self) -> int:
        return min(int(x.shape[0]) for x, _ in self.data.values())

    def batch(self, indices) -> dict:
        out = {}
        for k, (x, y) in self.data.items():
            out[f"x{k}"], out[f"y{k}"] = x[indices].float(), y[indices].float()
        return out

    def loss(self, mlps, batch, step):
        import torch

        from d2d.nn.activations import hoyer

        losses, logs = [], {}
        for k, m in mlps.items():
            h = m.hidden(batch[f"x{k}"])
            y = batch[f"y{k}"]
            err = (m.fc2(h) - y).pow(2).mean() / y.pow(2).mean().clamp_min(1e-12)
            loss = err + self.weight * hoyer(h).mean() if self.weight > 0 else err
            losses.append(loss)
            logs[f"err_{k}"] = float(err.detach())
        total = torch.stack(losses).sum()
        logs["loss"] = float(total.detach()) / len(losses)
        return total, logs

    def evaluate(self, mlps) -> dict:
        return {}


def _capture(model, targets: dict, batches, bf16: bool) -> dict:
    """Inputs and outputs [N, d] of each target projection on the real tokens of `batches`."""
    import torch

    from d2d.device import use_bf16

    store = {k: ([], []) for k in targets}
    real = {}

    def make(k):
        def hook(mod, args, out):
            x, y = args[0], out[0] if isinstance(out, tuple) else out
            x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            if real.get("m") is not None:
                x, y = x[real["m"]], y[real["m"]]
            store[k][0].append(x.detach().to(torch.bfloat16))
            store[k][1].append(y.detach().float())

        return hook

    handles = [mod.register_forward_hook(make(k)) for k, mod in targets.items()]
    try:
        with torch.no_grad():
            for b in batches:
                m = b.get("attention_mask")
                real["m"] = None if m is None else m.reshape(-1).bool()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16(bf16)):
                    model(**{k: v for k, v in b.items() if k != "labels_"})
    finally:
        for h in handles:
            h.remove()
    return {k: (torch.cat(xs), torch.cat(ys)) for k, (xs, ys) in store.items()}


def _held_errors(mlps, held: dict) -> dict:
    """Per MLP on its projection's held-out data: relative squared error, share of zeros."""
    import torch

    per = {}
    with torch.no_grad():
        for k, m in mlps.items():
            x, y = held[k][0].float(), held[k][1]
            h = m.hidden(x)
            err = float((m.fc2(h) - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-12))
            per[k] = {"rel_error": err, "zeros": float((h == 0).float().mean())}
    return per


def run(art, cfg: AttentionMLPConfig, progress):
    from torch import nn

    from d2d import arch
    from d2d.measure.evaluate import Evaluator, batches_for
    from d2d.nn.policy import ALL
    from d2d.nn.projection import (
        attention_projection,
        projection_mlps,
        projection_paths,
        replace_projections,
    )
    from d2d.train import cached_loop, train

    model = art.model
    if projection_mlps(model):
        raise D2DError("this model's attention projections are already MLPs")
    fam = arch.detect(model)
    blocks = arch.blocks(model, fam)
    layers = parse_layers(cfg.layers, len(blocks))
    paths = projection_paths(fam, cfg.names())
    ev = Evaluator.of(model, art.tokenizer, cfg, "heldout", cfg.eval_tokens)
    q_before = ev.measure(model, ALL).quality
    targets = {
        f"{i}_{n}": attention_projection(fam, blocks[i], i, n, p) for i in layers for n, p in paths
    }
    c = cfg
    args = (model, art.tokenizer, c.data)
    train_b = batches_for(*args, "train", c.seq_len, c.tokens, c.seed, c.doc_split)
    held_b = batches_for(*args, "heldout", c.seq_len, c.heldout_tokens, c.seed, c.doc_split)
    progress("capturing projections", 0, 2)
    data = _capture(model, targets, train_b, cfg.bf16)
    held = _capture(model, targets, held_b, cfg.bf16)
    progress("capturing projections", 2, 2)
    d_out = {
        n: int(arch.read_linear(targets[f"{layers[0]}_{n}"], fam.conv1d)[0].shape[0])
        for n, _ in paths
    }
    hidden = {n: max(1, round(cfg.width * d_out[n])) for n, _ in paths}
    made = replace_projections(model, layers, [n for n, _ in paths], hidden)
    for mlp, w, b in made.values():
        mlp.start_from(w, b)
    mlps = nn.ModuleDict({f"{i}_{n}": mlp for (i, n), (mlp, _, _) in made.items()})
    start = _held_errors(mlps, held)  # the error training starts from (0 for an exact start)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in mlps.parameters():
        p.requires_grad_(True)
    task = _ProjectionTask(data, cfg.weight)
    loop = cached_loop(cfg, task.n_examples, clip=1.0)
    try:
        result = train(mlps, task, loop, progress, label="training projection MLPs")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    per = {
        k: {**v, "start_error": start[k]["rel_error"]} for k, v in _held_errors(mlps, held).items()
    }
    q_after = ev.measure(model, ALL).quality
    vals = list(per.values())
    metrics = {
        "metric": ev.metric,
        "quality_before": q_before,
        "quality_after": q_after,
        "mean_rel_error": sum(v["rel_error"] for v in vals) / len(vals),
        "mean_zeros": sum(v["zeros"] for v in vals) / len(vals),
        "per_projection": per,
        "hidden": hidden,
        "history": result.history[-1:],
    }
    return metrics, {"layers": layers, "hidden": hidden}


def replay(model, structure: dict) -> None:
    from d2d.nn.projection import replace_projections

    replace_projections(model, structure["layers"], list(structure["hidden"]), structure["hidden"])


def summary(record: dict) -> str:
    m = record["metrics"]
    return (
        f"{len(m['per_projection'])} projections as MLPs: mean held-out relative error "
        f"{m['mean_rel_error']:.3g}, {pct(m['mean_zeros'])} zero activations; {m['metric']} "
        f"{m['quality_before']:.4g} -> {m['quality_after']:.4g}"
    )


def view(record: dict) -> list:
    m = record["metrics"]
    t = Table(
        "attention projections as MLPs (held-out)",
        ["layer_projection", "relative error at start", "relative error", "zero activations"],
    )
    for k, v in m["per_projection"].items():
        s0 = v.get("start_error")
        t.add(k, "" if s0 is None else f"{s0:.3g}", f"{v['rel_error']:.3g}", pct(v["zeros"]))
    t.add("mean", "", f"{m['mean_rel_error']:.3g}", pct(m["mean_zeros"]), style="bold")
    return [t, summary(record)]


STAGE = Stage(
    "attention-mlp",
    AttentionMLPConfig,
    run,
    help="Replace attention projections by trained ReLU MLPs (D2DMoE on attention, step 1).",
    replay=replay,
    summary=summary,
    view=view,
)
