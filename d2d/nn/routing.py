"""Routing a model: set a policy on every MoE layer (and a mode on every routed block), run
with one for a while, choose the execution path, collect statistics.

The policy itself (rules, JSON form, labels) is d2d.nn.policy.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from d2d.errors import D2DError
from d2d.nn.depth import depth_mode, mod_blocks, set_mode
from d2d.nn.moe import LayerStats
from d2d.nn.policy import RoutingPolicy
from d2d.nn.structure import moe_layers


def apply_routing(model: nn.Module, policy: RoutingPolicy | dict) -> RoutingPolicy:
    """Route `model` with `policy` from now on: every MoE layer holds it, and routed blocks take
    the depth mode it names (the rule "all" implies "dense" only inside `routing`). Returns the
    typed policy."""
    p = RoutingPolicy.of(policy)
    moes = moe_layers(model)
    # routers are needed only where the policy can skip an expert by the routers' scores (a
    # policy that names only the depth mode routes no FFN)
    if p.scores == "router" and any(
        m.router is None and p.routes(m.index, m.n_experts) for m in moes.values()
    ):
        raise D2DError("this artifact has no routers: run d2d train-routers first")
    for m in moes.values():
        m.policy = p
    if p.depth is not None and mod_blocks(model):  # named, not implied by "all"
        set_mode(model, p.depth)
    return p


@contextmanager
def routing(model: nn.Module, policy: RoutingPolicy | dict):
    """Temporarily route with `policy`; restores the previous policies and modes afterwards."""
    p = RoutingPolicy.of(policy)
    moes = moe_layers(model)
    saved = {i: m.policy for i, m in moes.items()}
    try:
        with depth_mode(model, p.depth_mode):
            apply_routing(model, p)
            yield p
    finally:
        for i, m in moes.items():
            m.policy = saved[i]


EXECUTIONS = ("sparse", "auto", "masked")


@contextmanager
def execution(model: nn.Module, mode: str):
    """Run the MoE layers with `mode` during the block: "sparse" (only the selected experts,
    where the fast kernels apply; every call routed, as quality is measured), "auto" (the same,
    except that a call whose routing cannot beat the dense product runs every expert and is
    counted so: exact-value thresholds on prompts and decoding batches; for generation and
    `d2d bench`) or "masked" (every expert computed, unselected ones zeroed: the reference)."""
    if mode not in EXECUTIONS:
        raise D2DError(f"execution must be one of {', '.join(EXECUTIONS)}, got {mode!r}")
    moes = moe_layers(model)
    saved = {i: m.execution for i, m in moes.items()}
    try:
        for m in moes.values():
            m.execution = mode
        yield
    finally:
        for i, m in moes.items():
            m.execution = saved[i]


def exact_policy(model: nn.Module, eps: float = 1e-6) -> dict:
    """Every expert whose true output norm exceeds eps (the oracle's scores, no router, no
    position kept dense): where an expert's neurons are ReLU and all of them are zero its
    output is exactly zero, so the model's function is unchanged, at the fewest FLOPs routing
    at this granularity can reach without losing anything (scripts/projection_oracle.py)."""
    return {
        "rule": "threshold",
        "scores": "oracle",
        "thresholds": {str(k): eps for k in moe_layers(model)},
        "dense_positions": 0,
    }


@contextmanager
def collecting(model: nn.Module):
    """Collect per-layer execution statistics during the block; yields {layer: LayerStats}."""
    moes = moe_layers(model)
    stats = {i: LayerStats() for i in moes}
    for i, m in moes.items():
        m.stats = stats[i]
    try:
        yield stats
    finally:
        for m in moes.values():
            m.stats = None
