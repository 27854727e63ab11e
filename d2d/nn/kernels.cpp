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
// W2 is given (gated FFNs), B[pos, j] = W2[e*s+j] . x[tok]. Experts run in parallel. A block of
// 4 tokens meets each weight row once. Without a gate, 4 rows at a time: 16 running sums per
// pass over x, each value loaded from x or a weight row feeding 4 multiply-adds (1.3-2x the
// one-row loop on MiniLM's MLPs); gated FFNs keep the one-row loop shared by gate and up (a
// 2+2-row block measured slower there).
namespace {
// the dot products of rows u[0..R) with the 4 token vectors x0..x3 over d values, into r[R][4]
template <int R>
inline void dots(const float* const* u, const float* x0, const float* x1, const float* x2,
                 const float* x3, int64_t d, float r[R][4]) {
  float s00 = 0.f, s01 = 0.f, s02 = 0.f, s03 = 0.f, s10 = 0.f, s11 = 0.f, s12 = 0.f, s13 = 0.f;
  float s20 = 0.f, s21 = 0.f, s22 = 0.f, s23 = 0.f, s30 = 0.f, s31 = 0.f, s32 = 0.f, s33 = 0.f;
  const float *u0 = u[0], *u1 = R > 1 ? u[1] : u[0], *u2 = R > 2 ? u[2] : u[0];
  const float* u3 = R > 3 ? u[3] : u[0];
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
  for (int64_t c = 0; c < d; ++c) {
    const float a = x0[c], b = x1[c], e = x2[c], f = x3[c];
    const float w0 = u0[c];
    s00 += w0 * a; s01 += w0 * b; s02 += w0 * e; s03 += w0 * f;
    if (R > 1) { const float w1 = u1[c]; s10 += w1 * a; s11 += w1 * b; s12 += w1 * e; s13 += w1 * f; }
    if (R > 2) { const float w2 = u2[c]; s20 += w2 * a; s21 += w2 * b; s22 += w2 * e; s23 += w2 * f; }
    if (R > 3) { const float w3 = u3[c]; s30 += w3 * a; s31 += w3 * b; s32 += w3 * e; s33 += w3 * f; }
  }
  const float all[4][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13},
                           {s20, s21, s22, s23}, {s30, s31, s32, s33}};
  for (int i = 0; i < R; ++i)
    for (int k = 0; k < 4; ++k) r[i][k] = all[i][k];
}
}  // namespace

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
      int64_t j = 0;
      if (two) {  // gated: each weight row once per block of 4 tokens, shared by gate and up
        for (; j < s; ++j) {
          const float* u = W1 + (e * s + j) * d;
          const float* g = W2 + (e * s + j) * d;
          float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, b0 = 0.f, b1 = 0.f, b2 = 0.f, b3 = 0.f;
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
          const float ra[4] = {a0, a1, a2, a3}, rb[4] = {b0, b1, b2, b3};
          for (int64_t i = 0; i < n; ++i) {
            A[P[p + i] * s + j] = ra[i];
            B[P[p + i] * s + j] = rb[i];
          }
        }
      } else {
        for (; j + 4 <= s; j += 4) {
          const float* w = W1 + (e * s + j) * d;
          const float* u[4] = {w, w + d, w + 2 * d, w + 3 * d};
          float r[4][4];
          dots<4>(u, x0, x1, x2, x3, d, r);
          for (int64_t i = 0; i < n; ++i) {
            float* ar = A + P[p + i] * s + j;
            ar[0] = r[0][i]; ar[1] = r[1][i]; ar[2] = r[2][i]; ar[3] = r[3][i];
          }
        }
        for (; j < s; ++j) {
          const float* u[1] = {W1 + (e * s + j) * d};
          float r[1][4];
          dots<1>(u, x0, x1, x2, x3, d, r);
          for (int64_t i = 0; i < n; ++i) A[P[p + i] * s + j] = r[0][i];
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
      int64_t p = O[e];
      if (s % 4 == 0)  // 4 of the expert's tokens (distinct rows of y) meet 4 weight rows at a
        for (; p + 4 <= O[e + 1]; p += 4) {  // time: 16 multiply-adds per 4 loads of w and of y
          float* y0 = Yt + T[p] * d;
          float* y1 = Yt + T[p + 1] * d;
          float* y2 = Yt + T[p + 2] * d;
          float* y3 = Yt + T[p + 3] * d;
          const float *g0 = H + Q[p] * s, *g1 = H + Q[p + 1] * s, *g2 = H + Q[p + 2] * s;
          const float* g3 = H + Q[p + 3] * s;
          for (int64_t j = 0; j < s; j += 4) {
            const float *w0 = blk + j * d, *w1 = w0 + d, *w2 = w1 + d, *w3 = w2 + d;
            const float a0 = g0[j], a1 = g0[j + 1], a2 = g0[j + 2], a3 = g0[j + 3];
            const float b0 = g1[j], b1 = g1[j + 1], b2 = g1[j + 2], b3 = g1[j + 3];
            const float c0 = g2[j], c1 = g2[j + 1], c2 = g2[j + 2], c3 = g2[j + 3];
            const float d0 = g3[j], d1 = g3[j + 1], d2 = g3[j + 2], d3 = g3[j + 3];
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) {
              const float v0 = w0[c], v1 = w1[c], v2 = w2[c], v3 = w3[c];
              y0[c] += a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3;
              y1[c] += b0 * v0 + b1 * v1 + b2 * v2 + b3 * v3;
              y2[c] += c0 * v0 + c1 * v1 + c2 * v2 + c3 * v3;
              y3[c] += d0 * v0 + d1 * v1 + d2 * v2 + d3 * v3;
            }
          }
        }
      for (; p < O[e + 1]; ++p) {
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

// Tiled kernels for experts of 16 or 32 neurons on AVX-512 CPUs. The pre-activations read
// each expert's weights from a packed [E, d, s] copy (an expert's block is contiguous and
// its s neurons lie side by side: one or two 16-float vectors per input entry), so a block
// of up to 8 of the expert's tokens keeps its s pre-activations in registers while the
// input entries stream by: one weight load and one broadcast per multiply-add per token, no
// horizontal sums. The down projection runs by strips of 32 output columns (the strip of
// every token's output stays in L1 while all the blocks add into it; threads share the
// strips, so no per-thread copies are summed). Blocks take 8, 4, 2 or 1 pairs, never padding.
#ifdef __AVX512F__
namespace {
constexpr int kMaxBlock = 8;

inline int block_size(int64_t remaining) {
  return remaining >= 8 ? 8 : remaining >= 4 ? 4 : remaining >= 2 ? 2 : 1;
}

// TB tokens (rows xr[t]) against one expert's packed block wp [d, 16*NV] (and gp, gated):
// pre-activations into ar[t] (and br[t]). Fewer than 4 tokens split the input entries
// between K running sums so that the multiply-adds do not wait on one another.
template <int NV, int TB, bool GATED>
inline void tile_in(const float* const* xr, const float* wp, const float* gp, int64_t d,
                    float* const* ar, float* const* br) {
  constexpr int S = 16 * NV, K = TB >= 4 ? 1 : 4 / TB;
  __m512 acc[K][TB][NV], acg[K][TB][GATED ? NV : 1];
  for (int k = 0; k < K; ++k)
    for (int t = 0; t < TB; ++t)
      for (int v = 0; v < NV; ++v) {
        acc[k][t][v] = _mm512_setzero_ps();
        if (GATED) acg[k][t][v] = _mm512_setzero_ps();
      }
  int64_t c = 0;
  for (; c + K <= d; c += K)
    for (int k = 0; k < K; ++k) {
      __m512 w[NV], g[GATED ? NV : 1];
      for (int v = 0; v < NV; ++v) {
        w[v] = _mm512_loadu_ps(wp + (c + k) * S + 16 * v);
        if (GATED) g[v] = _mm512_loadu_ps(gp + (c + k) * S + 16 * v);
      }
      for (int t = 0; t < TB; ++t) {
        const __m512 xv = _mm512_set1_ps(xr[t][c + k]);
        for (int v = 0; v < NV; ++v) {
          acc[k][t][v] = _mm512_fmadd_ps(xv, w[v], acc[k][t][v]);
          if (GATED) acg[k][t][v] = _mm512_fmadd_ps(xv, g[v], acg[k][t][v]);
        }
      }
    }
  for (; c < d; ++c)
    for (int t = 0; t < TB; ++t) {
      const __m512 xv = _mm512_set1_ps(xr[t][c]);
      for (int v = 0; v < NV; ++v) {
        acc[0][t][v] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wp + c * S + 16 * v), acc[0][t][v]);
        if (GATED)
          acg[0][t][v] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(gp + c * S + 16 * v), acg[0][t][v]);
      }
    }
  for (int t = 0; t < TB; ++t)
    for (int v = 0; v < NV; ++v) {
      __m512 a = acc[0][t][v], b = GATED ? acg[0][t][v] : a;
      for (int k = 1; k < K; ++k) {
        a = _mm512_add_ps(a, acc[k][t][v]);
        if (GATED) b = _mm512_add_ps(b, acg[k][t][v]);
      }
      _mm512_storeu_ps(ar[t] + 16 * v, a);
      if (GATED) _mm512_storeu_ps(br[t] + 16 * v, b);
    }
}

