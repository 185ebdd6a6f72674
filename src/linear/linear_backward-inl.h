// SPDX-License-Identifier: Apache-2.0
// Linear attention backward, SIMD body (one copy per Highway target): the gradients of the
// chunked form, built on the forward's buffers and GEMM (linear_forward-inl.h). With
// qf = scale phi(q), kf = phi(k), B the cumulative log decay of the chunk (as in the forward),
// G_ij = do_i . v_j and D_ij = e^(B_i - B_j) (per channel for GLA), for keys j <= i:
//   dqf_i = e^B_i o (S_prev do_i) + sum_j G_ij D_ij kf_j                 (forward sweep, state S)
//   dkf_j = e^(B_last - B_j) o (dS v_j) + sum_i G_ij D_ij qf_i            (reverse sweep, dS)
//   dv_j  = (kf_j o e^(B_last - B_j))^T dS + sum_i W_ij do_i,  W_ij = qf_i.(D_ij o kf_j)
//   dS   <- e^B_last o dS + sum_i (qf_i o e^B_i) do_i^T                 (to the previous chunk)
// and for GLA, dB_t = qf_t o dqf_t - kf_t o dkf_t, dg_t = sum_{r >= t} dB_r. Normalization is
// the same with v' = [v, 1] and do' = [do / (den + eps), -(do . o) / (den + eps)] (o the
// normalized output, recomputed first). dq, dk follow through the feature map's Jacobian.
// States (sequence parallelism): the forward sweep starts from the initial state, the reverse
// sweep from dS = d_final_state and ends with dS = d_initial_state (the prefix queries' part
// included); for GLA the final state's factor e^(B_last) adds sum_d dS_final S_final, per channel,
// to the gradient of every gate. Each sweep runs only for the outputs that need it.

#if defined(TESSERA_LINEAR_LINEAR_BACKWARD_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TESSERA_LINEAR_LINEAR_BACKWARD_INL_H_
#undef TESSERA_LINEAR_LINEAR_BACKWARD_INL_H_
#else
#define TESSERA_LINEAR_LINEAR_BACKWARD_INL_H_
#endif

