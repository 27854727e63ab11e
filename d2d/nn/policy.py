"""Routing policies: which experts a converted FFN runs, and how routed blocks choose tokens.

A policy is a typed, immutable value (`RoutingPolicy`) held whole by every MoE layer; its JSON
form (what d2d.json stores, unchanged since format 1) is a small dict:

    {"rule": "tau", "scores": "router", "tau": 0.1, "dense_positions": 1}
    {"rule": "tau", "taus": {"0": 0.02, "1": 0.1, ...}, ...}   per-layer thresholds
    {"rule": "topk", "fraction": 0.5}                            static top-k
    {"rule": "topk", "fractions": {"0": 0.9, ...}}               per-layer top-k
    {"rule": "threshold", "thresholds": {"0": 0.13, ...}}        per-layer absolute threshold
    {"rule": "all"}                                              every expert (== dense)

"depth" says how Mixture-of-Depths blocks route: "topk", "causal" or "dense" (the rule "all"
implies "dense"; without it the blocks keep their mode).

Dynamic-k (D2DMoE): a token runs expert i iff its predicted norm >= tau x the largest predicted
norm for that token. tau = 0 runs every expert; tau = 1 runs only the top one. (The reference
implementation writes the threshold as 1 - tau; d2d uses tau directly.)

A rule is one `Rule` in RULES: its mask, when it can skip an expert, its JSON keys, its label
and the grid calibrate searches per layer. Adding a rule is adding one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from d2d.errors import D2DError

DEPTH_MODES = ("topk", "causal", "dense")
# what ranks the experts of a token (d2d.nn.moe computes them; d2d.measure.flops prices them):
SCORES = {
    "router": "the learned router's predicted output norms (D2DMoE)",
    "oracle": "the true output norm of every expert (a ceiling: it computes them all)",
    "gate": "|act(gate)| of the expert's neurons, the gate computed in full (CATS-style)",
    "activation": "|h| of the expert's neurons, h computed in full (TEAL-style, down input)",
    "magnitude": "|h| x the norm of each neuron's down-projection row, h computed in full",
}


def _quantile_grid(scores: torch.Tensor) -> list[float]:
    qs = [0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.13, 0.16, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45]
    qs += [0.5, 0.6, 0.7, 0.8, 0.9]
    vals = scores.flatten().float()
    if vals.numel() > 2**20:
        vals = vals[torch.randperm(vals.numel())[: 2**20]]
    return [0.0] + [float(v) for v in torch.quantile(vals, torch.tensor(qs, dtype=vals.dtype))]


def _fixed(*values: float) -> Callable[[torch.Tensor], list[float]]:
    return lambda scores: [float(v) for v in values]


@dataclass(frozen=True)
class Rule:
    """One way of turning per-expert scores [N, E] into the experts each token runs."""

    name: str
    label: str  # how tables name it
    per_layer_key: str | None  # JSON key of per-layer values ("taus")
    global_key: str | None  # JSON key of the one value for all layers ("tau")
    default: float  # the value when neither is given
    valid: Callable[[float], bool]
    valid_text: str
    mask: Callable[[torch.Tensor, float], torch.Tensor]
    routes: Callable[[float, int], bool]  # (value, n_experts): can it skip an expert?
    grid: Callable[[torch.Tensor], list[float]]  # calibrate's per-layer search grid


def _k(fraction: float, n_experts: int) -> int:
    return max(1, round(fraction * n_experts))


def _topk_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    idx = scores.topk(_k(fraction, scores.shape[-1]), dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule(
            "all", "all experts", None, None, 0.0, lambda v: True, "",
            lambda s, v: torch.ones_like(s, dtype=torch.bool), lambda v, e: False, _fixed(0.0),
        ),
        Rule(
            "tau", "tau", "taus", "tau", 0.0, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]",
            lambda s, v: s >= v * s.amax(dim=-1, keepdim=True),
            lambda v, e: v > 0.0,
            _fixed(0, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.125,
                   0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0),
        ),
        Rule(
            "topk", "top-k", "fractions", "fraction", 1.0, lambda v: 0.0 < v <= 1.0,
            "a fraction in (0, 1]", _topk_mask, lambda v, e: _k(v, e) < e,
            _fixed(1.0, 0.97, 0.94, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45,
                   0.4, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1),
        ),
        Rule(
            "threshold", "threshold", "thresholds", None, 0.0, lambda v: v >= 0.0,
            "a number >= 0",
            # the best expert always runs: a token never loses its whole FFN (s >= v or s >= the
            # token's largest score, as one comparison against the smaller of the two)
            lambda s, v: s >= s.amax(dim=-1, keepdim=True).clamp(max=v),
            lambda v, e: v > 0.0,
            _quantile_grid,
        ),
    )
}  # fmt: skip
LAYER_RULES = tuple(n for n, r in RULES.items() if r.per_layer_key)


def rule_mask(rule: str, scores: torch.Tensor, value: float) -> torch.Tensor:
    """Boolean [N, E] mask of the experts `rule` runs at `value`, from scores [N, E] >= 0."""
    if rule not in RULES:
        raise ValueError(f"unknown routing rule {rule!r}")
    return RULES[rule].mask(scores, value)


def layer_key(k) -> int | str:
    """A per-layer key from its JSON form: a block's index (an FFN) or "<block>_<name>" (an
    attention projection converted to experts, e.g. "3_q")."""
    if isinstance(k, int) and not isinstance(k, bool):
        return k
    k = str(k)
    if k.isdigit():
        return int(k)
    head, _, name = k.partition("_")
    if not (head.isdigit() and name):
        raise D2DError(f"bad layer key {k!r}: a block index or <block>_<projection>, e.g. 3_q")
    return k


def block_of(key) -> int:
    """The block a per-layer key belongs to."""
    k = layer_key(key)
    return k if isinstance(k, int) else int(k.partition("_")[0])


def key_order(key) -> tuple[int, str]:
    """Sort key of per-layer keys: by block, the FFN ("") before its block's projections."""
    k = layer_key(key)
    return (k, "") if isinstance(k, int) else (block_of(k), k.partition("_")[2])


