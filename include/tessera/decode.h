// SPDX-License-Identifier: Apache-2.0
// tessera: decode, i.e. a few new queries per sequence over a long KV cache.
//
// Each sequence b has kv.seq_lens[b] tokens in the cache (the new tokens included) and Q query
// rows (1..16: one token, or the draft tokens of speculative verification). Query row i sits at
// position seq_lens[b] - Q + i, so causal / window masks are aligned bottom-right, as in
// FlashAttention's flash_attn_with_kvcache.
//
// The work is planned once for a batch shape (PlanDecode) and run any number of times
// (RunDecode). The keys of every sequence are cut into splits of a fixed number of tokens, so
// results depend only on each sequence's own length, never on the batch composition or the
// thread count (bitwise). Workers claim the (sequence, split) units in order as they finish
// their last one, stream-K style: a long sequence is shared by every worker and a worker may end
// one sequence and start the next, so one 128K context among many 1K contexts keeps every core
// busy, and so does a core the machine slows down. The partial states
// of a sequence are merged with the log-sum-exp merge (merge.h), in split order.
//
// AttentionForward routes here by itself when every sequence has at most 16 queries.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "tessera/context.h"
#include "tessera/kv_cache.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {

// Queries per sequence the decode path accepts.
constexpr int64_t kMaxDecodeQueries = 16;
// Default split size in tokens; kDefaultDecodeSplitTokensSmallPages for a paged cache with pages
// of fewer than kDecodeSmallPageTokens tokens (measured best for each, docs/decode.md).
constexpr int64_t kDefaultDecodeSplitTokens = 2048;
constexpr int64_t kDefaultDecodeSplitTokensSmallPages = 512;
constexpr int64_t kDecodeSmallPageTokens = 4;

// Per-key attention of a decode step, the statistics TOVA and H2O evict by (kv_policy.h).
// Key j is the token at position j of its sequence (paged or not). Written after the split-KV
// merge, so probs are final probabilities: p_ij = exp(s_ij - lse_i), 0 for a masked key.
// Deterministic (each entry written by one worker, sums in a fixed order).
struct DecodeStats {
  // f32 [B, Hq, Q, S], S >= the longest seq_len: probs[b][h][i][j] for j < seq_lens[b] (later
  // keys are not written). Optional.
  TensorView probs;
  // f32 [B, Hkv, S], read and written: accumulated[b][h][j] += the sum over the query heads of
  // KV head h's group and the Q rows of p_ij, for j < seq_lens[b] (H2O's accumulated attention;
  // the caller zeroes it once). Optional.
  TensorView accumulated;
};

struct DecodeParams {
  TensorView q;  // [B, Q, Hq, D] f32 / bf16 / f16, Q in 1..16, Hq a multiple of Hkv
  KVCacheView cache;
  KVBatchView kv;  // batch == B
  TensorView out;  // [B, Q, Hq, D], dtype of q, written
  TensorView lse;  // [B, Hq, Q] f32 natural-log LSE, optional (data == nullptr: not written)

  std::optional<float> scale;  // default 1 / sqrt(D)
  bool causal = false;         // query row i sees keys <= seq_lens[b] - Q + i
  int64_t window_left = -1;    // >= 0: also only keys >= position - window_left (unbounded
                               // when >= max(Q, longest seq_len), like -1)
  float softcap = 0.0f;        // tanh softcap on the scaled logit; 0 disables
  TensorView alibi_slopes;     // f32 [Hq] or [B, Hq]: bias -slope * |pos - j|; optional

  // Split size in tokens (0: kDefaultDecodeSplitTokens, or kDefaultDecodeSplitTokensSmallPages
  // for pages of fewer than kDecodeSmallPageTokens tokens). Part of the plan: results are bitwise
  // identical for every batch and thread count with the same split size.
  int64_t split_tokens = 0;

  // Optional side outputs (DecodeStats).
  DecodeStats stats;
};

namespace internal {
struct DecodeSchedule;
}

// A reusable schedule. It stays valid while the batch size, head counts, head dim, Q and the
// number of splits of every sequence (max(1, ceil(seq_len / split_tokens))) are unchanged, so one
// plan serves up to split_tokens consecutive decode steps; RunDecode reports a mismatch.
// Context::path works as for the forward: kReference runs the fp64 reference on the dequantized
// cache, kGeneric / kFast force the run-time / compile-time head-dim kernel.
class DecodePlan {
 public:
  DecodePlan();
  ~DecodePlan();
  DecodePlan(const DecodePlan&);
  DecodePlan& operator=(const DecodePlan&);

  bool valid() const { return schedule_ != nullptr; }
  int64_t num_units() const;     // (sequence, split, block of KV heads) work units
  int64_t split_tokens() const;  // fixed split size
  int32_t threads() const;       // workers the units were balanced over

 private:
  friend Status PlanDecode(const DecodeParams&, const Context&, DecodePlan*);
  friend Status RunDecode(const DecodePlan&, const DecodeParams&, const Context&);
  std::shared_ptr<const internal::DecodeSchedule> schedule_;
};

// Validates the parameters (data pointers of q / out / cache included) and plans the work.
Status PlanDecode(const DecodeParams& params, const Context& ctx, DecodePlan* plan);

// Runs a plan. Validates everything again (cheap) and that the plan fits; on error nothing is
// written. Thread-safe for distinct outputs (a plan may be shared).
Status RunDecode(const DecodePlan& plan, const DecodeParams& params, const Context& ctx);

// PlanDecode followed by RunDecode.
Status Decode(const DecodeParams& params, const Context& ctx);

}  // namespace tessera
