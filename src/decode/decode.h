// SPDX-License-Identifier: Apache-2.0
// Internal, SIMD-free: the decode kernel's view of the keys/values (KVSource), the schedule a
// DecodePlan holds, and the kernel entry. Used by decode.cc and by the exact forward, which
// routes calls with at most kMaxDecodeQueries queries per sequence here.
#pragma once

#include <climits>
#include <cstdint>
#include <vector>

#include "core/attention_problem.h"
#include "tessera/decode.h"
#include "tessera/kv_cache.h"

namespace tessera {
namespace decode {

// Keys per tile inside a split; tile boundaries are fixed offsets from the split start.
constexpr int64_t kKeyTile = 32;

// Where the K/V rows of (sequence b, token t, KV head h) live. Two forms:
//  - a KV cache (paged or contiguous, any KVDType, head-major pages): token t of sequence b is in
//    page block_table[b][t / page_size], slot t % page_size (contiguous: page b, slot t);
//  - dense strided tensors [B, S, Hkv, D] of f32 / bf16 / f16 (the routed exact forward): "page"
//    b (varlen: 0) and slot cu_seqlens_k[b] + t.
// A row starts at page * page_stride + head * head_stride + slot * token_stride (bytes); its
// channels are dim_stride elements apart (1 for a cache).
struct KVSource {
  KVDType dtype = KVDType::kF32;
  int64_t batch = 0;
  int64_t heads_kv = 0;
  int64_t dim = 0;
  const uint8_t* k = nullptr;
  const uint8_t* v = nullptr;
  int64_t k_page_stride = 0, k_head_stride = 0, k_token_stride = 0, k_dim_stride = 1;
  int64_t v_page_stride = 0, v_head_stride = 0, v_token_stride = 0, v_dim_stride = 1;
  // Cache form.
  bool cache = false;
  const int32_t* seq_lens = nullptr;
  const int32_t* block_table = nullptr;  // null: contiguous (sequence b owns page b)
  int64_t block_stride = 0;
  int64_t page_size = 0;
  // Quantized: per-row (step, min) pairs at 2 * ((page * heads_kv + h) * page_size + slot);
  // per-channel normalizers [Hkv, D].
  const float* k_scales = nullptr;
  const float* v_scales = nullptr;
  const float* k_norm = nullptr;
  const float* v_norm = nullptr;
  // Dense form: key count Sk, or varlen offsets.
  int64_t seq_k = 0;
  const int32_t* cu_seqlens_k = nullptr;

  struct Row {
    int64_t page, slot;
  };

  int64_t len(int64_t b) const {
    if (cache) return seq_lens[b];
    return cu_seqlens_k != nullptr ? cu_seqlens_k[b + 1] - cu_seqlens_k[b] : seq_k;
  }
  Row locate(int64_t b, int64_t t) const {
    if (!cache) {
      return cu_seqlens_k != nullptr ? Row{0, cu_seqlens_k[b] + t} : Row{b, t};
    }
    if (block_table == nullptr) return Row{b, t};
    return Row{block_table[b * block_stride + t / page_size], t % page_size};
  }
  // Tokens t, t + 1, ... that share t's page, so their rows are token_stride apart: the rest of
  // the page in a paged cache, otherwise unbounded.
  int64_t same_page(int64_t t) const {
    if (cache && block_table != nullptr) return page_size - t % page_size;
    return INT64_MAX;
  }
  int64_t k_offset(Row r, int64_t h) const {
    return r.page * k_page_stride + h * k_head_stride + r.slot * k_token_stride;
  }
  int64_t v_offset(Row r, int64_t h) const {
    return r.page * v_page_stride + h * v_head_stride + r.slot * v_token_stride;
  }
  // Index of the row's (step, min) pair in k_scales / v_scales (cache form).
  int64_t scale_index(Row r, int64_t h) const {
    return (r.page * heads_kv + h) * page_size + r.slot;
  }
};

// One work unit: keys [key_begin, key_end) of sequence `seq` for KV heads [head_begin,
// head_end). `slot` >= 0: the sequence has several splits and the unit writes its partial state
// to partial slot `slot` (split `split` of the sequence); -1: it writes the final output.
struct DecodeUnit {
  int64_t seq;
  int64_t key_begin, key_end;
  int64_t head_begin, head_end;
  int64_t split;
  int64_t slot;
};

// DecodeStats for the kernel: where it records each row's logits (scaled, dequantized, before
// softcap, ALiBi and the mask) while it scores a tile, and the outputs the statistics pass after
// the merge writes from them. Row (b, query head h, query i) of the logits starts at
// logits + b * logit_stride[0] + h * logit_stride[1] + i * logit_stride[2]; its keys are
// contiguous (the caller's probs when their key stride is 1, which the pass then overwrites in
// place, else a scratch buffer).
struct StatsRecord {
  float* logits = nullptr;
  int64_t logit_stride[3] = {0, 0, 0};
  float* probs = nullptr;  // [B, Hq, Q, S] with probs_stride, optional
  int64_t probs_stride[4] = {0, 0, 0, 0};
  float* accumulated = nullptr;  // [B, Hkv, S] with acc_stride, optional
  int64_t acc_stride[3] = {0, 0, 0};
};

}  // namespace decode

namespace internal {
// What a DecodePlan holds.
struct DecodeSchedule {
  int64_t batch = 0, heads_q = 0, heads_kv = 0, dim = 0, queries = 0;
  int64_t split_tokens = 0;
  int32_t threads = 1;
  std::vector<int64_t> splits;            // [batch] splits per sequence
  std::vector<decode::DecodeUnit> units;  // (sequence, split, head block) order
  std::vector<int64_t> first_slot;        // [batch] first partial slot (-1: single split)
  int64_t num_slots = 0;                  // partial (sequence, split) slots
};
}  // namespace internal

namespace decode {

// Builds the schedule for sequences of the given key lengths (q_lens: query rows per sequence,
// heads: Hkv). Up to `threads` workers claim the units in order while the kernel runs.
void BuildSchedule(const std::vector<int64_t>& k_lens, int64_t heads_q, int64_t heads_kv,
                   int64_t dim, int64_t queries, int64_t split_tokens, int32_t threads,
                   internal::DecodeSchedule* schedule);

// True when the schedule still fits these key lengths (same splits per sequence).
bool ScheduleFits(const internal::DecodeSchedule& schedule, const std::vector<int64_t>& k_lens);

// Runs the kernel: queries, outputs and options from `p` (k/v fields unused), keys and values
// from `kv`. With `stats`, also the decode statistics, which need p.lse (the caller's or a
// scratch one). Returns false when scratch could not be allocated. Dispatches to the best target.
bool RunDecodeKernel(const AttentionProblem& p, const KVSource& kv,
                     const internal::DecodeSchedule& schedule, bool fast,
                     const StatsRecord* stats = nullptr);

}  // namespace decode
}  // namespace tessera
