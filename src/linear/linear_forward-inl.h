// SPDX-License-Identifier: Apache-2.0
// Linear attention forward: one chunked skeleton for plain, decayed and gated linear attention and
// BASED, plus the recurrent form; SIMD body (one copy per Highway target). The GEMM, the feature
// maps and the per-worker buffers here are shared with the backward (linear_backward-inl.h).
//
// What it computes (tessera/linear.h): o_t = sum_{s <= t} decay(t, s) scale phi(q_t).phi(k_s) v_s,
// optionally divided by the same sum without v (plus eps), plus BASED's sliding-window softmax
// part. One task = (sequence, query head); its state S (F x Dv) and normalizer z (F) live in the
// worker's scratch, so memory is O(threads x F x Dv) beyond the inputs and outputs.
//
// Chunked form (Lightning Attention-2's tiling, docs/algorithms.md §6.0/6.1/6.4): per chunk of C
// tokens, with B_i the cumulative log decay inside the chunk (B_i = (i + 1) ln lambda, or per
// channel the running sum of the GLA gates),
//   inter  O  = (phi(Q) o e^B) S                     GEMM C x F x Dv
//   intra  A  = mask(phi(Q) phi(K)^T o e^(B_i - B_j)) GEMM C x F x C (GLA: element-wise, no GEMM)
//          O += A V                                  GEMM C x C x Dv
//   state  S  = e^(B_last) o S + (phi(K) o e^(B_last - B_j))^T V   GEMM F x C x Dv
// Every exponent is <= 0 (decays are <= 1 and gates <= 0), so nothing overflows however long the
// sequence: the state only ever shrinks by the decay. The GLA intra-chunk term is computed per
// (i, j) pair as a vector sum over channels of e^(B_i - B_j) (the "secondary chunking" of fla is
// then unnecessary: no reference point is needed when the exponent is formed before exp).
// Prefix (JRT) and non-causal: the state of the prefix keys is accumulated first, the prefix
// queries read it, and the causal chunks continue from it.
//
// Bytes and FLOPs: per token and head 2 F Dv (inter) + C F + C Dv (intra, half masked) + 2 F Dv
// (state) multiply-adds; inputs are read once, so the cost per token does not depend on the
// sequence length. A state-only call (LASP-2's chunk states) does the state part alone, reading
// k, v (and the gates) but not q: no C x C product.

#if defined(TESSERA_LINEAR_LINEAR_FORWARD_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TESSERA_LINEAR_LINEAR_FORWARD_INL_H_
#undef TESSERA_LINEAR_LINEAR_FORWARD_INL_H_
#else
#define TESSERA_LINEAR_LINEAR_FORWARD_INL_H_
#endif

#include <hwy/aligned_allocator.h>
#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/parallel.h"
#include "linear/linear_problem.h"
#include "simd/convert-inl.h"

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace linear_impl {

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

inline size_t Lanes() { return hn::Lanes(DF()); }
inline size_t RoundUp(size_t n) { return (n + Lanes() - 1) / Lanes() * Lanes(); }

// C[R rows][V vectors] (+)= sum_p A(r, p) B[p][...]: the register block of Gemm.
template <int R, int V, bool kAcc>
HWY_INLINE void GemmBlock(size_t k, const float* HWY_RESTRICT a, size_t a_rs, size_t a_cs,
                          const float* HWY_RESTRICT b, size_t ldb, float* HWY_RESTRICT c,
                          size_t ldc) {
  const DF df;
  const size_t L = hn::Lanes(df);
  VF acc[R][V];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) {
      acc[r][v] = kAcc ? hn::LoadU(df, c + r * ldc + v * L) : hn::Zero(df);
    }
  }
  for (size_t p = 0; p < k; ++p) {
    VF bv[V];
    for (int v = 0; v < V; ++v) bv[v] = hn::LoadU(df, b + p * ldb + v * L);
    for (int r = 0; r < R; ++r) {
      const VF ar = hn::Set(df, a[r * a_rs + p * a_cs]);
      for (int v = 0; v < V; ++v) acc[r][v] = hn::MulAdd(ar, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) hn::StoreU(acc[r][v], df, c + r * ldc + v * L);
  }
}

template <int R, bool kAcc>
HWY_INLINE void GemmRows(size_t n, size_t k, const float* a, size_t a_rs, size_t a_cs,
                         const float* b, size_t ldb, float* c, size_t ldc) {
  const size_t L = Lanes();
  size_t j = 0;
  for (; j + 4 * L <= n; j += 4 * L)
    GemmBlock<R, 4, kAcc>(k, a, a_rs, a_cs, b + j, ldb, c + j, ldc);
  switch ((n - j) / L) {
    case 3:
      GemmBlock<R, 3, kAcc>(k, a, a_rs, a_cs, b + j, ldb, c + j, ldc);
      break;
    case 2:
      GemmBlock<R, 2, kAcc>(k, a, a_rs, a_cs, b + j, ldb, c + j, ldc);
      break;
    case 1:
      GemmBlock<R, 1, kAcc>(k, a, a_rs, a_cs, b + j, ldb, c + j, ldc);
      break;
    default:
      break;
  }
}

// C[m x n] (+)= A[m x k] B[k x n], with A(i, p) = a[i * a_rs + p * a_cs] (any layout, so A^T
// needs no copy), B rows `ldb` floats apart, C rows `ldc` apart; n is a multiple of the vector
// width (the buffers are padded with zeros).
template <bool kAcc>
void Gemm(size_t m, size_t n, size_t k, const float* a, size_t a_rs, size_t a_cs, const float* b,
          size_t ldb, float* c, size_t ldc) {
  size_t i = 0;
  for (; i + 4 <= m; i += 4) {
    GemmRows<4, kAcc>(n, k, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc);
  }
  for (; i < m; ++i) GemmRows<1, kAcc>(n, k, a + i * a_rs, a_rs, a_cs, b, ldb, c + i * ldc, ldc);
}