#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "core/parallel.h"
#include "linear/linear_forward-inl.h"
#include "linear/linear_problem.h"
#include "simd/convert-inl.h"

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace linear_impl {

namespace hn = hwy::HWY_NAMESPACE;

// dx[0..dk) = mul * J_phi(x)^T dphi, in the kernels' feature basis (Features).
inline void FeatureGrad(LinearFeatureMap map, const float* x, size_t dk, float mul,
                        const float* dphi, float* dx) {
  switch (map) {
    case LinearFeatureMap::kIdentity:
      for (size_t i = 0; i < dk; ++i) dx[i] = mul * dphi[i];
      return;
    case LinearFeatureMap::kElu1:
      for (size_t i = 0; i < dk; ++i) dx[i] = mul * dphi[i] * (x[i] > 0.0f ? 1.0f : std::exp(x[i]));
      return;
    case LinearFeatureMap::kRelu:
      for (size_t i = 0; i < dk; ++i) dx[i] = x[i] > 0.0f ? mul * dphi[i] : 0.0f;
      return;
    case LinearFeatureMap::kTaylor2: {
      const float r4 = 1.0f / std::sqrt(std::sqrt(static_cast<float>(dk)));
      const float diag = mul / (std::sqrt(2.0f) * std::sqrt(static_cast<float>(dk)));
      const float off = mul / std::sqrt(static_cast<float>(dk));
      for (size_t i = 0; i < dk; ++i) dx[i] = mul * r4 * dphi[1 + i];
      size_t f = 1 + dk;
      for (size_t i = 0; i < dk; ++i) {
        dx[i] += 2.0f * x[i] * diag * dphi[f++];
        for (size_t j = i + 1; j < dk; ++j, ++f) {
          dx[i] += x[j] * off * dphi[f];
          dx[j] += x[i] * off * dphi[f];
        }
      }
      return;
    }
  }
}

// Per-worker buffers of the backward beyond the forward's Work.
struct BackWork {
  std::vector<float> dos;     // [C][Dvp] do' rows
  std::vector<float> g;       // [C][C] G (then G o D)
  std::vector<float> vt;      // [Dvp][C] v'^T
  std::vector<float> p;       // [C][Fp] dqf / dkf
  std::vector<float> tmp;     // [C][Fp]
  std::vector<float> dst;     // [Dvp][Fp] dS^T (reverse sweep)
  std::vector<float> r, u;    // [S] 1 / (den + eps), -(do . o) / (den + eps)
  std::vector<float> qdq;     // [S][Dkp] qf o dqf (GLA)
  std::vector<float> gsum;    // [Dkp] running reverse sum of dB (GLA)
  std::vector<float> dk, dv;  // [S][Dk], [S][Dv] f32 accumulators of the KV head
  std::vector<float> grad;    // [Dkp] one row of dq / dk
};

struct BackHead {
  const LinearBackwardProblem& bp;
  const Head& hd;

  // do' row t into dst (Dvp wide): do r_t (and u_t in column Dv) when normalizing.
  void LoadDout(const Work& w, const BackWork& bw, int64_t t, float* dst) const {
    const LinearProblem& p = hd.p;
    LoadRow(p.dtype, bp.dout, p.offset(bp.dout_stride, hd.b, t, hd.h), bp.dout_stride[3],
            static_cast<size_t>(p.dv), dst);
    for (size_t d = static_cast<size_t>(p.dv); d < w.dvp; ++d) dst[d] = 0.0f;
    if (p.normalize) {
      for (int64_t d = 0; d < p.dv; ++d) dst[d] *= bw.r[static_cast<size_t>(t)];
      dst[p.dv] = bw.u[static_cast<size_t>(t)];
    }
  }
  // The chunk [t0, t0 + n): phi(q), phi(k), v' and do' rows, and the gate sums for GLA.
  void LoadChunk(Work& w, BackWork& bw, int64_t t0, size_t n) const;

  // v' row t (with the ones column when normalizing).
  void LoadValue(Work& w, int64_t t, float* dst) const {
    hd.LoadV(w, t, dst);
    if (hd.p.normalize) dst[hd.p.dv] = 1.0f;
  }
};

inline void BackHead::LoadChunk(Work& w, BackWork& bw, int64_t t0, size_t n) const {
  for (size_t i = 0; i < n; ++i) {
    const int64_t t = t0 + static_cast<int64_t>(i);
    hd.LoadQ(w, t, w.qf + i * w.fp);
    hd.LoadK(w, t, w.kf + i * w.fp);
    LoadValue(w, t, w.vv + i * w.dvp);
    LoadDout(w, bw, t, bw.dos.data() + i * w.dvp);
  }
  if (hd.p.gates != nullptr) hd.GateSums(w, t0, n);
}

// dS <- e^B_last o dS + qin^T do': the gradient of the state before the chunk from the one after
// it (qin = qf o e^B, the chunk's do' rows loaded).
inline void StateGradBack(const Head& hd, Work& w, const BackWork& bw, const float* qin, size_t n) {
  const LinearProblem& p = hd.p;
  const size_t F = w.fi, fp = w.fp, dvp = w.dvp;
  const bool gla = p.gates != nullptr, decay = hd.ln_lambda != 0.0f;
  for (size_t f = 0; f < F && (gla || decay); ++f) {
    const float e = gla ? std::exp(w.cum[(n - 1) * w.dkp + f]) : hd.pow_lambda[n];
    for (size_t d = 0; d < dvp; ++d) w.s[f * dvp + d] *= e;
  }
  Gemm<true>(F, dvp, n, qin, 1, fp, bw.dos.data(), dvp, w.s, dvp);
}

// qin_i = qf_i o e^B_i into w.aux.
inline void ScaledQueries(const Head& hd, Work& w, size_t n) {
  const DF df;
  const size_t L = hn::Lanes(df), fp = w.fp;
  for (size_t i = 0; i < n; ++i) {
    for (size_t f = 0; f < fp; f += L) {
      const VF eq = hd.p.gates != nullptr ? hn::Exp(df, hn::LoadU(df, w.cum + i * w.dkp + f))
                                          : hn::Set(df, hd.pow_lambda[i + 1]);
      hn::StoreU(hn::Mul(hn::LoadU(df, w.qf + i * fp + f), eq), df, w.aux + i * fp + f);
    }
  }
}

// Reverse sweep over the causal chunk [t0, t0 + n): dkf, dv' from dS (the gradient of the state
// after the chunk), then dS moves to before the chunk. Only what the requested outputs need: with
// no dk, dv or dgates, the queries and do' alone carry dS back (d_initial_state).
inline void BackwardChunkReverse(const BackHead& bh, Work& w, BackWork& bw, int64_t t0, size_t n) {
  const Head& hd = bh.hd;
  const LinearProblem& p = hd.p;
  const LinearBackwardProblem& bp = bh.bp;
  const size_t F = w.fi, C = w.c, fp = w.fp, dvp = w.dvp;
  const bool gla = p.gates != nullptr, decay = hd.ln_lambda != 0.0f;
  const bool channel_gates = gla && !p.scalar_gates;
  const bool want_dv = bp.dv != nullptr, want_dkf = bp.dk != nullptr || bp.dgates != nullptr;
  const DF df;
  const size_t L = hn::Lanes(df);
  if (!want_dv && !want_dkf) {
    for (size_t i = 0; i < n; ++i) {
      const int64_t t = t0 + static_cast<int64_t>(i);
      hd.LoadQ(w, t, w.qf + i * fp);
      bh.LoadDout(w, bw, t, bw.dos.data() + i * dvp);
    }
    if (gla) hd.GateSums(w, t0, n);
    ScaledQueries(hd, w, n);
    StateGradBack(hd, w, bw, w.aux, n);
    return;
  }
  bh.LoadChunk(w, bw, t0, n);
  // e^B_i and e^(B_last - B_j) factors: qin = qf o e^B (aux), kout = kf o e^(B_last - B) (tmp).
  ScaledQueries(hd, w, n);
  const float* qin = w.aux;
  float* kout = bw.tmp.data();
  for (size_t i = 0; i < n && want_dv; ++i) {
    for (size_t f = 0; f < fp; f += L) {
      const VF ek = gla ? hn::Exp(df, hn::Sub(hn::LoadU(df, w.cum + (n - 1) * w.dkp + f),
                                              hn::LoadU(df, w.cum + i * w.dkp + f)))
                        : hn::Set(df, hd.pow_lambda[n - 1 - i]);
      hn::StoreU(hn::Mul(hn::LoadU(df, w.kf + i * fp + f), ek), df, kout + i * fp + f);
    }
  }
  // W (the forward's intra weights, for dv) and G o D (for dkf), lower triangles.
  if (want_dkf) {
    for (size_t d = 0; d < dvp; ++d) {
      for (size_t j = 0; j < C; ++j) bw.vt[d * C + j] = j < n ? w.vv[j * dvp + d] : 0.0f;
    }
    Gemm<false>(n, C, dvp, bw.dos.data(), dvp, 1, bw.vt.data(), C, bw.g.data(), C);
  }
  if (want_dv && !channel_gates) {
    for (size_t f = 0; f < F; ++f) {
      for (size_t j = 0; j < C; ++j) w.kt[f * C + j] = j < n ? w.kf[j * fp + f] : 0.0f;
    }
    Gemm<false>(n, C, F, w.qf, fp, 1, w.kt, C, w.a, C);
  }
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j <= i; ++j) {
      float dij = decay ? hd.pow_lambda[i - j] : gla ? ScalarGatePair(w, i, j) : 1.0f;
      if (channel_gates) {
        // Per channel: W_ij = sum_c qf kf e^(B_i - B_j); G o D is applied channel-wise below.
        if (want_dv) w.a[i * C + j] = GatedDot(w, i, j);
        dij = 1.0f;
      } else if (want_dv) {
        w.a[i * C + j] *= dij;
      }
      if (want_dkf) bw.g[i * C + j] *= dij;
    }
    for (size_t j = i + 1; j < C; ++j) {
      if (want_dv) w.a[i * C + j] = 0.0f;
      if (want_dkf) bw.g[i * C + j] = 0.0f;
    }
  }
  // dv'_j = kout_j^T dS + sum_i W_ij do'_i.
  float* dv = w.o;
  if (want_dv) {
    Gemm<false>(n, dvp, F, kout, fp, 1, w.s, dvp, dv, dvp);
    Gemm<true>(n, dvp, n, w.a, 1, C, bw.dos.data(), dvp, dv, dvp);
  }
  // dkf_j = e^(B_last - B_j) o (dS v'_j) + sum_i (G o D)_ij qf_i.
  float* dkf = bw.p.data();
  if (want_dkf) {
    for (size_t d = 0; d < dvp; ++d) {
      for (size_t f = 0; f < fp; ++f) bw.dst[d * fp + f] = w.s[f * dvp + d];
    }
    Gemm<false>(n, fp, dvp, w.vv, dvp, 1, bw.dst.data(), fp, dkf, fp);
    for (size_t j = 0; j < n; ++j) {
      for (size_t f = 0; f < fp; f += L) {
        VF ek = hn::Set(df, hd.pow_lambda[n - 1 - j]);
        if (gla)
          ek = hn::Exp(df, hn::Sub(hn::LoadU(df, w.cum + (n - 1) * w.dkp + f),
                                   hn::LoadU(df, w.cum + j * w.dkp + f)));
        hn::StoreU(hn::Mul(hn::LoadU(df, dkf + j * fp + f), ek), df, dkf + j * fp + f);
      }
    }
    if (channel_gates) {
      AddGatedPairs(w, bw.g.data(), n, w.qf, dkf, /*to_keys=*/true);
    } else {
      Gemm<true>(n, fp, n, bw.g.data(), 1, C, w.qf, fp, dkf, fp);
    }
  }
  StateGradBack(hd, w, bw, qin, n);
  // Accumulate dk, dv of the KV head; dgates of the query head.
  const size_t dk = static_cast<size_t>(p.dk);
  for (size_t j = 0; j < n; ++j) {
    const int64_t t = t0 + static_cast<int64_t>(j);
    if (bp.dk != nullptr) {
      LoadRow(p.dtype, p.k, p.offset(p.k_stride, hd.b, t, hd.kvh), p.k_stride[3], dk, w.row);
      FeatureGrad(p.map, w.row, dk, 1.0f, hd.FoldLrpe(w, t, dkf + j * fp), bw.grad.data());
      float* dk_row = bw.dk.data() + static_cast<size_t>(t) * dk;
      for (size_t c = 0; c < dk; ++c) dk_row[c] += bw.grad[c];
    }
    if (want_dv) {
      float* dv_row = bw.dv.data() + static_cast<size_t>(t) * static_cast<size_t>(p.dv);
      for (int64_t d = 0; d < p.dv; ++d) dv_row[d] += dv[j * dvp + static_cast<size_t>(d)];
    }
  }
  if (gla && bp.dgates != nullptr) {
    for (size_t j = n; j-- > 0;) {
      const int64_t t = t0 + static_cast<int64_t>(j);
      float* out = bh.bp.dgates + p.offset(bh.bp.dgates_stride, hd.b, t, hd.h);
      float total = 0.0f;  // scalar gates: the sum over channels
      for (size_t c = 0; c < dk; ++c) {
        bw.gsum[c] +=
            bw.qdq[static_cast<size_t>(t) * w.dkp + c] - w.kf[j * fp + c] * dkf[j * fp + c];
        if (p.scalar_gates) {
          total += bw.gsum[c];
        } else {
          out[static_cast<int64_t>(c) * bh.bp.dgates_stride[3]] = bw.gsum[c];
        }
      }
      if (p.scalar_gates) *out = total;
    }
  }
}

