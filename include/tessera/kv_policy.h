// SPDX-License-Identifier: Apache-2.0
// tessera: KV cache eviction. Policies choose which tokens of a cache to keep under a budget,
// from the attention statistics the forward and decode calls write (AttentionStats,
// DecodeStats); CompactKV then moves the kept tokens to the front of each sequence, in place.
//
// Budget: tokens kept per (sequence, KV head). Every KV head of a sequence keeps the same number
// of tokens, min(budget, seq_len), each head choosing its own tokens by its own scores, so a
// compacted sequence keeps a single seq_len (what KVBatchView and decode need). A sequence of at
// most `budget` tokens keeps everything.
//
// Statistics come as f32 views [B, H, S] (any strides; S >= the longest seq_len, key j of
// sequence b at [b, h, j] for j < seq_lens[b], later entries unread). H may be Hkv, or a multiple
// of it (per query head, H = Hq): the rows h * g .. h * g + g - 1 (g = H / Hkv) are KV head h's
// GQA group, and each policy says how it combines them. Scores must be finite (a NaN or inf is an
// InvalidArgument naming the element).
//
// Ties: every top-k selection orders keys by score, highest first, and among equal scores the
// more recent key (larger index) first, so a keep-set is a pure function of the inputs.
//
// The policies (what each keeps, and why):
//   StreamingLLM  the first `sinks` tokens (attention sinks: softmax parks its spare mass there)
//                 and the most recent budget - sinks tokens. Needs no statistics.
//   H2O           the `recent` most recent tokens and the top (budget - recent) of the rest by
//                 accumulated attention (DecodeStats::accumulated over the steps so far, or a
//                 prefill window's key_mass), summed over the GQA group: heavy hitters keep
//                 receiving attention.
//   TOVA          the top `budget` tokens by the current query's attention (DecodeStats::probs,
//                 [B, Hq, Q, S], summed over the group's heads and the Q rows): the last query
//                 is the best predictor of the next one.
//   SnapKV        the observation window (the last `window` tokens, whose queries produced the
//                 statistics) and the top (budget - window) of the earlier tokens by the
//                 window's key_mass summed over the GQA group, pooled over neighbouring keys
//                 (kernel `kernel`, max or average) so that the neighbours of an important token,
//                 which carry its context, survive with it.
//   PyramidKV     SnapKV with a budget per layer decreasing linearly with depth
//                 (PyramidKVBudgets): early layers attend broadly, late layers to few tokens.
//   CAKE          layer budgets in proportion to a preference P_l = H_l^(1/tau1) * V_l^(1/tau2)
//                 (CakeLayerPreference, CakeAllocator): H_l, the entropy of the window-averaged
//                 attention over keys (spatial dispersion: a layer that spreads its attention
//                 needs more tokens), V_l, the summed variance of each key's attention across
//                 the window rows (temporal shift: a layer whose focus moves between queries
//                 needs more tokens). Within a layer, the recent window and the top of the other
//                 tokens by mean + gamma * variance of the attention each key receives (per
//                 query head, averaged over the group, pooled): the variance term keeps keys
//                 that some queries need a lot even when the mean is low.
//
// A keep-set of a smaller budget from the same statistics is a subset of the one of a larger
// budget (top-k of one order, the same forced tokens), so evicting a compacted layer further
// (CAKE's cascade) is the keep-set of the smaller budget mapped through the first one.
#pragma once

#include <cstdint>
#include <vector>

#include "tessera/context.h"
#include "tessera/kv_cache.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {

// The tokens each (sequence, KV head) keeps, by index in the cache (its position in the cache
// before compaction), strictly ascending.
struct KeepSet {
  int64_t num_kv_heads = 0;
  std::vector<int32_t> counts;   // [B]: tokens kept by every KV head of sequence b
  std::vector<int64_t> offsets;  // [B + 1]: sequence b's entries in `tokens`, Hkv * counts[b]
  std::vector<int32_t> tokens;   // head h of sequence b: tokens[offsets[b] + h * counts[b] + i]