// The features the kernels use: phi, with the Taylor map's pair terms folded to unordered pairs,
// doubled by LRPE.
inline size_t KernelFeatureDim(const LinearProblem& p) {
  const size_t dk = static_cast<size_t>(p.dk);
  if (p.map == LinearFeatureMap::kTaylor2) return 1 + dk + dk * (dk + 1) / 2;
  return p.lrpe_theta != nullptr ? 2 * dk : dk;
}

// dst[0..fp) = phi(x[0..dk)) * mul in the kernels' feature basis (zero padded to fp).
inline void Features(LinearFeatureMap map, const float* x, size_t dk, float mul, float* dst,
                     size_t fp) {
  size_t f = 0;
  switch (map) {
    case LinearFeatureMap::kIdentity:
      for (; f < dk; ++f) dst[f] = x[f] * mul;
      break;
    case LinearFeatureMap::kElu1:
      for (; f < dk; ++f) dst[f] = (x[f] > 0.0f ? x[f] + 1.0f : std::exp(x[f])) * mul;
      break;
    case LinearFeatureMap::kRelu:
      for (; f < dk; ++f) dst[f] = std::max(x[f], 0.0f) * mul;
      break;
    case LinearFeatureMap::kTaylor2: {
      // [1, x / dk^(1/4), x_i x_j / (sqrt(2) sqrt(dk))] gives phi(q).phi(k) = 1 + s + s^2/2 with
      // s = q.k / sqrt(dk). The pair terms are symmetric, so the kernels keep one per unordered
      // pair: x_i^2 / (sqrt(2) sqrt(dk)) and x_i x_j / sqrt(dk) for i < j, the same dot product
      // with 1 + dk + dk (dk + 1) / 2 features instead of 1 + dk + dk^2 (TaylorFeatures).
      const float r4 = 1.0f / std::sqrt(std::sqrt(static_cast<float>(dk)));
      const float diag = mul / (std::sqrt(2.0f) * std::sqrt(static_cast<float>(dk)));
      const float off = mul / std::sqrt(static_cast<float>(dk));
      dst[f++] = mul;
      for (size_t i = 0; i < dk; ++i) dst[f++] = x[i] * r4 * mul;
      for (size_t i = 0; i < dk; ++i) {
        dst[f++] = x[i] * x[i] * diag;
        for (size_t j = i + 1; j < dk; ++j) dst[f++] = x[i] * x[j] * off;
      }
      break;
    }
  }
  for (; f < fp; ++f) dst[f] = 0.0f;
}

// LRPE's angles (LinearAttentionParams::lrpe_theta): cos and sin of p theta_f for every feature,
// a function of the position p alone, so every path that reads row p sees the same bits: exact
// (double trig) at the anchor p - p mod kLrpeAnchor, then rotated by theta_f once per position, in
// double. Reading positions in order costs one rotation (4 flops) per feature and position.
constexpr int64_t kLrpeAnchor = 64;
struct LrpeAngles {
  int64_t pos = -1;
  std::vector<double> c, s;
};
struct Lrpe {
  int64_t head = -1;
  std::vector<double> theta, step_c, step_s;
  LrpeAngles q, k, grad;    // the rows LoadQ, LoadK and the gradients' folds read
  std::vector<float> fold;  // [Dk] a folded feature gradient

  void SetHead(const LinearProblem& p, int64_t h) {
    if (head == h) return;
    head = h;
    const size_t dk = static_cast<size_t>(p.dk);
    theta.resize(dk), step_c.resize(dk), step_s.resize(dk), fold.resize(dk);
    for (size_t f = 0; f < dk; ++f) {
      theta[f] = p.lrpe_theta[h * p.lrpe_theta_stride[0] +
                              static_cast<int64_t>(f) * p.lrpe_theta_stride[1]];
      step_c[f] = std::cos(theta[f]);
      step_s[f] = std::sin(theta[f]);
    }
    q.pos = k.pos = grad.pos = -1;  // their angles belong to the previous head's theta
  }
  const LrpeAngles& At(LrpeAngles& a, int64_t pos) {
    if (a.pos == pos) return a;
    const size_t dk = theta.size();
    a.c.resize(dk), a.s.resize(dk);
    const int64_t anchor = pos - pos % kLrpeAnchor;
    if (a.pos < anchor || a.pos >= pos) {
      for (size_t f = 0; f < dk; ++f) {
        a.c[f] = std::cos(static_cast<double>(anchor) * theta[f]);
        a.s[f] = std::sin(static_cast<double>(anchor) * theta[f]);
      }
      a.pos = anchor;
    }
    for (; a.pos < pos; ++a.pos) {
      for (size_t f = 0; f < dk; ++f) {
        const double c = a.c[f] * step_c[f] - a.s[f] * step_s[f];
        a.s[f] = a.s[f] * step_c[f] + a.c[f] * step_s[f];
        a.c[f] = c;
      }
    }
    return a;
  }
};

// Per-worker buffers, carved from one aligned allocation per call.
struct Work {
  Lrpe* lrpe = nullptr;              // the worker's LRPE angles (set with lrpe_theta)
  size_t c, fi, fp, dvp, dkp, wide;  // fi: kernel features (KernelFeatureDim), fp: fi padded
  float* qf;    // [C][Fp] scaled phi(q) (GLA: times e^B after the inter product)
  float* kf;    // [C][Fp] phi(k)
  float* kt;    // [Fp][C] phi(k) transposed
  float* vv;    // [C][Dvp] values
  float* a;     // [C][C] intra-chunk weights
  float* o;     // [C][Dvp] outputs
  float* s;     // [Fp][Dvp] state
  float* z;     // [Fp] normalizer
  float* den;   // [C]
  float* cum;   // [C][Dkp] cumulative gates (GLA)
  float* aux;   // [C][Fp] phi(q) o e^B, phi(k) o e^(B_last - B)
  float* row;   // [wide] one converted input row
  float* row2;  // [wide]
  float* att;   // [window + 1] window scores
  float* pow;   // [C + 1] powers of the head's decay
  float* win;   // [C][Dvp] window part of the chunk's outputs (BASED)
  float* wq;    // [C][Dkp] raw q rows of the chunk
  float* wkt;   // [Dkp][M] raw k rows of the window's keys, transposed (M = C + window, padded)
  float* wv;    // [M][Dvp] their v rows
  float* wsc;   // [C][M] window scores, then probabilities
  size_t wm;    // M

