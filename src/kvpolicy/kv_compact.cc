// SPDX-License-Identifier: Apache-2.0
// CompactKV (kv_policy.h): moves the kept tokens of every (sequence, KV head) to the front of
// the sequence, in place. Kept token i comes from index t_i >= i (the indices ascend), and the
// rows are moved in ascending i, so a row is always read before anything overwrites it. Each
// (sequence, head) pair owns its rows (pages are head-major and not shared between sequences:
// validated), so the pairs run in parallel without touching each other's bytes; the tables
// (seq_lens, block_table) are updated after every move.
//
// Re-indexing rotates each moved key by (new position - old position): theta_c and the angle
// in double, as AppendKV's RoPE (kv_cache.cc), then one rounding to the cache dtype.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/i32_view.h"
#include "core/parallel.h"
#include "kvcache/kv_quant.h"
#include "kvcache/kv_validate.h"
#include "kvcache/rotary.h"
#include "kvpolicy/kv_policy_internal.h"
#include "tessera/kv_policy.h"

namespace tessera {
namespace {

using kvpolicy::Invalid;
using kvpolicy::Str;

Status ValidateKeepSet(const KeepSet& keep, const KVCacheView& cache, const int32_t* lens,
                       int64_t B) {
  if (keep.num_kv_heads != cache.num_kv_heads) {
    return Invalid("keep->num_kv_heads", Str(cache.num_kv_heads) + " (cache.num_kv_heads)",
                   Str(keep.num_kv_heads));
  }
  if (keep.batch() != B) {
    return Invalid("keep->counts", Str(B) + " sequences (batch.batch)", Str(keep.batch()));
  }
  if (static_cast<int64_t>(keep.offsets.size()) != B + 1 || keep.offsets[0] != 0) {
    return Invalid("keep->offsets", Str(B + 1) + " entries starting at 0",
                   Str(static_cast<int64_t>(keep.offsets.size())) + " entries");
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t count = keep.counts[size_t(b)];
    if (count < 0 || count > lens[b]) {
      return Invalid("keep->counts[" + Str(b) + "]",
                     "0.." + Str(lens[b]) + " (batch.seq_lens[" + Str(b) + "])", Str(count));
    }
    if (keep.offsets[size_t(b) + 1] - keep.offsets[size_t(b)] != keep.num_kv_heads * count) {
      return Invalid("keep->offsets[" + Str(b + 1) + "]",
                     "offsets[" + Str(b) + "] + num_kv_heads * counts[" + Str(b) +
                         "] = " + Str(keep.offsets[size_t(b)] + keep.num_kv_heads * count),
                     Str(keep.offsets[size_t(b) + 1]));
    }
  }
  if (static_cast<int64_t>(keep.tokens.size()) != keep.offsets[size_t(B)]) {
    return Invalid("keep->tokens", Str(keep.offsets[size_t(B)]) + " entries (offsets[B])",
                   Str(static_cast<int64_t>(keep.tokens.size())));
  }
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < keep.num_kv_heads; ++h) {
      const int32_t* t = keep.Tokens(b, h);
      for (int64_t i = 0; i < keep.counts[size_t(b)]; ++i) {
        const int64_t lo = i == 0 ? 0 : int64_t{t[i - 1]} + 1;
        if (t[i] < lo || t[i] >= lens[b]) {
          return Invalid("keep->Tokens(" + Str(b) + ", " + Str(h) + ")[" + Str(i) + "]",
                         "an index in [" + Str(lo) + ", " + Str(lens[b]) +
                             ") (strictly ascending, below seq_lens[" + Str(b) + "])",
                         Str(t[i]));
        }
      }
    }
  }
  return Status::Ok();
}

// Rotates the first rotary_dim channels of a stored f32 / bf16 / f16 row by `delta` positions
// (rotary.h: the arithmetic AppendKV rotates keys with). `angles` holds rope.angle_count().
void RotateRow(KVDType dtype, const rotary::Rotary& rope, int64_t rotary_dim, int64_t delta,
               uint8_t* row, float* scratch, double* angles) {
  if (!rope.enabled() || delta == 0) return;
  for (int64_t c = 0; c < rotary_dim; ++c) {
    if (dtype == KVDType::kF32) {
      std::memcpy(&scratch[c], row + 4 * c, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, row + 2 * c, 2);
      scratch[c] = dtype == KVDType::kBF16 ? BF16ToFloat(h) : F16ToFloat(h);
    }
  }
  rope.Angles(delta, angles);
  rope.Apply(delta, angles, scratch);
  for (int64_t c = 0; c < rotary_dim; ++c) {
    if (dtype == KVDType::kF32) {
      std::memcpy(row + 4 * c, &scratch[c], 4);
    } else {
      const uint16_t h = dtype == KVDType::kBF16 ? FloatToBF16(scratch[c]) : FloatToF16(scratch[c]);
      std::memcpy(row + 2 * c, &h, 2);
    }
  }
}

}  // namespace

