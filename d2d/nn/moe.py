"""The converted FFN: experts are equal-size groups of the FFN's neurons, plus a router.

Neurons are permuted so that expert e owns rows [e*s, (e+1)*s) of `w_in` and `w_gate` ([f, d],
nn.Linear layout) and the same rows of `w_out`, which is stored [f, d] (the transpose of the
down projection's nn.Linear weight) so that every expert's weights are contiguous rows.
Executing every expert is therefore the dense FFN with its neurons reordered: the same function.

Which experts run is a routing policy (d2d.nn.policy, not weights) that each layer holds whole,
set by d2d.nn.routing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from d2d.errors import D2DError
from d2d.nn import kernels
from d2d.nn.policy import ALL, RoutingPolicy


def _env_token_limit(default: int = 3) -> int | str:
    """D2D_THRESHOLD_MAX_TOKENS as a count >= 0, or the bad text (refused where it is used:
    an import cannot raise the one-line error)."""
    v = os.environ.get("D2D_THRESHOLD_MAX_TOKENS", "").strip()
    if not v:
        return default
    return int(v) if v.isdigit() else v


def _versions(weights) -> tuple:
    """What identifies the current values of these tensors (None entries skipped): their
    storage and in-place version, the key of every cache derived from them."""
    return tuple((w.data_ptr(), w._version) for w in weights if w is not None)


def _cpu_fp32(weights) -> bool:
    """Whether every given tensor (None entries skipped) is a contiguous fp32 CPU tensor, as
    the kernels read them."""
    return all(
        w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous()
        for w in weights
        if w is not None
    )


class Router(nn.Module):
    """Predicts the L2 norm of each expert's output from the FFN's input (2-layer MLP)."""

    def __init__(self, d_model: int, n_experts: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # softplus keeps predictions non-negative without the dead zone of a ReLU output
        return F.softplus(self.fc2(F.relu(self.fc1(x))))

    def macs(self) -> int:
        return self.fc1.in_features * self.fc1.out_features + self.fc2.in_features * (
            self.fc2.out_features
        )


@dataclass
class RoutingContext:
    """Per-forward facts shared by all MoE layers of a model (set by a model pre-hook)."""

    positions: torch.Tensor | None = None  # [B, T] position of each token in its sequence
    # the smallest position in this forward (read once per forward, not once per layer): a
    # decoding step past the sink needs no sink test in any layer
    min_position: int = 0
    token_mask: torch.Tensor | None = None  # [B, T] 1 for real tokens, 0 for padding


@dataclass
class LayerStats:
    tokens: int = 0
    executed: int = 0  # experts executed, summed over tokens
    usage: torch.Tensor | None = None  # [E] how often each expert ran
    k_hist: torch.Tensor | None = None  # [E+1] tokens that ran k experts
    input_kept: float = 0.0  # summed over tokens: the share of input entries kept (TEAL-style)
    extra: dict = field(default_factory=dict)

    def reset(self) -> None:
        """Forget what was counted (the same object stays collected into)."""
        self.__init__()

    def fraction(self, n_experts: int) -> float:
        return self.executed / max(1, self.tokens * n_experts)

    def input_fraction(self) -> float:
        """The mean share of the FFN input that gate and up read (1.0 without input sparsity)."""
        return self.input_kept / self.tokens if self.tokens else 1.0


class MoEFFN(nn.Module):
    """A dense FFN split into `n_experts` experts of `expert_size` neurons each."""

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        expert_size: int,
        act: nn.Module,
        gated: bool,
        bias_in: bool,
        bias_out: bool,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
        d_out: int | None = None,
    ):
        super().__init__()
        f = n_experts * expert_size
        kw = {"dtype": dtype, "device": device}
        self.d_model, self.n_experts, self.expert_size = d_model, n_experts, expert_size
        # the output width: the input's for an FFN, the projection's for an attention
        # projection converted through d2d.nn.projection (k and v narrower under GQA)
        self.d_out = d_model if d_out is None else d_out
        self.act = act
        self.w_in = nn.Parameter(torch.empty(f, d_model, **kw))
        self.b_in = nn.Parameter(torch.empty(f, **kw)) if bias_in else None
        self.w_gate = nn.Parameter(torch.empty(f, d_model, **kw)) if gated else None
        self.b_gate = nn.Parameter(torch.empty(f, **kw)) if (gated and bias_in) else None
        self.w_out = nn.Parameter(torch.empty(f, self.d_out, **kw))  # [f, d_out]: neuron rows
        self.b_out = nn.Parameter(torch.empty(self.d_out, **kw)) if bias_out else None
        # original neuron index of each permuted neuron: maps experts back to the dense FFN
        self.register_buffer("perm", torch.arange(f, device=device))
        self.router: Router | None = None
        # per-layer policies are keyed by it: the block's index for an FFN, "<block>_<name>"
        # for an attention projection (d2d.nn.structure.moe_layers)
        self.index: int | str = 0
        self.policy: RoutingPolicy = ALL
        self.context = RoutingContext()
        self.stats: LayerStats | None = None  # collect when not None
        self.capture = None  # callable(x, h) used by router training and calibration
        # "sparse": run only the selected experts (d2d/nn/kernels.py) where it applies;
        # "auto": the same, but a call whose routing cannot beat the dense product runs every
        # expert and is counted so (_dense_call); "masked": compute every expert and zero the
        # unselected ones (the reference)
        self.execution = "sparse"
        # derived copies of the weights the threshold kernel reads, keyed by the weights'
        # versions (rebuilt after training changes them; not saved)
        self._derived: dict[str, tuple[tuple, object]] = {}
        # (policy, index and weight versions, plan) of the threshold kernel (_threshold_plan)
        # and of the one-call router path (_router_plan)
        self._plan: tuple | None = None
        self._rplan: tuple | None = None

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    def expert_macs(self) -> int:
        """Multiply-accumulates of one expert for one token."""
        return ((2 if self.gated else 1) * self.d_model + self.d_out) * self.expert_size

    def token_macs(self, stats: LayerStats | None) -> float:
        """Multiply-accumulates per token under the current policy, from execution statistics
        (None: every expert, the whole input). What each kind of score needs computed:
        router / oracle: the selected experts only (the oracle's scoring is not counted: it is a
        ceiling); gate: the gate in full, up and down for the selected experts; activation /
        magnitude: gate and up in full (on the kept share of the input), down for the selected."""
        d, f = self.d_model, self.n_experts * self.expert_size
        gate_up, down = (2 if self.gated else 1) * d * f, self.d_out * f
        k = stats.fraction(self.n_experts) if stats is not None and stats.tokens else 1.0
        kx = stats.input_fraction() if stats is not None else 1.0
        scores = self.policy.scores
        if scores == "gate" and self.gated:
            return d * f + k * (gate_up - d * f + down)
        if scores in ("activation", "magnitude"):
            return kx * gate_up + k * down
        return k * (kx * gate_up + down) + self.router_macs()

    def neuron_weights(self) -> torch.Tensor:
        """[f] the norm of each neuron's down-projection row: a neuron's output is |h| x it."""
        return self.w_out.norm(dim=-1)

    def _cached(self, name: str, make, *weights: torch.Tensor | None):
        key = _versions(weights)
        hit = self._derived.get(name)
        if hit is None or hit[0] != key:
            with torch.no_grad():
                hit = self._derived[name] = (key, make())
        return hit[1]

    def derived_bytes(self) -> int:
        """Bytes held in derived copies of the weights (the threshold and tiled kernels')."""
        return sum(
            t.numel() * t.element_size()
            for _, made in self._derived.values()
            for t in (made if isinstance(made, tuple) else (made,))
        )

    def block_norm(self, v: torch.Tensor) -> torch.Tensor:
        """[N, E] the L2 norm over each expert's neurons of per-neuron values [N, f]."""
        if self.expert_size == 1:
            return v.abs()
        return v.view(v.shape[0], self.n_experts, self.expert_size).norm(dim=-1)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Intermediate activations [N, E*s] of every expert."""
        up = F.linear(x, self.w_in, self.b_in)
        if self.gated:
            return self.act(F.linear(x, self.w_gate, self.b_gate)) * up
        return self.act(up)

    def down(self, h: torch.Tensor) -> torch.Tensor:
        """The down projection of intermediate activations [N, f] (every neuron)."""
        return F.linear(h, self.w_out.t(), self.b_out)

    def expert_norms(self, h: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """True L2 norm of each expert's output [N, E] (the quantity routers regress)."""
        n, (E, s) = h.shape[0], (self.n_experts, self.expert_size)
        if s == 1:  # a single neuron's output is h_j times its down-projection row
            return h.abs() * self.neuron_weights().to(h.dtype)
        # ||sum_j h_j w_j||^2 = h^T G h with G = W W^T, the [s, s] Gram matrix of the expert's
        # down rows: s^2 instead of s x d multiply-adds per token and expert, and no [N, E, d]
        # intermediate (computed in float64: G's entries cancel where outputs are small)
        w = self.w_out.view(E, s, self.d_out).double()
        gram = torch.einsum("esd,etd->est", w, w)
        out = []
        for i in range(0, n, chunk):
            hc = h[i : i + chunk].view(-1, E, s).double()
            q = torch.einsum("nes,est,net->ne", hc, gram, hc)
            out.append(q.clamp_min(0).sqrt().to(h.dtype))
        return torch.cat(out) if out else h.new_zeros(0, E)

    def router_macs(self) -> int:
        """The router's cost per token under the current policy (it runs only where the policy
        can skip an expert and scores come from the router)."""
        runs = self.router is not None and self.policy.scores == "router" and self.routes()
        return self.router.macs() if runs else 0

    def routes(self) -> bool:
        """Whether the policy can skip an expert; if not, scores (and the router) are not run."""
        return self.policy.routes(self.index, self.n_experts)

    def scores(self, x: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor:
        """[N, E] what ranks the experts of each token under the policy (d2d.nn.policy.SCORES);
        `h`: the intermediate activations computed from the (kept) input."""
        kind = self.policy.scores
        if kind == "oracle":
            return self.expert_norms(h)
        if kind == "gate":  # CATS-style: the gate's activation, computed in full
            if not self.gated:
                raise RuntimeError("gate scores need a gated FFN")
            return self.block_norm(self.act(F.linear(x, self.w_gate, self.b_gate)).float())
        if kind == "activation":
            return self.block_norm(h.float())
        if kind == "magnitude":
            nw = self._cached("neuron weights", self.neuron_weights, self.w_out)
            return self.block_norm(h.float() * nw.float())
        if self.router is None:
            raise RuntimeError("this MoE layer has no router: run train-routers first")
        return self.router(x.to(self.router.fc1.weight.dtype))

    def select(self, x: torch.Tensor, h: torch.Tensor | None) -> torch.Tensor | None:
        """Boolean [N, E] mask of experts to run, or None for all of them."""
        if not self.routes():
            return None
        fused = self._fused_router_mask(x)
        if fused is not None:
            return fused
        mask = self.policy.mask(self.index, self.scores(x, h))
        return mask | self._sink_rows(x.shape[0])[:, None]

    # rules the router kernel applies itself (d2d.nn.kernels.router_mask)
    _FUSED_RULES = {"tau": 0, "threshold": 1}

    def _fused_router_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The mask of a learned router and its rule from one kernel call (CPU inference in
        fp32): the same products and comparisons as the modules, without the framework's cost
        per operation, which dominates at few tokens. None where it does not apply."""
        p, r = self.policy, self.router
        if (
            p.scores != "router"
            or p.rule not in self._FUSED_RULES
            or r is None
            or r.fc1.bias is None
            or r.fc2.bias is None
            or torch.is_autocast_enabled("cpu")
            or not kernels.applies(x, r.fc1.weight, r.fc2.weight)
            or kernels.load() is None
        ):
            return None
        n = x.shape[0]
        sink = self._sink_rows(n) if self._may_sink(n) else None
        return kernels.router_mask(r, x, self._FUSED_RULES[p.rule], p.value_at(self.index), sink)

    def _sink_rows(self, n: int) -> torch.Tensor:
        """[n] the tokens of this forward at positions below the policy's dense sink."""
        if self._may_sink(n):
            return self.context.positions.reshape(-1) < self.policy.dense_positions
        return torch.zeros(n, dtype=torch.bool, device=self.w_in.device)

    def _may_sink(self, n: int) -> bool:
        """Whether some of this forward's n tokens may lie in the dense sink (a check without
        tensors: decoding steps past the sink answer it for free)."""
        pos = self.context.positions
        return (
            self.policy.dense_positions > self.context.min_position
            and pos is not None
            and pos.numel() == n
        )

    def _router_plan(self) -> tuple | None:
        """(rule code, value, the kernel's arguments) where this layer's learned router, its
        rule and its selected experts run in one kernel call (kernels.routed_ffn): router
        scores under a tau or threshold rule that can skip an expert, no input threshold, fp32
        contiguous CPU weights, biases on the router, an activation the kernel computes, the
        kernels built. Cached per policy, index, router and weight version, so that a call pays
        a lookup, not these checks (the fixed cost that dominates at few tokens)."""
        p, r = self.policy, self.router
        weights = [self.w_in, self.b_in, self.w_gate, self.b_gate, self.w_out, self.b_out]
        if r is not None:
            weights += [r.fc1.weight, r.fc1.bias, r.fc2.weight, r.fc2.bias]
        key = (self.index, id(r), *_versions(weights))
        hit = self._rplan
        if hit is not None and hit[0] is p and hit[1] == key:
            return hit[2]
        ok = (
            p.scores == "router"
            and p.rule in self._FUSED_RULES
            and r is not None
            and r.fc1.bias is not None
            and r.fc2.bias is not None
            and self.routes()
            and p.input_threshold(self.index) == 0
            and _cpu_fp32(weights)
            and kernels.act_code(self.act) >= 0
            and kernels.load() is not None
        )
        plan = None
        if ok:
            rule, value = self._FUSED_RULES[p.rule], float(p.value_at(self.index))
            plan = (rule, value, kernels.routed_args(self))
        self._rplan = (p, key, plan)
        return plan

    def _router_run(self, x2: torch.Tensor) -> torch.Tensor | None:
        """The one-call router path (_router_plan) on this call, or None where it does not
        apply (then forward takes the general path)."""
        if self.router is None or self.policy.scores != "router":  # before any other test
            return None
        if not (kernels.applies(x2) and self._fast_inference(x2)):
            return None
        plan = self._router_plan()
        if plan is None:
            return None
        n = x2.shape[0]
        sink = self._sink_rows(n) if self._may_sink(n) else None
        rule, value, args = plan
        y, mask = kernels.routed_ffn(x2, rule, value, sink, args, self.SPARSE_MAX_FRACTION)
        if self.stats is not None:
            self._record(mask, n, None)
        if y is None:  # too many experts selected: the dense product under the mask is faster
            y = self.down(self._masked(self.hidden(x2), mask))
        return y

    def _masked(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Activations [N, f] with the unselected experts' zeroed: a product with the mask, a
        quarter of masked_fill's time on the CPU (the unselected experts' activations are
        finite, so both give the same zeros)."""
        E, s = self.n_experts, self.expert_size
        return (h.view(-1, E, s) * mask.unsqueeze(-1)).view(-1, E * s)

    # above this executed fraction the dense product beats the sparse kernel
    SPARSE_MAX_FRACTION = 0.8

    def _fast_inference(self, x2: torch.Tensor) -> bool:
        """The conditions every fast path shares: sparse execution asked for, nothing captured,
        no autograd, no autocast."""
        return (
            self.execution in ("sparse", "auto")
            and self.capture is None
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x2.device.type)
        )

    def _sparse_ok(self, x2: torch.Tensor) -> bool:
        """Whether this call may run only the selected experts (inference with router scores);
        False keeps the masked reference computation."""
        if not (self._fast_inference(x2) and self.policy.scores == "router" and self.routes()):
            return False
        if x2.device.type == "cuda":
            return True  # grouped_ffn
        return kernels.applies(x2, self.w_in, self.w_out) and kernels.load() is not None

    def _run_sparse(self, x2: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """Only the selected experts; None above SPARSE_MAX_FRACTION of the pairs (the caller
        then takes the dense product)."""
        cpu = x2.device.type == "cpu"
        if cpu and kernels.act_code(self.act) >= 0:  # one kernel call, fraction test inside
            return kernels.fused_ffn(self, x2, mask, self.SPARSE_MAX_FRACTION)
        if mask.sum() > self.SPARSE_MAX_FRACTION * mask.numel():
            return None
        return (kernels.sparse_ffn if cpu else kernels.grouped_ffn)(self, x2, mask)

    # the threshold kernel reads the weights once per token: above this many tokens in one call
    # the dense products are faster (a decoding batch's weights from memory: 0.80 of dense at
    # 2 tokens, 1.08 at 4, scripts/cold_ffn_sweep.py, docs/results.md); the crossover depends
    # on the CPU: D2D_THRESHOLD_MAX_TOKENS sets it
    THRESHOLD_MAX_TOKENS = _env_token_limit()

    def _threshold_plan(self) -> tuple | None:
        """(input threshold, unit threshold, the kernel's weight arguments) where this layer's
        policy and weights let the threshold kernel run it, else None: a threshold on exact
        values (TEAL-style, CATS-style, exact magnitude), fp32 CPU weights, an activation the
        kernel computes, the kernels built; the execution mode is _threshold_ok's check. (Gate
        scores read the whole input: the kernel does not combine them with input thresholds.)
        Cached per policy, index and weight version, so that a decoding step pays a lookup in
        every layer, not these checks and copies."""
        p, weights = self.policy, (self.w_in, self.w_gate, self.w_out)
        key = (self.index, *_versions(weights))
        hit = self._plan
        if hit is not None and hit[0] is p and hit[1] == key:
            return hit[2]
        t_in = p.input_threshold(self.index)
        ok = (
            p.rule == "threshold"
            and p.scores in kernels.SCORE_CODES
            and (p.scores != "gate" or (self.gated and t_in == 0))
            and _cpu_fp32(weights)
            and kernels.act_code(self.act) >= 0
            and self.d_out == self.d_model
            and kernels.load() is not None
        )
        plan = None
        if ok:
            t_unit = p.value_at(self.index) if self.routes() else 0.0
            transposed = None
            if t_in > 0 and p.scores != "gate":
                # [d, f] copies of gate and up: an input entry's weights are one contiguous row
                transposed = self._cached(
                    "transposed",
                    lambda: (
                        self.w_in.t().contiguous(),
                        self.w_gate.t().contiguous() if self.gated else torch.empty(0),
                    ),
                    self.w_in,
                    self.w_gate,
                )
            plan = (float(t_in), float(t_unit), kernels.threshold_args(self, transposed))
        self._plan = (p, key, plan)
        return plan

    def _threshold_ok(self, x2: torch.Tensor) -> bool:
        """Whether this call runs the threshold kernel: a few fp32 CPU tokens past the dense
        sink, the fast inference path, a layer _threshold_plan accepts."""
        n, limit = x2.shape[0], self.THRESHOLD_MAX_TOKENS
        if isinstance(limit, str):
            raise D2DError(
                f"D2D_THRESHOLD_MAX_TOKENS must be a whole number of tokens >= 0, got {limit!r}"
            )
        return (
            0 < n <= limit
            and x2.dtype == torch.float32
            and x2.device.type == "cpu"
            and self._fast_inference(x2)
            and self._threshold_plan() is not None
            and not (self._may_sink(n) and bool(self._sink_rows(n).any()))
        )

    def _dense_call(self, x2: torch.Tensor) -> bool:
        """Whether "auto" execution runs this call as the dense FFN: exact-value thresholds that
        can skip work, on more tokens than the threshold kernel takes (a prompt, a decoding
        batch) or where the kernel cannot run. Each token of such a call keeps its own input
        entries and units, so the masked computation reads every weight and adds scores and
        masks on top: slower than the dense product it would have to beat."""
        p = self.policy
        return (
            self.execution == "auto"
            and p.rule == "threshold"
            and p.scores in kernels.SCORE_CODES
            and (self.routes() or p.input_threshold(self.index) > 0)
            and self._fast_inference(x2)
            and not self._threshold_ok(x2)
        )

    def _threshold_run(self, x2: torch.Tensor) -> torch.Tensor:
        t_in, t_unit, args = self._plan[2]
        y, mask, kept = kernels.threshold_ffn(x2, t_in, t_unit, args, self.n_experts)
        if self.stats is not None:
            self._record(mask, x2.shape[0], kept)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = self._router_run(x2)
        if y is not None:
            return y.view(*shape[:-1], self.d_out)
        if self._threshold_ok(x2):
            return self._threshold_run(x2).view(*shape[:-1], self.d_out)
        if self._dense_call(x2):  # counted as what it runs: every expert, the whole input
            if self.stats is not None:
                self._record(None, x2.shape[0], None)
            return self.down(self.hidden(x2)).view(*shape[:-1], self.d_out)
        # TEAL-style input sparsity: gate and up read only the entries above the threshold
        t_in = self.policy.input_threshold(self.index) if self.capture is None else 0.0
        kept = (x2.abs() >= t_in) if t_in > 0 else None
        if kept is not None:  # the dense sink reads its whole input too
            kept |= self._sink_rows(x2.shape[0])[:, None]
        xin = x2 if kept is None else x2 * kept
        # router scores without input sparsity: the selection needs no activations
        sparse = kept is None and self._sparse_ok(x2)
        h = None if sparse else self.hidden(xin)
        if self.capture is not None:
            self.capture(x2, h)
        mask = self.select(x2, h)
        if self.stats is not None:
            self._record(mask, x2.shape[0], None if kept is None else kept.float().mean(-1))
        if sparse:
            y = self._run_sparse(x2, mask)
            if y is not None:
                return y.view(*shape[:-1], self.d_out)
            h = self.hidden(x2)
        if mask is not None:
            h = self._masked(h, mask)
        y = self.down(h)
        return y.view(*shape[:-1], self.d_out)

    def _record(self, mask: torch.Tensor | None, n: int, kept: torch.Tensor | None) -> None:
        """Add one call to the statistics; `kept`: [n] the share of each token's input kept."""
        st, E = self.stats, self.n_experts
        if mask is None:
            mask = torch.ones(n, E, dtype=torch.bool)
        mask = mask.cpu()
        kept_share = torch.ones(n) if kept is None else kept.float().cpu()
        tm = self.context.token_mask
        if tm is not None and tm.numel() == n:
            real = tm.reshape(-1).cpu().bool()
            mask, kept_share = mask[real], kept_share[real]
        st.input_kept += float(kept_share.sum())
        if st.usage is None:
            st.usage = torch.zeros(E, dtype=torch.long)
            st.k_hist = torch.zeros(E + 1, dtype=torch.long)
        st.tokens += mask.shape[0]
        st.executed += int(mask.sum())
        st.usage += mask.sum(0)
        st.k_hist += torch.bincount(mask.sum(-1), minlength=E + 1)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_out={self.d_out}, n_experts={self.n_experts}, "
            f"expert_size={self.expert_size}, "
            f"gated={self.gated}, policy={self.policy.to_dict()}"
        )
