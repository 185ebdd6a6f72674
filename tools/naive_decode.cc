// SPDX-License-Identifier: Apache-2.0
// Naive decode over a KV cache (see naive_decode.h). The dequantization is deliberately scalar
// and follows kv_cache.h line by line; the dot products, exp and accumulation are small Highway
// loops so the baseline is not handicapped by scalar FMA latency.

// foreach_target must come first, then highway.h, then the math header.
// clang-format off
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "naive_decode.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>
// clang-format on

#include "naive_decode.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace cli {
namespace HWY_NAMESPACE {
namespace {  // internal linkage: naive_backward.cc has its own Dot
namespace hn = hwy::HWY_NAMESPACE;

// sum_i a[i] * b[i] over n floats.
float Dot(const float* HWY_RESTRICT a, const float* HWY_RESTRICT b, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  auto s0 = hn::Zero(d), s1 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 2 * lanes <= n; i += 2 * lanes) {
    s0 = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), s0);
    s1 = hn::MulAdd(hn::LoadU(d, a + i + lanes), hn::LoadU(d, b + i + lanes), s1);
  }
  for (; i + lanes <= n; i += lanes) s0 = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), s0);
  float s = hn::GetLane(hn::SumOfLanes(d, hn::Add(s0, s1)));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[i] += alpha * x[i] over n floats.
void Axpy(float alpha, const float* HWY_RESTRICT x, float* HWY_RESTRICT y, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  const auto va = hn::Set(d, alpha);
  int64_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    hn::StoreU(hn::MulAdd(va, hn::LoadU(d, x + i), hn::LoadU(d, y + i)), d, y + i);
  }
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// Replaces row[0, n) (n >= 1) by exp(row - max row) and returns the sum of the new values.
float ExpRow(float* HWY_RESTRICT row, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  float max = row[0];
  for (int64_t j = 1; j < n; ++j) max = std::max(max, row[j]);
  const auto vm = hn::Set(d, max);
  auto vsum = hn::Zero(d);
  int64_t j = 0;
  for (; j + lanes <= n; j += lanes) {
    const auto e = hn::Exp(d, hn::Sub(hn::LoadU(d, row + j), vm));
    hn::StoreU(e, d, row + j);
    vsum = hn::Add(vsum, e);
  }
  float sum = hn::GetLane(hn::SumOfLanes(d, vsum));
  for (; j < n; ++j) {
    row[j] = std::exp(row[j] - max);
    sum += row[j];
  }
  return sum;
}

// Dequantizes one (token t of sequence b, KV head h) row of K or V into dst[D] f32, exactly as
// kv_cache.h defines the storage. f16_table maps f16 bits to f32.
void DequantizeRow(const KVCacheView& c, const KVBatchView& kv, bool value, int64_t row_bytes,
                   const float* f16_table, int64_t b, int64_t t, int64_t h,
                   float* HWY_RESTRICT dst) {
  const int64_t D = c.head_dim;
  int64_t page = b, slot = t;  // contiguous: sequence b owns page b
  if (kv.block_table.data != nullptr) {
    const int32_t* table = static_cast<const int32_t*>(kv.block_table.data);
    page = table[b * kv.block_table.strides[0] + t / c.page_size];
    slot = t % c.page_size;
  }
  const int64_t row = (page * c.num_kv_heads + h) * c.page_size + slot;  // head-major pages
  const uint8_t* src = static_cast<const uint8_t*>(value ? c.v : c.k) + row * row_bytes;
  switch (c.dtype) {
    case KVDType::kF32:
      std::memcpy(dst, src, static_cast<size_t>(D) * sizeof(float));
      break;
    case KVDType::kBF16:
      for (int64_t i = 0; i < D; ++i) {
        uint16_t bits;
        std::memcpy(&bits, src + 2 * i, sizeof(bits));
        const uint32_t wide = static_cast<uint32_t>(bits) << 16;
        std::memcpy(dst + i, &wide, sizeof(wide));
      }
      break;
    case KVDType::kF16:
      for (int64_t i = 0; i < D; ++i) {
        uint16_t bits;
        std::memcpy(&bits, src + 2 * i, sizeof(bits));
        dst[i] = f16_table[bits];
      }
      break;
    case KVDType::kInt8:
    case KVDType::kInt4: {
      const float* scales = value ? c.v_scales : c.k_scales;
      const float* normalizer = (value ? c.v_channel_scales : c.k_channel_scales) + h * D;
      const float step = scales[2 * row], min = scales[2 * row + 1];
      const bool int4 = c.dtype == KVDType::kInt4;
      for (int64_t i = 0; i < D; ++i) {
        const int code = int4 ? (i % 2 ? src[i / 2] >> 4 : src[i / 2] & 0xF) : src[i];
        dst[i] = normalizer[i] * (min + step * static_cast<float>(code));
      }
      break;
    }
  }
}

