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
