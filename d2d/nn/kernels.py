"""Sparse execution of a converted FFN on the CPU: only the selected experts are computed.

A token-varying expert set makes thin, per-expert matrix products (16-64 rows) that eager
PyTorch runs far below the speed of one dense product, so the selected work is done by a small
C++ kernel (compiled on first use with torch's JIT extension builder, cached afterwards):

1. `route` lists the (token, expert) pairs the mask selects, by token and by expert;
   `pairs_in` computes each pair's pre-activations (gate and up projections together):
   experts in parallel, each reading its own weight rows once per block of 4 of its tokens.
   Unselected experts' weights are never read.
2. the activation, the gate product and biases: in the kernel for SiLU, GELU (erf and tanh)
   and ReLU (`ffn`, everything in one call), in PyTorch on the [pairs, expert_size] values for
   any other activation (`sparse_ffn`);
3. `pairs_out`: each expert adds its down-projection rows (w_out is stored [f, d], so an
   expert's block is contiguous and stays in cache) into its tokens' outputs: experts in
   parallel, each thread into its own copy of the output, summed at the end.

On AVX-512 CPUs, experts of 16 or 32 neurons take tiled kernels instead (`pairs_in_packed`
on a packed [E, d, s] copy of the weights, `pairs_out_strips` by strips of output columns):
a block of up to 8 of an expert's tokens keeps its pre-activations (or a strip of its
outputs) in vector registers, with no horizontal sums; 1.2-2.1x the pair kernels' speed. The
strips pay on calls of 256 tokens or more (prompts); fewer tokens (decoding) keep pairs_out,
whose whole rows per expert stream better from memory.

The result equals the masked dense computation up to float summation order (tests assert it).
Where the kernel cannot be built (no compiler) or does not apply (autograd, non-fp32 dtypes),
the caller falls back to the masked dense path. On a GPU, `grouped_ffn` runs the selected
experts with one product per used expert in plain PyTorch.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

# the C++ source lies beside this module; torch rebuilds the extension when it changes
_SOURCE_FILE = Path(__file__).with_name("kernels.cpp")

_lock = threading.Lock()
_module = None
_failed: str | None = None


def load():
    """The compiled kernels, or None where they cannot be built (the reason in `why_not`)."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    if os.environ.get("D2D_NO_KERNELS"):
        _failed = "disabled by D2D_NO_KERNELS"
        return None
    with _lock:
        if _module is None and _failed is None:
            try:
                from torch.utils.cpp_extension import load_inline

                _module = load_inline(
                    name="d2d_moe_cpu",  # torch rebuilds when the source changes
                    cpp_sources=[_SOURCE_FILE.read_text()],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as e:  # no compiler, no ninja, an odd platform: fall back
                _failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
    return _module


def why_not() -> str | None:
    load()
    return _failed


def applies(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and all(w.dtype == torch.float32 and w.is_contiguous() for w in weights)
    )


# activation modules the fused kernel computes itself (transformers' and torch's names)
_ACT_CODES = {
    "SiLU": 0,
    "SiLUActivation": 0,
    "GELUActivation": 1,
    "NewGELUActivation": 2,
    "GELUTanh": 2,
    "PytorchGELUTanh": 2,
    "ReLU": 3,
}


def act_code(act) -> int:
    """The fused kernel's code for an activation module, or -1 (then PyTorch applies it)."""
    name = type(act).__name__
    if name == "GELU":
        return 2 if getattr(act, "approximate", "none") == "tanh" else 1
    return _ACT_CODES.get(name, -1)  # transformers' GELUActivation is the erf GELU either way


def fused_ffn(moe, x: torch.Tensor, mask: torch.Tensor, max_fraction: float):
    """The whole sparse FFN in one kernel call, or None when more than `max_fraction` of the
    (token, expert) pairs are selected or the activation is not one the kernel knows."""
    code = act_code(moe.act)
    if code < 0:
        return None
    max_pairs = int(max_fraction * mask.numel())
    y = load().ffn(x.contiguous(), mask.contiguous(), *expert_args(moe), code, max_pairs)
    return y if y.numel() or x.shape[0] == 0 else None


def expert_args(moe) -> tuple:
    """The experts' arguments of the `ffn` kernel: weights, biases (empty where absent), the
    tiled kernels' packed copies (empty where they do not apply) and the expert size."""
    wp_in, wp_gate = packed(moe, moe.d_model)
    return (
        moe.w_in,
        _EMPTY if moe.b_in is None else moe.b_in,
        moe.w_gate if moe.gated else _EMPTY,
        _EMPTY if moe.b_gate is None else moe.b_gate,
        moe.w_out,
        _EMPTY if moe.b_out is None else moe.b_out,
        wp_in,
        wp_gate,
        moe.expert_size,
    )


def sparse_ffn(moe, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The MoE FFN on x [N, d] running only the experts in mask [N, E]; returns [N, d]."""
    k = load()
    E, s = moe.n_experts, moe.expert_size
    x = x.contiguous()
    ex, tok, pos, off = k.route(mask.contiguous())
    pairs = ex.numel()
    up = torch.empty(pairs, s)
    gate = torch.empty(pairs, s) if moe.gated else _EMPTY
    wp_in, wp_gate = packed(moe, x.shape[1])
    if wp_in.numel():
        k.pairs_in_packed(x, wp_in, wp_gate, tok, pos, off, up, gate, s)
    else:
        k.pairs_in(x, moe.w_in, moe.w_gate if moe.gated else _EMPTY, tok, pos, off, up, gate, s)
    if moe.b_in is not None:
        up += moe.b_in.view(E, s)[ex]
    if moe.gated:
        if moe.b_gate is not None:
            gate += moe.b_gate.view(E, s)[ex]
        h = moe.act(gate).mul_(up)
    else:
        h = moe.act(up)
    pairs_out = k.pairs_out_strips if k.strips_pay(s, moe.d_out, x.shape[0]) else k.pairs_out
    y = pairs_out(h.contiguous(), moe.w_out, tok, pos, off, x.shape[0], s)
    if moe.b_out is not None:
        y += moe.b_out
    return y


_EMPTY = torch.empty(0)


def packed(moe, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed copies [E, d, s] of up's (and gate's) weights for the tiled kernels (experts of
    16 or 32 neurons on AVX-512 CPUs: an expert's block contiguous, its neurons side by side),
    built once per weight version; empty tensors where the tiled kernels do not apply."""
    E, s = moe.n_experts, moe.expert_size
    if not load().tiled(s, d):
        return _EMPTY, _EMPTY

    def pack(w):
        return w.view(E, s, d).transpose(1, 2).contiguous()

    return moe._cached(
        "packed",
        lambda: (pack(moe.w_in), pack(moe.w_gate) if moe.gated else _EMPTY),
        moe.w_in,
        moe.w_gate,
    )


def router_mask(router, x: torch.Tensor, rule: int, value: float, sink) -> torch.Tensor:
    """[N, E] the experts a learned router's rule runs (rule 0: tau, 1: threshold), from one
    kernel call; `sink`: [N] tokens that run every expert, or None."""
    return load().router_mask(
        x.contiguous(),
        router.fc1.weight,
        router.fc1.bias,
        router.fc2.weight,
        router.fc2.bias,
        rule,
        float(value),
        _EMPTY if sink is None else sink.contiguous(),
    )


def routed_args(moe) -> tuple:
    """The weight arguments of `routed_ffn` for one layer (its router's, its experts' and the
    tiled kernels' packed copies), built once per policy and weight version
    (d2d.nn.moe.MoEFFN._router_plan)."""
    r = moe.router
    router = (r.fc1.weight, r.fc1.bias, r.fc2.weight, r.fc2.bias)
    return (*router, *expert_args(moe), act_code(moe.act))


def routed_ffn(x: torch.Tensor, rule: int, value: float, sink, args: tuple, max_fraction: float):
    """A layer's learned router, its rule (0: tau, 1: threshold) and its selected experts in
    one kernel call; `args` from routed_args, `sink`: [N] tokens that run every expert, or None.
    Returns (y [N, d_out] or None above `max_fraction` of the pairs, mask [N, E])."""
    sink = _EMPTY if sink is None else sink.contiguous()
    y, mask = _module.routed_ffn(
        x.contiguous(), *args[:4], rule, value, sink, *args[4:], max_fraction
    )
    return (y if y.numel() or x.shape[0] == 0 else None), mask


# what each kind of exact score is called by threshold_ffn
SCORE_CODES = {"activation": 0, "magnitude": 1, "gate": 2}


def threshold_args(moe, transposed) -> tuple:
    """The weight arguments of the threshold kernel for one layer under its policy (built once
    per policy and weight version: d2d.nn.moe.MoEFFN._threshold_plan). `transposed`: (w_in,
    w_gate) as [d, f] copies, so that gate and up read only the rows of the kept input entries,
    or None."""
    wt_in, wt_gate = transposed if transposed is not None else (_EMPTY, _EMPTY)
    kind = moe.policy.scores
    nw = (
        moe._cached("neuron weights", moe.neuron_weights, moe.w_out)
        if kind == "magnitude"
        else _EMPTY
    )
    return (
        SCORE_CODES[kind],
        moe.w_in,
        _EMPTY if moe.b_in is None else moe.b_in,
        moe.w_gate if moe.gated else _EMPTY,
        _EMPTY if moe.b_gate is None else moe.b_gate,
        wt_in,
        wt_gate,
        moe.w_out,
        _EMPTY if moe.b_out is None else moe.b_out,
        nw,
        moe.expert_size,
        act_code(moe.act),
    )


def threshold_ffn(x: torch.Tensor, t_in: float, t_unit: float, args: tuple, n_experts: int):
    """The FFN of a few tokens under thresholds on exact values (TEAL-style: |x| >= t_in before
    gate and up, expert scores from h; CATS-style: scores from act(gate)), one kernel call;
    `args` from threshold_args. Returns (y [N, d], mask [N, E], kept share [N])."""
    n = x.shape[0]
    mask = torch.empty(n, n_experts, dtype=torch.bool)
    kept = torch.empty(n)
    code, *weights = args
    y = _module.threshold_ffn(x.contiguous(), t_in, t_unit, code, *weights, mask, kept)
    return y, mask, kept


def grouped_ffn(moe, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same computation in plain PyTorch, on any device (the GPU path): tokens sorted by
    expert, one product per used expert on its own weight slices, results added back per
    token. Only the used experts' weights are read."""
    E, s = moe.n_experts, moe.expert_size
    tok, ex = mask.nonzero(as_tuple=True)
    order = torch.argsort(ex, stable=True)
    tok_e = tok[order]
    counts = torch.bincount(ex, minlength=E).tolist()
    xs = x.index_select(0, tok_e)
    ys = torch.empty(len(tok_e), moe.d_out, dtype=x.dtype, device=x.device)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        rows = slice(e * s, (e + 1) * s)
        seg = xs[start : start + c]
        b_in = None if moe.b_in is None else moe.b_in[rows]
        up = torch.nn.functional.linear(seg, moe.w_in[rows], b_in)
        if moe.gated:
            b_gate = None if moe.b_gate is None else moe.b_gate[rows]
            h = moe.act(torch.nn.functional.linear(seg, moe.w_gate[rows], b_gate)) * up
        else:
            h = moe.act(up)
        ys[start : start + c] = h @ moe.w_out[rows]
        start += c
    y = x.new_zeros(x.shape[0], moe.d_out).index_add_(0, tok_e, ys)
    return y if moe.b_out is None else y + moe.b_out
