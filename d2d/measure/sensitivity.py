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

    def weights(self) -> dict:
        """Each layer's FLOPs with every expert run: allocate's weights (layers differ once
        attention projections are converted)."""
        return {i: m.expert_macs() * m.n_experts for i, m in self.moes.items()}

    @torch.no_grad()
    def table(
        self, rule: str, progress=None
    ) -> dict[int, tuple[np.ndarray, np.ndarray, list[float]]]:
        """Per layer: (fraction of experts run, estimated cost, rule parameter) over a grid."""
        out = {}
        for j, (i, m) in enumerate(self.moes.items()):
            if progress is not None:
                progress(f"{rule} cost table, layer", j, len(self.moes))
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
            out[i] = cost_table(fr, cost, params)
        return out


# tokens per forward/backward pass of the sensitivity measure: the backward keeps every block's
# activations, which on wide models outgrow the model itself (a 16-block 1B-class model held
# 9 GB beyond its 4 GB at 2,048 tokens a pass), so batches are cut into passes of this many
PASS_TOKENS = 512


def layer_sensitivity(
    model,
    ev,
    dense_sink: int,
    tokens: int,
    seed: int = 0,
    scores: str = "router",
    progress=None,
    pass_tokens: int = PASS_TOKENS,
) -> Sensitivity:
    """Forward/backward passes capturing each MoE layer's input and output gradient, at most
    `pass_tokens` tokens (at least one sequence) a pass (`progress(task, done, total)` after
    each batch). The Fisher samples are drawn per sequence, so the passes' split does not
    change the result."""
    from d2d.measure.evaluate import first_batches

    moes = moe_layers(model)
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
    chosen = first_batches(ev.batches, tokens)  # the batches the token budget takes
    row = 0  # index of the next sequence: it seeds that sequence's Fisher sample
    try:
        with routing(model, ALL):
            for j, b in enumerate(chosen):
                if progress is not None:
                    progress("sensitivity (forward and backward)", j, len(chosen))
                kw = {k: v for k, v in b.items() if not k.endswith("_")}
                n, t = kw["input_ids"].shape[:2]
                step = max(1, pass_tokens // max(1, t))
                for r0 in range(0, n, step):
                    part = {k: v[r0 : r0 + step] for k, v in kw.items()}
                    rows = range(row + r0, row + min(n, r0 + step))
                    with torch.enable_grad():
                        out = model(**part)
                        loss = _fisher_loss(ev.task, out, part, seed, rows)
                        ys = [outs[i][-1] for i in moes]
                        gs = torch.autograd.grad(loss, ys, allow_unused=True)
                    for i, y, g in zip(moes, ys, gs, strict=True):
                        grads[i].append(torch.zeros_like(y) if g is None else g.detach())
                    for i in moes:
                        outs[i].clear()
                row += n
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
    g = {i: torch.cat([t.reshape(-1, moes[i].d_out) for t in grads[i]]).float() for i in moes}
    return Sensitivity(moes, merged, g, dense_sink, scores)


def _row_generator(seed: int, row: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + row)


def _fisher_loss(task: str, out, kw, seed: int, rows) -> torch.Tensor:
    """A loss whose gradient is a sample of the empirical Fisher's: labels drawn from the model's
    own distribution (decoders, classifiers) or random output directions (encoders), each
    sequence from a generator seeded by its index `rows[j]`."""
    if task == "encoder":
        h = out.last_hidden_state
        r = torch.stack([torch.randn(h.shape[1:], generator=_row_generator(seed, i)) for i in rows])
        return (h * r.to(h.dtype) * kw["attention_mask"].unsqueeze(-1)).sum()
    logits = out.logits.float()
    probs = logits.detach().softmax(-1)
    flat = probs.reshape(probs.shape[0], -1, probs.shape[-1])  # [rows, positions, classes]
    y = torch.stack(
        [
            torch.multinomial(flat[j], 1, generator=_row_generator(seed, i)).squeeze(-1)
            for j, i in enumerate(rows)
        ]
    ).view(logits.shape[:-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")


def cost_table(fr, cost, params) -> tuple[np.ndarray, np.ndarray, list]:
    """One layer's entry of `allocate`'s table from its grid points: (fractions run, costs,
    rule parameters), most run first, the costs made non-decreasing as fewer run."""
    order = np.argsort(-np.asarray(fr, dtype=float), kind="stable")
    return (
        np.asarray(fr, dtype=float)[order],
        np.maximum.accumulate(np.asarray(cost, dtype=float)[order]),
        [params[j] for j in order],
    )


def allocate(table: dict, budget: float, weights: dict | None = None) -> dict[int, float]:
    """Per-layer rule parameters minimising the summed cost with mean fraction <= budget, the
    mean weighted by `weights` (each layer's FLOPs with every expert run; None: equal).

    Lagrangian relaxation: for a price lam on compute each layer independently picks the grid
    point minimising cost + lam * weight * fraction; lam is bisected until the budget is met.
    """
    layers = list(table)
    w = {i: 1.0 for i in layers} if weights is None else {i: float(weights[i]) for i in layers}
    total = sum(w.values())
    w = {i: v * len(layers) / total for i, v in w.items()}  # mean 1: prices as before

    def pick(lam):
        return {i: int(np.argmin(table[i][1] + lam * w[i] * table[i][0])) for i in layers}

    def frac(choice):
        return float(np.mean([w[i] * table[i][0][choice[i]] for i in layers]))

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
    params = {i: table[i][2][choice[i]] for i in layers}  # a number, or a tuple of them
    return {i: p if isinstance(p, tuple) else float(p) for i, p in params.items()}


# the grids of the exact-magnitude rule: shares of the FFN input gate and up read, and shares
# of the neurons (experts) whose down projection runs
INPUT_KEEP = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
UNIT_KEEP = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05)


def quantiles(v: torch.Tensor, qs, cap: int = 2**20) -> list[float]:
    """The qs-quantiles of a tensor's values (of a seeded subsample of `cap` values above that),
    from one sort."""
    v = v.flatten().float()
    if v.numel() > cap:
        g = torch.Generator().manual_seed(0)
        v = v[torch.randint(v.numel(), (cap,), generator=g)]
    if not v.numel():
        return [0.0 for _ in qs]
    return torch.quantile(v, torch.tensor(list(qs), dtype=v.dtype)).tolist()


def quantile(v: torch.Tensor, q: float) -> float:
    return quantiles(v, [q])[0]


class LayerSample:
    """One MoE layer's captured calibration tokens: inputs, gradients, which tokens count."""

    def __init__(self, m, x, pos, tm, g, sink: int):
        self.m, self.x, self.g = m, x, g
        n = x.shape[0]
        self.real = tm if tm is not None else torch.ones(n, dtype=torch.bool)
        none = torch.zeros(n, dtype=torch.bool)
        self.sink = (pos < sink) if (pos is not None and sink > 0) else none
        self.free = self.real & ~self.sink  # the tokens a rule may change

    def kept_input(self, t_x: float) -> tuple[torch.Tensor, float]:
        """The input with |x| < t_x zeroed (sink tokens whole), and the kept share."""
        if t_x <= 0:
            return self.x, 1.0
        kept = (self.x.abs() >= t_x) | self.sink[:, None]
        return self.x * kept, float(kept[self.real].float().mean())


def _sample(sens, i) -> LayerSample:
    x, pos, tm = sens.caps[i]
    return LayerSample(sens.moes[i], x, pos, tm, sens.grads[i], sens.sink)


@torch.no_grad()
def magnitude_table(
    sens, progress=None
) -> dict[int, tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]]:
    """Per layer, for the exact-magnitude rule (scores "magnitude" with input thresholds):
    (FFN FLOPs fraction, estimated cost, (input threshold, unit threshold)) over the grid of
    INPUT_KEEP x UNIT_KEEP. Each neuron's effect on the loss direction g is h_j (W_down^T g)_j,
    so the cost of every grid point needs only element-wise work."""
    out = {}
    for j, (i, m) in enumerate(sens.moes.items()):
        if progress is not None:
            progress("magnitude cost table, layer", j, len(sens.moes))
        s = _sample(sens, i)
        gw = s.g @ m.w_out.float().t()  # [N, f]
        h = m.hidden(s.x)
        base = (h * gw).sum(-1)
        wn = m.neuron_weights().float()
        d, f = m.d_model, m.n_experts * m.expert_size
        gate_up, down = (2 if m.gated else 1) * d * f, m.d_out * f
        ax = s.x.abs()[s.free]
        fr, cost, params = [], [], []
        t_xs = quantiles(ax, [1 - px for px in INPUT_KEEP])
        for px, t_x in zip(INPUT_KEEP, t_xs, strict=True):
            t_x = 0.0 if px >= 1 else t_x
            xin, kx = s.kept_input(t_x)
            hx = h if t_x <= 0 else m.hidden(xin)
            mag = m.block_norm(hx * wn)
            t_hs = quantiles(mag[s.free], [1 - pk for pk in UNIT_KEEP])
            for pk, t_h in zip(UNIT_KEEP, t_hs, strict=True):
                t_h = 0.0 if pk >= 1 else t_h
                mask = (
                    rule_mask("threshold", mag, t_h)
                    if t_h > 0
                    else torch.ones_like(mag, dtype=bool)
                )
                mask |= s.sink[:, None]
                hm = (hx.view(-1, m.n_experts, m.expert_size) * mask.unsqueeze(-1)).view(-1, f)
                c = (base - (hm * gw).sum(-1))[s.real].pow(2).sum()
                k = float(mask[s.real].float().mean())
                fr.append((kx * gate_up + k * down) / (gate_up + down))
                cost.append(float(c))
                params.append((t_x, t_h))
        out[i] = cost_table(fr, cost, params)
    return out


def unit_share(m, budget: float, input_keep: float) -> float | None:
    """The share of units whose down projection fits in an FFN FLOPs `budget` once gate and up
    read the share `input_keep` of the input: (budget x (gate_up + down) - input_keep x gate_up)
    / down for layer `m`; None where nothing or more than every unit would fit."""
    f = m.n_experts * m.expert_size
    gate_up, down = (2 if m.gated else 1) * m.d_model * f, m.d_out * f
    k = (budget * (gate_up + down) - input_keep * gate_up) / down
    return k if 0.0 < k <= 1.0 + 1e-9 else None


@torch.no_grad()
def split_thresholds(
    sens, input_keep: float, unit_keep: float | dict, weighted: bool = False
) -> tuple[dict[int, float], dict[int, float]]:
    """Thresholds that keep the share `input_keep` of every layer's FFN input (gate and up read
    those entries' weights) and then the share `unit_keep` (one for all, or per layer) of the
    units by their activation on the kept input (|h|; `weighted`: |h| x the norm of the unit's
    down row, the exact-magnitude rule's score). Returns (input, unit) thresholds per layer."""
    t_in, t_unit = {}, {}
    for i, m in sens.moes.items():
        s = _sample(sens, i)
        keep = unit_keep[i] if isinstance(unit_keep, dict) else unit_keep
        t_in[i] = quantile(s.x.abs()[s.free], 1 - input_keep) if input_keep < 1 else 0.0
        h = m.hidden(s.kept_input(t_in[i])[0]).float()
        if weighted:
            h = h * m.neuron_weights().float()
        act = m.block_norm(h)
        t_unit[i] = quantile(act[s.free], 1 - keep) if keep < 1 else 0.0
    return t_in, t_unit


def teal_thresholds(sens, keep: float) -> tuple[dict[int, float], dict[int, float]]:
    """TEAL-style thresholds at one share `keep` for every matrix of every layer: the input's
    |x| quantile (gate and up), then |h|'s on the kept input (down). Returns (input, unit)."""
    return split_thresholds(sens, keep, keep)


@torch.no_grad()
def cats_thresholds(sens, keep: float) -> dict[int, float]:
    """CATS-style thresholds: per layer the quantile of |act(gate)| that keeps `keep` of the
    units (the gate itself is computed in full)."""
    out = {}
    for i, m in sens.moes.items():
        if not m.gated:  # an attention projection's MLP: no gate to read
            continue
        s = _sample(sens, i)
        ga = m.block_norm(m.act(torch.nn.functional.linear(s.x, m.w_gate, m.b_gate)).float())
        out[i] = quantile(ga[s.free], 1 - keep) if keep < 1 else 0.0
    return out


# --- Mixture-of-Depths: which blocks to route --------------------------------------------


def _keep_top(update: torch.Tensor, capacity: float, positions, sink: int) -> torch.Tensor:
    """[B, T, 1] 1 for the tokens of each sequence whose update has the largest norm (a share
    `capacity` of them, at least one) and for the sink positions, else 0."""
    norms = update.float().norm(dim=-1)  # [B, T]
    k = max(1, round(capacity * norms.shape[1]))
    keep = torch.zeros_like(norms, dtype=torch.bool)
    keep.scatter_(1, norms.topk(k, dim=1).indices, True)
    if sink and positions is not None:
        keep |= positions < sink
    return keep[..., None].to(update.dtype)


@torch.no_grad()
def depth_sensitivity(
    model,
    batches: list[dict],
    layers: list[int],
    capacity: float,
    skip: str,
    sink: int,
    progress=None,
) -> dict[int, float]:
    """Per candidate block: how much the held-in next-token loss rises when that block alone
    skips, for all but a share `capacity` of each sequence's tokens, what `skip` names (the
    whole block, its attention or its MLP). The tokens kept are those whose update is largest
    (the choice a router can at best learn), so the figure is the block's cost of skipping, not
    a router's. Skipped tokens stay visible to later ones as keys here: exactly what a block with
    keep_kv does, an upper bound on what one without it keeps. Returns {block: loss increase in
    nats}."""
    from d2d import arch
    from d2d.train import next_token_loss

    blocks = arch.blocks(model, arch.detect(model))

    def loss() -> float:
        total, n = 0.0, 0
        for b in batches:
            ids = b["input_ids"]
            total += float(next_token_loss(model(**b).logits, ids)) * ids.numel()
            n += ids.numel()
        return total / max(1, n)

    positions = {}

    def record(module, args, kwargs):  # the block's position ids, for the sink
        positions["p"] = kwargs.get("position_ids")

    def on_update(module, args, out):  # attention / MLP: keep the largest updates only
        y = out[0] if isinstance(out, tuple) else out
        y = y * _keep_top(y, capacity, positions.get("p"), sink)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def on_block(module, args, kwargs, out):  # the whole block: the same on its residual update
        x = args[0] if args else kwargs["hidden_states"]
        y = out[0] if isinstance(out, tuple) else out
        y = x + (y - x) * _keep_top(y - x, capacity, kwargs.get("position_ids"), sink)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    base = loss()
    out = {}
    for i in layers:
        blk = blocks[i]
        if skip == "block":
            hooks = [blk.register_forward_hook(on_block, with_kwargs=True)]
        else:
            sub = blk.self_attn if skip == "attention" else blk.mlp
            hooks = [
                blk.register_forward_pre_hook(record, with_kwargs=True),
                sub.register_forward_hook(on_update),
            ]
        try:
            out[i] = loss() - base
        finally:
            for h in hooks:
                h.remove()
        if progress is not None:
            progress("block sensitivity", len(out), len(layers), block=i)
    return out