  static size_t Floats(size_t c, size_t fp, size_t dvp, size_t dkp, size_t wide, size_t window) {
    const size_t m = window > 0 ? RoundUp(c + window) : 0;
    return 3 * c * fp + fp * c + 2 * c * dvp + c * c + fp * dvp + fp + c + c * dkp + c * fp +
           2 * wide + RoundUp(window + 1) + RoundUp(c + 1) +
           (window > 0 ? c * dvp + c * dkp + dkp * m + m * dvp + c * m : 0) +
           30 * 16;  // + the rounding of each buffer
  }
  void Carve(float* base, size_t c_, size_t fi_, size_t dvp_, size_t dkp_, size_t wide_,
             size_t window) {
    c = c_, fi = fi_, fp = RoundUp(fi_), dvp = dvp_, dkp = dkp_, wide = wide_;
    float* p = base;
    auto take = [&](size_t n) {
      float* r = p;
      p += RoundUp(n);
      return r;
    };
    qf = take(c * fp);
    kf = take(c * fp);
    kt = take(fp * c);
    vv = take(c * dvp);
    a = take(c * c);
    o = take(c * dvp);
    s = take(fp * dvp);
    z = take(fp);
    den = take(c);
    cum = take(c * dkp);
    aux = take(c * fp);
    row = take(wide);
    row2 = take(wide);
    att = take(window + 1);
    pow = take(c + 1);
    wm = window > 0 ? RoundUp(c + window) : 0;
    win = window > 0 ? take(c * dvp) : nullptr;
    wq = window > 0 ? take(c * dkp) : nullptr;
    wkt = window > 0 ? take(dkp * wm) : nullptr;
    wv = window > 0 ? take(wm * dvp) : nullptr;
    wsc = window > 0 ? take(c * wm) : nullptr;
  }
};

// The task's view of the problem: sequence b, query head h.
struct Head {
  const LinearProblem& p;
  int64_t b, h, kvh;
  float ln_lambda;          // log of the head's decay (0: none)
  const float* pow_lambda;  // [C + 1] lambda^k

  void LoadQ(Work& w, int64_t t, float* dst) const {
    LoadRow(p.dtype, p.q, p.offset(p.q_stride, b, t, h), p.q_stride[3], static_cast<size_t>(p.dk),
            w.row);
    Features(p.map, w.row, static_cast<size_t>(p.dk), p.scale, dst, w.fp);
    if (p.lrpe_theta != nullptr) Lrpe(w.lrpe->At(w.lrpe->q, p.position_offset + t), dst);
  }
  void LoadK(Work& w, int64_t t, float* dst) const {
    LoadRow(p.dtype, p.k, p.offset(p.k_stride, b, t, kvh), p.k_stride[3], static_cast<size_t>(p.dk),
            w.row);
    Features(p.map, w.row, static_cast<size_t>(p.dk), 1.0f, dst, w.fp);
    if (p.lrpe_theta != nullptr) Lrpe(w.lrpe->At(w.lrpe->k, p.position_offset + t), dst);
  }
  // LRPE's doubling of a feature row (Features wrote phi to [0, Dk) and zeros past it).
  void Lrpe(const LrpeAngles& a, float* dst) const {
    const size_t dk = static_cast<size_t>(p.dk);
    for (size_t f = 0; f < dk; ++f) {
      const double x = dst[f];
      dst[f] = static_cast<float>(x * a.c[f]);
      dst[dk + f] = static_cast<float>(x * a.s[f]);
    }
  }
  // The gradient of row t's 2 Dk LRPE features folded onto the Dk features of phi (LRPE), or
  // dphi itself.
  const float* FoldLrpe(Work& w, int64_t t, const float* dphi) const {
    if (p.lrpe_theta == nullptr) return dphi;
    const LrpeAngles& a = w.lrpe->At(w.lrpe->grad, p.position_offset + t);
    const size_t dk = static_cast<size_t>(p.dk);
    for (size_t f = 0; f < dk; ++f) {
      w.lrpe->fold[f] = static_cast<float>(dphi[f] * a.c[f] + dphi[dk + f] * a.s[f]);
    }
    return w.lrpe->fold.data();
  }
  void LoadV(Work& w, int64_t t, float* dst) const {
    LoadRow(p.dtype, p.v, p.offset(p.v_stride, b, t, kvh), p.v_stride[3], static_cast<size_t>(p.dv),
            dst);
    for (size_t d = static_cast<size_t>(p.dv); d < w.dvp; ++d) dst[d] = 0.0f;
  }
  // w.cum[i][c] = the sum of the gates of tokens t0..t0+i, channel c (zero past Dk).
  void GateSums(Work& w, int64_t t0, size_t n) const {
    for (size_t i = 0; i < n; ++i) {
      for (size_t c = 0; c < w.dkp; ++c) {
        const float g =
            c < static_cast<size_t>(p.dk) ? Gate(t0 + static_cast<int64_t>(i), c) : 0.0f;
        w.cum[i * w.dkp + c] = (i > 0 ? w.cum[(i - 1) * w.dkp + c] : 0.0f) + g;
      }
    }
  }