Status CompactKV(const CompactKVParams& p, const Context& ctx, CompactKVResult* result) {
  if (result == nullptr) return Invalid("result", "a non-null CompactKVResult", "nullptr");
  if (p.keep == nullptr) return Invalid("keep", "a non-null KeepSet", "nullptr");
  const KVCacheView& cache = p.cache;
  const KVBatchView& batch = p.batch;
  Status s = ValidateKVCache(cache, batch, "cache", "batch");
  if (!s.ok()) return s;
  const int64_t B = batch.batch, Hkv = cache.num_kv_heads;
  const int32_t* lens = kvquant::SeqLens(batch);
  s = ValidateKeepSet(*p.keep, cache, lens, B);
  if (!s.ok()) return s;
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) longest = std::max<int64_t>(longest, lens[b]);
  if (p.positions.data != nullptr) {
    const int64_t shape[3] = {B, Hkv, -1};
    s = CheckI32View("positions", p.positions, 3, shape,
                     "shape [" + Str(B) + ", " + Str(Hkv) + ", S] (batch.batch, Hkv)");
    if (!s.ok()) return s;
    if (p.positions.shape[2] < longest) {
      return Invalid("positions", "at least " + Str(longest) + " tokens (the longest seq_len)",
                     ShapeString(p.positions));
    }
  }
  if (p.reindex) {
    if (KVDTypeIsQuantized(cache.dtype)) {
      return Status::Unimplemented(
          std::string("reindex: re-rotating stored keys needs an f32, bf16 or f16 cache, got ") +
          KVDTypeName(cache.dtype) + " (a quantized row would have to be re-quantized)");
    }
    s = rotary::Validate(p.rotary, cache.head_dim);
    if (!s.ok()) return s;
  }
  const bool paged = batch.block_table.data != nullptr;
  const int64_t ps = cache.page_size;
  if (paged) {
    // Every page in use belongs to one sequence, once.
    std::vector<std::pair<int32_t, int64_t>> used;  // (page, b)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t pages = (lens[b] + ps - 1) / ps;
      for (int64_t i = 0; i < pages; ++i) {
        used.push_back({static_cast<int32_t>(kvquant::PageOfToken(batch, b, i * ps, ps)), b});
      }
    }
    std::sort(used.begin(), used.end());
    for (size_t i = 1; i < used.size(); ++i) {
      if (used[i].first == used[i - 1].first) {
        return Invalid("batch.block_table",
                       "pages used by one sequence once (compaction moves tokens within them)",
                       "page " + Str(used[i].first) + " used by sequences " +
                           Str(used[i - 1].second) + " and " + Str(used[i].second));
      }
    }
  }
  std::vector<Region> outputs = KVCacheRegions(cache, "cache");
  for (Region& r : KVBatchRegions(batch, "batch")) outputs.push_back(std::move(r));
  outputs.push_back(ViewRegion("positions", p.positions));
  s = CheckDisjoint(outputs, {});
  if (!s.ok()) return s;

  // Moves.
  const KeepSet& keep = *p.keep;
  const int64_t row_bytes = KVRowBytes(cache.dtype, cache.head_dim);
  const bool quantized = KVDTypeIsQuantized(cache.dtype);
  int32_t* positions = static_cast<int32_t*>(p.positions.data);
  const int32_t threads = ResolveThreads(ctx);
  const rotary::Rotary rope(p.rotary);
  ParallelFor(threads, B * Hkv, [&](int64_t task, int32_t) {
    const int64_t b = task / Hkv, h = task % Hkv;
    const int32_t* tok = keep.Tokens(b, h);
    const int64_t count = keep.counts[size_t(b)];
    int32_t* pos = positions == nullptr
                       ? nullptr
                       : positions + b * p.positions.strides[0] + h * p.positions.strides[1];
    std::vector<float> scratch(static_cast<size_t>(cache.head_dim));
    std::vector<double> angles(static_cast<size_t>(rope.angle_count()));
    for (int64_t i = 0; i < count; ++i) {
      const int64_t src = tok[i];
      const int64_t old_pos = pos != nullptr ? pos[src] : src;
      const int64_t dp = kvquant::PageOfToken(batch, b, i, ps), dslot = i % ps;
      if (src != i) {
        const int64_t sp = kvquant::PageOfToken(batch, b, src, ps), sslot = src % ps;
        const int64_t from = kvquant::RowOffset(cache, sp, sslot, h);
        const int64_t to = kvquant::RowOffset(cache, dp, dslot, h);
        std::memcpy(static_cast<uint8_t*>(cache.k) + to, static_cast<uint8_t*>(cache.k) + from,
                    static_cast<size_t>(row_bytes));
        std::memcpy(static_cast<uint8_t*>(cache.v) + to, static_cast<uint8_t*>(cache.v) + from,
                    static_cast<size_t>(row_bytes));
        if (quantized) {
          const int64_t fi = 2 * kvquant::RowIndex(cache, sp, sslot, h);
          const int64_t ti = 2 * kvquant::RowIndex(cache, dp, dslot, h);
          cache.k_scales[ti] = cache.k_scales[fi];
          cache.k_scales[ti + 1] = cache.k_scales[fi + 1];
          cache.v_scales[ti] = cache.v_scales[fi];
          cache.v_scales[ti + 1] = cache.v_scales[fi + 1];
        }
      }
      if (p.reindex) {
        RotateRow(cache.dtype, rope, p.rotary.rotary_dim, i - old_pos,
                  static_cast<uint8_t*>(cache.k) + kvquant::RowOffset(cache, dp, dslot, h),
                  scratch.data(), angles.data());
      }
      if (pos != nullptr) pos[i] = p.reindex ? static_cast<int32_t>(i) : pos[src];
    }
  });

  // Tables.
  int32_t* seq_lens = static_cast<int32_t*>(batch.seq_lens.data);
  std::vector<int32_t> freed;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t count = keep.counts[size_t(b)];
    if (paged) {
      int32_t* row =
          static_cast<int32_t*>(batch.block_table.data) + b * kvquant::BlockStride(batch);
      for (int64_t i = (count + ps - 1) / ps; i < (lens[b] + ps - 1) / ps; ++i) {
        freed.push_back(row[i]);
        row[i] = -1;
      }
    }
    seq_lens[b] = static_cast<int32_t>(count);
  }
  result->freed_pages = std::move(freed);
  return Status::Ok();
}

}  // namespace tessera
