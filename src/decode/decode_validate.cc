// SPDX-License-Identifier: Apache-2.0
// Decode argument validation: DecodeParams against the cache, the batch and the forward's option
// checks, every check before any work.
#include "decode/decode_validate.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/check.h"
#include "kvcache/kv_quant.h"
#include "kvcache/kv_validate.h"
#include "tessera/attention.h"

namespace tessera {
namespace {

std::string Num(int64_t x) { return std::to_string(x); }

}  // namespace

// DecodeStats: f32 outputs whose key extent holds the longest sequence.
Status ValidateDecodeStats(const DecodeStats& st, int64_t B, int64_t Q, int64_t Hq, int64_t Hkv,
                           int64_t max_len) {
  const struct {
    const char* name;
    const TensorView& view;
    int32_t rank;
    int64_t shape[4];
    std::string what;
  } outputs[] = {{"stats.probs",
                  st.probs,
                  4,
                  {B, Hq, Q, -1},
                  "shape [" + Num(B) + ", " + Num(Hq) + ", " + Num(Q) + ", S] ([B, Hq, Q, S])"},
                 {"stats.accumulated",
                  st.accumulated,
                  3,
                  {B, Hkv, -1, 0},
                  "shape [" + Num(B) + ", " + Num(Hkv) + ", S] ([B, Hkv, S])"}};
  for (const auto& o : outputs) {
    if (o.view.data == nullptr) continue;
    if (o.view.dtype != DType::kF32) {
      return Status::InvalidArgument(Expected(o.name, "dtype f32", DTypeName(o.view.dtype)));
    }
    Status s = CheckShape(o.name, o.view, o.rank, o.shape, o.what, true);
    if (!s.ok()) return s;
    const int64_t keys = o.view.shape[o.rank - 1];
    if (keys < max_len) {
      return Status::InvalidArgument(
          Expected(o.name, "a key extent S >= " + Num(max_len) + " (the longest seq_len)",
                   "shape " + ShapeString(o.view)));
    }
  }
  return Status::Ok();
}

Status ValidateDecode(const DecodeParams& p, AttentionProblem* prob, decode::KVSource* kv,
                      std::vector<int64_t>* lens) {
  Status s = ValidateKVCache(p.cache, p.kv, "cache", "kv");
  if (!s.ok()) return s;
  s = CheckRankAndStrides("q", p.q, false);
  if (!s.ok()) return s;
  if (p.q.rank != 4) {
    return Status::InvalidArgument(
        Expected("q", "rank 4 [B, Q, Hq, D]", "rank " + std::to_string(p.q.rank)));
  }
  const int64_t B = p.q.shape[0], Q = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t Hkv = p.cache.num_kv_heads;
  if (B != p.kv.batch) {
    return Status::InvalidArgument(Expected(
        "q", "batch " + Num(p.kv.batch) + " (kv.batch) in dim 0", "shape " + ShapeString(p.q)));
  }
  if (Q < 1 || Q > kMaxDecodeQueries) {
    return Status::InvalidArgument(
        Expected("q", "1 to " + Num(kMaxDecodeQueries) + " queries per sequence (dim 1)", Num(Q)));
  }
  if (D != p.cache.head_dim) {
    return Status::InvalidArgument(
        Expected("q", "head dim " + Num(p.cache.head_dim) + " (cache.head_dim) in dim 3", Num(D)));
  }
  if (Hq < 1 || Hq % Hkv != 0) {
    return Status::InvalidArgument(Expected(
        "q", "a head count that is a positive multiple of cache.num_kv_heads = " + Num(Hkv),
        Num(Hq)));
  }
  if (p.split_tokens < 0) {
    return Status::InvalidArgument(
        Expected("split_tokens", ">= 0 (0: the default)", Num(p.split_tokens)));
  }
  AttentionParams a;
  a.q = p.q;
  a.out = p.out;
  a.lse = p.lse;
  a.scale = p.scale;
  a.causal = p.causal;
  a.window_left = p.window_left;
  a.softcap = p.softcap;
  a.alibi_slopes = p.alibi_slopes;
  // The stand-in K/V: the cache's shape with one key, never read (its pointer is q's, so that
  // the forward's alias checks find no overlap the cache checks below do not name).
  a.k = MakeView4(p.q.data, p.q.dtype, B, 1, Hkv, D);
  for (int i = 0; i < 4; ++i) a.k.strides[i] = 0;
  a.v = a.k;
  s = ValidateAttention(a, prob);
  if (!s.ok()) return s;
  // The stand-in has one key: resolve the window against the real lengths (positions lie in
  // [-Q, max seq_len)), so that a window past every sequence means unbounded.
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = std::max<int64_t>(max_len, kvquant::SeqLens(p.kv)[b]);
  s = ValidateDecodeStats(p.stats, B, Q, Hq, Hkv, max_len);
  if (!s.ok()) return s;
  std::vector<Region> inputs = KVCacheRegions(p.cache, "cache");
  for (Region& r : KVBatchRegions(p.kv, "kv")) inputs.push_back(std::move(r));
  s = CheckDisjoint(
      {ViewRegion("out", p.out), ViewRegion("lse", p.lse), ViewRegion("stats.probs", p.stats.probs),
       ViewRegion("stats.accumulated", p.stats.accumulated)},
      inputs);
  if (!s.ok()) return s;
  prob->window_left =
      p.window_left < 0 || p.window_left >= std::max(Q, max_len) ? kUnboundedWindow : p.window_left;

  decode::KVSource& src = *kv;
  src = decode::KVSource();
  src.dtype = p.cache.dtype;
  src.batch = B;
  src.heads_kv = Hkv;
  src.dim = D;
  src.k = static_cast<const uint8_t*>(p.cache.k);
  src.v = static_cast<const uint8_t*>(p.cache.v);
  const int64_t row_bytes = KVRowBytes(p.cache.dtype, D);
  src.k_page_stride = src.v_page_stride = Hkv * p.cache.page_size * row_bytes;
  src.k_head_stride = src.v_head_stride = p.cache.page_size * row_bytes;
  src.k_token_stride = src.v_token_stride = row_bytes;
  src.seq_lens = kvquant::SeqLens(p.kv);
  src.block_table = kvquant::BlockTable(p.kv);
  src.block_stride = kvquant::BlockStride(p.kv);
  src.page_size = p.cache.page_size;
  src.cache = true;
  if (KVDTypeIsQuantized(p.cache.dtype)) {
    src.k_scales = p.cache.k_scales;
    src.v_scales = p.cache.v_scales;
    src.k_norm = p.cache.k_channel_scales;
    src.v_norm = p.cache.v_channel_scales;
  }
  lens->resize(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) (*lens)[size_t(b)] = kvquant::SeqLens(p.kv)[b];
  return Status::Ok();
}

int64_t ResolveSplitTokens(const DecodeParams& p) {
  // A split of 2^31 tokens holds any sequence (lengths are int32): larger values are the same
  // plan, and clamping keeps split sums and counts far from overflow.
  constexpr int64_t kMaxSplitTokens = int64_t{1} << 31;
  if (p.split_tokens > 0) return std::min(p.split_tokens, kMaxSplitTokens);
  const bool small_pages =
      p.kv.block_table.data != nullptr && p.cache.page_size < kDecodeSmallPageTokens;
  return small_pages ? kDefaultDecodeSplitTokensSmallPages : kDefaultDecodeSplitTokens;
}

}  // namespace tessera