  // Prefetches the q (with_q), k, v (and gate) rows of token t into L2, when it exists.
  void Prefetch(int64_t t, bool with_q = true) const {
    if (t >= p.seq) return;
    const int64_t elem = static_cast<int64_t>(DTypeSize(p.dtype));
    // Rows with unit element stride only: a strided row's span (any stride fits a view whose
    // dim is 1) is not worth prefetching, and its product could overflow.
    const auto rows = [&](const void* base, int64_t off, int64_t dim, int64_t stride) {
      if (stride != 1) return;
      const char* row = static_cast<const char*>(base) + off * elem;
      for (int64_t b2 = 0; b2 < dim * elem; b2 += 64) __builtin_prefetch(row + b2, 0, 2);
    };
    if (with_q) rows(p.q, p.offset(p.q_stride, b, t, h), p.dk, p.q_stride[3]);
    rows(p.k, p.offset(p.k_stride, b, t, kvh), p.dk, p.k_stride[3]);
    rows(p.v, p.offset(p.v_stride, b, t, kvh), p.dv, p.v_stride[3]);
    if (p.gates != nullptr && (p.scalar_gates || p.gates_stride[3] == 1)) {
      const char* g = reinterpret_cast<const char*>(p.gates + p.offset(p.gates_stride, b, t, h));
      const int64_t bytes = p.scalar_gates ? 4 : p.dk * 4;
      for (int64_t b2 = 0; b2 < bytes; b2 += 64) __builtin_prefetch(g + b2, 0, 2);
    }
  }
  float Gate(int64_t t, size_t c) const {
    return p.gates[p.offset(p.gates_stride, b, t, h) + static_cast<int64_t>(c) * p.gates_stride[3]];
  }

