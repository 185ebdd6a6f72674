// SPDX-License-Identifier: Apache-2.0
// The textbook attention baselines `tessera bench --vs naive` measures against.
//
// Forward: materialize the scores S = scale * Q K^T with OpenBLAS sgemm, softmax each row
// (vectorized, parallel), then O = P V with sgemm.
// Backward: recompute S = scale * Q K^T (sgemm) and P = exp(S - LSE) from the forward's
// log-sum-exp, then dV = P^T dO and dP = dO V^T (sgemm), dS = P * (dP - rowsum(dO * O))
// (vectorized, parallel), dQ = scale * dS K and dK = scale * dS^T Q (sgemm).
//
// Both move O(Sq * Sk) bytes per head, which is exactly what tessera avoids; they are what users
// fall back to when a fused kernel is slow, so they are the honest bar to beat.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "npy.h"

namespace tessera {
namespace cli {

struct NaiveProblem {
  int64_t batch = 1;
  int64_t seq_q = 0;
  int64_t seq_k = 0;
  int64_t heads_q = 1;
  int64_t heads_kv = 1;  // divides heads_q; query head h reads KV head h / (heads_q / heads_kv)
  int64_t dim = 0;
  bool causal = false;  // bottom-right aligned: query i sees keys j <= i + seq_k - seq_q
  float scale = 1.0f;
  const float* q = nullptr;  // [B, Sq, Hq, D], contiguous
  const float* k = nullptr;  // [B, Sk, Hkv, D], contiguous
  const float* v = nullptr;  // [B, Sk, Hkv, D], contiguous
  float* out = nullptr;      // [B, Sq, Hq, D], contiguous, written by the forward
  float* lse = nullptr;      // [B, Hq, Sq], written by the forward when not null (-inf: no key)
};

// One sgemm call's shape (row-major, C [m, n] = op(A) [m, k] op(B) [k, n]).
struct GemmShape {
  bool trans_a = false;
  bool trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  bool operator==(const GemmShape& o) const {
    return trans_a == o.trans_a && trans_b == o.trans_b && m == o.m && n == o.n && k == o.k;
  }
};

// The BLAS calls of a baseline's last Run(): their summed wall time and FLOPs (2 * M * N * K
// each) and their distinct shapes, so the benchmark can hold the baseline's GEMM rate against
// plain sgemms of the same shapes.
struct GemmStats {
  double seconds = 0.0;
  double flops = 0.0;
  std::vector<GemmShape> shapes;  // distinct, in first-call order
  double gflops() const { return seconds > 0.0 ? flops / seconds * 1e-9 : 0.0; }
};

// Row-major cblas_sgemm, C = alpha * op(A) op(B) + beta * C, its time, FLOPs and shape added to
// *stats.
void TimedSgemm(GemmStats* stats, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                float alpha, const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                float* c, int64_t ldc);

// The rate of a plain n x n x n sgemm (contiguous, no transpose) on `threads` threads: the
// median GFLOP/s of `reps` runs after one warm-up; 0 when the buffers cannot be allocated.
double MeasureSgemmGflops(int64_t n, int32_t threads, int reps);

// The rate of plain sgemms of the given shapes, once each on fresh contiguous operands (every
// dimension capped at kMaxProbeDim, so the probe's buffers stay small; the rate does not depend
// on it past a few thousand), after one warm-up call each: total FLOPs / total time, in GFLOP/s;
// 0 when the buffers cannot be allocated.
constexpr int64_t kMaxProbeDim = 4096;
double MeasureShapesGflops(const std::vector<GemmShape>& shapes, int32_t threads);

class NaiveAttention {
 public:
  // Score buffers of up to this many bytes hold every (batch, head) at once; larger problems
  // are processed in chunks of as many heads as fit.
  static constexpr size_t kMaxScoreBytes = size_t{1} << 30;

  // Allocates the score buffer (outside any timed region). `threads` drives both OpenBLAS and
  // the softmax. ok() is false when the buffer cannot be allocated.
  NaiveAttention(const NaiveProblem& problem, int32_t threads);

  bool ok() const { return scores_ != nullptr || score_elems_ == 0; }
  // Computes problem.out.
  void Run();

  // (batch, head) pairs whose scores are materialized at once.
  int64_t heads_per_chunk() const { return heads_per_chunk_; }
  size_t score_bytes() const { return score_elems_ * sizeof(float); }
  // The sgemm calls of the last Run().
  const GemmStats& gemm_stats() const { return gemm_; }

 private:
  NaiveProblem p_;
  int32_t threads_;
  int64_t heads_per_chunk_ = 1;
  size_t score_elems_ = 0;
  AlignedBytes scores_buffer_;
  float* scores_ = nullptr;
  GemmStats gemm_;
};

// The backward's inputs are the forward problem's q, k, v, out and lse (all read only; lse
// required), plus dout; it writes dq, dk, dv (GQA: dk, dv summed over each group's query heads).
struct NaiveBackwardProblem {
  NaiveProblem forward;
  const float* dout = nullptr;  // [B, Sq, Hq, D], contiguous
  float* dq = nullptr;          // [B, Sq, Hq, D], contiguous, written
  float* dk = nullptr;          // [B, Sk, Hkv, D], contiguous, written
  float* dv = nullptr;          // [B, Sk, Hkv, D], contiguous, written
};

class NaiveAttentionBackward {
 public:
  // The two score-sized buffers (P and dP, which becomes dS in place) take up to this many bytes
  // together for every (batch, head) at once; larger problems go in chunks of heads.
  static constexpr size_t kMaxScoreBytes = size_t{1} << 30;

  // Allocates both buffers (outside any timed region); `threads` drives OpenBLAS and the
  // element-wise pass. ok() is false when they cannot be allocated.
  NaiveAttentionBackward(const NaiveBackwardProblem& problem, int32_t threads);

  bool ok() const { return buffer_ != nullptr || score_elems_ == 0; }
  // Computes problem.dq, dk, dv.
  void Run();

  int64_t heads_per_chunk() const { return heads_per_chunk_; }
  // Bytes of both buffers together.
  size_t score_bytes() const { return 2 * score_elems_ * sizeof(float); }
  // The sgemm calls of the last Run().
  const GemmStats& gemm_stats() const { return gemm_; }

 private:
  NaiveBackwardProblem p_;
  int32_t threads_;
  int64_t heads_per_chunk_ = 1;
  size_t score_elems_ = 0;  // per buffer
  AlignedBytes buffer_;
  GemmStats gemm_;
};

}  // namespace cli
}  // namespace tessera