  int64_t batch() const { return static_cast<int64_t>(counts.size()); }
  const int32_t* Tokens(int64_t b, int64_t h) const {
    return tokens.data() + offsets[static_cast<size_t>(b)] + h * counts[static_cast<size_t>(b)];
  }
};

// The arguments every policy takes.
struct EvictionTarget {
  TensorView seq_lens;       // i32 [B] (unit stride): tokens per sequence
  int64_t num_kv_heads = 0;  // Hkv >= 1
  int64_t budget = 0;        // tokens kept per (sequence, KV head), >= 1
};

enum class PoolKind : int32_t { kMax = 0, kAvg = 1 };

struct StreamingLLMParams {
  EvictionTarget target;
  int64_t sinks = 4;  // >= 0; at most budget are kept
};
Status StreamingLLMKeep(const StreamingLLMParams& params, KeepSet* keep);

struct H2OParams {
  EvictionTarget target;
  TensorView scores;    // f32 [B, H, S], H a multiple of Hkv: accumulated attention
  int64_t recent = 32;  // >= 0; the most recent min(recent, budget) tokens are kept
};
Status H2OKeep(const H2OParams& params, KeepSet* keep);

struct TovaParams {
  EvictionTarget target;
  TensorView probs;  // f32 [B, Hq, Q, S], Hq a multiple of Hkv (DecodeStats::probs)
};
Status TovaKeep(const TovaParams& params, KeepSet* keep);

struct SnapKVParams {
  EvictionTarget target;
  TensorView key_mass;  // f32 [B, H, S], H a multiple of Hkv (AttentionStats::key_mass)
  int64_t window = 32;  // >= 0: the observation window, always kept (min(window, budget))
  int64_t kernel = 7;   // odd, >= 1: pooling over keys j - kernel/2 .. j + kernel/2
  PoolKind pool = PoolKind::kMax;
};
Status SnapKVKeep(const SnapKVParams& params, KeepSet* keep);

// PyramidKV's per-layer budgets: `total` tokens (per sequence and KV head, summed over the
// `num_layers` layers) split so that the last layer gets total / (beta * L), the first
// 2 * total / L - that, and the layers between them on a straight line; rounded down, the
// remainder given one token each to the first layers, so the budgets sum to `total` exactly.
// beta >= 1 (1: equal budgets); total >= num_layers >= 1. Budgets are floored at 1.
Status PyramidKVBudgets(int64_t total, int64_t num_layers, double beta,
                        std::vector<int64_t>* budgets);

struct CakeParams {
  double tau1 = 1.0;     // > 0: temperature of the dispersion
  double tau2 = 1.0;     // > 0: temperature of the shift
  double gamma = 200.0;  // >= 0: weight of the variance in the eviction score
  int64_t window = 32;   // >= 0: the recent tokens always kept (min(window, budget))
  int64_t kernel = 5;    // odd, >= 1
  PoolKind pool = PoolKind::kAvg;
};

// One layer's window statistics (AttentionStats), H a multiple of Hkv.
struct CakeLayerStats {
  TensorView key_mass;     // f32 [B, H, S]: sum over the rows of p
  TensorView key_mass_sq;  // f32 [B, H, S]: sum over the rows of p^2
  int64_t rows = 0;        // rows summed in each entry: W, or W * Hq / Hkv for group sums
};

// P_l = H^(1/tau1) * V^(1/tau2), with, for each sequence and each of the H rows of statistics,
// mean_j = key_mass_j / rows, var_j = max(0, key_mass_sq_j / rows - mean_j^2),
// H = -sum_j mean_j ln mean_j (0 ln 0 = 0) and V = sum_j var_j, both averaged over the rows and
// sequences. dispersion / shift may be nullptr.
Status CakeLayerPreference(const CakeParams& params, const EvictionTarget& target,
                           const CakeLayerStats& stats, double* preference, double* dispersion,
                           double* shift);

// CAKE's keep-set of one layer under target.budget: the recent min(window, budget) tokens and
// the top of the others by the pooled score mean + gamma * var (per row as above), averaged over
// the group's rows.
Status CakeKeep(const CakeParams& params, const EvictionTarget& target, const CakeLayerStats& stats,
                KeepSet* keep);