  // BASED's exact part: o += softmax(q_t . k_j / sqrt(Dk)) v_j over keys [t - window + 1, t].
  void AddWindow(Work& w, int64_t t, float* o) const {
    const size_t dk = static_cast<size_t>(p.dk), dv = static_cast<size_t>(p.dv);
    const int64_t j0 = std::max<int64_t>(0, t - p.window + 1);
    LoadRow(p.dtype, p.q, p.offset(p.q_stride, b, t, h), p.q_stride[3], dk, w.row);
    const float inv = 1.0f / std::sqrt(static_cast<float>(dk));
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = j0; j <= t; ++j) {
      LoadRow(p.dtype, p.k, p.offset(p.k_stride, b, j, kvh), p.k_stride[3], dk, w.row2);
      float dot = 0.0f;
      for (size_t d = 0; d < dk; ++d) dot += w.row[d] * w.row2[d];
      w.att[j - j0] = dot * inv;
      mx = std::max(mx, w.att[j - j0]);
    }
    float sum = 0.0f;
    for (int64_t j = j0; j <= t; ++j) sum += (w.att[j - j0] = std::exp(w.att[j - j0] - mx));
    const float norm = 1.0f / sum;
    for (int64_t j = j0; j <= t; ++j) {
      LoadRow(p.dtype, p.v, p.offset(p.v_stride, b, j, kvh), p.v_stride[3], dv, w.row2);
      const float pj = w.att[j - j0] * norm;
      for (size_t d = 0; d < dv; ++d) o[d] += pj * w.row2[d];
    }
  }

  // BASED's exact part for the queries [t0, t0 + n) at once, into w.win: scores against the keys
  // [t0 - window + 1, t0 + n) as one GEMM, a masked softmax per row, then one GEMM with V.
  void WindowChunk(Work& w, int64_t t0, size_t n) const {
    const size_t dk = static_cast<size_t>(p.dk), dkp = w.dkp, dvp = w.dvp, m = w.wm;
    const int64_t k0 = std::max<int64_t>(0, t0 - p.window + 1);
    const size_t keys = static_cast<size_t>(t0 + static_cast<int64_t>(n) - k0);
    for (size_t i = 0; i < n; ++i) {
      LoadRow(p.dtype, p.q, p.offset(p.q_stride, b, t0 + static_cast<int64_t>(i), h), p.q_stride[3],
              dk, w.wq + i * dkp);
      for (size_t d = dk; d < dkp; ++d) w.wq[i * dkp + d] = 0.0f;
    }
    for (size_t j = 0; j < m; ++j) {
      if (j < keys) {
        const int64_t t = k0 + static_cast<int64_t>(j);
        LoadRow(p.dtype, p.k, p.offset(p.k_stride, b, t, kvh), p.k_stride[3], dk, w.row);
        LoadV(w, t, w.wv + j * dvp);
      }
      for (size_t d = 0; d < dk; ++d) w.wkt[d * m + j] = j < keys ? w.row[d] : 0.0f;
    }
    Gemm<false>(n, m, dk, w.wq, dkp, 1, w.wkt, m, w.wsc, m);
    const float inv = 1.0f / std::sqrt(static_cast<float>(dk));
    for (size_t i = 0; i < n; ++i) {
      // Visible keys of query t: [t - window + 1, t], as indices into the loaded keys.
      const int64_t t = t0 + static_cast<int64_t>(i);
      const size_t lo = static_cast<size_t>(std::max<int64_t>(k0, t - p.window + 1) - k0);
      const size_t hi = static_cast<size_t>(t - k0);
      float* row = w.wsc + i * m;
      float mx = -std::numeric_limits<float>::infinity();
      for (size_t j = lo; j <= hi; ++j) mx = std::max(mx, row[j] * inv);
      float sum = 0.0f;
      for (size_t j = 0; j < m; ++j) {
        row[j] = j >= lo && j <= hi ? std::exp(row[j] * inv - mx) : 0.0f;
        sum += row[j];
      }
      const float norm = 1.0f / sum;
      for (size_t j = lo; j <= hi; ++j) row[j] *= norm;
    }
    Gemm<false>(n, dvp, keys, w.wsc, m, 1, w.wv, dvp, w.win, dvp);
  }

  // Normalization, the window part and the store of output row t from o (den[i] its denominator).
  // `win`: the row's window part when computed for the whole chunk, else nullptr.
  void Finish(Work& w, int64_t t, float* o, float den, const float* win = nullptr) const {
    if (p.normalize) {
      const float inv = NormalizerReciprocal(den, p.eps);
      for (size_t d = 0; d < static_cast<size_t>(p.dv); ++d) o[d] *= inv;
    }
    if (win != nullptr) {
      for (size_t d = 0; d < static_cast<size_t>(p.dv); ++d) o[d] += win[d];
    } else if (p.window > 0) {
      AddWindow(w, t, o);
    }
    StoreStridedScaled(p.dtype, o, 1, static_cast<size_t>(p.dv), 1.0f, p.out,
                       p.offset(p.out_stride, b, t, h), p.out_stride[3]);
  }

  // Row of the API's state (feature f of F) that kernel feature fk holds, and its weight: the
  // Taylor map's pair (i, j), i < j, is one kernel feature carrying both ordered pairs.
  void ApiRows(size_t fk, int64_t* f1, int64_t* f2, float* weight) const {
    const int64_t dk = p.dk;
    *f2 = -1;
    *weight = 1.0f;
    if (p.map != LinearFeatureMap::kTaylor2 || fk < static_cast<size_t>(1 + dk)) {
      *f1 = static_cast<int64_t>(fk);
      return;
    }
    int64_t rest = static_cast<int64_t>(fk) - 1 - dk, i = 0;
    while (rest >= dk - i) rest -= dk - i, ++i;
    const int64_t j = i + rest;
    *f1 = 1 + dk + i * dk + j;
    if (j != i) {
      *f2 = 1 + dk + j * dk + i;
      *weight = 1.0f / std::sqrt(2.0f);
    }
  }

  // Adds an API-basis state of this task, [F, Dv] at `state` (strides st) and [F] at `norm`
  // (strides nt; either may be nullptr), into the kernel basis: feature fk, column d at
  // dst[fk * rs + d * cs], the normalizer at z[fk * zs]. A Taylor pair feature holds
  // (S[i, j] + S[j, i]) / sqrt(2): the part of S the symmetric features can see (and, read as a
  // gradient, the gradient of that feature from the two ordered pairs').
  void AddApiState(const float* state, const int64_t* st, const float* norm, const int64_t* nt,
                   size_t fi, float* dst, size_t rs, size_t cs, float* z, size_t zs) const {
    for (size_t fk = 0; fk < fi; ++fk) {
      int64_t f1, f2;
      float weight;
      ApiRows(fk, &f1, &f2, &weight);
      for (int64_t f : {f1, f2}) {
        if (f < 0) continue;
        if (state != nullptr) {
          const float* src = state + b * st[0] + h * st[1] + f * st[2];
          for (int64_t d = 0; d < p.dv; ++d) {
            dst[fk * rs + static_cast<size_t>(d) * cs] += weight * src[d * st[3]];
          }
        }
        if (norm != nullptr) z[fk * zs] += weight * norm[b * nt[0] + h * nt[1] + f * nt[2]];
      }
    }
  }
  // The inverse map, kernel basis to the API's: a Taylor pair feature splits evenly over (i, j)
  // and (j, i) (read as a gradient: each ordered pair's gradient is the feature's / sqrt(2)).
  void StoreApiState(const float* src, size_t rs, size_t cs, const float* z, size_t zs, size_t fi,
                     float* state, const int64_t* st, float* norm, const int64_t* nt) const {
    for (size_t fk = 0; fk < fi; ++fk) {
      int64_t f1, f2;
      float weight;
      ApiRows(fk, &f1, &f2, &weight);
      for (int64_t f : {f1, f2}) {
        if (f < 0) continue;
        if (state != nullptr) {
          float* dst = state + b * st[0] + h * st[1] + f * st[2];
          for (int64_t d = 0; d < p.dv; ++d) {
            dst[d * st[3]] = weight * src[fk * rs + static_cast<size_t>(d) * cs];
          }
        }
        if (norm != nullptr) norm[b * nt[0] + h * nt[1] + f * nt[2]] = weight * z[fk * zs];
      }
    }
  }

  // S and z from the initial state (or zero).
  void InitState(Work& w) const {
    std::memset(w.s, 0, w.fp * w.dvp * sizeof(float));
    std::memset(w.z, 0, w.fp * sizeof(float));
    AddApiState(p.state_in, p.state_in_stride, p.norm_in, p.norm_in_stride, w.fi, w.s, w.dvp, 1,
                w.z, 1);
  }
  // The final state in the API's basis.
  void StoreState(const Work& w) const {
    StoreApiState(w.s, w.dvp, 1, w.z, 1, w.fi, p.state_out, p.state_out_stride, p.norm_out,
                  p.norm_out_stride);
  }
};

// z += sum_j rows[j] (n rows of fp floats).
inline void AddRows(const float* rows, size_t n, size_t fp, float* z) {
  for (size_t j = 0; j < n; ++j) {
    for (size_t f = 0; f < fp; ++f) z[f] += rows[j * fp + f];
  }
}

// The prefix keys (JRT, non-causal): S += phi(K)^T V, z += phi(K) over keys [0, prefix).
inline void PrefixState(const Head& hd, Work& w) {
  const LinearProblem& p = hd.p;
  const size_t F = w.fi;
  for (int64_t t0 = 0; t0 < p.prefix; t0 += static_cast<int64_t>(w.c)) {
    const size_t n =
        static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(w.c), p.prefix - t0));
    for (size_t j = 0; j < n; ++j) {
      hd.LoadK(w, t0 + static_cast<int64_t>(j), w.kf + j * w.fp);
      hd.LoadV(w, t0 + static_cast<int64_t>(j), w.vv + j * w.dvp);
    }
    Gemm<true>(F, w.dvp, n, w.kf, 1, w.fp, w.vv, w.dvp, w.s, w.dvp);
    AddRows(w.kf, n, w.fp, w.z);
  }
}

