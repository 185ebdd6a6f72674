// SPDX-License-Identifier: Apache-2.0
// The decode baseline `tessera bench --op decode --vs naive` measures against: plain f32
// attention of a few query rows per sequence over a KV cache, read straight from the cache's
// storage (paged or contiguous, any KVDType).
//
// One task per (sequence, KV head), spread over ParallelFor. A task dequantizes each key row into
// an f32 row with simple scalar code that follows the format in kv_cache.h (block-table lookup,
// then the f32 / bf16 / f16 values, or the int8 / int4 codes times the row's step plus its
// minimum, times the channel normalizer) and scores it against every query row of the head group:
// s = scale * q . k. Then a softmax over each full row, then out = sum_j p_j v_j with the value
// rows dequantized the same way. The scores are materialized ([group * Q, seq_len] f32 per
// worker); there is no split-KV parallelism, no fused dequantization and no online softmax: it is
// the loop one writes first. Every KV row is read once per task (not once per query head), so the
// baseline moves the same bytes as the op it is compared with. Dot products, exp and the
// accumulation use Highway vectors, so the baseline is bound by its memory traffic and its scalar
// dequantization, not by scalar FMA latency.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "npy.h"
#include "tessera/kv_cache.h"

namespace tessera {
namespace cli {

struct NaiveDecodeProblem {
  int64_t queries = 1;  // Q query rows per sequence
  int64_t heads_q = 1;  // Hq, a multiple of cache.num_kv_heads
  float scale = 1.0f;
  bool causal = false;       // query row i sees keys j <= seq_lens[b] - Q + i
  const float* q = nullptr;  // [B, Q, Hq, D] f32, contiguous (B = kv.batch, D = cache.head_dim)
  KVCacheView cache;
  KVBatchView kv;
  float* out = nullptr;  // [B, Q, Hq, D] f32, contiguous, written (0 for rows that see no key)
};

class NaiveDecode {
 public:
  // Allocates every worker's scratch (outside any timed region): the scores of one task and an
  // f32 row. ok() is false when that fails.
  NaiveDecode(const NaiveDecodeProblem& problem, int32_t threads);

  bool ok() const { return scratch_ != nullptr || scratch_floats_ == 0; }
  // Computes problem.out.
  void Run();

  // Bytes of all workers' scratch together.
  size_t scratch_bytes() const { return scratch_floats_ * sizeof(float); }

 private:
  NaiveDecodeProblem p_;
  int32_t threads_;
  size_t per_worker_floats_ = 0;
  size_t scratch_floats_ = 0;
  AlignedBytes scratch_buffer_;
  float* scratch_ = nullptr;
  std::vector<float> f16_table_;  // f16 bits -> f32, all 65536 codes
};

}  // namespace cli
}  // namespace tessera