// Forward sweep over the causal chunk [t0, t0 + n): dqf from the state before the chunk (kept
// transposed, St = S^T, in bw.dst), then the state moves past the chunk. Runs for dq and for
// dgates (qf o dqf).
inline void BackwardChunkForward(const BackHead& bh, Work& w, BackWork& bw, int64_t t0, size_t n) {
  const Head& hd = bh.hd;
  const LinearProblem& p = hd.p;
  const size_t C = w.c, fp = w.fp, dvp = w.dvp;
  const bool gla = p.gates != nullptr, decay = hd.ln_lambda != 0.0f;
  const bool channel_gates = gla && !p.scalar_gates;
  const DF df;
  const size_t L = hn::Lanes(df);
  bh.LoadChunk(w, bw, t0, n);
  // G = do' v'^T (lower triangle), times D for the decay (and for scalar gates).
  for (size_t d = 0; d < dvp; ++d) {
    for (size_t j = 0; j < C; ++j) bw.vt[d * C + j] = j < n ? w.vv[j * dvp + d] : 0.0f;
  }
  Gemm<false>(n, C, dvp, bw.dos.data(), dvp, 1, bw.vt.data(), C, bw.g.data(), C);
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = 0; j <= i && decay; ++j) bw.g[i * C + j] *= hd.pow_lambda[i - j];
    for (size_t j = 0; j <= i && gla && !channel_gates; ++j)
      bw.g[i * C + j] *= ScalarGatePair(w, i, j);
    for (size_t j = i + 1; j < C; ++j) bw.g[i * C + j] = 0.0f;
  }
  // dqf_i = e^B_i o (S do'_i) + sum_j G_ij D_ij kf_j.
  float* dqf = bw.p.data();
  Gemm<false>(n, fp, dvp, bw.dos.data(), dvp, 1, bw.dst.data(), fp, dqf, fp);
  for (size_t i = 0; i < n; ++i) {
    for (size_t f = 0; f < fp; f += L) {
      const VF e = gla ? hn::Exp(df, hn::LoadU(df, w.cum + i * w.dkp + f))
                       : hn::Set(df, hd.pow_lambda[i + 1]);
      hn::StoreU(hn::Mul(hn::LoadU(df, dqf + i * fp + f), e), df, dqf + i * fp + f);
    }
  }
  if (channel_gates) {
    AddGatedPairs(w, bw.g.data(), n, w.kf, dqf, /*to_keys=*/false);
  } else {
    Gemm<true>(n, fp, n, bw.g.data(), C, 1, w.kf, fp, dqf, fp);
  }
  // St <- St o e^B_last (per column f) + v'^T kout.
  float* kout = bw.tmp.data();
  for (size_t j = 0; j < n; ++j) {
    for (size_t f = 0; f < fp; f += L) {
      VF ek = hn::Set(df, hd.pow_lambda[n - 1 - j]);
      if (gla)
        ek = hn::Exp(df, hn::Sub(hn::LoadU(df, w.cum + (n - 1) * w.dkp + f),
                                 hn::LoadU(df, w.cum + j * w.dkp + f)));
      hn::StoreU(hn::Mul(hn::LoadU(df, w.kf + j * fp + f), ek), df, kout + j * fp + f);
    }
  }
  if (gla || decay) {
    for (size_t f = 0; f < fp; f += L) {
      const VF e = gla ? hn::Exp(df, hn::LoadU(df, w.cum + (n - 1) * w.dkp + f))
                       : hn::Set(df, hd.pow_lambda[n]);
      for (size_t d = 0; d < dvp; ++d) {
        float* row = bw.dst.data() + d * fp + f;
        hn::StoreU(hn::Mul(hn::LoadU(df, row), e), df, row);
      }
    }
  }
  Gemm<true>(dvp, fp, n, w.vv, 1, dvp, kout, fp, bw.dst.data(), fp);
  // dq (through the feature map, scale included in qf) and qf o dqf for the gates.
  const size_t dk = static_cast<size_t>(p.dk);
  for (size_t i = 0; i < n; ++i) {
    const int64_t t = t0 + static_cast<int64_t>(i);
    if (bh.bp.dq != nullptr) {
      LoadRow(p.dtype, p.q, p.offset(p.q_stride, hd.b, t, hd.h), p.q_stride[3], dk, w.row);
      FeatureGrad(p.map, w.row, dk, p.scale, hd.FoldLrpe(w, t, dqf + i * fp), bw.grad.data());
      StoreStridedScaled(p.dtype, bw.grad.data(), 1, dk, 1.0f, bh.bp.dq,
                         p.offset(bh.bp.dq_stride, hd.b, t, hd.h), bh.bp.dq_stride[3]);
    }
    if (gla && bh.bp.dgates != nullptr) {
      for (size_t c = 0; c < dk; ++c) {
        bw.qdq[static_cast<size_t>(t) * w.dkp + c] = w.qf[i * fp + c] * dqf[i * fp + c];
      }
    }
  }
}

