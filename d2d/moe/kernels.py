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

The result equals the masked dense computation up to float summation order (tests assert it).
Where the kernel cannot be built (no compiler) or does not apply (autograd, non-fp32 dtypes),
the caller falls back to the masked dense path. On a GPU, `grouped_ffn` runs the selected
experts with one product per used expert in plain PyTorch.
"""

from __future__ import annotations

import os
import threading

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

using torch::Tensor;

// From the [N, E] boolean mask: the (token, expert) pairs in token order (their expert `ex`)
// and in expert order (their token `tok`, their position in token order `pos`, per-expert
// offsets `off`).
std::vector<Tensor> route(const Tensor& mask) {
  const int64_t N = mask.size(0), E = mask.size(1);
  const bool* M = mask.data_ptr<bool>();
  auto opt = torch::TensorOptions().dtype(torch::kInt64);
  Tensor off = torch::zeros({E + 1}, opt);
  int64_t* O = off.data_ptr<int64_t>();
  for (int64_t t = 0; t < N; ++t)
    for (int64_t e = 0; e < E; ++e) O[e + 1] += M[t * E + e];
  for (int64_t e = 0; e < E; ++e) O[e + 1] += O[e];
  const int64_t P = O[E];
  Tensor ex = torch::empty({P}, opt), tok = torch::empty({P}, opt), pos = torch::empty({P}, opt);
  int64_t *X = ex.data_ptr<int64_t>(), *T = tok.data_ptr<int64_t>(), *Q = pos.data_ptr<int64_t>();
  std::vector<int64_t> fill(O, O + E);
  int64_t p = 0;
  for (int64_t t = 0; t < N; ++t)
    for (int64_t e = 0; e < E; ++e)
      if (M[t * E + e]) {
        X[p] = e;
        const int64_t q = fill[e]++;
        T[q] = t;
        Q[q] = p++;
      }
  return {ex, tok, pos, off};
}

// For the pairs of each expert e (expert order): A[pos, j] = W1[e*s+j] . x[tok] and, when
// W2 is given (gated FFNs), B[pos, j] = W2[e*s+j] . x[tok]. Experts run in parallel; each
// weight row is read once per block of 4 tokens and shared by the gate and up products.
void pairs_in(const Tensor& x, const Tensor& w1, const Tensor& w2, const Tensor& tok,
              const Tensor& pos, const Tensor& off, Tensor& a, Tensor& b, int64_t s) {
  const float* Xs = x.data_ptr<float>();
  const float* W1 = w1.data_ptr<float>();
  const bool two = w2.numel() > 0;
  const float* W2 = two ? w2.data_ptr<float>() : W1;
  const int64_t* T = tok.data_ptr<int64_t>();
  const int64_t* P = pos.data_ptr<int64_t>();
  const int64_t* O = off.data_ptr<int64_t>();
  float* A = a.data_ptr<float>();
  float* B = two ? b.data_ptr<float>() : A;
  const int64_t d = x.size(1), E = off.numel() - 1;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t p = O[e]; p < O[e + 1]; p += 4) {
      const int64_t n = std::min<int64_t>(4, O[e + 1] - p);
      const float* x0 = Xs + T[p] * d;
      const float* x1 = Xs + T[p + std::min<int64_t>(1, n - 1)] * d;
      const float* x2 = Xs + T[p + std::min<int64_t>(2, n - 1)] * d;
      const float* x3 = Xs + T[p + std::min<int64_t>(3, n - 1)] * d;
      for (int64_t j = 0; j < s; ++j) {
        const float* u = W1 + (e * s + j) * d;
        const float* g = W2 + (e * s + j) * d;
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, b0 = 0.f, b1 = 0.f, b2 = 0.f, b3 = 0.f;
        if (two) {
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
          for (int64_t c = 0; c < d; ++c) {
            const float uv = u[c], gv = g[c];
            a0 += uv * x0[c];
            a1 += uv * x1[c];
            a2 += uv * x2[c];
            a3 += uv * x3[c];
            b0 += gv * x0[c];
            b1 += gv * x1[c];
            b2 += gv * x2[c];
            b3 += gv * x3[c];
          }
        } else {
#pragma omp simd reduction(+ : a0, a1, a2, a3)
          for (int64_t c = 0; c < d; ++c) {
            const float uv = u[c];
            a0 += uv * x0[c];
            a1 += uv * x1[c];
            a2 += uv * x2[c];
            a3 += uv * x3[c];
          }
        }
        const float ra[4] = {a0, a1, a2, a3}, rb[4] = {b0, b1, b2, b3};
        for (int64_t i = 0; i < n; ++i) {
          A[P[p + i] * s + j] = ra[i];
          if (two) B[P[p + i] * s + j] = rb[i];
        }
      }
    }
  }
}

// y[t, :] = sum over token t's pairs of h[pos, :] @ w_out[e*s : (e+1)*s, :], where w_out is
// [f, d] (rows per neuron). Expert-major, like pairs_in: an expert's block (s x d floats) stays
// in cache while all its tokens use it; each thread adds into its own copy of y (no races),
// and the copies are summed at the end.
Tensor pairs_out(const Tensor& h, const Tensor& w_out, const Tensor& tok, const Tensor& pos,
                 const Tensor& off, int64_t n_tokens, int64_t s) {
  const int64_t d = w_out.size(1), N = n_tokens, E = off.numel() - 1;
  const float* H = h.data_ptr<float>();
  const float* Wo = w_out.data_ptr<float>();
  const int64_t* T = tok.data_ptr<int64_t>();
  const int64_t* Q = pos.data_ptr<int64_t>();
  const int64_t* O = off.data_ptr<int64_t>();
#ifdef _OPENMP
  const int nt = std::max(1, std::min<int>(omp_get_max_threads(), (int)E));
#else
  const int nt = 1;
#endif
  std::vector<float> buf((size_t)nt * N * d, 0.f);
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    float* Yt = buf.data() + (size_t)omp_get_thread_num() * N * d;
#else
    float* Yt = buf.data();
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t e = 0; e < E; ++e) {
      const float* blk = Wo + e * s * d;
      for (int64_t p = O[e]; p < O[e + 1]; ++p) {
        float* yr = Yt + T[p] * d;
        const float* hr = H + Q[p] * s;
        int64_t j = 0;
        for (; j + 4 <= s; j += 4) {  // four rows per pass over y: fewer loads and stores of y
          const float h0 = hr[j], h1 = hr[j + 1], h2 = hr[j + 2], h3 = hr[j + 3];
          const float *w0 = blk + j * d, *w1 = w0 + d, *w2 = w1 + d, *w3 = w2 + d;
#pragma omp simd
          for (int64_t c = 0; c < d; ++c)
            yr[c] += h0 * w0[c] + h1 * w1[c] + h2 * w2[c] + h3 * w3[c];
        }
        for (; j < s; ++j) {
          const float hv = hr[j];
          const float* w = blk + j * d;
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) yr[c] += hv * w[c];
        }
      }
    }
  }
  Tensor y = torch::empty({N, d}, h.options());
  float* Y = y.data_ptr<float>();
#pragma omp parallel for schedule(static) if (N * d > 65536)
  for (int64_t i = 0; i < N * d; ++i) {
    float v = buf[i];
    for (int k = 1; k < nt; ++k) v += buf[(size_t)k * N * d + i];
    Y[i] = v;
  }
  return y;
}

static inline float activate(float v, int64_t act) {
  switch (act) {
    case 0: return v / (1.f + std::exp(-v));  // SiLU
    case 1: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));  // GELU (erf)
    case 2: {  // GELU, tanh approximation
      const float k = 0.7978845608028654f;
      return 0.5f * v * (1.f + std::tanh(k * (v + 0.044715f * v * v * v)));
    }
    default: return v > 0.f ? v : 0.f;  // ReLU
  }
}

// The sparse FFN of one chunk of tokens: pairs, pre-activations, activation (and gate
// product), biases, down projection.
Tensor ffn_chunk(const Tensor& x, const Tensor& mask, const Tensor& w_in, const Tensor& b_in,
                 const Tensor& w_gate, const Tensor& b_gate, const Tensor& w_out,
                 const Tensor& b_out, int64_t s, int64_t act) {
  auto r = route(mask);
  const Tensor &ex = r[0], &tok = r[1], &pos = r[2], &off = r[3];
  const int64_t P = ex.numel();
  const bool gated = w_gate.numel() > 0;
  Tensor up = torch::empty({P, s}, x.options());
  Tensor gate = gated ? torch::empty({P, s}, x.options()) : torch::empty({0}, x.options());
  pairs_in(x, w_in, w_gate, tok, pos, off, up, gate, s);
  float* U = up.data_ptr<float>();
  const float* G = gated ? gate.data_ptr<float>() : nullptr;
  const float* BI = b_in.numel() ? b_in.data_ptr<float>() : nullptr;
  const float* BG = b_gate.numel() ? b_gate.data_ptr<float>() : nullptr;
  const int64_t* X = ex.data_ptr<int64_t>();
#pragma omp parallel for schedule(static) if (P > 256)
  for (int64_t p = 0; p < P; ++p) {
    const int64_t base = X[p] * s;
    for (int64_t j = 0; j < s; ++j) {
      float u = U[p * s + j] + (BI ? BI[base + j] : 0.f);
      if (gated)
        u *= activate(G[p * s + j] + (BG ? BG[base + j] : 0.f), act);
      else
        u = activate(u, act);
      U[p * s + j] = u;
    }
  }
  Tensor y = pairs_out(up, w_out, tok, pos, off, x.size(0), s);
  if (b_out.numel()) y.add_(b_out);
  return y;
}

// The whole sparse FFN in one call (fewer framework round trips: what decoding one token at a
// time pays for). Returns an empty tensor when more than max_pairs pairs are selected (the
// dense product is then faster and the caller uses it).
Tensor ffn(const Tensor& x, const Tensor& mask, const Tensor& w_in, const Tensor& b_in,
           const Tensor& w_gate, const Tensor& b_gate, const Tensor& w_out, const Tensor& b_out,
           int64_t s, int64_t act, int64_t max_pairs) {
  const bool* M = mask.data_ptr<bool>();
  int64_t pairs = 0;
  for (int64_t i = 0, n = mask.numel(); i < n; ++i) pairs += M[i];
  if (pairs > max_pairs) return torch::empty({0}, x.options());
  // chunks of tokens: a chunk's inputs, pre-activations and outputs stay in cache
  constexpr int64_t CH = 512;
  const int64_t N = x.size(0);
  if (N <= CH) return ffn_chunk(x, mask, w_in, b_in, w_gate, b_gate, w_out, b_out, s, act);
  Tensor y = torch::empty({N, w_out.size(1)}, x.options());
  for (int64_t a = 0; a < N; a += CH) {
    const int64_t n = std::min(CH, N - a);
    y.narrow(0, a, n).copy_(ffn_chunk(x.narrow(0, a, n), mask.narrow(0, a, n), w_in, b_in, w_gate,
                                      b_gate, w_out, b_out, s, act));
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ffn", &ffn);
  m.def("route", &route);
  m.def("pairs_in", &pairs_in);
  m.def("pairs_out", &pairs_out);
}
"""

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
                    cpp_sources=[_SOURCE],
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
    y = load().ffn(
        x.contiguous(),
        mask.contiguous(),
        moe.w_in,
        _EMPTY if moe.b_in is None else moe.b_in,
        moe.w_gate if moe.gated else _EMPTY,
        _EMPTY if moe.b_gate is None else moe.b_gate,
        moe.w_out,
        _EMPTY if moe.b_out is None else moe.b_out,
        moe.expert_size,
        code,
        int(max_fraction * mask.numel()),
    )
    return y if y.numel() or x.shape[0] == 0 else None