// The prefix part (JRT, non-causal): the state of keys [0, prefix), then every query t < prefix
// reads it. emit(t, o, den) receives each unnormalized output row.
template <class Emit>
void PrefixChunks(const Head& hd, Work& w, const Emit& emit) {
  const LinearProblem& p = hd.p;
  const size_t F = w.fi;
  PrefixState(hd, w);
  for (int64_t t0 = 0; t0 < p.prefix; t0 += static_cast<int64_t>(w.c)) {
    const size_t n =
        static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(w.c), p.prefix - t0));
    for (size_t i = 0; i < n; ++i) hd.LoadQ(w, t0 + static_cast<int64_t>(i), w.qf + i * w.fp);
    Gemm<false>(n, w.dvp, F, w.qf, w.fp, 1, w.s, w.dvp, w.o, w.dvp);
    for (size_t i = 0; i < n; ++i) {
      float den = 0.0f;
      for (size_t f = 0; f < F; ++f) den += w.qf[i * w.fp + f] * w.z[f];
      emit(t0 + static_cast<int64_t>(i), w.o + i * w.dvp, den);
    }
  }
}

// Scalar gates (one per token, every channel alike): the pair's decay e^(B_i - B_j), exponent
// <= 0, from channel 0 of the cumulative sums.
inline float ScalarGatePair(const Work& w, size_t i, size_t j) {
  return std::exp(w.cum[i * w.dkp] - w.cum[j * w.dkp]);
}

// GLA's exact intra-chunk weight of the pair (i, j), j <= i: sum_c qf_ic kf_jc e^(B_ic - B_jc),
// every exponent <= 0 whatever the gates.
inline float GatedDot(const Work& w, size_t i, size_t j) {
  const DF df;
  VF acc = hn::Zero(df);
  for (size_t c = 0; c < w.dkp; c += hn::Lanes(df)) {
    const VF e = hn::Exp(
        df, hn::Sub(hn::LoadU(df, w.cum + i * w.dkp + c), hn::LoadU(df, w.cum + j * w.dkp + c)));
    acc = hn::MulAdd(
        hn::Mul(hn::LoadU(df, w.qf + i * w.fp + c), hn::LoadU(df, w.kf + j * w.fp + c)), e, acc);
  }
  return hn::GetLane(hn::SumOfLanes(df, acc));
}

// For every pair j <= i of the chunk, with weight g[i][j] e^(B_i - B_j) per channel:
// to_keys: dst[j] += weight o src[i] (dkf from qf); else dst[i] += weight o src[j] (dqf from kf).
inline void AddGatedPairs(const Work& w, const float* g, size_t n, const float* src, float* dst,
                          bool to_keys) {
  const DF df;
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j <= i; ++j) {
      const VF gij = hn::Set(df, g[i * w.c + j]);
      const size_t from = to_keys ? i : j, to = to_keys ? j : i;
      for (size_t c = 0; c < w.dkp; c += hn::Lanes(df)) {
        const VF e = hn::Exp(df, hn::Sub(hn::LoadU(df, w.cum + i * w.dkp + c),
                                         hn::LoadU(df, w.cum + j * w.dkp + c)));
        float* d = dst + to * w.fp + c;
        hn::StoreU(
            hn::MulAdd(hn::Mul(gij, e), hn::LoadU(df, src + from * w.fp + c), hn::LoadU(df, d)), df,
            d);
      }
    }
  }
}

// The state past a chunk of n tokens whose phi(k), v rows (and gate sums) are in w:
// S = e^(B_last) o S + (phi(K) o e^(B_last - B_j))^T V, likewise z.
inline void AdvanceState(const Head& hd, Work& w, size_t n) {
  const LinearProblem& p = hd.p;
  const size_t F = w.fi, fp = w.fp, dvp = w.dvp;
  const bool gla = p.gates != nullptr, decay = hd.ln_lambda != 0.0f;
  const DF df;
  const size_t L = hn::Lanes(df);
  const float* kout = w.kf;
  if (gla || decay) {
    for (size_t j = 0; j < n; ++j) {
      const VF scalar = hn::Set(df, hd.pow_lambda[n - 1 - j]);
      for (size_t f = 0; f < fp; f += L) {
        const VF e = gla ? hn::Exp(df, hn::Sub(hn::LoadU(df, w.cum + (n - 1) * w.dkp + f),
                                               hn::LoadU(df, w.cum + j * w.dkp + f)))
                         : scalar;
        hn::StoreU(hn::Mul(hn::LoadU(df, w.kf + j * fp + f), e), df, w.aux + j * fp + f);
      }
    }
    kout = w.aux;
    for (size_t f = 0; f < F; ++f) {
      const float e = gla ? std::exp(w.cum[(n - 1) * w.dkp + f]) : hd.pow_lambda[n];
      const VF ev = hn::Set(df, e);
      for (size_t d = 0; d < dvp; d += L) {
        hn::StoreU(hn::Mul(ev, hn::LoadU(df, w.s + f * dvp + d)), df, w.s + f * dvp + d);
      }
      w.z[f] *= e;
    }
  }
  Gemm<true>(F, dvp, n, kout, 1, fp, w.vv, dvp, w.s, dvp);
  AddRows(kout, n, fp, w.z);
}