template <int NV, bool GATED>
void tiled_in(const float* X, const float* WP, const float* GP, const int64_t* T,
              const int64_t* P, const int64_t* O, float* A, float* B, int64_t d, int64_t E) {
  constexpr int S = 16 * NV;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t e = 0; e < E; ++e) {
    const float* wp = WP + e * d * S;
    const float* gp = GATED ? GP + e * d * S : wp;
    for (int64_t p = O[e]; p < O[e + 1];) {
      const int tb = block_size(O[e + 1] - p);
      const float* xr[kMaxBlock];
      float *ar[kMaxBlock], *br[kMaxBlock];
      for (int t = 0; t < tb; ++t) {
        xr[t] = X + T[p + t] * d;
        ar[t] = A + P[p + t] * S;
        br[t] = B + P[p + t] * S;
      }
      switch (tb) {
        case 8: tile_in<NV, 8, GATED>(xr, wp, gp, d, ar, br); break;
        case 4: tile_in<NV, 4, GATED>(xr, wp, gp, d, ar, br); break;
        case 2: tile_in<NV, 2, GATED>(xr, wp, gp, d, ar, br); break;
        default: tile_in<NV, 1, GATED>(xr, wp, gp, d, ar, br);
      }
      p += tb;
    }
  }
}

// TB tokens' h (hv [S][TB]) times one expert's rows wo (row stride d) on the strip of 32
// columns from c0, added into the tokens' output rows yr[t].
template <int S, int TB>
inline void tile_out(const float* hv, const float* wo, int64_t d, int64_t c0,
                     const int64_t* rows, float* Y) {
  constexpr int K = TB >= 4 ? 1 : 4 / TB;
  __m512 a0[K][TB], a1[K][TB];
  for (int k = 0; k < K; ++k)
    for (int t = 0; t < TB; ++t) {
      a0[k][t] = _mm512_setzero_ps();
      a1[k][t] = _mm512_setzero_ps();
    }
  for (int j = 0; j < S; j += K)
    for (int k = 0; k < K; ++k) {
      const __m512 w0 = _mm512_loadu_ps(wo + (j + k) * d + c0);
      const __m512 w1 = _mm512_loadu_ps(wo + (j + k) * d + c0 + 16);
      for (int t = 0; t < TB; ++t) {
        const __m512 h = _mm512_set1_ps(hv[(j + k) * TB + t]);
        a0[k][t] = _mm512_fmadd_ps(h, w0, a0[k][t]);
        a1[k][t] = _mm512_fmadd_ps(h, w1, a1[k][t]);
      }
    }
  for (int t = 0; t < TB; ++t) {
    __m512 u = a0[0][t], v = a1[0][t];
    for (int k = 1; k < K; ++k) {
      u = _mm512_add_ps(u, a0[k][t]);
      v = _mm512_add_ps(v, a1[k][t]);
    }
    float* yr = Y + rows[t] + c0;
    _mm512_storeu_ps(yr, _mm512_add_ps(_mm512_loadu_ps(yr), u));
    _mm512_storeu_ps(yr + 16, _mm512_add_ps(_mm512_loadu_ps(yr + 16), v));
  }
}