// The prefix keys and queries (JRT, non-causal) in the forward sweep: St accumulates every prefix
// key, and each prefix query's dqf reads it (no intra-chunk part: all prefix keys are visible).
inline void BackwardPrefixForward(const BackHead& bh, Work& w, BackWork& bw) {
  const Head& hd = bh.hd;
  const LinearProblem& p = hd.p;
  const size_t fp = w.fp, dvp = w.dvp, dk = static_cast<size_t>(p.dk);
  for (int64_t t0 = 0; t0 < p.prefix; t0 += static_cast<int64_t>(w.c)) {
    const size_t n =
        static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(w.c), p.prefix - t0));
    for (size_t j = 0; j < n; ++j) {
      hd.LoadK(w, t0 + static_cast<int64_t>(j), w.kf + j * fp);
      bh.LoadValue(w, t0 + static_cast<int64_t>(j), w.vv + j * dvp);
    }
    Gemm<true>(dvp, fp, n, w.vv, 1, dvp, w.kf, fp, bw.dst.data(), fp);
  }
  for (int64_t t0 = 0; t0 < p.prefix && bh.bp.dq != nullptr; t0 += static_cast<int64_t>(w.c)) {
    const size_t n =
        static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(w.c), p.prefix - t0));
    for (size_t i = 0; i < n; ++i)
      bh.LoadDout(w, bw, t0 + static_cast<int64_t>(i), bw.dos.data() + i * dvp);
    Gemm<false>(n, fp, dvp, bw.dos.data(), dvp, 1, bw.dst.data(), fp, bw.p.data(), fp);
    for (size_t i = 0; i < n; ++i) {
      const int64_t t = t0 + static_cast<int64_t>(i);
      LoadRow(p.dtype, p.q, p.offset(p.q_stride, hd.b, t, hd.h), p.q_stride[3], dk, w.row);
      FeatureGrad(p.map, w.row, dk, p.scale, hd.FoldLrpe(w, t, bw.p.data() + i * fp),
                  bw.grad.data());
      StoreStridedScaled(p.dtype, bw.grad.data(), 1, dk, 1.0f, bh.bp.dq,
                         p.offset(bh.bp.dq_stride, hd.b, t, hd.h), bh.bp.dq_stride[3]);
    }
  }
}

