"""`calibrate`: sweep the dynamic-k threshold, measure cost and quality, pick an operating point.

Two selection rules are calibrated side by side on the calibration split:

* global tau: one threshold for every layer (D2DMoE's rule);
* per-layer tau: a threshold per layer, allocated where it costs least. Each layer's cost of a
  threshold is estimated from one forward/backward pass: with g the gradient of a sampled-label
  log-likelihood (its outer product is the Fisher information) at the layer's output and dy the
  change of the layer's output when experts are skipped, sum_t (g_t . dy_t)^2 approximates twice
  the KL divergence the change causes. A Lagrangian allocation then picks per-layer thresholds
  for each FLOPs budget, and every allocation is measured for real before it can be chosen.

Optionally the first `dense_sink` positions of each sequence run every expert: on decoder LMs
the first token is an attention sink whose FFN output is large and easily damaged.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from d2d.configs import DEFAULT_BUDGETS as DEFAULT_BUDGETS_SPEC
from d2d.configs import CalibrateConfig, parse_budgets, parse_rules, parse_taus
from d2d.errors import D2DError
from d2d.evaluate import Evaluator, Measurement, quality_drop
from d2d.moe.convert import moe_layers
from d2d.moe.routing import routing
from d2d.progress import Progress, null_progress

LAYER_GRID = np.array(
    [
        0,
        0.002,
        0.005,
        0.01,
        0.015,
        0.02,
        0.03,
        0.04,
        0.05,
        0.075,
        0.1,
        0.125,
        0.15,
        0.2,
        0.25,
        0.3,
        0.4,
        0.5,
        0.7,
        1.0,
    ]
)
DEFAULT_BUDGETS = tuple(parse_budgets(DEFAULT_BUDGETS_SPEC))


def _row(rule: str, policy: dict, m: Measurement, dense_q: float, metric: str) -> dict:
    return {
        "rule": rule,
        "policy": policy,
        "ffn_fraction": m.ffn_fraction,
        "model_fraction": m.model_fraction,
        "quality": m.quality,
        "drop": quality_drop(metric, m.quality, dense_q),
        "layer_fractions": m.layer_fractions,
    }


FRACTION_GRID = np.array(
    [
        1.0,
        0.97,
        0.94,
        0.9,
        0.85,
        0.8,
        0.75,
        0.7,
        0.65,
        0.6,
        0.55,
        0.5,
        0.45,
        0.4,
        0.35,
        0.3,
        0.25,
        0.2,
        0.15,
        0.1,
    ]
)
QUANTILE_GRID = np.array(
    [
        0.0,
        0.01,
        0.02,
        0.04,
        0.06,
        0.08,
        0.1,
        0.13,
        0.16,
        0.2,
        0.25,
        0.3,
        0.35,
        0.4,
        0.45,
        0.5,
        0.6,
        0.7,
        0.8,
        0.9,
    ]
)


class Sensitivity:
    """FFN inputs and output gradients captured once; per-layer cost tables for any rule."""

    def __init__(self, moes, caps, grads, dense_sink: int, scores: str):
        self.moes, self.caps, self.grads, self.sink = moes, caps, grads, dense_sink
        self.scores = scores  # "router" or "oracle": what the tables rank experts by

    def _grid(self, rule: str, scores: torch.Tensor, real: torch.Tensor | None) -> list[float]:
        if rule == "tau":
            return [float(t) for t in LAYER_GRID]
        if rule == "topk":
            return [float(f) for f in FRACTION_GRID]
        vals = scores[real] if real is not None else scores
        vals = vals.flatten().float()
        if vals.numel() > 2**20:
            vals = vals[torch.randperm(vals.numel())[: 2**20]]
        qs = torch.tensor(QUANTILE_GRID[1:], dtype=vals.dtype)
        return [0.0] + [float(v) for v in torch.quantile(vals, qs)]

    @torch.no_grad()
    def table(self, rule: str) -> dict[int, tuple[np.ndarray, np.ndarray, list[float]]]:
        """Per layer: (fraction of experts run, estimated cost, rule parameter) over a grid."""
        from d2d.moe.layer import rule_mask

        out = {}
        for i, m in self.moes.items():
            x, pos, tm = self.caps[i]
            g = self.grads[i]
            h = m.hidden(x)
            scores = m.router(x) if self.scores == "router" else m.expert_norms(h)
            E, s = m.n_experts, m.expert_size
            keep_all = (pos < self.sink) if (pos is not None and self.sink > 0) else None
            params = self._grid(rule, scores, tm)
            fr, cost = [], []
            for p in params:
                if rule == "topk":
                    mask = rule_mask("topk", scores, k=max(1, round(p * E)))
                else:
                    mask = rule_mask(rule, scores, tau=p, threshold=p)
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
    model, ev: Evaluator, dense_sink: int, tokens: int, seed: int = 0, scores: str = "router"
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
        with routing(model, {"rule": "all"}):
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


def layer_policy(rule: str, params: dict[int, float], dense_sink: int, **extra) -> dict:
    key = {"tau": "taus", "topk": "fractions", "threshold": "thresholds"}[rule]
    return {
        "rule": rule,
        key: {str(k): v for k, v in params.items()},
        "dense_positions": dense_sink,
        **extra,
    }


def choose(rows: list[dict], cfg: CalibrateConfig) -> int:
    if cfg.target_flops is not None:
        ok = [j for j, r in enumerate(rows) if r["ffn_fraction"] <= cfg.target_flops + 0.01]
        if not ok:
            raise D2DError(
                f"no calibrated point reaches {cfg.target_flops:.0%} of the FFN FLOPs: "
                "add larger taus to --taus or raise --target-flops"
            )
        return min(ok, key=lambda j: rows[j]["drop"])
    limit = 0.02 if cfg.max_quality_drop is None else cfg.max_quality_drop
    ok = [j for j, r in enumerate(rows) if r["drop"] <= limit]
    return min(ok, key=lambda j: (rows[j]["ffn_fraction"], rows[j]["drop"]))


def calibrate(model, tokenizer, cfg: CalibrateConfig, progress: Progress = null_progress) -> dict:
    """Sweep taus on the calibration split; returns the calibration record (table + choice)."""
    moes = moe_layers(model)
    if not moes or any(m.router is None for m in moes.values()):
        raise D2DError("calibrate needs routers: run d2d train-routers first")
    ev = Evaluator(model, tokenizer, cfg.data, "calib", cfg.seq_len, cfg.tokens, cfg.seed, cfg.bf16)
    dense = ev.measure(model, {"rule": "all"}, progress, "dense reference")
    rows = [_row("dense", {"rule": "all"}, dense, dense.quality, ev.metric)]
    measured = [dense]  # parallel to rows: the chosen one's expert usage goes into the record
    sink = cfg.dense_sink
    taus = parse_taus(cfg.taus)
    for j, tau in enumerate(taus):
        pol = {"rule": "tau", "tau": tau, "dense_positions": sink}
        measured.append(ev.measure(model, pol))
        rows.append(_row("global-tau", pol, measured[-1], dense.quality, ev.metric))
        progress("global tau sweep", j + 1, len(taus), tau=tau)
    if cfg.per_layer:
        sens = layer_sensitivity(model, ev, sink, cfg.sensitivity_tokens, cfg.seed)
        budgets = set(parse_budgets(cfg.budgets))
        if cfg.target_flops:
            budgets.add(cfg.target_flops)
        budgets = sorted(budgets, reverse=True)
        for rule in parse_rules(cfg.layer_rules):
            table = sens.table(rule)
            for j, b in enumerate(budgets):
                pol = layer_policy(rule, allocate(table, b), sink)
                measured.append(ev.measure(model, pol))
                row = _row(f"per-layer-{rule}", pol, measured[-1], dense.quality, ev.metric)
                row["budget"] = b
                rows.append(row)
                progress(f"per-layer {rule}", j + 1, len(budgets), budget=b)
    pick = choose(rows, cfg)
    return {
        "split": "calib",
        "tokens": ev.tokens,
        "metric": ev.metric,
        "dense_quality": dense.quality,
        "rows": rows,
        "choice": pick,
        # how often each expert ran, and how many experts each token ran, at the choice
        "usage": measured[pick].usage,
        "k_hist": measured[pick].k_hist,
        "config": asdict(cfg),
    }