template <int S>
Tensor tiled_out(const float* H, const float* Wo, const int64_t* T, const int64_t* Q,
                 const int64_t* O, int64_t N, int64_t d, int64_t E, const Tensor& like) {
  // the blocks (expert, first pair, size), their h packed [S][size] and output row offsets
  std::vector<int64_t> bexp, bstart, bpack;
  std::vector<int> bsize;
  int64_t packed = 0;
  for (int64_t e = 0; e < E; ++e)
    for (int64_t p = O[e]; p < O[e + 1];) {
      const int tb = block_size(O[e + 1] - p);
      bexp.push_back(e);
      bstart.push_back(p);
      bsize.push_back(tb);
      bpack.push_back(packed);
      packed += tb;
      p += tb;
    }
  const int64_t nb = bexp.size();
  std::vector<float> hb(packed * S);
  std::vector<int64_t> rows(packed);
#pragma omp parallel for schedule(static) if (nb > 64)
  for (int64_t b = 0; b < nb; ++b) {
    const int tb = bsize[b];
    float* dst = hb.data() + bpack[b] * S;
    for (int t = 0; t < tb; ++t) {
      const int64_t q = bstart[b] + t;
      rows[bpack[b] + t] = T[q] * d;
      const float* src = H + Q[q] * S;
      for (int j = 0; j < S; ++j) dst[j * tb + t] = src[j];
    }
  }
  Tensor y = torch::zeros({N, d}, like.options());
  float* Y = y.data_ptr<float>();
#pragma omp parallel for schedule(static)
  for (int64_t c0 = 0; c0 < d; c0 += 32)
    for (int64_t b = 0; b < nb; ++b) {
      const float* hv = hb.data() + bpack[b] * S;
      const float* wo = Wo + bexp[b] * S * d;
      const int64_t* rw = rows.data() + bpack[b];
      switch (bsize[b]) {
        case 8: tile_out<S, 8>(hv, wo, d, c0, rw, Y); break;
        case 4: tile_out<S, 4>(hv, wo, d, c0, rw, Y); break;
        case 2: tile_out<S, 2>(hv, wo, d, c0, rw, Y); break;
        default: tile_out<S, 1>(hv, wo, d, c0, rw, Y);
      }
    }
  return y;
}
}  // namespace
#endif