// The prefix in the reverse sweep: dS gains every prefix query, and each prefix key's dkf, dv'
// read the total (every query sees it).
inline void BackwardPrefixReverse(const BackHead& bh, Work& w, BackWork& bw) {
  const Head& hd = bh.hd;
  const LinearProblem& p = hd.p;
  const size_t F = w.fi, fp = w.fp, dvp = w.dvp, dk = static_cast<size_t>(p.dk);
  for (int64_t t0 = 0; t0 < p.prefix; t0 += static_cast<int64_t>(w.c)) {
    const size_t n =
        static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(w.c), p.prefix - t0));
    for (size_t i = 0; i < n; ++i) {
      hd.LoadQ(w, t0 + static_cast<int64_t>(i), w.qf + i * fp);
      bh.LoadDout(w, bw, t0 + static_cast<int64_t>(i), bw.dos.data() + i * dvp);
    }
    Gemm<true>(F, dvp, n, w.qf, 1, fp, bw.dos.data(), dvp, w.s, dvp);
  }
  for (size_t d = 0; d < dvp; ++d) {
    for (size_t f = 0; f < fp; ++f) bw.dst[d * fp + f] = w.s[f * dvp + d];
  }
  const bool want_dk = bh.bp.dk != nullptr, want_dv = bh.bp.dv != nullptr;
  for (int64_t t0 = 0; t0 < p.prefix && (want_dk || want_dv); t0 += static_cast<int64_t>(w.c)) {
    const size_t n =
        static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(w.c), p.prefix - t0));
    for (size_t j = 0; j < n; ++j) {
      hd.LoadK(w, t0 + static_cast<int64_t>(j), w.kf + j * fp);
      bh.LoadValue(w, t0 + static_cast<int64_t>(j), w.vv + j * dvp);
    }
    if (want_dv) Gemm<false>(n, dvp, F, w.kf, fp, 1, w.s, dvp, w.o, dvp);
    if (want_dk) Gemm<false>(n, fp, dvp, w.vv, dvp, 1, bw.dst.data(), fp, bw.p.data(), fp);
    for (size_t j = 0; j < n; ++j) {
      const int64_t t = t0 + static_cast<int64_t>(j);
      if (want_dk) {
        LoadRow(p.dtype, p.k, p.offset(p.k_stride, hd.b, t, hd.kvh), p.k_stride[3], dk, w.row);
        FeatureGrad(p.map, w.row, dk, 1.0f, hd.FoldLrpe(w, t, bw.p.data() + j * fp),
                    bw.grad.data());
        float* dk_row = bw.dk.data() + static_cast<size_t>(t) * dk;
        for (size_t c = 0; c < dk; ++c) dk_row[c] += bw.grad[c];
      }
      if (want_dv) {
        float* dv_row = bw.dv.data() + static_cast<size_t>(t) * static_cast<size_t>(p.dv);
        for (int64_t d = 0; d < p.dv; ++d) dv_row[d] += w.o[j * dvp + static_cast<size_t>(d)];
      }
    }
  }
}

}  // namespace linear_impl