// One causal chunk [t0, t0 + n) of the chunked form; emit(t, o, den) receives each
// unnormalized output row.
template <class Emit>
void CausalChunk(const Head& hd, Work& w, int64_t t0, size_t n, const Emit& emit) {
  const LinearProblem& p = hd.p;
  const size_t F = w.fi, C = w.c, fp = w.fp, dvp = w.dvp;
  const bool gla = p.gates != nullptr, decay = hd.ln_lambda != 0.0f;
  for (size_t i = 0; i < n; ++i) {
    const int64_t t = t0 + static_cast<int64_t>(i);
    hd.LoadQ(w, t, w.qf + i * fp);
    hd.LoadK(w, t, w.kf + i * fp);
    hd.LoadV(w, t, w.vv + i * dvp);
    // The same row of the next chunk into L2: rows of one head are H x D elements apart, a
    // stride the hardware prefetcher does not follow far enough ahead on its own.
    hd.Prefetch(t + static_cast<int64_t>(C));
  }
  const DF df;
  const size_t L = hn::Lanes(df);
  if (gla) hd.GateSums(w, t0, n);
  // Inter-chunk: O = (phi(Q) o e^B) S, den = (phi(Q) o e^B) . z.
  const float* qin = w.qf;
  if (gla || decay) {
    for (size_t i = 0; i < n; ++i) {
      const VF scalar = hn::Set(df, hd.pow_lambda[i + 1]);
      for (size_t f = 0; f < fp; f += L) {
        const VF e = gla ? hn::Exp(df, hn::LoadU(df, w.cum + i * w.dkp + f)) : scalar;
        hn::StoreU(hn::Mul(hn::LoadU(df, w.qf + i * fp + f), e), df, w.aux + i * fp + f);
      }
    }
    qin = w.aux;
  }
  Gemm<false>(n, dvp, F, qin, fp, 1, w.s, dvp, w.o, dvp);
  for (size_t i = 0; i < n; ++i) {
    float den = 0.0f;
    for (size_t f = 0; f < F; ++f) den += qin[i * fp + f] * w.z[f];
    w.den[i] = den;
  }
  // Intra-chunk weights A (lower triangle, diagonal included): one GEMM of phi(Q) against
  // phi(K)^T, with the decay applied as lambda^(i - j) after it; for GLA, while the chunk's gates
  // sum to more than -kMaxGateSpan per channel, the GEMM of (phi(Q) o e^B) against
  // (phi(K) o e^-B)^T (every factor within e^kMaxGateSpan, far from overflow), else a vector sum
  // over channels of e^(B_i - B_j) per pair (exponents <= 0 whatever the gates). Scalar gates
  // take the decay's route: the GEMM of phi(Q) against phi(K)^T, times e^(B_i - B_j) per pair.
  constexpr float kMaxGateSpan = 60.0f;
  const bool channel_gates = gla && !p.scalar_gates;
  bool factored = !channel_gates;
  if (channel_gates) {
    float span = 0.0f;
    for (size_t c = 0; c < F; ++c) span = std::max(span, -w.cum[(n - 1) * w.dkp + c]);
    factored = span < kMaxGateSpan;
  }
  if (factored) {
    for (size_t j = 0; j < C; ++j) {
      const float* kj = w.kf + j * fp;
      if (j < n && channel_gates) {
        for (size_t f = 0; f < fp; f += L) {
          hn::StoreU(hn::Mul(hn::LoadU(df, kj + f),
                             hn::Exp(df, hn::Neg(hn::LoadU(df, w.cum + j * w.dkp + f)))),
                     df, w.row2 + f);
        }
        kj = w.row2;
      }
      for (size_t f = 0; f < F; ++f) w.kt[f * C + j] = j < n ? kj[f] : 0.0f;
    }
    Gemm<false>(n, C, F, channel_gates ? qin : w.qf, fp, 1, w.kt, C, w.a, C);
    for (size_t i = 0; i < n; ++i) {
      for (size_t j = 0; j <= i && decay; ++j) w.a[i * C + j] *= hd.pow_lambda[i - j];
      for (size_t j = 0; j <= i && gla && !channel_gates; ++j)
        w.a[i * C + j] *= ScalarGatePair(w, i, j);
      for (size_t j = i + 1; j < C; ++j) w.a[i * C + j] = 0.0f;
    }
  } else {
    for (size_t i = 0; i < n; ++i) {
      for (size_t j = 0; j <= i; ++j) w.a[i * C + j] = GatedDot(w, i, j);
      for (size_t j = i + 1; j < C; ++j) w.a[i * C + j] = 0.0f;
    }
  }
  // The upper triangle is zero: row i of A V needs keys 0..i only, so rows are done in blocks of
  // 16 against the keys up to the block's end.
  for (size_t i0 = 0; i0 < n; i0 += 16) {
    const size_t rows = std::min<size_t>(16, n - i0);
    Gemm<true>(rows, dvp, i0 + rows, w.a + i0 * C, C, 1, w.vv, dvp, w.o + i0 * dvp, dvp);
  }
  for (size_t i = 0; i < n; ++i) {
    float sum = 0.0f;
    for (size_t j = 0; j <= i; ++j) sum += w.a[i * C + j];
    w.den[i] += sum;
  }
  AdvanceState(hd, w, n);
  for (size_t i = 0; i < n; ++i) emit(t0 + static_cast<int64_t>(i), w.o + i * dvp, w.den[i]);
}