// Whether the tiled kernels run for this expert size and width on this build.
bool tiled(int64_t s, int64_t d) {
#ifdef __AVX512F__
  return (s == 16 || s == 32) && d % 32 == 0;
#else
  (void)s;
  (void)d;
  return false;
#endif
}

// Whether pairs_out_strips beats pairs_out on a call of n tokens: the strips read each
// expert's rows in 128-byte pieces, once per strip, which pays where many tokens share the
// expert and its rows stay in cache; a few tokens (decoding) meet each layer's weights from
// memory, where whole rows per expert stream better (measured: scripts/pairs_ab.py on hot
// weights, docs/results.md on cold ones).
constexpr int64_t kStripMinTokens = 256;
bool strips_pay(int64_t s, int64_t d_out, int64_t n) {
  return tiled(s, d_out) && n >= kStripMinTokens;
}

// pairs_in on the packed copies wp_in / wp_gate [E, d, s] (tiled(s, d) must hold).
void pairs_in_packed(const Tensor& x, const Tensor& wp_in, const Tensor& wp_gate,
                     const Tensor& tok, const Tensor& pos, const Tensor& off, Tensor& a,
                     Tensor& b, int64_t s) {
  TORCH_CHECK(tiled(s, x.size(1)), "the tiled kernels do not apply here");
#ifdef __AVX512F__
  const int64_t d = x.size(1), E = off.numel() - 1;
  const bool gated = wp_gate.numel() > 0;
  const float* X = x.data_ptr<float>();
  const float* W = wp_in.data_ptr<float>();
  const float* G = gated ? wp_gate.data_ptr<float>() : W;
  const int64_t *T = tok.data_ptr<int64_t>(), *P = pos.data_ptr<int64_t>();
  const int64_t* O = off.data_ptr<int64_t>();
  float* A = a.data_ptr<float>();
  float* B = gated ? b.data_ptr<float>() : A;
  if (s == 16) {
    if (gated) tiled_in<1, true>(X, W, G, T, P, O, A, B, d, E);
    else tiled_in<1, false>(X, W, G, T, P, O, A, B, d, E);
  } else {
    if (gated) tiled_in<2, true>(X, W, G, T, P, O, A, B, d, E);
    else tiled_in<2, false>(X, W, G, T, P, O, A, B, d, E);
  }
#endif
}

// pairs_out by strips of output columns (tiled(s, d) must hold).
Tensor pairs_out_strips(const Tensor& h, const Tensor& w_out, const Tensor& tok,
                        const Tensor& pos, const Tensor& off, int64_t n_tokens, int64_t s) {
  const int64_t d = w_out.size(1), E = off.numel() - 1;
  TORCH_CHECK(tiled(s, d), "the tiled kernels do not apply here");
#ifdef __AVX512F__
  const float *H = h.data_ptr<float>(), *Wo = w_out.data_ptr<float>();
  const int64_t *T = tok.data_ptr<int64_t>(), *Q = pos.data_ptr<int64_t>();
  const int64_t* O = off.data_ptr<int64_t>();
  return s == 16 ? tiled_out<16>(H, Wo, T, Q, O, n_tokens, d, E, h)
                 : tiled_out<32>(H, Wo, T, Q, O, n_tokens, d, E, h);
#else
  return Tensor();
#endif
}