// Task (b, KV head): every query row of the head group against every key of sequence b.
// scratch holds group * Q * max_len scores, then group * Q inverse sums, then one f32 row.
void DecodeTask(const NaiveDecodeProblem& p, const float* f16_table, int64_t max_len, int64_t task,
                float* HWY_RESTRICT scratch) {
  const KVCacheView& c = p.cache;
  const int64_t Hkv = c.num_kv_heads, D = c.head_dim, Q = p.queries, Hq = p.heads_q;
  const int64_t group = Hq / Hkv, rows = group * Q;
  const int64_t b = task / Hkv, kvh = task % Hkv;
  const int64_t len = static_cast<const int32_t*>(p.kv.seq_lens.data)[b];
  const int64_t row_bytes = KVRowBytes(c.dtype, D);
  float* scores = scratch;  // [rows, len]
  float* inv_sum = scratch + rows * max_len;
  float* kv_row = inv_sum + ((rows + 15) / 16) * 16;

  // Row r is query row i = r % Q of query head kvh * group + r / Q.
  auto offset = [&](int64_t r) {
    const int64_t h = kvh * group + r / Q, i = r % Q;
    return ((b * Q + i) * Hq + h) * D;
  };
  auto visible = [&](int64_t r) {
    return p.causal ? std::clamp<int64_t>(len - Q + r % Q + 1, 0, len) : len;
  };

  for (int64_t j = 0; j < len; ++j) {
    DequantizeRow(c, p.kv, false, row_bytes, f16_table, b, j, kvh, kv_row);
    for (int64_t r = 0; r < rows; ++r) {
      if (j < visible(r)) scores[r * len + j] = p.scale * Dot(p.q + offset(r), kv_row, D);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = visible(r);
    inv_sum[r] = n > 0 ? 1.0f / ExpRow(scores + r * len, n) : 0.0f;
    float* out = p.out + offset(r);
    std::fill(out, out + D, 0.0f);
  }
  for (int64_t j = 0; j < len; ++j) {
    DequantizeRow(c, p.kv, true, row_bytes, f16_table, b, j, kvh, kv_row);
    for (int64_t r = 0; r < rows; ++r) {
      if (j < visible(r)) Axpy(scores[r * len + j], kv_row, p.out + offset(r), D);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* out = p.out + offset(r);
    for (int64_t d = 0; d < D; ++d) out[d] *= inv_sum[r];
  }
}

}  // namespace
}  // namespace HWY_NAMESPACE
}  // namespace cli
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#if HWY_ONCE

#include "core/parallel.h"
#include "tessera/types.h"

namespace tessera {
namespace cli {
namespace {

HWY_EXPORT(DecodeTask);

int64_t RoundUp16(int64_t n) { return (n + 15) / 16 * 16; }

int64_t MaxLen(const KVBatchView& kv) {
  int64_t max_len = 0;
  const int32_t* lens = static_cast<const int32_t*>(kv.seq_lens.data);
  for (int64_t b = 0; b < kv.batch; ++b) max_len = std::max<int64_t>(max_len, lens[b]);
  return max_len;
}

}  // namespace

NaiveDecode::NaiveDecode(const NaiveDecodeProblem& problem, int32_t threads)
    : p_(problem), threads_(std::max<int32_t>(1, threads)) {
  const int64_t tasks = p_.kv.batch * p_.cache.num_kv_heads;
  if (tasks == 0 || p_.cache.head_dim == 0) return;
  const int64_t rows = p_.heads_q / p_.cache.num_kv_heads * p_.queries;
  per_worker_floats_ = static_cast<size_t>(RoundUp16(rows * MaxLen(p_.kv)) + RoundUp16(rows) +
                                           RoundUp16(p_.cache.head_dim));
  scratch_floats_ = per_worker_floats_ * static_cast<size_t>(std::min<int64_t>(threads_, tasks));
  scratch_buffer_ = AllocateAligned(scratch_floats_ * sizeof(float));
  scratch_ = reinterpret_cast<float*>(scratch_buffer_.get());
  if (p_.cache.dtype == KVDType::kF16) {
    f16_table_.resize(65536);
    for (uint32_t bits = 0; bits < 65536; ++bits) {
      f16_table_[bits] = F16ToFloat(static_cast<uint16_t>(bits));
    }
  }
}

void NaiveDecode::Run() {
  const int64_t tasks = p_.kv.batch * p_.cache.num_kv_heads;
  if (tasks == 0 || !ok()) return;
  const int64_t max_len = MaxLen(p_.kv);
  const float* table = f16_table_.empty() ? nullptr : f16_table_.data();
  ParallelFor(threads_, tasks, [&](int64_t task, int32_t worker) {
    HWY_DYNAMIC_DISPATCH(DecodeTask)
    (p_, table, max_len, task, scratch_ + static_cast<size_t>(worker) * per_worker_floats_);
  });
}

}  // namespace cli
}  // namespace tessera

#endif  // HWY_ONCE