// CAKE's cascading budget allocation. `reserved` tokens of every layer are set aside (CAKE
// keeps each layer's recent window: pass the window, so no budget falls below it); the rest,
// R = total - num_layers * reserved, is what the preferences divide. Layers arrive in order with
// their preferences; after layer l arrives, R is re-divided over layers 0..l in proportion to
// their preferences (largest remainder, ties to the earlier layer; all preferences 0: equal
// shares) and each budget is reserved + its share, so the budgets seen so far sum to
// R + (l + 1) * reserved (`total` after the last layer): the cache never holds more than `total`
// tokens per sequence and KV head while it fills, and earlier layers shrink (are evicted
// further) as later ones arrive. A layer's budget never grows back (its evicted tokens are
// gone): where rounding would give an earlier layer one token more than before, it keeps its
// previous budget and the newest layer gets the difference.
class CakeAllocator {
 public:
  // total >= num_layers >= 1; 0 <= reserved <= total / num_layers.
  Status Init(int64_t num_layers, int64_t total, int64_t reserved = 0);
  // preference finite and >= 0; at most num_layers calls.
  Status AddLayer(double preference);
  int64_t layers_seen() const { return static_cast<int64_t>(preferences_.size()); }
  // Budgets of the layers seen so far (each >= reserved).
  const std::vector<int64_t>& budgets() const { return budgets_; }

 private:
  int64_t num_layers_ = 0;
  int64_t total_ = 0;
  int64_t reserved_ = 0;
  std::vector<double> preferences_;
  std::vector<int64_t> budgets_;
};

struct CompactKVParams {
  KVCacheView cache;
  // seq_lens and block_table are read and written (the views' data must be writable): see
  // CompactKV. A page may be used by one sequence only (pages shared between sequences, or
  // twice in a row, are refused: compaction would overwrite the other user's tokens).
  KVBatchView batch;
  const KeepSet* keep = nullptr;  // batch() == batch.batch, num_kv_heads == cache.num_kv_heads
  // Optional i32 [B, Hkv, S] (S >= every seq_len, unit stride in the last dim), read and
  // written: the position of each stored token (e.g. its original position after earlier
  // compactions). Compacted with the tokens; with reindex, set to 0 .. count - 1. Without it,
  // the position of token j is taken to be j.
  TensorView positions;
  // StreamingLLM's re-indexing: kept token i (of its head) moves to position i. Its stored key
  // was rotated (RoPE) at its old position p; rotations compose (R(a) R(b) = R(a + b)), so it is
  // rotated in place by i - p with `rotary`, which is exactly the key RoPE'd at i (up to one
  // rounding to the cache dtype). f32, bf16, f16 caches only (a quantized row would need
  // re-quantizing: Unimplemented). V is never touched.
  bool reindex = false;
  RotaryParams rotary;  // used with reindex; rotary_dim 0 makes reindex a no-op on K
};

struct CompactKVResult {
  // Paged caches: the pages sequence b no longer uses, for every b in order; ascending
  // block-table index within a sequence. The caller's page allocator owns them.
  std::vector<int32_t> freed_pages;
};

// Applies a keep-set in place. For each (b, h), kept token i (ascending) moves from index
// keep->Tokens(b, h)[i] to index i; rows of every dtype move as stored bytes (int8 / int4 with
// their (step, min) pair; the channel normalizers are per head and do not change). Writes:
//   the K and V rows (and scales) of indices 0 .. counts[b] - 1 of every head of sequence b;
//   batch.seq_lens[b] = counts[b];
//   paged: block_table[b][i] = -1 for i in [ceil(counts[b] / page_size),
//          ceil(old seq_lens[b] / page_size)), those pages appended to result->freed_pages
//          (the kept tokens stay in the sequence's first pages);
//   positions (when set), and K re-rotated with reindex.
// Everything is validated first (the cache and batch as ValidateKVCache, the keep-set: counts
// <= seq_lens, tokens strictly ascending in [0, seq_len)); on error nothing is written.
// (Sequence, head) pairs are spread over ctx.num_threads workers.
Status CompactKV(const CompactKVParams& params, const Context& ctx, CompactKVResult* result);

}  // namespace tessera