// the dot product of two rows of n floats
static inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < n; ++c) acc += a[c] * b[c];
  return acc;
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
                 const Tensor& b_out, const Tensor& wp_in, const Tensor& wp_gate, int64_t s,
                 int64_t act) {
  auto r = route(mask);
  const Tensor &ex = r[0], &tok = r[1], &pos = r[2], &off = r[3];
  const int64_t P = ex.numel();
  const bool gated = w_gate.numel() > 0;
  Tensor up = torch::empty({P, s}, x.options());
  Tensor gate = gated ? torch::empty({P, s}, x.options()) : torch::empty({0}, x.options());
  if (wp_in.numel() > 0 && tiled(s, x.size(1)))
    pairs_in_packed(x, wp_in, wp_gate, tok, pos, off, up, gate, s);
  else
    pairs_in(x, w_in, w_gate, tok, pos, off, up, gate, s);
  float* U = up.data_ptr<float>();
  const float* G = gated ? gate.data_ptr<float>() : nullptr;
  // biases (zeros where absent) and the activation, one loop per activation kind so that
  // the compiler vectorises each pair's s values
  const int64_t f = w_in.size(0);
  std::vector<float> zeros(b_in.numel() && (!gated || b_gate.numel()) ? 0 : f, 0.f);
  const float* BI = b_in.numel() ? b_in.data_ptr<float>() : zeros.data();
  const float* BG = !gated ? nullptr : b_gate.numel() ? b_gate.data_ptr<float>() : zeros.data();
  const int64_t* X = ex.data_ptr<int64_t>();
  auto finish = [&](auto fn) {
#pragma omp parallel for schedule(static) if (P > 256)
    for (int64_t p = 0; p < P; ++p) {
      float* u = U + p * s;
      const float* bi = BI + X[p] * s;
      if (gated) {
        const float* g = G + p * s;
        const float* bg = BG + X[p] * s;
#pragma omp simd
        for (int64_t j = 0; j < s; ++j) u[j] = (u[j] + bi[j]) * fn(g[j] + bg[j]);
      } else {
#pragma omp simd
        for (int64_t j = 0; j < s; ++j) u[j] = fn(u[j] + bi[j]);
      }
    }
  };
  switch (act) {
    case 0: finish([](float v) { return activate(v, 0); }); break;
    case 1: finish([](float v) { return activate(v, 1); }); break;
    case 2: finish([](float v) { return activate(v, 2); }); break;
    default: finish([](float v) { return v > 0.f ? v : 0.f; });
  }
  Tensor y = strips_pay(s, w_out.size(1), x.size(0))
                 ? pairs_out_strips(up, w_out, tok, pos, off, x.size(0), s)
                 : pairs_out(up, w_out, tok, pos, off, x.size(0), s);
  if (b_out.numel()) y.add_(b_out);
  return y;
}

// The whole sparse FFN in one call (fewer framework round trips: what decoding one token at a
// time pays for). Returns an empty tensor when more than max_pairs pairs are selected (the
// dense product is then faster and the caller uses it). wp_in / wp_gate: packed [E, d, s]
// copies for the tiled kernels, or empty.
Tensor ffn(const Tensor& x, const Tensor& mask, const Tensor& w_in, const Tensor& b_in,
           const Tensor& w_gate, const Tensor& b_gate, const Tensor& w_out, const Tensor& b_out,
           const Tensor& wp_in, const Tensor& wp_gate, int64_t s, int64_t act,
           int64_t max_pairs) {
  const bool* M = mask.data_ptr<bool>();
  int64_t pairs = 0;
  for (int64_t i = 0, n = mask.numel(); i < n; ++i) pairs += M[i];
  if (pairs > max_pairs) return torch::empty({0}, x.options());
  // chunks of tokens: a chunk's inputs, pre-activations and outputs stay in cache
  constexpr int64_t CH = 512;
  const int64_t N = x.size(0);
  if (N <= CH)
    return ffn_chunk(x, mask, w_in, b_in, w_gate, b_gate, w_out, b_out, wp_in, wp_gate, s, act);
  Tensor y = torch::empty({N, w_out.size(1)}, x.options());
  for (int64_t a = 0; a < N; a += CH) {
    const int64_t n = std::min(CH, N - a);
    y.narrow(0, a, n).copy_(ffn_chunk(x.narrow(0, a, n), mask.narrow(0, a, n), w_in, b_in, w_gate,
                                      b_gate, w_out, b_out, wp_in, wp_gate, s, act));
  }
  return y;
}

