// The textbook attention baseline `tessera bench --vs naive` measures against: materialize the
// scores S = scale * Q K^T with OpenBLAS sgemm, softmax each row (vectorized, parallel), then
// O = P V with sgemm. It moves O(Sq * Sk) bytes per head, which is exactly what tessera avoids;
// it is what users fall back to when a fused kernel is slow, so it is the honest bar to beat.
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
  float* out = nullptr;      // [B, Sq, Hq, D], contiguous, written
};

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

 private:
  NaiveProblem p_;
  int32_t threads_;
  int64_t heads_per_chunk_ = 1;
  size_t score_elems_ = 0;
  AlignedBytes scores_buffer_;
  float* scores_ = nullptr;
};

}  // namespace cli
}  // namespace tessera