// One chunk of a state-only call: the chunk's phi(k), v rows (and gate sums) and AdvanceState,
// the operations CausalChunk does for the state, so the final state is the same bit for bit.
inline void StateOnlyChunk(const Head& hd, Work& w, int64_t t0, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const int64_t t = t0 + static_cast<int64_t>(i);
    hd.LoadK(w, t, w.kf + i * w.fp);
    hd.LoadV(w, t, w.vv + i * w.dvp);
    hd.Prefetch(t + static_cast<int64_t>(w.c), /*with_q=*/false);
  }
  if (hd.p.gates != nullptr) hd.GateSums(w, t0, n);
  AdvanceState(hd, w, n);
}
// One token of the recurrent form: S = a o S + phi(k) v^T, z = a o z + phi(k), o = phi(q)^T S.
inline void RecurrentToken(const Head& hd, Work& w, int64_t t) {
  const LinearProblem& p = hd.p;
  const size_t F = w.fi, dvp = w.dvp;
  const DF df;
  const size_t L = hn::Lanes(df);
  hd.LoadK(w, t, w.kf);
  hd.LoadV(w, t, w.vv);
  hd.LoadQ(w, t, w.qf);
  for (size_t f = 0; f < F; ++f) {
    const float a = p.gates != nullptr ? std::exp(hd.Gate(t, f)) : std::exp(hd.ln_lambda);
    const VF av = hn::Set(df, a), kv = hn::Set(df, w.kf[f]);
    for (size_t d = 0; d < dvp; d += L) {
      float* s = w.s + f * dvp + d;
      hn::StoreU(hn::MulAdd(kv, hn::LoadU(df, w.vv + d), hn::Mul(av, hn::LoadU(df, s))), df, s);
    }
    w.z[f] = a * w.z[f] + w.kf[f];
  }
  float den = 0.0f;
  for (size_t d = 0; d < dvp; d += L) hn::StoreU(hn::Zero(df), df, w.o + d);
  for (size_t f = 0; f < F; ++f) {
    const VF qv = hn::Set(df, w.qf[f]);
    for (size_t d = 0; d < dvp; d += L) {
      hn::StoreU(hn::MulAdd(qv, hn::LoadU(df, w.s + f * dvp + d), hn::LoadU(df, w.o + d)), df,
                 w.o + d);
    }
    den += w.qf[f] * w.z[f];
  }
  hd.Finish(w, t, w.o, den);
}

}  // namespace linear_impl

// Runs the chunked (recurrent = false) or recurrent form over every (sequence, query head); with
// p.out == nullptr (validated: a state-only call) only the final state. Returns false when
// scratch could not be allocated.
bool LinearForward(const LinearProblem& p, int32_t threads, bool recurrent) {
  using namespace linear_impl;  // NOLINT
  // With no tokens each task still hands its initial state over to the final one.
  const int64_t tasks = p.batch * p.heads_q;
  if (tasks == 0) return true;
  const size_t c = static_cast<size_t>(p.chunk), fi = KernelFeatureDim(p), fp = RoundUp(fi),
               dvp = RoundUp(static_cast<size_t>(p.dv)), dkp = RoundUp(static_cast<size_t>(p.dk));
  const size_t wide = std::max({fp, dvp, dkp});
  const size_t per_worker =
      RoundUp(Work::Floats(c, fp, dvp, dkp, wide, static_cast<size_t>(p.window)) + 64);
  const int32_t workers =
      static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
  auto storage = hwy::AllocateAligned<float>(per_worker * static_cast<size_t>(workers));
  if (!storage) return false;
  std::vector<Lrpe> lrpe(p.lrpe_theta != nullptr ? static_cast<size_t>(workers) : 0);
  ParallelFor(workers, tasks, [&](int64_t task, int32_t worker) {
    Work w;
    w.Carve(storage.get() + per_worker * static_cast<size_t>(worker), c, fi, dvp, dkp, wide,
            static_cast<size_t>(p.window));
    const int64_t b = task / p.heads_q, h = task % p.heads_q;
    if (p.lrpe_theta != nullptr) {
      w.lrpe = &lrpe[static_cast<size_t>(worker)];
      w.lrpe->SetHead(p, h);
    }
    const float lambda = p.decay != nullptr ? p.decay[h * p.decay_stride] : 1.0f;
    for (size_t i = 0; i <= c; ++i) w.pow[i] = std::exp(static_cast<float>(i) * std::log(lambda));
    const Head hd{p, b, h, h / p.group, std::log(lambda), w.pow};
    hd.InitState(w);
    if (recurrent) {
      // The prefix state first (its keys are visible to every query), then token by token.
      for (int64_t t = 0; t < p.prefix; ++t) {
        hd.LoadK(w, t, w.kf);
        hd.LoadV(w, t, w.vv);
        Gemm<true>(fi, dvp, 1, w.kf, 1, fp, w.vv, dvp, w.s, dvp);
        AddRows(w.kf, 1, fp, w.z);
      }
      for (int64_t t = 0; t < p.prefix; ++t) {
        hd.LoadQ(w, t, w.qf);
        Gemm<false>(1, dvp, fi, w.qf, fp, 1, w.s, dvp, w.o, dvp);
        float den = 0.0f;
        for (size_t f = 0; f < fi; ++f) den += w.qf[f] * w.z[f];
        hd.Finish(w, t, w.o, den);
      }
      for (int64_t t = p.prefix; t < p.seq; ++t) RecurrentToken(hd, w, t);
    } else if (p.out == nullptr) {
      // State only: the chunks' state updates, no queries and no outputs (the window part never
      // enters the state).
      PrefixState(hd, w);
      for (int64_t t0 = p.prefix; t0 < p.seq; t0 += p.chunk) {
        StateOnlyChunk(hd, w, t0, static_cast<size_t>(std::min(p.chunk, p.seq - t0)));
      }
    } else {
      // Outputs leave chunk by chunk; the window part of a chunk is computed with its first row.
      int64_t window_chunk = -1;
      const auto finish = [&](int64_t t, float* o, float den) {
        const float* win = nullptr;
        if (p.window > 0) {
          const int64_t t0 =
              t < p.prefix ? t / p.chunk * p.chunk : p.prefix + (t - p.prefix) / p.chunk * p.chunk;
          if (t0 != window_chunk) {
            const int64_t end = t < p.prefix ? p.prefix : p.seq;
            hd.WindowChunk(w, t0, static_cast<size_t>(std::min(p.chunk, end - t0)));
            window_chunk = t0;
          }
          win = w.win + static_cast<size_t>(t - t0) * w.dvp;
        }
        hd.Finish(w, t, o, den, win);
      };
      PrefixChunks(hd, w, finish);
      for (int64_t t0 = p.prefix; t0 < p.seq; t0 += p.chunk) {
        CausalChunk(hd, w, t0, static_cast<size_t>(std::min(p.chunk, p.seq - t0)), finish);
      }
    }
    hd.StoreState(w);
  });
  return true;
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_LINEAR_LINEAR_FORWARD_INL_H_