// Thresholds on exact values, one token at a time (TEAL-style and CATS-style decoding).
// Per token: the input entries with |x| >= t_in are kept; the scores of the experts are
//   kind 0: || h ||, kind 1: || h x nw || (nw: each neuron's down-row norm), both from h computed
//   in full on the kept input; kind 2: || act(gate) ||, the gate computed in full (CATS-style);
// an expert runs iff its score >= t_h or it has the token's largest score; only the running
// experts' down-projection rows are read (kind 2: and their up-projection rows).
// With transposed copies wt_in/wt_gate [d, f] (kinds 0 and 1), gate and up read only the rows of
// the kept input entries (contiguous f-long rows); without them, row dot products on the
// input with the dropped entries zeroed. Experts are split between threads for gate/up, output
// columns for down (no reduction). Fills mask [N, E] and kept [N] (the share of input kept).
Tensor threshold_ffn(const Tensor& x, double t_in, double t_h, int64_t kind, const Tensor& w_in,
                     const Tensor& b_in, const Tensor& w_gate, const Tensor& b_gate,
                     const Tensor& wt_in, const Tensor& wt_gate, const Tensor& w_out,
                     const Tensor& b_out, const Tensor& nw, int64_t s, int64_t act, Tensor& mask,
                     Tensor& kept) {
  const int64_t N = x.size(0), d = x.size(1), f = w_out.size(0), E = f / s;
  const bool gated = w_gate.numel() > 0, transposed = wt_in.numel() > 0 && t_in > 0 && kind != 2;
  const float* X = x.data_ptr<float>();
  const float* Wi = w_in.data_ptr<float>();
  const float* Wg = gated ? w_gate.data_ptr<float>() : nullptr;
  const float* Ti = transposed ? wt_in.data_ptr<float>() : nullptr;
  const float* Tg = transposed && gated ? wt_gate.data_ptr<float>() : nullptr;
  const float* Wo = w_out.data_ptr<float>();
  const float* BI = b_in.numel() ? b_in.data_ptr<float>() : nullptr;
  const float* BG = b_gate.numel() ? b_gate.data_ptr<float>() : nullptr;
  const float* BO = b_out.numel() ? b_out.data_ptr<float>() : nullptr;
  const float* NW = nw.numel() ? nw.data_ptr<float>() : nullptr;
  bool* M = mask.data_ptr<bool>();
  float* K = kept.data_ptr<float>();
  Tensor y = torch::empty({N, d}, x.options());
  float* Y = y.data_ptr<float>();
  std::vector<float> h(f), a(gated ? f : 0), score(E), xk(d);
  std::vector<int64_t> idx(d);
  int64_t n_idx = 0;
#ifdef _OPENMP
  const int nt = std::max(1, std::min<int>(omp_get_max_threads(), (int)E));
#else
  const int nt = 1;
#endif
  std::vector<float> tmax(nt);
  // per-thread partial sums of gate and up (the transposed path)
  std::vector<float> hbuf(transposed ? nt * f : 0), abuf(transposed && gated ? nt * f : 0);
  std::vector<float> ybuf(nt * d);  // per-thread partial outputs of the down projection
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    const int64_t e0 = E * tid / nt, e1 = E * (tid + 1) / nt;  // this thread's experts
    const int64_t j0 = e0 * s, j1 = e1 * s;
    const int64_t c0 = d * tid / nt, c1 = d * (tid + 1) / nt;  // and output columns
    std::vector<int64_t> sel;
    for (int64_t t = 0; t < N; ++t) {
      const float* xt = X + t * d;
#pragma omp single
      {  // the kept input entries, and the input with the others zeroed
        n_idx = 0;
        for (int64_t c = 0; c < d; ++c) {
          const bool k = !(t_in > 0) || std::fabs(xt[c]) >= t_in;
          xk[c] = k ? xt[c] : 0.f;
          if (k) idx[n_idx++] = c;
        }
        K[t] = (float)n_idx / (float)d;
      }  // implicit barrier
      // 1. pre-activations of this thread's experts (kind 2: the gate only) and their scores
      if (transposed) {
        // each thread streams whole [d, f] rows of its share of the kept input entries (rows
        // in ascending order: nearly contiguous reads) into its own partial sums, which are
        // then added per neuron range (a split by neurons would read half-rows, which the
        // hardware prefetcher follows badly)
        float* hp = hbuf.data() + tid * f;
        float* ap = gated ? abuf.data() + tid * f : nullptr;
        std::fill(hp, hp + f, 0.f);
        if (gated) std::fill(ap, ap + f, 0.f);
        const int64_t q0 = n_idx * tid / nt, q1 = n_idx * (tid + 1) / nt;
        int64_t q = q0;
        for (; q + 4 <= q1; q += 4) {  // four rows at a time: more streams from memory at once
          const float v0 = xt[idx[q]], v1 = xt[idx[q + 1]], v2 = xt[idx[q + 2]];
          const float v3 = xt[idx[q + 3]];
          const float *r0 = Ti + idx[q] * f, *r1 = Ti + idx[q + 1] * f;
          const float *r2 = Ti + idx[q + 2] * f, *r3 = Ti + idx[q + 3] * f;
          if (gated) {  // gate's rows in the same pass: eight streams
            const float *g0 = Tg + idx[q] * f, *g1 = Tg + idx[q + 1] * f;
            const float *g2 = Tg + idx[q + 2] * f, *g3 = Tg + idx[q + 3] * f;
#pragma omp simd
            for (int64_t j = 0; j < f; ++j) {
              hp[j] += v0 * r0[j] + v1 * r1[j] + v2 * r2[j] + v3 * r3[j];
              ap[j] += v0 * g0[j] + v1 * g1[j] + v2 * g2[j] + v3 * g3[j];
            }
          } else {
#pragma omp simd
            for (int64_t j = 0; j < f; ++j)
              hp[j] += v0 * r0[j] + v1 * r1[j] + v2 * r2[j] + v3 * r3[j];
          }
        }
        for (; q < q1; ++q) {
          const int64_t c = idx[q];
          const float v = xt[c];
          const float* ri = Ti + c * f;
#pragma omp simd
          for (int64_t j = 0; j < f; ++j) hp[j] += v * ri[j];
          if (gated) {
            const float* rg = Tg + c * f;
#pragma omp simd
            for (int64_t j = 0; j < f; ++j) ap[j] += v * rg[j];
          }
        }
#pragma omp barrier
        for (int64_t j = j0; j < j1; ++j) {
          float u = BI ? BI[j] : 0.f, g = BG ? BG[j] : 0.f;
          for (int i = 0; i < nt; ++i) {
            u += hbuf[i * f + j];
            if (gated) g += abuf[i * f + j];
          }
          h[j] = gated ? activate(g, act) * u : activate(u, act);
        }
      } else {
        for (int64_t j = j0; j < j1; ++j) {
          if (gated) {
            a[j] = activate(dot(Wg + j * d, xk.data(), d) + (BG ? BG[j] : 0.f), act);
            if (kind == 2) continue;  // up only for the experts that run
          }
          const float u = dot(Wi + j * d, xk.data(), d) + (BI ? BI[j] : 0.f);
          h[j] = gated ? a[j] * u : activate(u, act);
        }
      }
      float mx = 0.f;
      for (int64_t e = e0; e < e1; ++e) {
        float q = 0.f;
        for (int64_t j = e * s; j < (e + 1) * s; ++j) {
          const float v = kind == 2 ? a[j] : (kind == 1 ? h[j] * NW[j] : h[j]);
          q += v * v;
        }
        score[e] = std::sqrt(q);
        mx = std::max(mx, score[e]);
      }
      tmax[tid] = mx;
#pragma omp barrier
      // 2. which experts run (and, kind 2, their up projection)
      float top = tmax[0];
      for (int i = 1; i < nt; ++i) top = std::max(top, tmax[i]);
      bool* Mt = M + t * E;
      for (int64_t e = e0; e < e1; ++e) {
        Mt[e] = !(t_h > 0) || score[e] >= t_h || score[e] >= top;
        if (kind == 2 && Mt[e])
          for (int64_t j = e * s; j < (e + 1) * s; ++j)
            h[j] = a[j] * (dot(Wi + j * d, xk.data(), d) + (BI ? BI[j] : 0.f));
      }
#pragma omp barrier
      // 3. down projection of the running experts: each thread adds whole rows of its share
      // of the running neurons (eight at a time: whole rows, often adjacent, keep the memory
      // streams long and many in flight) into its own partial output; then the partials are
      // summed per output column range
      sel.clear();
      for (int64_t e = 0; e < E; ++e)
        if (Mt[e])
          for (int64_t j = e * s; j < (e + 1) * s; ++j) sel.push_back(j);
      float* yp = ybuf.data() + tid * d;
      std::fill(yp, yp + d, 0.f);
      const size_t s0 = sel.size() * tid / nt, s1 = sel.size() * (tid + 1) / nt;
      size_t q = s0;
      for (; q + 8 <= s1; q += 8) {
        const float* w[8];
        float hv[8];
        for (int k = 0; k < 8; ++k) {
          w[k] = Wo + sel[q + k] * d;
          hv[k] = h[sel[q + k]];
        }
#pragma omp simd
        for (int64_t c = 0; c < d; ++c)
          yp[c] += hv[0] * w[0][c] + hv[1] * w[1][c] + hv[2] * w[2][c] + hv[3] * w[3][c] +
                   hv[4] * w[4][c] + hv[5] * w[5][c] + hv[6] * w[6][c] + hv[7] * w[7][c];
      }
      for (; q < s1; ++q) {
        const float hq = h[sel[q]];
        const float* w = Wo + sel[q] * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) yp[c] += hq * w[c];
      }
#pragma omp barrier
      float* yr = Y + t * d;
      for (int64_t c = c0; c < c1; ++c) {
        float v = BO ? BO[c] : 0.f;
        for (int i = 0; i < nt; ++i) v += ybuf[i * d + c];
        yr[c] = v;
      }
#pragma omp barrier
    }
  }
  return y;
}

