// SPDX-License-Identifier: Apache-2.0
// Naive materialized attention on OpenBLAS (see naive_attention.h). The row softmax is a small
// Highway kernel so the baseline is not handicapped by a scalar expf: the baseline's time is
// dominated by the two sgemms, as it would be in any reasonable textbook implementation.

// Highway's foreach_target order: foreach_target.h, then highway.h, then the contrib headers.
// clang-format off
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "naive_attention.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep

#include <hwy/highway.h>

#include <hwy/contrib/math/math-inl.h>
// clang-format on

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace cli {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Softmax of the first `visible` entries of `row` (length n) in place; entries from `visible`
// on are masked out and set to 0. A row with nothing visible becomes all zeros. Returns the
// row's log-sum-exp (-inf when nothing is visible).
float SoftmaxRow(float* HWY_RESTRICT row, int64_t visible, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  const int64_t full = visible - visible % lanes;
  float lse = -std::numeric_limits<float>::infinity();
  if (visible > 0) {
    auto vmax = hn::Set(d, -std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < full; j += lanes) vmax = hn::Max(vmax, hn::LoadU(d, row + j));
    float max = hn::GetLane(hn::MaxOfLanes(d, vmax));
    for (int64_t j = full; j < visible; ++j) max = std::max(max, row[j]);

    const auto vm = hn::Set(d, max);
    auto vsum = hn::Zero(d);
    for (int64_t j = 0; j < full; j += lanes) {
      const auto e = hn::Exp(d, hn::Sub(hn::LoadU(d, row + j), vm));
      hn::StoreU(e, d, row + j);
      vsum = hn::Add(vsum, e);
    }
    float sum = hn::GetLane(hn::SumOfLanes(d, vsum));
    for (int64_t j = full; j < visible; ++j) {
      row[j] = std::exp(row[j] - max);
      sum += row[j];
    }

    const float inv = 1.0f / sum;
    const auto vinv = hn::Set(d, inv);
    for (int64_t j = 0; j < full; j += lanes) {
      hn::StoreU(hn::Mul(hn::LoadU(d, row + j), vinv), d, row + j);
    }
    for (int64_t j = full; j < visible; ++j) row[j] *= inv;
    lse = max + std::log(sum);
  }
  for (int64_t j = std::max<int64_t>(visible, 0); j < n; ++j) row[j] = 0.0f;
  return lse;
}

// Softmax of rows [row_begin, row_end) of a stack of [seq_q, seq_k] score matrices; row r's
// log-sum-exp goes to lse[r] when lse is not null.
void SoftmaxRows(float* HWY_RESTRICT scores, float* HWY_RESTRICT lse, int64_t row_begin,
                 int64_t row_end, int64_t seq_q, int64_t seq_k, bool causal) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const int64_t i = r % seq_q;
    const int64_t visible =
        causal ? std::min(seq_k, std::max<int64_t>(0, i + seq_k - seq_q + 1)) : seq_k;
    const float row_lse = SoftmaxRow(scores + r * seq_k, visible, seq_k);
    if (lse != nullptr) lse[r] = row_lse;
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace cli
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#if HWY_ONCE

#include <cblas.h>

#include <chrono>
#include <vector>

#include "core/parallel.h"
#include "naive_attention.h"

namespace tessera {
namespace cli {
namespace {

HWY_EXPORT(SoftmaxRows);

constexpr int64_t kRowsPerTask = 16;

}  // namespace

void TimedSgemm(GemmStats* stats, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                float alpha, const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                float* c, int64_t ldc) {
  const auto start = std::chrono::steady_clock::now();
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, static_cast<blasint>(m), static_cast<blasint>(n),
              static_cast<blasint>(k), alpha, a, static_cast<blasint>(lda), b,
              static_cast<blasint>(ldb), beta, c, static_cast<blasint>(ldc));
  stats->seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  stats->flops += 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k);
  const GemmShape shape{trans_a, trans_b, m, n, k};
  if (std::find(stats->shapes.begin(), stats->shapes.end(), shape) == stats->shapes.end()) {
    stats->shapes.push_back(shape);
  }
}

double MeasureShapesGflops(const std::vector<GemmShape>& shapes, int32_t threads) {
  size_t a_elems = 0, b_elems = 0, c_elems = 0;
  std::vector<GemmShape> capped;
  for (GemmShape s : shapes) {
    s.m = std::min(s.m, kMaxProbeDim);
    s.n = std::min(s.n, kMaxProbeDim);
    s.k = std::min(s.k, kMaxProbeDim);
    a_elems = std::max(a_elems, static_cast<size_t>(s.m * s.k));
    b_elems = std::max(b_elems, static_cast<size_t>(s.k * s.n));
    c_elems = std::max(c_elems, static_cast<size_t>(s.m * s.n));
    capped.push_back(s);
  }
  if (capped.empty()) return 0.0;
  AlignedBytes buffer = AllocateAligned((a_elems + b_elems + c_elems) * sizeof(float));
  if (!buffer) return 0.0;
  float* a = reinterpret_cast<float*>(buffer.get());
  float* b = a + a_elems;
  float* c = b + b_elems;
  for (size_t i = 0; i < a_elems + b_elems + c_elems; ++i) {  // small, finite values
    a[i] = static_cast<float>(i % 7) * 0.01f;
  }
  openblas_set_num_threads(std::max<int32_t>(1, threads));
  GemmStats stats;
  for (int timed = 0; timed < 2; ++timed) {  // a warm-up pass, then the timed one
    stats = GemmStats();
    for (const GemmShape& s : capped) {
      TimedSgemm(&stats, s.trans_a, s.trans_b, s.m, s.n, s.k, 1.0f, a, s.trans_a ? s.m : s.k, b,
                 s.trans_b ? s.k : s.n, 0.0f, c, s.n);
    }
  }
  return stats.gflops();
}

double MeasureSgemmGflops(int64_t n, int32_t threads, int reps) {
  const size_t elems = static_cast<size_t>(n) * static_cast<size_t>(n);
  AlignedBytes buffer = AllocateAligned(3 * elems * sizeof(float));
  if (!buffer || n < 1) return 0.0;
  float* a = reinterpret_cast<float*>(buffer.get());
  float* b = a + elems;
  float* c = b + elems;
  for (size_t i = 0; i < elems; ++i) {  // small, finite values: no denormals, no overflow
    a[i] = static_cast<float>(i % 7) * 0.01f;
    b[i] = static_cast<float>(i % 5) * 0.01f;
  }
  openblas_set_num_threads(std::max<int32_t>(1, threads));
  std::vector<double> rates;
  for (int r = 0; r <= reps; ++r) {
    GemmStats stats;
    TimedSgemm(&stats, false, false, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
    if (r > 0) rates.push_back(stats.gflops());  // run 0 warms up
  }
  if (rates.empty()) return 0.0;
  std::sort(rates.begin(), rates.end());
  const size_t mid = rates.size() / 2;
  return rates.size() % 2 == 1 ? rates[mid] : 0.5 * (rates[mid - 1] + rates[mid]);
}

NaiveAttention::NaiveAttention(const NaiveProblem& problem, int32_t threads)
    : p_(problem), threads_(std::max<int32_t>(1, threads)) {
  const int64_t pairs = p_.batch * p_.heads_q;
  const size_t per_head = static_cast<size_t>(p_.seq_q) * static_cast<size_t>(p_.seq_k);
  if (pairs == 0 || per_head == 0) return;
  const size_t fit = kMaxScoreBytes / sizeof(float) / per_head;
  heads_per_chunk_ = std::max<int64_t>(1, std::min<int64_t>(pairs, static_cast<int64_t>(fit)));
  score_elems_ = per_head * static_cast<size_t>(heads_per_chunk_);
  scores_buffer_ = AllocateAligned(score_elems_ * sizeof(float));
  scores_ = reinterpret_cast<float*>(scores_buffer_.get());
}

void NaiveAttention::Run() {
  const int64_t B = p_.batch, Sq = p_.seq_q, Sk = p_.seq_k, Hq = p_.heads_q, Hkv = p_.heads_kv;
  const int64_t D = p_.dim, group = Hq / Hkv;
  if (B * Sq * Hq * D == 0) return;
  if (Sk == 0) {  // nothing to attend to: the convention is output 0, LSE -inf
    std::fill(p_.out, p_.out + B * Sq * Hq * D, 0.0f);
    if (p_.lse != nullptr) {
      std::fill(p_.lse, p_.lse + B * Hq * Sq, -std::numeric_limits<float>::infinity());
    }
    return;
  }
  openblas_set_num_threads(threads_);
  gemm_ = GemmStats();
  const int64_t pairs = B * Hq;
  const int64_t per_head = Sq * Sk;
  const int64_t ldq = Hq * D, ldk = Hkv * D;
  for (int64_t c0 = 0; c0 < pairs; c0 += heads_per_chunk_) {
    const int64_t c1 = std::min(pairs, c0 + heads_per_chunk_);
    for (int64_t bh = c0; bh < c1; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      TimedSgemm(&gemm_, false, true, Sq, Sk, D, p_.scale, p_.q + (b * Sq * Hq + h) * D, ldq,
                 p_.k + (b * Sk * Hkv + h / group) * D, ldk, 0.0f, scores_ + (bh - c0) * per_head,
                 Sk);
    }
    const int64_t rows = (c1 - c0) * Sq;
    const int64_t tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
    float* scores = scores_;
    float* lse = p_.lse != nullptr ? p_.lse + c0 * Sq : nullptr;  // [B, Hq, Sq]: row-aligned
    const bool causal = p_.causal;
    ParallelFor(threads_, tasks, [&](int64_t task, int32_t) {
      const int64_t r0 = task * kRowsPerTask;
      HWY_DYNAMIC_DISPATCH(SoftmaxRows)
      (scores, lse, r0, std::min(rows, r0 + kRowsPerTask), Sq, Sk, causal);
    });
    for (int64_t bh = c0; bh < c1; ++bh) {
      const int64_t b = bh / Hq, h = bh % Hq;
      TimedSgemm(&gemm_, false, false, Sq, D, Sk, 1.0f, scores_ + (bh - c0) * per_head, Sk,
                 p_.v + (b * Sk * Hkv + h / group) * D, ldk, 0.0f, p_.out + (b * Sq * Hq + h) * D,
                 ldq);
    }
  }
}

}  // namespace cli
}  // namespace tessera

#endif  // HWY_ONCE
