// SPDX-License-Identifier: Apache-2.0
// Validation of a KV cache view and the batch that reads it (kv_validate.h), shared by AppendKV,
// ReadKV and decode.
#include "kvcache/kv_validate.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "core/check.h"
#include "core/checked_math.h"
#include "core/dispatch.h"
#include "core/i32_view.h"
#include "kvcache/kv_quant.h"

namespace tessera {
namespace {

using kvquant::kMaxPageSize;

std::string Field(const char* arg, const char* field) { return std::string(arg) + "." + field; }

std::string Str(int64_t x) { return std::to_string(x); }

Status Invalid(const std::string& name, const std::string& what, const std::string& got) {
  return Status::InvalidArgument(Expected(name.c_str(), what, got));
}

std::string DTypeGot(KVDType dtype) {
  return kvquant::IsKnownDType(dtype) ? KVDTypeName(dtype)
                                      : "unknown dtype " + Str(static_cast<int32_t>(dtype));
}

// Rows (page, head, slot) of the pool; -1 when the count overflows.
int64_t PoolRows(const KVCacheView& cache) {
  int64_t rows = 0;
  if (!CheckedMul(cache.num_pages, cache.num_kv_heads, &rows) ||
      !CheckedMul(rows, cache.page_size, &rows)) {
    return -1;
  }
  return rows;
}

// Bytes of the K (or V) pool; -1 when any product overflows, scales included.
int64_t PoolBytes(const KVCacheView& cache) {
  const int64_t rows = PoolRows(cache);
  int64_t bytes = 0, scale_bytes = 0;
  if (rows < 0 || !CheckedMul(rows, KVRowBytes(cache.dtype, cache.head_dim), &bytes) ||
      !CheckedMul(rows, 2 * int64_t{sizeof(float)}, &scale_bytes)) {
    return -1;
  }
  return bytes;
}

}  // namespace

Status ValidateKVCache(const KVCacheView& cache, const KVBatchView& batch, const char* cache_arg,
                       const char* batch_arg) {
  const char* ca = cache_arg;
  const char* ba = batch_arg;
  if (!kvquant::IsKnownDType(cache.dtype)) {
    return Invalid(Field(ca, "dtype"), "f32, bf16, f16, int8 or int4", DTypeGot(cache.dtype));
  }
  if (cache.num_pages < 1) {
    return Invalid(Field(ca, "num_pages"), "at least 1 page", Str(cache.num_pages));
  }
  if (cache.page_size < 1) {
    return Invalid(Field(ca, "page_size"), "at least 1 token per page", Str(cache.page_size));
  }
  if (cache.num_kv_heads < 1) {
    return Invalid(Field(ca, "num_kv_heads"), "at least 1 KV head", Str(cache.num_kv_heads));
  }
  if (cache.head_dim < 1 || cache.head_dim > kMaxHeadDim) {
    return Invalid(Field(ca, "head_dim"), "a head dim in [1, " + Str(kMaxHeadDim) + "]",
                   Str(cache.head_dim));
  }
  if (cache.k == nullptr) return Invalid(Field(ca, "k"), "a non-null pointer", "nullptr");
  if (cache.v == nullptr) return Invalid(Field(ca, "v"), "a non-null pointer", "nullptr");
  if (KVDTypeIsQuantized(cache.dtype)) {
    const struct {
      const char* field;
      const float* ptr;
    } scales[] = {{"k_scales", cache.k_scales},
                  {"v_scales", cache.v_scales},
                  {"k_channel_scales", cache.k_channel_scales},
                  {"v_channel_scales", cache.v_channel_scales}};
    for (const auto& sc : scales) {
      if (sc.ptr == nullptr) {
        return Invalid(Field(ca, sc.field),
                       std::string("a non-null pointer (required by the ") +
                           KVDTypeName(cache.dtype) + " dtype)",
                       "nullptr");
      }
    }
  }

  if (PoolBytes(cache) < 0) {
    return Invalid(Field(ca, "num_pages"),
                   "a pool whose size num_pages * num_kv_heads * page_size * row bytes fits in "
                   "int64",
                   Str(cache.num_pages) + " * " + Str(cache.num_kv_heads) + " * " +
                       Str(cache.page_size) + " * " + Str(KVRowBytes(cache.dtype, cache.head_dim)));
  }

  if (batch.batch < 0) {
    return Invalid(Field(ba, "batch"), "a non-negative sequence count", Str(batch.batch));
  }
  if (batch.batch == 0) return Status::Ok();
  if (batch.seq_lens.data == nullptr) {
    return Invalid(Field(ba, "seq_lens"),
                   "an i32 [" + Str(batch.batch) + "] view (" + Field(ba, "batch") + " = " +
                       Str(batch.batch) + ")",
                   "data == nullptr");
  }
  const int64_t lens_shape[1] = {batch.batch};
  Status s = CheckI32View(Field(ba, "seq_lens").c_str(), batch.seq_lens, 1, lens_shape,
                          "shape [" + Str(batch.batch) + "] (" + Field(ba, "batch") + ")");
  if (!s.ok()) return s;
  const int32_t* seq_lens = kvquant::SeqLens(batch);
  for (int64_t b = 0; b < batch.batch; ++b) {
    if (seq_lens[b] < 0) {
      return Invalid(Field(ba, "seq_lens") + "[" + Str(b) + "]", "a non-negative length",
                     Str(seq_lens[b]));
    }
  }

  if (batch.block_table.data == nullptr) {
    if (batch.batch > cache.num_pages) {
      return Invalid(Field(ba, "batch"),
                     "at most " + Field(ca, "num_pages") + " = " + Str(cache.num_pages) +
                         " sequences (the contiguous layout, block_table == nullptr, gives "
                         "sequence b page b)",
                     Str(batch.batch));
    }
    for (int64_t b = 0; b < batch.batch; ++b) {
      if (seq_lens[b] > cache.page_size) {
        return Invalid(Field(ba, "seq_lens") + "[" + Str(b) + "]",
                       "at most " + Field(ca, "page_size") + " = " + Str(cache.page_size) +
                           " tokens (the capacity per sequence of the contiguous layout)",
                       Str(seq_lens[b]));
      }
    }
    return Status::Ok();
  }

  if (cache.page_size > kMaxPageSize) {
    return Invalid(Field(ca, "page_size"),
                   "1.." + Str(kMaxPageSize) + " tokens per page for the paged layout (" +
                       Field(ba, "block_table") + " set)",
                   Str(cache.page_size));
  }
  const int64_t table_shape[2] = {batch.batch, -1};
  s = CheckI32View(
      Field(ba, "block_table").c_str(), batch.block_table, 2, table_shape,
      "shape [" + Str(batch.batch) + ", max_pages_per_seq] (" + Field(ba, "batch") + " rows)");
  if (!s.ok()) return s;
  const int64_t max_pages = batch.block_table.shape[1];
  if (max_pages < 1) {
    return Invalid(Field(ba, "block_table"), "at least 1 page per row (shape[1] >= 1)",
                   ShapeString(batch.block_table));
  }
  // At most 2^31 - 1 pages are reachable by int32 lengths: the product fits (page_size <= 256).
  const int64_t capacity =
      std::min<int64_t>(max_pages, std::numeric_limits<int32_t>::max()) * cache.page_size;
  const int32_t* table = kvquant::BlockTable(batch);
  const int64_t stride = kvquant::BlockStride(batch);
  for (int64_t b = 0; b < batch.batch; ++b) {
    const int64_t len = seq_lens[b];
    if (len > capacity) {
      return Invalid(
          Field(ba, "block_table"),
          "room for seq_lens[" + Str(b) + "] = " + Str(len) + " tokens in sequence " + Str(b),
          "max_pages_per_seq * page_size = " + Str(max_pages) + " * " + Str(cache.page_size) +
              " = " + Str(capacity) + " tokens");
    }
    const int64_t pages = (len + cache.page_size - 1) / cache.page_size;
    const int32_t* row = table + b * stride;
    for (int64_t i = 0; i < pages; ++i) {
      if (row[i] < 0 || row[i] >= cache.num_pages) {
        return Invalid(
            Field(ba, "block_table") + "[" + Str(b) + "][" + Str(i) + "]",
            "a page id in [0, " + Str(cache.num_pages) + ") (" + Field(ca, "num_pages") + ")",
            Str(row[i]));
      }
    }
  }
  return Status::Ok();
}

std::vector<Region> KVCacheRegions(const KVCacheView& cache, const char* cache_arg) {
  const int64_t rows = std::max<int64_t>(0, PoolRows(cache));
  const int64_t pool = std::max<int64_t>(0, PoolBytes(cache));
  std::vector<Region> r = {ArrayRegion(Field(cache_arg, "k"), cache.k, pool, 1),
                           ArrayRegion(Field(cache_arg, "v"), cache.v, pool, 1)};
  if (KVDTypeIsQuantized(cache.dtype)) {
    const int64_t channels = cache.num_kv_heads * cache.head_dim;
    r.push_back(ArrayRegion(Field(cache_arg, "k_scales"), cache.k_scales, 2 * rows, 4));
    r.push_back(ArrayRegion(Field(cache_arg, "v_scales"), cache.v_scales, 2 * rows, 4));
    r.push_back(
        ArrayRegion(Field(cache_arg, "k_channel_scales"), cache.k_channel_scales, channels, 4));
    r.push_back(
        ArrayRegion(Field(cache_arg, "v_channel_scales"), cache.v_channel_scales, channels, 4));
  }
  return r;
}

std::vector<Region> KVBatchRegions(const KVBatchView& batch, const char* batch_arg) {
  return {ViewRegion(Field(batch_arg, "seq_lens"), batch.seq_lens),
          ViewRegion(Field(batch_arg, "block_table"), batch.block_table)};
}

}  // namespace tessera