// The learned router and its rule in one call (what a layer pays per call beside its experts):
// scores = softplus(z), z = fc2(relu(fc1(x))) with the same ATen products as the module, then
//   rule 0 (tau):       expert e runs iff s_e >= tau x the token's largest score
//   rule 1 (threshold): iff s_e >= min(value, the token's largest score)
// and every expert of a token in the dense sink (sink[t], when given). Returns the [N, E] mask.
// softplus is increasing, so each comparison is made on the logits z against the inverse
// softplus of the token's threshold, log(expm1(t)): two transcendental calls per token instead
// of one per score (the same selection up to rounding where a score equals its threshold).
static inline float softplus(float z) { return z > 20.f ? z : std::log1p(std::exp(z)); }
static inline float softplus_inverse(float t) {
  return t > 20.f ? t : t > 0.f ? std::log(std::expm1(t)) : -INFINITY;
}

Tensor router_mask(const Tensor& x, const Tensor& w1, const Tensor& b1, const Tensor& w2,
                   const Tensor& b2, int64_t rule, double value, const Tensor& sink) {
  Tensor h = at::addmm(b1, x, w1.t());
  h.clamp_min_(0);
  const Tensor z = at::addmm(b2, h, w2.t()).contiguous();
  const int64_t N = z.size(0), E = z.size(1);
  Tensor mask = torch::empty({N, E}, x.options().dtype(torch::kBool));
  const float* Z = z.data_ptr<float>();
  bool* M = mask.data_ptr<bool>();
  const bool* K = sink.numel() ? sink.data_ptr<bool>() : nullptr;
  const float v = (float)value, zv = softplus_inverse(v);
  for (int64_t t = 0; t < N; ++t) {
    const float* zt = Z + t * E;
    bool* mt = M + t * E;
    if (K && K[t]) {
      std::fill(mt, mt + E, true);
      continue;
    }
    float mx = zt[0];
    for (int64_t e = 1; e < E; ++e) mx = std::max(mx, zt[e]);
    // tau <= 1: the token's best expert passes in exact arithmetic, so the threshold is
    // capped at its logit (rounding in the round trip must not drop it)
    const float thr = std::min(rule == 0 ? softplus_inverse(v * softplus(mx)) : zv, mx);
    for (int64_t e = 0; e < E; ++e) mt[e] = zt[e] >= thr;
  }
  return mask;
}