def _number(v, what: str, rule: Rule) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not rule.valid(float(v)):
        raise D2DError(f"{what} must be {rule.valid_text}, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class RoutingPolicy:
    """Which experts run (rule, scores, its value globally or per layer, the dense sink) and
    how routed blocks route (depth). Immutable: layers hold it whole."""

    rule: str = "all"
    value: float | None = None  # one value for every layer (tau, top-k fraction)
    per_layer: dict[int | str, float] = field(default_factory=dict)
    scores: str = "router"  # a key of SCORES
    dense_positions: int = 0  # leading positions of each sequence that run every expert
    depth: str | None = None  # topk | causal | dense; None: blocks keep their mode
    # per layer: input entries with |x| below this are zeroed before gate and up, whose weight
    # columns for them are then skipped (TEAL-style input sparsity)
    input_thresholds: dict[int | str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.rule not in RULES:
            raise D2DError(f"unknown routing rule {self.rule!r}: use one of {', '.join(RULES)}")
        if self.scores not in SCORES:
            raise D2DError(
                f"routing scores must be one of {', '.join(SCORES)}, got {self.scores!r}"
            )
        for v in self.input_thresholds.values():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise D2DError(f"input thresholds must be numbers >= 0, got {v!r}")
        if self.depth not in (None, *DEPTH_MODES):
            raise D2DError(
                f"depth routing must be one of {', '.join(DEPTH_MODES)}, got {self.depth!r}"
            )
        if isinstance(self.dense_positions, bool) or not isinstance(self.dense_positions, int):
            raise D2DError(f"dense_positions must be an integer, got {self.dense_positions!r}")

    @property
    def spec(self) -> Rule:
        return RULES[self.rule]

    @property
    def dense(self) -> bool:
        return self.rule == "all"

    @property
    def depth_mode(self) -> str | None:
        """The mode routed blocks take under this policy (None: keep theirs)."""
        return self.depth or ("dense" if self.dense else None)

    def value_at(self, layer: int | str) -> float:
        if layer in self.per_layer:
            return self.per_layer[layer]
        return self.spec.default if self.value is None else self.value

    def routes(self, layer: int | str, n_experts: int) -> bool:
        """Whether layer `layer` can skip an expert under this policy."""
        return self.spec.routes(self.value_at(layer), n_experts)

    def mask(self, layer: int | str, scores: torch.Tensor) -> torch.Tensor:
        return self.spec.mask(scores, self.value_at(layer))

    def input_threshold(self, layer: int | str) -> float:
        return float(self.input_thresholds.get(layer, 0.0))

    # --- JSON form (d2d.json, recipe files) ----------------------------------------------

    @classmethod
    def of(cls, p: RoutingPolicy | dict | None) -> RoutingPolicy:
        """A policy from its JSON form (or itself); None is every expert."""
        if isinstance(p, RoutingPolicy):
            return p
        if p is None:
            return cls()
        if not isinstance(p, dict):
            raise D2DError(f"a routing policy is a mapping, got {type(p).__name__}")
        rule = p.get("rule", "tau")
        if rule not in RULES:
            raise D2DError(f"unknown routing rule {rule!r}: use one of {', '.join(RULES)}")
        spec = RULES[rule]
        value, per_layer = None, {}
        # every rule's keys are checked (an old policy may carry a key its rule ignores)
        for r in RULES.values():
            if r.global_key and r.global_key in p:
                v = _number(p[r.global_key], r.global_key.replace("fraction", "top-k fraction"), r)
                value = v if r is spec else value
            if r.per_layer_key and p.get(r.per_layer_key):
                vals = p[r.per_layer_key]
                if not isinstance(vals, dict):
                    raise D2DError(f"{r.per_layer_key} must map layers to values")
                checked = {layer_key(k): _number(v, r.per_layer_key, r) for k, v in vals.items()}
                per_layer = checked if r is spec else per_layer
        inputs = p.get("input_thresholds") or {}
        if not isinstance(inputs, dict):
            raise D2DError("input_thresholds must map layers to values")
        return cls(
            rule,
            value,
            per_layer,
            p.get("scores", "router"),
            p.get("dense_positions", 0),
            p.get("depth"),
            {layer_key(k): v for k, v in inputs.items()},
        )

    def to_dict(self) -> dict:
        d: dict = {"rule": self.rule}
        if self.scores != "router":
            d["scores"] = self.scores
        if self.value is not None and self.spec.global_key:
            d[self.spec.global_key] = self.value
        if self.per_layer and self.spec.per_layer_key:
            d[self.spec.per_layer_key] = {str(k): v for k, v in self.per_layer.items()}
        if self.dense_positions or not self.dense:
            d["dense_positions"] = self.dense_positions
        if self.depth is not None:
            d["depth"] = self.depth
        if self.input_thresholds:
            d["input_thresholds"] = {str(k): v for k, v in self.input_thresholds.items()}
        return d

    def with_depth(self, depth: str | None) -> RoutingPolicy:
        return RoutingPolicy(
            self.rule,
            self.value,
            self.per_layer,
            self.scores,
            self.dense_positions,
            depth,
            self.input_thresholds,
        )


ALL = RoutingPolicy()


def validate(policy: dict) -> dict:
    """Check a policy's JSON form (raises D2DError); returns it."""
    RoutingPolicy.of(policy)
    return policy


def global_tau(tau: float, chosen: dict | RoutingPolicy | None = None) -> dict:
    """A global-tau policy that keeps the chosen routing's dense sink (if any)."""
    sink = RoutingPolicy.of(chosen).dense_positions if chosen else 0
    return {"rule": "tau", "tau": tau, "dense_positions": sink}


def layer_policy(rule: str, params: dict[int, float], dense_sink: int, **extra) -> dict:
    """The JSON form of a per-layer policy of `rule`."""
    return {
        "rule": rule,
        RULES[rule].per_layer_key: {str(k): v for k, v in params.items()},
        "dense_positions": dense_sink,
        **extra,
    }


def label(policy: dict | RoutingPolicy | None) -> str:
    """A short human label for a policy: "tau 0.1", "per-layer threshold", "all experts"."""
    if not policy:
        return "none chosen"
    p = RoutingPolicy.of(policy)
    if p.dense:
        return "all experts"
    if p.per_layer:
        return f"per-layer {p.spec.label}"
    if p.rule == "topk":
        return f"top-k {p.value_at(-1):.0%}"
    return f"{p.spec.label} {p.value_at(-1):g}"


def row_label(row: dict) -> str:
    """The label of a calibration row: "dense (all experts)", "global tau 0.1",
    "per-layer threshold @50%"."""
    if row["rule"] == "dense":
        return "dense (all experts)"
    named = {
        "teal-style": "TEAL-style",
        "cats-style": "CATS-style",
        "per-layer-magnitude": "exact magnitude",
        "split-magnitude": "exact magnitude, uniform split",
        "per-layer-split": "exact magnitude, split per layer by measured cost",
    }.get(row["rule"])
    share = row.get("policy", {}).get("input_share")
    if named and share is not None:  # the uniform split: the input share gate and up read
        named = f"{named}, input {100 * share:.0f}%"
    if named and "budget" in row:
        return f"{named} @{100 * row['budget']:.0f}%"
    if "budget" in row:
        return f"{label(row['policy'])} @{100 * row['budget']:.0f}%"
    return ("global " if row["rule"] == "global-tau" else "") + label(row["policy"])