def sparse_ffn(moe, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The MoE FFN on x [N, d] running only the experts in mask [N, E]; returns [N, d]."""
    k = load()
    E, s = moe.n_experts, moe.expert_size
    x = x.contiguous()
    ex, tok, pos, off = k.route(mask.contiguous())
    pairs = ex.numel()
    up = torch.empty(pairs, s)
    gate = torch.empty(pairs, s) if moe.gated else _EMPTY
    k.pairs_in(x, moe.w_in, moe.w_gate if moe.gated else _EMPTY, tok, pos, off, up, gate, s)
    if moe.b_in is not None:
        up += moe.b_in.view(E, s)[ex]
    if moe.gated:
        if moe.b_gate is not None:
            gate += moe.b_gate.view(E, s)[ex]
        h = moe.act(gate).mul_(up)
    else:
        h = moe.act(up)
    y = k.pairs_out(h.contiguous(), moe.w_out, tok, pos, off, x.shape[0], s)
    if moe.b_out is not None:
        y += moe.b_out
    return y


_EMPTY = torch.empty(0)


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
    ys = torch.empty(len(tok_e), moe.d_model, dtype=x.dtype, device=x.device)
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
    y = torch.zeros_like(x).index_add_(0, tok_e, ys)
    return y if moe.b_out is None else y + moe.b_out
