// SPDX-License-Identifier: Apache-2.0
// Naive materialized attention backward on OpenBLAS (see naive_attention.h). The element-wise
// pass (P from the LSE, the row dot products rowsum(dO * O), dS) is a small Highway kernel run
// in parallel over rows, so the baseline's time is dominated by its five sgemms.

// Highway's foreach_target order: foreach_target.h, then highway.h, then the contrib headers.
// clang-format off
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "naive_backward.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep

#include <hwy/highway.h>

#include <hwy/contrib/math/math-inl.h>
// clang-format on

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "naive_attention.h"

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace cli {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

float Dot(const float* HWY_RESTRICT a, const float* HWY_RESTRICT b, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  const int64_t full = n - n % lanes;
  auto acc = hn::Zero(d);
  for (int64_t j = 0; j < full; j += lanes) {
    acc = hn::MulAdd(hn::LoadU(d, a + j), hn::LoadU(d, b + j), acc);
  }
  float sum = hn::GetLane(hn::SumOfLanes(d, acc));
  for (int64_t j = full; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

// One row of one (batch, head). On entry p holds the scaled logits S and ds holds dP = dO V^T;
// on exit p = exp(S - lse) and ds = p * (dP - di) for the first `visible` entries, and both are
// 0 from `visible` on (masked keys).
void BackwardRow(float* HWY_RESTRICT p, float* HWY_RESTRICT ds, int64_t visible, int64_t n,
                 float lse, float di) {
  const hn::ScalableTag<float> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  const int64_t full = visible > 0 ? visible - visible % lanes : 0;
  const auto vlse = hn::Set(d, lse);
  const auto vdi = hn::Set(d, di);
  for (int64_t j = 0; j < full; j += lanes) {
    const auto pj = hn::Exp(d, hn::Sub(hn::LoadU(d, p + j), vlse));
    hn::StoreU(pj, d, p + j);
    hn::StoreU(hn::Mul(pj, hn::Sub(hn::LoadU(d, ds + j), vdi)), d, ds + j);
  }
  for (int64_t j = full; j < visible; ++j) {
    p[j] = std::exp(p[j] - lse);
    ds[j] = p[j] * (ds[j] - di);
  }
  for (int64_t j = std::max<int64_t>(visible, 0); j < n; ++j) {
    p[j] = 0.0f;
    ds[j] = 0.0f;
  }
}

// Rows [row_begin, row_end) of the chunk whose first (batch, head) pair is bh0; the chunk's
// score matrices are stacked [pairs, Sq, Sk] in p_buf and ds_buf.
void BackwardRows(const NaiveBackwardProblem& problem, float* HWY_RESTRICT p_buf,
                  float* HWY_RESTRICT ds_buf, int64_t bh0, int64_t row_begin, int64_t row_end) {
  const NaiveProblem& f = problem.forward;
  const int64_t Sq = f.seq_q, Sk = f.seq_k, Hq = f.heads_q, D = f.dim;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t bh = bh0 + r / Sq, i = r % Sq;
    const int64_t b = bh / Hq, h = bh % Hq;
    const int64_t visible = f.causal ? std::min(Sk, std::max<int64_t>(0, i + Sk - Sq + 1)) : Sk;
    const int64_t at = ((b * Sq + i) * Hq + h) * D;
    const float di = Dot(problem.dout + at, f.out + at, D);
    BackwardRow(p_buf + r * Sk, ds_buf + r * Sk, visible, Sk, f.lse[bh * Sq + i], di);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace cli
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#if HWY_ONCE

#include <cblas.h>

#include "core/parallel.h"

namespace tessera {
namespace cli {
namespace {

HWY_EXPORT(BackwardRows);

constexpr int64_t kRowsPerTask = 16;

}  // namespace

NaiveAttentionBackward::NaiveAttentionBackward(const NaiveBackwardProblem& problem, int32_t threads)
    : p_(problem), threads_(std::max<int32_t>(1, threads)) {
  const NaiveProblem& f = p_.forward;
  const int64_t pairs = f.batch * f.heads_q;
  const size_t per_head = static_cast<size_t>(f.seq_q) * static_cast<size_t>(f.seq_k);
  if (pairs == 0 || per_head == 0) return;
  const size_t fit = kMaxScoreBytes / sizeof(float) / (2 * per_head);
  heads_per_chunk_ = std::max<int64_t>(1, std::min<int64_t>(pairs, static_cast<int64_t>(fit)));
  score_elems_ = per_head * static_cast<size_t>(heads_per_chunk_);
  buffer_ = AllocateAligned(2 * score_elems_ * sizeof(float));
}

void NaiveAttentionBackward::Run() {
  const NaiveProblem& f = p_.forward;
  const int64_t B = f.batch, Sq = f.seq_q, Sk = f.seq_k, Hq = f.heads_q, Hkv = f.heads_kv;
  const int64_t D = f.dim, group = Hq / Hkv;
  if (B * Sq * Hq * D == 0 || Sk == 0) {  // no (query, key) pair: every gradient is 0
    std::fill(p_.dq, p_.dq + B * Sq * Hq * D, 0.0f);
    std::fill(p_.dk, p_.dk + B * Sk * Hkv * D, 0.0f);
    std::fill(p_.dv, p_.dv + B * Sk * Hkv * D, 0.0f);
    return;
  }
  openblas_set_num_threads(threads_);
  gemm_ = GemmStats();
  float* p_buf = reinterpret_cast<float*>(buffer_.get());
  float* ds_buf = p_buf + score_elems_;
  const int64_t pairs = B * Hq;
  const int64_t per_head = Sq * Sk;
  const int64_t ldq = Hq * D, ldk = Hkv * D;
  for (int64_t c0 = 0; c0 < pairs; c0 += heads_per_chunk_) {
    const int64_t c1 = std::min(pairs, c0 + heads_per_chunk_);
    // S = scale * Q K^T and dP = dO V^T.
    for (int64_t bh = c0; bh < c1; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      const float* q = f.q + (b * Sq * Hq + h) * D;
      const float* dout = p_.dout + (b * Sq * Hq + h) * D;
      const float* k = f.k + (b * Sk * Hkv + h / group) * D;
      const float* v = f.v + (b * Sk * Hkv + h / group) * D;
      float* s = p_buf + (bh - c0) * per_head;
      float* dp = ds_buf + (bh - c0) * per_head;
      TimedSgemm(&gemm_, false, true, Sq, Sk, D, f.scale, q, ldq, k, ldk, 0.0f, s, Sk);
      TimedSgemm(&gemm_, false, true, Sq, Sk, D, 1.0f, dout, ldq, v, ldk, 0.0f, dp, Sk);
    }
    // P = exp(S - LSE), dS = P * (dP - rowsum(dO * O)).
    const int64_t rows = (c1 - c0) * Sq;
    const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
    ParallelFor(threads_, tasks, [&](int64_t task, int32_t) {
      const int64_t r0 = task * kRowsPerTask;
      HWY_DYNAMIC_DISPATCH(BackwardRows)
      (p_, p_buf, ds_buf, c0, r0, std::min(rows, r0 + kRowsPerTask));
    });
    // dV = P^T dO, dQ = scale * dS K, dK = scale * dS^T Q. The first query head of a GQA group
    // overwrites its KV head's dK / dV (beta = 0), the others accumulate (heads run in order).
    for (int64_t bh = c0; bh < c1; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      const int64_t q_at = (b * Sq * Hq + h) * D, kv_at = (b * Sk * Hkv + h / group) * D;
      const float* p = p_buf + (bh - c0) * per_head;
      const float* ds = ds_buf + (bh - c0) * per_head;
      const float beta = h % group == 0 ? 0.0f : 1.0f;
      TimedSgemm(&gemm_, true, false, Sk, D, Sq, 1.0f, p, Sk, p_.dout + q_at, ldq, beta,
                 p_.dv + kv_at, ldk);
      TimedSgemm(&gemm_, false, false, Sq, D, Sk, f.scale, ds, Sk, f.k + kv_at, ldk, 0.0f,
                 p_.dq + q_at, ldq);
      TimedSgemm(&gemm_, true, false, Sk, D, Sq, f.scale, ds, Sk, f.q + q_at, ldq, beta,
                 p_.dk + kv_at, ldk);
    }
  }
}

}  // namespace cli
}  // namespace tessera

#endif  // HWY_ONCE