// Gradients of the chunked form; one task per (sequence, KV head), looping over the query heads
// of its group so that dk and dv of a KV head have one owner (no atomics, deterministic).
bool LinearBackward(const LinearBackwardProblem& bp, int32_t threads) {
  using namespace linear_impl;  // NOLINT
  const LinearProblem& p = bp.fwd;
  const int64_t tasks = p.batch * p.heads_kv;
  if (tasks == 0) return true;
  const size_t c = static_cast<size_t>(p.chunk), fi = KernelFeatureDim(p), fp = RoundUp(fi),
               dvp = RoundUp(static_cast<size_t>(p.dv + (p.normalize ? 1 : 0))),
               dkp = RoundUp(static_cast<size_t>(p.dk));
  const size_t wide = std::max({fp, dvp, dkp});
  const size_t per_worker = RoundUp(Work::Floats(c, fp, dvp, dkp, wide, 0) + 64);
  const int32_t workers =
      static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>(threads, tasks)));
  auto storage = hwy::AllocateAligned<float>(per_worker * static_cast<size_t>(workers));
  if (!storage) return false;
  const size_t seq = static_cast<size_t>(p.seq);
  // The forward sweep gives dq and, with the reverse sweep, dgates; the reverse sweep dk, dv and
  // the initial state's gradient.
  const bool forward_sweep = bp.dq != nullptr || bp.dgates != nullptr;
  const bool reverse_sweep = bp.dk != nullptr || bp.dv != nullptr || bp.dgates != nullptr ||
                             bp.d_state_out != nullptr || bp.d_norm_out != nullptr;
  std::vector<BackWork> back(static_cast<size_t>(workers));
  std::vector<Lrpe> lrpe(p.lrpe_theta != nullptr ? static_cast<size_t>(workers) : 0);
  try {
    for (BackWork& bw : back) {
      bw.dos.resize(c * dvp);
      bw.g.resize(c * c);
      bw.vt.resize(dvp * c);
      bw.p.resize(c * fp);
      bw.tmp.resize(c * fp);
      bw.dst.resize(dvp * fp);
      bw.r.resize(p.normalize ? seq : 0);
      bw.u.resize(p.normalize ? seq : 0);
      bw.qdq.resize(bp.dgates != nullptr ? seq * dkp : 0);
      bw.gsum.resize(dkp);
      bw.dk.resize(bp.dk != nullptr ? seq * static_cast<size_t>(p.dk) : 0);
      bw.dv.resize(bp.dv != nullptr ? seq * static_cast<size_t>(p.dv) : 0);
      bw.grad.resize(dkp);
    }
  } catch (const std::bad_alloc&) {
    return false;
  }
  ParallelFor(workers, tasks, [&](int64_t task, int32_t worker) {
    Work w;
    w.Carve(storage.get() + per_worker * static_cast<size_t>(worker), c, fi, dvp, dkp, wide, 0);
    BackWork& bw = back[static_cast<size_t>(worker)];
    const int64_t b = task / p.heads_kv, kvh = task % p.heads_kv;
    std::fill(bw.dk.begin(), bw.dk.end(), 0.0f);
    std::fill(bw.dv.begin(), bw.dv.end(), 0.0f);
    for (int64_t h = kvh * p.group; h < (kvh + 1) * p.group; ++h) {
      if (p.lrpe_theta != nullptr) {
        w.lrpe = &lrpe[static_cast<size_t>(worker)];
        w.lrpe->SetHead(p, h);
      }
      const float lambda = p.decay != nullptr ? p.decay[h * p.decay_stride] : 1.0f;
      for (size_t i = 0; i <= c; ++i) w.pow[i] = std::exp(static_cast<float>(i) * std::log(lambda));
      const Head hd{p, b, h, kvh, std::log(lambda), w.pow};
      const BackHead bh{bp, hd};
      if (p.normalize) {
        // The forward once more, for 1 / (den + eps) and do . o per row.
        hd.InitState(w);
        const auto collect = [&](int64_t t, float* o, float den) {
          const float r = NormalizerReciprocal(den, p.eps);
          LoadRow(p.dtype, bp.dout, p.offset(bp.dout_stride, b, t, h), bp.dout_stride[3],
                  static_cast<size_t>(p.dv), w.row);
          float dot = 0.0f;
          for (int64_t d = 0; d < p.dv; ++d) dot += w.row[d] * o[d] * r;
          bw.r[static_cast<size_t>(t)] = r;
          bw.u[static_cast<size_t>(t)] = -dot * r;
        };
        PrefixChunks(hd, w, collect);
        for (int64_t t0 = p.prefix; t0 < p.seq; t0 += p.chunk) {
          CausalChunk(hd, w, t0, static_cast<size_t>(std::min(p.chunk, p.seq - t0)), collect);
        }
      }
      // The states in the backward's layout: v' = [v, 1] makes the normalizer column Dv.
      const size_t zcol = static_cast<size_t>(p.dv);
      if (forward_sweep) {
        // St = S0'^T: the initial state, transposed (feature f, column d at dst[d * fp + f]).
        std::fill(bw.dst.begin(), bw.dst.end(), 0.0f);
        hd.AddApiState(p.state_in, p.state_in_stride, p.norm_in, p.norm_in_stride, fi,
                       bw.dst.data(), 1, fp, bw.dst.data() + zcol * fp, 1);
        BackwardPrefixForward(bh, w, bw);
        for (int64_t t0 = p.prefix; t0 < p.seq; t0 += p.chunk) {
          BackwardChunkForward(bh, w, bw, t0, static_cast<size_t>(std::min(p.chunk, p.seq - t0)));
        }
      }
      if (!reverse_sweep) continue;
      // dS after the last token: d_final_state' (0 when not given).
      std::memset(w.s, 0, w.fp * w.dvp * sizeof(float));
      hd.AddApiState(bp.d_state_in, bp.d_state_in_stride, bp.d_norm_in, bp.d_norm_in_stride, fi,
                     w.s, dvp, 1, w.s + zcol, dvp);
      std::fill(bw.gsum.begin(), bw.gsum.end(), 0.0f);
      if (bp.dgates != nullptr && (bp.d_state_in != nullptr || bp.d_norm_in != nullptr)) {
        // The final state is e^(B_last) o (...): every gate, all before the last token, gains
        // sum_d dS_final[c, d] S_final[c, d] (S_final^T is in bw.dst after the forward sweep).
        for (size_t ch = 0; ch < static_cast<size_t>(p.dk); ++ch) {
          float sum = 0.0f;
          for (size_t d = 0; d < dvp; ++d) sum += w.s[ch * dvp + d] * bw.dst[d * fp + ch];
          bw.gsum[ch] = sum;
        }
      }
      const int64_t chunks = (p.seq - p.prefix + p.chunk - 1) / p.chunk;
      for (int64_t k = chunks - 1; k >= 0; --k) {
        const int64_t t0 = p.prefix + k * p.chunk;
        BackwardChunkReverse(bh, w, bw, t0, static_cast<size_t>(std::min(p.chunk, p.seq - t0)));
      }
      BackwardPrefixReverse(bh, w, bw);
      // dS before the first token: the gradient of the initial state.
      hd.StoreApiState(w.s, dvp, 1, w.s + zcol, dvp, fi, bp.d_state_out, bp.d_state_out_stride,
                       bp.d_norm_out, bp.d_norm_out_stride);
    }
    for (int64_t t = 0; t < p.seq; ++t) {
      if (bp.dk != nullptr) {
        StoreStridedScaled(p.dtype, bw.dk.data() + static_cast<size_t>(t * p.dk), 1,
                           static_cast<size_t>(p.dk), 1.0f, bp.dk,
                           p.offset(bp.dk_stride, b, t, kvh), bp.dk_stride[3]);
      }
      if (bp.dv != nullptr) {
        StoreStridedScaled(p.dtype, bw.dv.data() + static_cast<size_t>(t * p.dv), 1,
                           static_cast<size_t>(p.dv), 1.0f, bp.dv,
                           p.offset(bp.dv_stride, b, t, kvh), bp.dv_stride[3]);
      }
    }
  });
  return true;
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_LINEAR_LINEAR_BACKWARD_INL_H_