// A routed layer in one call: the learned router's mask (router_mask), then the selected
// experts (ffn). Returns {y, mask}; y is empty where more than max_pairs pairs are selected
// (the caller then runs the dense product under the mask).
std::vector<Tensor> routed_ffn(const Tensor& x, const Tensor& r_w1, const Tensor& r_b1,
                               const Tensor& r_w2, const Tensor& r_b2, int64_t rule,
                               double value, const Tensor& sink, const Tensor& w_in,
                               const Tensor& b_in, const Tensor& w_gate, const Tensor& b_gate,
                               const Tensor& w_out, const Tensor& b_out, const Tensor& wp_in,
                               const Tensor& wp_gate, int64_t s, int64_t act, double max_fraction) {
  Tensor mask = router_mask(x, r_w1, r_b1, r_w2, r_b2, rule, value, sink);
  const int64_t max_pairs = (int64_t)(max_fraction * (double)mask.numel());
  Tensor y = ffn(x, mask, w_in, b_in, w_gate, b_gate, w_out, b_out, wp_in, wp_gate, s, act,
                 max_pairs);
  return {y, mask};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ffn", &ffn);
  m.def("threshold_ffn", &threshold_ffn);
  m.def("route", &route);
  m.def("pairs_in", &pairs_in);
  m.def("pairs_out", &pairs_out);
  m.def("tiled", &tiled);
  m.def("strips_pay", &strips_pay);
  m.def("router_mask", &router_mask);
  m.def("routed_ffn", &routed_ffn);
  m.def("pairs_in_packed", &pairs_in_packed);
  m.def("pairs_out_strips", &pairs_out_strips);
}
