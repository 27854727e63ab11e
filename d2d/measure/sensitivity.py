"""Per-layer sensitivity of a converted model to skipped experts, and budget allocation.

Each layer's cost of a routing parameter is estimated from one forward/backward pass: with g
the gradient of a sampled-label log-likelihood (its outer product is the Fisher information) at
the layer's output and dy the change of the layer's output when experts are skipped,
sum_t (g_t . dy_t)^2 approximates twice the KL divergence the change causes. `allocate` then
picks per-layer parameters for a FLOPs budget by Lagrangian relaxation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from d2d.nn.policy import ALL, RULES, rule_mask
from d2d.nn.routing import routing
from d2d.nn.structure import moe_layers


class Sensitivity:
    """FFN inputs and output gradients captured once; per-layer cost tables for any rule."""

    def __init__(self, moes, caps, grads, dense_sink: int, scores: str):
        self.moes, self.caps, self.grads, self.sink = moes, caps, grads, dense_sink
        self.scores = scores  # "router" or "oracle": what the tables rank experts by

    @torch.no_grad()
    def table(self, rule: str) -> dict[int, tuple[np.ndarray, np.ndarray, list[float]]]:
        """Per layer: (fraction of experts run, estimated cost, rule parameter) over a grid."""
        out = {}
        for i, m in self.moes.items():
            x, pos, tm = self.caps[i]
            g = self.grads[i]
            h = m.hidden(x)
            scores = m.router(x) if self.scores == "router" else m.expert_norms(h)
            E, s = m.n_experts, m.expert_size
            keep_all = (pos < self.sink) if (pos is not None and self.sink > 0) else None
            params = RULES[rule].grid(scores[tm] if tm is not None else scores)
            fr, cost = [], []
            for p in params:
                mask = rule_mask(rule, scores, p)
                if keep_all is not None:
                    mask |= keep_all[:, None]
                dropped = (h.view(-1, E, s) * (~mask).unsqueeze(-1)).view(-1, E * s)
                c = ((g * (dropped @ m.w_out.float())).sum(-1)) ** 2
                if tm is not None:
                    c, mask = c[tm], mask[tm]
                fr.append(float(mask.float().mean()))
                cost.append(float(c.sum()))
            order = np.argsort(-np.array(fr), kind="stable")  # dense first
            fr_a = np.array(fr)[order]
            out[i] = (
                fr_a,
                np.maximum.accumulate(np.array(cost)[order]),
                [params[j] for j in order],
            )
        return out


def layer_sensitivity(
    model, ev, dense_sink: int, tokens: int, seed: int = 0, scores: str = "router"
) -> Sensitivity:
    """One forward/backward pass capturing each MoE layer's input and output gradient."""
    moes = moe_layers(model)
    gen = torch.Generator().manual_seed(seed)
    caps: dict[int, list] = {i: [] for i in moes}
    outs: dict[int, list] = {i: [] for i in moes}

    def make(i):
        def cap(x, h):
            pos = moes[i].context.positions
            tm = moes[i].context.token_mask
            caps[i].append(
                (
                    x.detach().float(),
                    None if pos is None else pos.reshape(-1),
                    None if tm is None else tm.reshape(-1).bool(),
                )
            )

        return cap

    hooks = []
    for i, m in moes.items():
        m.capture = make(i)
        hooks.append(m.register_forward_hook(lambda mod, a, y, i=i: outs[i].append(y)))
    grads: dict[int, list] = {i: [] for i in moes}
    used = 0
    try:
        with routing(model, ALL):
            for b in ev.batches:
                if used >= tokens:
                    break
                used += int(b["input_ids"].numel())
                kw = {k: v for k, v in b.items() if not k.endswith("_")}
                with torch.enable_grad():
                    out = model(**kw)
                    loss = _fisher_loss(ev.task, out, kw, gen)
                    ys = [outs[i][-1] for i in moes]
                    gs = torch.autograd.grad(loss, ys, allow_unused=True)
                for i, y, g in zip(moes, ys, gs, strict=True):
                    grads[i].append(torch.zeros_like(y) if g is None else g.detach())
                for i in moes:
                    outs[i].clear()
    finally:
        for m in moes.values():
            m.capture = None
        for h in hooks:
            h.remove()

    def cat(parts):
        return torch.cat(parts) if parts and parts[0] is not None else None

    merged = {
        i: (
            torch.cat([c[0] for c in caps[i]]),
            cat([c[1] for c in caps[i]]),
            cat([c[2] for c in caps[i]]),
        )
        for i in moes
    }
    g = {i: torch.cat([t.reshape(-1, moes[i].d_model) for t in grads[i]]).float() for i in moes}
    return Sensitivity(moes, merged, g, dense_sink, scores)


def _fisher_loss(task: str, out, kw, gen: torch.Generator) -> torch.Tensor:
    if task == "encoder":
        h = out.last_hidden_state
        r = torch.randn(h.shape, generator=gen).to(h.dtype)
        return (h * r * kw["attention_mask"].unsqueeze(-1)).sum()
    logits = out.logits.float()
    probs = logits.detach().softmax(-1).reshape(-1, logits.shape[-1])
    y = torch.multinomial(probs, 1, generator=gen).view(logits.shape[:-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")


def allocate(table: dict, budget: float) -> dict[int, float]:
    """Per-layer rule parameters minimising the summed cost with mean fraction <= budget.

    Lagrangian relaxation: for a price lam on compute each layer independently picks the grid
    point minimising cost + lam * fraction; lam is bisected until the budget is met.
    """
    layers = list(table)

    def pick(lam):
        return {i: int(np.argmin(table[i][1] + lam * table[i][0])) for i in layers}

    def frac(choice):
        return float(np.mean([table[i][0][choice[i]] for i in layers]))

    if frac(pick(0.0)) <= budget:
        choice = pick(0.0)
    else:
        scale = max(max(table[i][1].max() for i in layers), 1e-30)
        lo, hi = 0.0, scale
        while frac(pick(hi)) > budget and hi < scale * 1e12:
            hi *= 10
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if frac(pick(mid)) > budget else (lo, mid)
        choice = pick(hi)
    return {i: float(table[i][2][choice[i]]) for i in layers}
