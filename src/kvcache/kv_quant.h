// SPDX-License-Identifier: Apache-2.0
// Internal: the KV cache's storage format, shared by AppendKV / ReadKV and every kernel that reads
// the cache (decode). Scalar and inline; a SIMD kernel must reproduce the same dequantized values
// up to fp32 rounding (ReadKV, built on DequantizeRow, defines "the dequantized cache").
//
// Row addressing (kv_cache.h, head-major pages): the (page, slot, head) row of K lives at byte
//   RowOffset = ((page * num_kv_heads + head) * page_size + slot) * RowBytes(dtype, head_dim)
// and its quantization parameters (step, min) at floats [2 * RowIndex, 2 * RowIndex + 1] of
// k_scales. Token t of sequence b is in page PageOfToken(batch, b, t, page_size), slot
// t % page_size.
//
// Quantization (int8: bits = 8, int4: bits = 4), per (token, head) row of D channels with the
// per-channel normalizers n[c] of that head:
//   y[c] = x[c] / n[c]                                         (float division)
//   step = (max y - min y) / (2^bits - 1)                      (in double, rounded to float once)
//   code[c] = clamp(nearbyint((y[c] - min) / step), 0, 2^bits - 1)   (in double; 0 when step == 0)
//   x^[c] = n[c] * (min + step * code[c])                       (float: t = min + step * code,
//                                                                then n * t; no fma)
// The step and the code index are computed in double so that a row whose range exceeds
// FLT_MAX does not overflow to inf and the code is the nearest one to the float y.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "core/dispatch.h"
#include "tessera/kv_cache.h"

namespace tessera {
namespace kvquant {

// Largest page size of the paged layout (the contiguous layout accepts any capacity).
constexpr int64_t kMaxPageSize = 256;

// True for the five KVDType values.
inline bool IsKnownDType(KVDType dtype) {
  return dtype == KVDType::kF32 || dtype == KVDType::kBF16 || dtype == KVDType::kF16 ||
         dtype == KVDType::kInt8 || dtype == KVDType::kInt4;
}

// Code bits of a quantized dtype (8 or 4); 0 for the others.
inline int Bits(KVDType dtype) {
  return dtype == KVDType::kInt8 ? 8 : dtype == KVDType::kInt4 ? 4 : 0;
}

// Bytes of one (token, head) row: 4D, 2D, 2D, D, ceil(D / 2); 0 for D <= 0 or an unknown dtype.
inline int64_t RowBytes(KVDType dtype, int64_t head_dim) {
  if (head_dim <= 0) return 0;
  switch (dtype) {
    case KVDType::kF32:
      return 4 * head_dim;
    case KVDType::kBF16:
    case KVDType::kF16:
      return 2 * head_dim;
    case KVDType::kInt8:
      return head_dim;
    case KVDType::kInt4:
      return (head_dim + 1) / 2;
  }
  return 0;
}

// Row number of (page, slot, head) in the pool: the index into k_scales / v_scales pairs.
inline int64_t RowIndex(const KVCacheView& cache, int64_t page, int64_t slot, int64_t head) {
  return (page * cache.num_kv_heads + head) * cache.page_size + slot;
}

// Byte offset of the (page, slot, head) row from cache.k (or cache.v).
inline int64_t RowOffset(const KVCacheView& cache, int64_t page, int64_t slot, int64_t head) {
  return RowIndex(cache, page, slot, head) * RowBytes(cache.dtype, cache.head_dim);
}

// The batch's i32 views as the raw arrays the kernels read (ValidateKVCache checked them: rank
// 1 and 2, unit stride in the last dim). Row b of the block table starts at
// BlockTable(batch) + b * BlockStride(batch).
inline const int32_t* SeqLens(const KVBatchView& batch) {
  return static_cast<const int32_t*>(batch.seq_lens.data);
}
inline const int32_t* BlockTable(const KVBatchView& batch) {
  return static_cast<const int32_t*>(batch.block_table.data);
}
inline int64_t BlockStride(const KVBatchView& batch) {
  return batch.block_table.data != nullptr ? batch.block_table.strides[0] : 0;
}

// Page holding token t of sequence b: block_table[b][t / page_size] (paged) or b (contiguous).
inline int64_t PageOfToken(const KVBatchView& batch, int64_t b, int64_t t, int64_t page_size) {
  if (batch.block_table.data == nullptr) return b;
  return BlockTable(batch)[b * BlockStride(batch) + t / page_size];
}

// The channel normalizer for a channel whose largest |x| is max_abs: sqrt(max_abs), and 1 for
// max_abs == 0 (an all-zero channel), so it is never 0 and never NaN for finite input.
inline float ChannelNormalizer(float max_abs) {
  if (!(max_abs > 0.0f)) return 1.0f;
  return std::sqrt(max_abs);
}

// Code of channel c in a packed row.
inline uint32_t CodeAt(const uint8_t* codes, int bits, int64_t c) {
  if (bits == 8) return codes[c];
  const uint8_t byte = codes[c >> 1];
  return (c & 1) ? (byte >> 4) : (byte & 0x0Fu);
}

// Quantizes one row x[D] (finite) with normalizers channel_norm[D] (positive, finite) into
// codes[RowBytes] and (*step, *min). int4: channel 2i in the low nibble of byte i, 2i + 1 in the
// high nibble; for odd D the last high nibble is 0.
inline void QuantizeRow(const float* x, int64_t D, const float* channel_norm, int bits,
                        uint8_t* codes, float* step, float* min) {
  const uint32_t levels = (1u << bits) - 1u;
  float lo = 0.0f, hi = 0.0f;
  for (int64_t c = 0; c < D; ++c) {
    const float y = x[c] / channel_norm[c];
    if (c == 0 || y < lo) lo = y;
    if (c == 0 || y > hi) hi = y;
  }
  const float s = static_cast<float>((static_cast<double>(hi) - static_cast<double>(lo)) / levels);
  *step = s;
  *min = lo;
  if (bits == 4) {
    for (int64_t i = 0; i < (D + 1) / 2; ++i) codes[i] = 0;
  }
  for (int64_t c = 0; c < D; ++c) {
    uint32_t code = 0;
    if (s != 0.0f) {
      const float y = x[c] / channel_norm[c];
      const double q = std::nearbyint((static_cast<double>(y) - lo) / static_cast<double>(s));
      code = static_cast<uint32_t>(std::min<double>(std::max(q, 0.0), levels));
    }
    if (bits == 8) {
      codes[c] = static_cast<uint8_t>(code);
    } else {
      codes[c >> 1] |= static_cast<uint8_t>((c & 1) ? (code << 4) : code);
    }
  }
}

// The dequantized value of one code: n * (min + step * code), in float, in that order.
inline float DequantizeValue(uint32_t code, float channel_norm, float step, float min) {
  const float t = min + step * static_cast<float>(code);
  return channel_norm * t;
}

// Dequantizes one row: out[c] = channel_norm[c] * (min + step * code[c]).
inline void DequantizeRow(const uint8_t* codes, int64_t D, const float* channel_norm, int bits,
                          float step, float min, float* out) {
  for (int64_t c = 0; c < D; ++c) {
    out[c] = DequantizeValue(CodeAt(codes, bits, c), channel_norm[c], step, min);
  }
}

}  // namespace kvquant
}  // namespace tessera
