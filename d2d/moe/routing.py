"""Routing policies: which experts run. A policy is a small JSON-able dict.

    {"rule": "tau", "scores": "router", "tau": 0.1, "dense_positions": 1}
    {"rule": "tau", "taus": {"0": 0.02, "1": 0.1, ...}, ...}   per-layer thresholds
    {"rule": "topk", "fraction": 0.5}                            static top-k
    {"rule": "topk", "fractions": {"0": 0.9, ...}}               per-layer top-k
    {"rule": "threshold", "thresholds": {"0": 0.13, ...}}        per-layer absolute threshold
    {"rule": "all"}                                              every expert (== dense)

A policy may also say how Mixture-of-Depths blocks route: "depth": "topk", "causal" or "dense"
(the rule "all" implies "dense"; otherwise the blocks keep their mode).

Dynamic-k (D2DMoE): a token runs expert i iff its predicted norm >= tau x the largest predicted
norm for that token. tau = 0 runs every expert; tau = 1 runs only the top one. (The reference
implementation writes the threshold as 1 - tau; d2d uses tau directly.)
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from d2d.errors import D2DError
from d2d.moe.layer import LayerStats, MoEFFN

RULES = ("all", "tau", "topk", "threshold")


def validate(policy: dict) -> dict:
    rule = policy.get("rule", "tau")
    if rule not in RULES:
        raise D2DError(f"unknown routing rule {rule!r}: use one of {', '.join(RULES)}")
    if policy.get("scores", "router") not in ("router", "oracle"):
        raise D2DError("routing scores must be 'router' or 'oracle'")
    taus = [policy.get("tau", 0.0)] + list((policy.get("taus") or {}).values())
    for t in taus:
        if not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise D2DError(f"tau must be a number in [0, 1], got {t!r}")
    for frac in [policy.get("fraction", 1.0)] + list((policy.get("fractions") or {}).values()):
        if not isinstance(frac, (int, float)) or not 0.0 < frac <= 1.0:
            raise D2DError(f"top-k fraction must be in (0, 1], got {frac!r}")
    for t in (policy.get("thresholds") or {}).values():
        if not isinstance(t, (int, float)) or t < 0:
            raise D2DError(f"thresholds must be numbers >= 0, got {t!r}")
    from d2d.mod import MODES

    if policy.get("depth") not in (None, *MODES):
        raise D2DError(f"depth routing must be one of {', '.join(MODES)}, got {policy['depth']!r}")
    return policy


def global_tau(tau: float, chosen: dict | None = None) -> dict:
    """A global-tau policy that keeps the chosen routing's dense sink (if any)."""
    return {"rule": "tau", "tau": tau, "dense_positions": (chosen or {}).get("dense_positions", 0)}


def describe(policy: dict | None) -> str:
    """A short human label for a policy: "tau 0.1", "per-layer threshold", "all experts"."""
    if not policy:
        return "none chosen"
    if policy.get("rule") == "all":
        return "all experts"
    for key, name in (("taus", "tau"), ("thresholds", "threshold"), ("fractions", "top-k")):
        if policy.get(key):
            return f"per-layer {name}"
    if policy.get("rule") == "topk":
        return f"top-k {policy.get('fraction', 1):.0%}"
    return f"tau {policy.get('tau', 0):g}"


def describe_row(row: dict) -> str:
    """The label of a calibration row: "dense (all experts)", "global tau 0.1",
    "per-layer threshold @50%"."""
    if row["rule"] == "dense":
        return "dense (all experts)"
    if "budget" in row:
        return f"{describe(row['policy'])} @{100 * row['budget']:.0f}%"
    return ("global " if row["rule"] == "global-tau" else "") + describe(row["policy"])


def _moes(model: nn.Module) -> dict[int, MoEFFN]:
    from d2d.moe.convert import moe_layers

    return moe_layers(model)


def apply_routing(model: nn.Module, policy: dict) -> None:
    validate(policy)
    moes = _moes(model)
    taus = {int(k): v for k, v in (policy.get("taus") or {}).items()}
    fracs = {int(k): v for k, v in (policy.get("fractions") or {}).items()}
    thresholds = {int(k): v for k, v in (policy.get("thresholds") or {}).items()}
    for i, m in moes.items():
        m.rule = policy.get("rule", "tau")
        m.scores = policy.get("scores", "router")
        m.tau = float(taus.get(i, policy.get("tau", 0.0)))
        m.k = max(1, round(fracs.get(i, policy.get("fraction", 1.0)) * m.n_experts))
        m.threshold = float(thresholds.get(i, 0.0))
        m.dense_positions = int(policy.get("dense_positions", 0))
        if m.scores == "router" and m.rule != "all" and m.router is None:
            raise D2DError("this artifact has no routers: run d2d train-routers first")


@contextmanager
def routing(model: nn.Module, policy: dict):
    """Temporarily route with `policy`; restores the previous settings afterwards."""
    from d2d.mod import depth

    moes = _moes(model)
    saved = {
        i: (m.rule, m.scores, m.tau, m.k, m.threshold, m.dense_positions) for i, m in moes.items()
    }
    mode = policy.get("depth", "dense" if policy.get("rule") == "all" else None)
    try:
        apply_routing(model, policy)
        with depth(model, mode):
            yield
    finally:
        for i, m in moes.items():
            m.rule, m.scores, m.tau, m.k, m.threshold, m.dense_positions = saved[i]


EXECUTIONS = ("sparse", "masked")


@contextmanager
def execution(model: nn.Module, mode: str):
    """Run the MoE layers with `mode` during the block: "sparse" (only the selected experts,
    where the fast kernels apply) or "masked" (every expert computed, unselected ones zeroed:
    the reference)."""
    if mode not in EXECUTIONS:
        raise D2DError(f"execution must be one of {', '.join(EXECUTIONS)}, got {mode!r}")
    moes = _moes(model)
    saved = {i: m.execution for i, m in moes.items()}
    try:
        for m in moes.values():
            m.execution = mode
        yield
    finally:
        for i, m in moes.items():
            m.execution = saved[i]


@contextmanager
def collecting(model: nn.Module):
    """Collect per-layer execution statistics during the block; yields {layer: LayerStats}."""
    moes = _moes(model)
    stats = {i: LayerStats() for i in moes}
    for i, m in moes.items():
        m.stats = stats[i]
    try:
        yield stats
    finally:
        for m in moes.values():
            m.stats = None
