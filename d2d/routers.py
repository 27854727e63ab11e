"""Router training (D2DMoE): per MoE layer, a small MLP regresses each expert's output L2 norm.

FFN inputs and the true expert output norms are captured once from the converted model (every
expert executed, base weights frozen); each layer's router is then trained by MSE on that
cache, on the shared training loop, and judged on held-out tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from d2d.device import use_bf16
from d2d.errors import D2DError
from d2d.measure.evaluate import batches_for
from d2d.nn.moe import MoEFFN, Router
from d2d.nn.policy import ALL
from d2d.nn.routing import routing
from d2d.nn.structure import attach_routers, moe_layers
from d2d.progress import Progress, null_progress
from d2d.train import cached_loop, train


@torch.no_grad()
def capture(
    model,
    moes: dict[int, MoEFFN],
    batches,
    bf16: bool,
    progress: Progress,
    task: str = "capturing FFN inputs",
    skip_positions: int = 0,
):
    """Run the model with every expert; return {layer: (inputs [N, d], norms [N, E])}."""
    store = {i: ([], []) for i in moes}

    def make(i):
        def cap(x, h):
            keep = torch.ones(x.shape[0], dtype=torch.bool)
            tm, pos = moes[i].context.token_mask, moes[i].context.positions
            if tm is not None and tm.numel() == x.shape[0]:  # padding is not routed data
                keep &= tm.reshape(-1).bool()
            if skip_positions and pos is not None and pos.numel() == x.shape[0]:
                keep &= pos.reshape(-1) >= skip_positions
            x, h = x[keep], h[keep]
            store[i][0].append(x.detach().to(torch.bfloat16))
            store[i][1].append(moes[i].expert_norms(h.detach().float()))

        return cap

    for i, m in moes.items():
        m.capture = make(i)
    try:
        with routing(model, ALL):
            for j, b in enumerate(batches):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16(bf16)):
                    model(**b)
                progress(task, j + 1, len(batches))
    finally:
        for m in moes.values():
            m.capture = None
    return {i: (torch.cat(xs), torch.cat(ys)) for i, (xs, ys) in store.items()}


def router_metrics(pred: torch.Tensor, true: torch.Tensor) -> dict:
    """R^2 over token-expert pairs, and the share of the true output norm that the router's
    top-25% experts capture relative to the oracle's top-25%."""
    sse = ((pred - true) ** 2).sum()
    sst = ((true - true.mean(0, keepdim=True)) ** 2).sum().clamp_min(1e-12)
    k = max(1, true.shape[1] // 4)
    got = true.gather(1, pred.topk(k, dim=1).indices).sum()
    best = true.topk(k, dim=1).values.sum().clamp_min(1e-12)
    return {
        "r2": float(1 - sse / sst),
        "capture_25": float(got / best),
        "mse": float(sse / true.numel()),
    }


ROUTER_LOSSES = ("mse", "log")
LOG_FLOOR = 0.01  # the log loss's floor, as a share of the layer's mean expert norm


def router_loss(pred: torch.Tensor, true: torch.Tensor, kind: str, eps: float | None = None):
    """mse: squared error of the norms (large norms dominate); log: squared error of
    log(norm + eps), which weighs every expert's relative error alike, so the ranking among
    the many small norms that decide the middle of the budget range is learned too."""
    if kind == "log":
        return F.mse_loss(torch.log(pred + eps), torch.log(true + eps))
    return F.mse_loss(pred, true)


@dataclass
class _RoutersTask:
    """Regression of expert output norms from FFN inputs, every layer at once, for the shared
    training loop. Routers share no parameters, so the summed loss trains each one exactly as
    its own MSE would."""

    data: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (inputs [N, d], norms [N, E])
    kind: str = "mse"  # ROUTER_LOSSES
    eps: dict[str, float] | None = None  # layer -> the log loss's floor (log kind)

    @property
    def n_examples(self) -> int:
        return min(int(x.shape[0]) for x, _ in self.data.values())

    def batch(self, indices: torch.Tensor) -> dict:
        out = {}
        for i, (x, y) in self.data.items():
            out[f"x{i}"], out[f"y{i}"] = x[indices].float(), y[indices]
        return out

    def loss(self, routers, batch, step):
        losses = {
            i: router_loss(r(batch[f"x{i}"]), batch[f"y{i}"], self.kind, (self.eps or {}).get(i))
            for i, r in routers.items()
        }
        total = torch.stack(list(losses.values())).sum()
        logs = {f"loss_{i}": float(v.detach()) for i, v in losses.items()}
        logs["loss"] = float(total.detach()) / len(losses)
        return total, logs

    def evaluate(self, routers) -> dict:
        return {}


def train_router_set(
    routers: dict[str, Router],
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    cfg,
    progress: Progress = null_progress,
) -> dict[str, float]:
    """Fit every router by MSE on its layer's cache, on the shared training loop (AdamW,
    cosine decay, no warm-up, fp32). Returns each router's last training loss."""
    for i, r in routers.items():
        with torch.no_grad():  # start at the mean norm of each expert
            m = data[i][1].mean(0).clamp_min(1e-4)
            r.fc2.bias.copy_(m + torch.log(-torch.expm1(-m)))  # softplus^-1, overflow-free
    kind = getattr(cfg, "loss", "mse")
    eps = {i: LOG_FLOOR * float(y.mean()) + 1e-12 for i, (_, y) in data.items()}
    task = _RoutersTask(data, kind, eps)
    loop = cached_loop(cfg, task.n_examples)
    result = train(nn.ModuleDict(routers), task, loop, progress, label="training routers")
    last = result.history[-1]
    return {i: last[f"loss_{i}"] for i in routers}


def train_routers(model, tokenizer, cfg, progress: Progress = null_progress) -> dict:
    """Attach and train a router for every MoE layer of `model`. Returns metrics."""
    moes = moe_layers(model)
    if not moes:
        raise D2DError("this model has no MoE layers: run d2d convert first")
    torch.manual_seed(cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    c = cfg
    train_b = batches_for(
        model, tokenizer, c.data, "train", c.seq_len, c.tokens, c.seed, c.doc_split
    )
    held_b = batches_for(
        model, tokenizer, c.data, "heldout", c.seq_len, c.heldout_tokens, c.seed, c.doc_split
    )
    train = capture(
        model, moes, train_b, cfg.bf16, progress, "capturing FFN inputs (train)", cfg.skip_positions
    )
    held = capture(
        model,
        moes,
        held_b,
        cfg.bf16,
        progress,
        "capturing FFN inputs (held-out)",
        cfg.skip_positions,
    )
    attach_routers(moes, cfg.hidden, cfg.attention_hidden)
    routers = {str(i): m.router for i, m in moes.items()}
    finals = train_router_set(routers, {str(i): v for i, v in train.items()}, cfg, progress)
    del train
    per_layer = {}
    for i, m in moes.items():
        with torch.no_grad():
            hx, hy = held[i]
            met = router_metrics(m.router(hx.float()), hy)
        per_layer[str(i)] = {"train_mse": finals[str(i)], **met}
    for p in model.parameters():
        p.requires_grad_(True)
    vals = list(per_layer.values())
    return {
        "train_tokens": int(sum(b["input_ids"].numel() for b in train_b)),
        "heldout_tokens": int(sum(b["input_ids"].numel() for b in held_b)),
        "mean_r2": sum(v["r2"] for v in vals) / len(vals),
        "mean_capture_25": sum(v["capture_25"] for v in vals) / len(vals),
        "per_layer": per_layer,
    }
