// SPDX-License-Identifier: Apache-2.0
// KV cache: the owning pool, AppendKV, ApplyRotary and ReadKV (kv_cache.h; storage format and
// quantization in kv_quant.h).
//
// AppendKV writes B * n * Hkv rows. Everything is validated before the first write: the views,
// the cache and batch (twice: with the current lengths, then with the lengths after the append,
// which checks the capacity and the page ids of the new tokens), and for the quantized dtypes a
// pre-pass over the new values that checks they are finite (after RoPE for K, and after the
// division by already set channel normalizers) and, when the normalizers are still all zero,
// takes the per-(head, channel) max |x| that calibrates them. The store pass then reads each new
// element once and writes each row once: f32 / bf16 / f16 rows are converted (round to nearest
// even), int8 / int4 rows are quantized with their (step, min). Tokens (b, i) are spread over the
// threads in chunks; every row is computed and written by one task from its own inputs only, so
// the cache bytes do not depend on the thread count. The calibration maxima are reduced per
// worker and then combined; max is exact, so they do not depend on it either.
//
// RoPE: theta_c = base^(-2c / r) and the angle p * theta_c are computed in double, as are cos,
// sin and the rotation of each pair (from the f32 values); the result is rounded to float once.
// Position 0 is the identity (the rotation is skipped, so even signed zeros survive).
#include "tessera/kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "core/check.h"
#include "core/checked_math.h"
#include "core/element.h"
#include "core/guard.h"
#include "core/huge_pages.h"
#include "core/i32_view.h"
#include "core/parallel.h"
#include "kvcache/kv_quant.h"
#include "kvcache/kv_validate.h"
#include "kvcache/rotary.h"

namespace tessera {
namespace {

std::string Str(int64_t x) { return std::to_string(x); }

std::string FloatStr(float x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", static_cast<double>(x));
  return buf;
}

Status Invalid(const std::string& name, const std::string& what, const std::string& got) {
  return Status::InvalidArgument(Expected(name.c_str(), what, got));
}

std::string DTypeGot(KVDType dtype) {
  return kvquant::IsKnownDType(dtype) ? KVDTypeName(dtype)
                                      : "unknown dtype " + Str(static_cast<int32_t>(dtype));
}

// ---------------------------------------------------------------------------------------------
// RoPE.

// Row [b, i, h, :] of a rank-4 view, as f32.
void LoadRow(const TensorView& t, int64_t b, int64_t i, int64_t h, float* out) {
  const int64_t base = b * t.strides[0] + i * t.strides[1] + h * t.strides[2];
  const int64_t D = t.shape[3], s = t.strides[3];
  for (int64_t c = 0; c < D; ++c) out[c] = LoadElement(t.dtype, t.data, base + c * s);
}

// ---------------------------------------------------------------------------------------------
// Storage.

// Writes one f32 row into the cache row at `dst` (and its (step, min) at `scales` for the
// quantized dtypes, with the head's normalizers `norm`).
void StoreCacheRow(KVDType dtype, const float* x, int64_t D, const float* norm, uint8_t* dst,
                   float* scales) {
  switch (dtype) {
    case KVDType::kF32:
      std::memcpy(dst, x, static_cast<size_t>(D) * sizeof(float));
      return;
    case KVDType::kBF16:
    case KVDType::kF16: {
      const bool bf16 = dtype == KVDType::kBF16;
      for (int64_t c = 0; c < D; ++c) {
        const uint16_t h = bf16 ? FloatToBF16(x[c]) : FloatToF16(x[c]);
        std::memcpy(dst + 2 * c, &h, 2);
      }
      return;
    }
    case KVDType::kInt8:
    case KVDType::kInt4:
      kvquant::QuantizeRow(x, D, norm, kvquant::Bits(dtype), dst, &scales[0], &scales[1]);
      return;
  }
}

// Reads one cache row back as f32 (dequantized for int8 / int4).
void LoadCacheRow(KVDType dtype, const uint8_t* src, int64_t D, const float* norm,
                  const float* scales, float* out) {
  switch (dtype) {
    case KVDType::kF32:
      std::memcpy(out, src, static_cast<size_t>(D) * sizeof(float));
      return;
    case KVDType::kBF16:
    case KVDType::kF16: {
      const bool bf16 = dtype == KVDType::kBF16;
      for (int64_t c = 0; c < D; ++c) {
        uint16_t h;
        std::memcpy(&h, src + 2 * c, 2);
        out[c] = bf16 ? BF16ToFloat(h) : F16ToFloat(h);
      }
      return;
    }
    case KVDType::kInt8:
    case KVDType::kInt4:
      kvquant::DequantizeRow(src, D, norm, kvquant::Bits(dtype), scales[0], scales[1], out);
      return;
  }
}

// ---------------------------------------------------------------------------------------------
// AppendKV.

Status ValidateNewTensor(const char* name, const TensorView& t) {
  if (t.rank != 4) {
    return Invalid(name, "rank 4 [B, n, Hkv, D]", "rank " + Str(t.rank));
  }
  Status s = CheckRankAndStrides(name, t, false);
  if (!s.ok()) return s;
  if (!IsSupportedDType(t.dtype)) {
    return Invalid(name, "dtype f32, bf16 or f16", std::string("dtype ") + DTypeName(t.dtype));
  }
  return Status::Ok();
}

// Everything but the values: the views, the cache, the rotary parameters and the capacity.
// `new_lens` receives seq_lens[b] + n.
Status ValidateAppend(const AppendKVParams& p, std::vector<int32_t>* new_lens) {
  Status s = ValidateNewTensor("k_new", p.k_new);
  if (!s.ok()) return s;
  s = ValidateNewTensor("v_new", p.v_new);
  if (!s.ok()) return s;
  if (p.v_new.dtype != p.k_new.dtype) {
    return Invalid("v_new",
                   std::string("dtype ") + DTypeName(p.k_new.dtype) + " (the dtype of k_new)",
                   DTypeName(p.v_new.dtype));
  }
  for (int i = 0; i < 4; ++i) {
    if (p.v_new.shape[i] != p.k_new.shape[i]) {
      return Invalid("v_new", "shape " + ShapeString(p.k_new) + " (the shape of k_new)",
                     ShapeString(p.v_new));
    }
  }
  const KVCacheView& cache = p.cache;
  const KVBatchView& batch = p.batch;
  s = ValidateKVCache(cache, batch, "cache", "batch");
  if (!s.ok()) return s;
  const int64_t B = p.k_new.shape[0], n = p.k_new.shape[1];
  if (B != batch.batch) {
    return Invalid("k_new", "batch " + Str(batch.batch) + " (batch.batch)", ShapeString(p.k_new));
  }
  if (p.k_new.shape[2] != cache.num_kv_heads) {
    return Invalid("k_new", Str(cache.num_kv_heads) + " KV heads (cache.num_kv_heads)",
                   ShapeString(p.k_new));
  }
  if (p.k_new.shape[3] != cache.head_dim) {
    return Invalid("k_new", "head dim " + Str(cache.head_dim) + " (cache.head_dim)",
                   ShapeString(p.k_new));
  }
  s = rotary::Validate(p.rotary, cache.head_dim);
  if (!s.ok()) return s;

  const bool paged = batch.block_table.data != nullptr;
  const int64_t max_pages = paged ? batch.block_table.shape[1] : 0;
  const int64_t capacity =
      paged ? std::min<int64_t>(max_pages, std::numeric_limits<int32_t>::max()) * cache.page_size
            : cache.page_size;
  const int32_t* seq_lens = kvquant::SeqLens(batch);
  new_lens->resize(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t len = seq_lens[b];
    const int64_t total = len + n;
    auto room = [&]() {
      return "room for seq_lens[" + Str(b) + "] + n = " + Str(len) + " + " + Str(n) + " = " +
             Str(total) + " tokens in sequence " + Str(b);
    };
    if (total > std::numeric_limits<int32_t>::max()) {
      return Invalid(
          "k_new", "at most 2^31 - 1 tokens per sequence after the append",
          "seq_lens[" + Str(b) + "] + n = " + Str(total) + " tokens in sequence " + Str(b));
    }
    if (total > capacity) {
      if (paged) {
        return Invalid("batch.block_table", room(),
                       "max_pages_per_seq * page_size = " + Str(max_pages) + " * " +
                           Str(cache.page_size) + " = " + Str(capacity) + " tokens");
      }
      return Invalid("cache.page_size", room() + " (the contiguous layout's capacity per sequence)",
                     Str(capacity));
    }
    (*new_lens)[size_t(b)] = static_cast<int32_t>(total);
    if (n > 0) {
      s = rotary::CheckXposRange(p.rotary, total - 1);
      if (!s.ok()) return s;
    }
  }
  KVBatchView after = batch;
  after.seq_lens = MakeView1(new_lens->data(), DType::kI32, B);
  s = ValidateKVCache(cache, after, "cache", "batch");
  if (!s.ok()) return s;
  // The cache is written: it may overlap neither the new tokens nor the batch's arrays, and its
  // parts may not overlap each other.
  std::vector<Region> inputs = KVBatchRegions(batch, "batch");
  inputs.push_back(ViewRegion("k_new", p.k_new));
  inputs.push_back(ViewRegion("v_new", p.v_new));
  return CheckDisjoint(KVCacheRegions(cache, "cache"), inputs);
}

// Channel normalizers must be all zero (not calibrated yet) or all positive and finite.
// *calibrate is set for the all-zero case.
Status CheckChannelScales(const char* name, const float* scales, int64_t count, bool* calibrate) {
  bool all_zero = true;
  for (int64_t i = 0; i < count; ++i) all_zero = all_zero && scales[i] == 0.0f;
  *calibrate = all_zero;
  if (all_zero) return Status::Ok();
  for (int64_t i = 0; i < count; ++i) {
    if (!(scales[i] > 0.0f) || !std::isfinite(scales[i])) {
      return Invalid(name, "all zero (not calibrated) or all positive and finite",
                     FloatStr(scales[i]) + " at [" + Str(i) + "] (flat [head * D + channel])");
    }
  }
  return Status::Ok();
}

// The first value of k_new / v_new that a quantized cache cannot take.
struct BadValue {
  int64_t index = std::numeric_limits<int64_t>::max();  // flat ((b * n + i) * Hkv + h) * D + c
  int reason = 0;  // 0: not finite; 1: not finite after rotary; 2: not finite once normalized
};

void NoteBad(BadValue* bad, int64_t index, int reason) {
  if (index < bad->index) *bad = BadValue{index, reason};
}

Status BadValueStatus(const char* name, const BadValue& bad, const TensorView& t) {
  const int64_t H = t.shape[2], D = t.shape[3], n = t.shape[1];
  const int64_t c = bad.index % D, h = bad.index / D % H, i = bad.index / (D * H) % n,
                b = bad.index / (D * H * n);
  const std::string at = " at [" + Str(b) + ", " + Str(i) + ", " + Str(h) + ", " + Str(c) + "]";
  const float x = LoadElement(
      t.dtype, t.data, b * t.strides[0] + i * t.strides[1] + h * t.strides[2] + c * t.strides[3]);
  const std::string what = "finite values (a quantized cache stores no inf / nan)";
  if (bad.reason == 0) return Invalid(name, what, FloatStr(x) + at);
  if (bad.reason == 1) {
    return Invalid(name, what + " after rotary",
                   FloatStr(x) + at + ", which overflows when rotated");
  }
  return Invalid(name, what + " after the division by the channel normalizer",
                 FloatStr(x) + at + ", which overflows when normalized");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public: dtypes and the owning cache.

const char* KVDTypeName(KVDType dtype) {
  switch (dtype) {
    case KVDType::kF32:
      return "f32";
    case KVDType::kBF16:
      return "bf16";
    case KVDType::kF16:
      return "f16";
    case KVDType::kInt8:
      return "int8";
    case KVDType::kInt4:
      return "int4";
  }
  return "unknown";
}

bool KVDTypeIsQuantized(KVDType dtype) {
  return dtype == KVDType::kInt8 || dtype == KVDType::kInt4;
}

int64_t KVRowBytes(KVDType dtype, int64_t head_dim) { return kvquant::RowBytes(dtype, head_dim); }

Status KVCache::Allocate(KVDType dtype, int64_t num_pages, int64_t page_size, int64_t num_kv_heads,
                         int64_t head_dim) try {
  if (!kvquant::IsKnownDType(dtype)) {
    return Invalid("dtype", "f32, bf16, f16, int8 or int4", DTypeGot(dtype));
  }
  if (num_pages < 1) return Invalid("num_pages", "at least 1 page", Str(num_pages));
  if (page_size < 1) return Invalid("page_size", "at least 1 token per page", Str(page_size));
  if (num_kv_heads < 1) return Invalid("num_kv_heads", "at least 1 KV head", Str(num_kv_heads));
  if (head_dim < 1 || head_dim > kMaxHeadDim) {
    return Invalid("head_dim", "a head dim in [1, " + Str(kMaxHeadDim) + "]", Str(head_dim));
  }
  const bool quantized = KVDTypeIsQuantized(dtype);
  const int64_t row_bytes = kvquant::RowBytes(dtype, head_dim);
  // Sizes in double first, so absurd requests fail cleanly instead of overflowing.
  const double rows = static_cast<double>(num_pages) * static_cast<double>(page_size) *
                      static_cast<double>(num_kv_heads);
  const double total = rows * (2.0 * static_cast<double>(row_bytes) + (quantized ? 16.0 : 0.0));
  if (total > static_cast<double>(int64_t{1} << 50)) {
    return Invalid("num_pages",
                   "a pool of at most 2^50 bytes (num_pages * page_size * num_kv_heads "
                   "rows)",
                   Str(num_pages) + " pages of " + Str(page_size) + " tokens x " +
                       Str(num_kv_heads) + " heads (" + std::to_string(total) + " bytes)");
  }
  const size_t nrows = static_cast<size_t>(num_pages * page_size * num_kv_heads);
  const size_t pool_bytes = nrows * static_cast<size_t>(row_bytes);
  PageBytes k = AllocatePages(pool_bytes), v = AllocatePages(pool_bytes);
  if (!k || !v) {  // pool_bytes >= 1: every size above is at least 1
    return Status::Internal("KVCache::Allocate: out of memory for a pool of " +
                            std::to_string(total) + " bytes");
  }
  // Zeroed by the allocating thread: the first touch maps the (huge) pages.
  std::memset(k.get(), 0, pool_bytes);
  std::memset(v.get(), 0, pool_bytes);
  std::vector<float> k_scales, v_scales, k_channel, v_channel;
  try {
    if (quantized) {
      k_scales.assign(2 * nrows, 0.0f);
      v_scales.assign(2 * nrows, 0.0f);
      k_channel.assign(static_cast<size_t>(num_kv_heads * head_dim), 0.0f);
      v_channel.assign(static_cast<size_t>(num_kv_heads * head_dim), 0.0f);
    }
  } catch (const std::bad_alloc&) {
    return Status::Internal("KVCache::Allocate: out of memory for a pool of " +
                            std::to_string(total) + " bytes");
  }
  k_.reset(k.release());
  v_.reset(v.release());
  pool_bytes_ = static_cast<int64_t>(pool_bytes);
  k_scales_ = std::move(k_scales);
  v_scales_ = std::move(v_scales);
  k_channel_ = std::move(k_channel);
  v_channel_ = std::move(v_channel);
  shape_ = KVCacheView();
  shape_.dtype = dtype;
  shape_.num_pages = num_pages;
  shape_.page_size = page_size;
  shape_.num_kv_heads = num_kv_heads;
  shape_.head_dim = head_dim;
  return Status::Ok();
}
TESSERA_CATCH_ALL("KVCache::Allocate")

void KVCache::FreeBytes::operator()(uint8_t* p) const { std::free(p); }

KVCacheView KVCache::view() {
  KVCacheView v = shape_;
  v.k = k_.get();
  v.v = v_.get();
  v.k_scales = k_scales_.empty() ? nullptr : k_scales_.data();
  v.v_scales = v_scales_.empty() ? nullptr : v_scales_.data();
  v.k_channel_scales = k_channel_.empty() ? nullptr : k_channel_.data();
  v.v_channel_scales = v_channel_.empty() ? nullptr : v_channel_.data();
  return v;
}

int64_t KVCache::bytes() const {
  const size_t floats = k_scales_.size() + v_scales_.size() + k_channel_.size() + v_channel_.size();
  return 2 * pool_bytes_ + static_cast<int64_t>(floats * sizeof(float));
}

// ---------------------------------------------------------------------------------------------
// Public: AppendKV, ApplyRotary, ReadKV.

Status AppendKV(const AppendKVParams& p, const Context& ctx) try {
  std::vector<int32_t> new_lens;
  Status status = ValidateAppend(p, &new_lens);
  if (!status.ok()) return status;
  const KVCacheView& cache = p.cache;
  const int64_t B = p.k_new.shape[0], n = p.k_new.shape[1];
  const int64_t H = cache.num_kv_heads, D = cache.head_dim;
  const bool quantized = KVDTypeIsQuantized(cache.dtype);
  bool calibrate_k = false, calibrate_v = false;
  if (quantized) {
    status =
        CheckChannelScales("cache.k_channel_scales", cache.k_channel_scales, H * D, &calibrate_k);
    if (!status.ok()) return status;
    status =
        CheckChannelScales("cache.v_channel_scales", cache.v_channel_scales, H * D, &calibrate_v);
    if (!status.ok()) return status;
  }
  const int64_t tokens = B * n;
  // No tokens: nothing to store, and the normalizers stay uncalibrated.
  if (tokens == 0) return Status::Ok();

  const rotary::Rotary rope(p.rotary);
  const int64_t work = tokens * H * D;
  const int32_t threads = work < (int64_t{1} << 15) ? 1 : ResolveThreads(ctx);
  const int64_t tokens_per_task = std::max<int64_t>(1, (int64_t{1} << 14) / (H * D));
  const int64_t num_tasks = (tokens + tokens_per_task - 1) / tokens_per_task;
  const TensorView& kn = p.k_new;
  const TensorView& vn = p.v_new;
  const int32_t* lens = kvquant::SeqLens(p.batch);

  if (quantized) {
    // Pre-pass: finite values (for K after RoPE), and the calibration maxima. Writes nothing.
    const size_t hd = static_cast<size_t>(H * D);
    std::vector<float> kmax(calibrate_k ? hd * size_t(threads) : 0, 0.0f);
    std::vector<float> vmax(calibrate_v ? hd * size_t(threads) : 0, 0.0f);
    std::vector<BadValue> kbad(static_cast<size_t>(threads)), vbad(kbad.size());
    ParallelFor(threads, num_tasks, [&](int64_t task, int32_t worker) {
      std::vector<float> row(static_cast<size_t>(D)), in(static_cast<size_t>(D));
      std::vector<double> angles(static_cast<size_t>(rope.angle_count()));
      float* km = calibrate_k ? kmax.data() + size_t(worker) * hd : nullptr;
      float* vm = calibrate_v ? vmax.data() + size_t(worker) * hd : nullptr;
      BadValue* kb = &kbad[size_t(worker)];
      BadValue* vb = &vbad[size_t(worker)];
      const int64_t end = std::min(tokens, (task + 1) * tokens_per_task);
      for (int64_t tok = task * tokens_per_task; tok < end; ++tok) {
        const int64_t b = tok / n, i = tok % n, pos = lens[b] + i;
        if (rope.enabled()) rope.Angles(pos, angles.data());
        for (int64_t h = 0; h < H; ++h) {
          const int64_t flat = (tok * H + h) * D;
          LoadRow(kn, b, i, h, in.data());
          std::copy(in.begin(), in.end(), row.begin());
          if (rope.enabled()) rope.Apply(pos, angles.data(), row.data());
          for (int64_t c = 0; c < D; ++c) {
            const float x = row[size_t(c)];
            if (!std::isfinite(in[size_t(c)])) {
              NoteBad(kb, flat + c, 0);
            } else if (!std::isfinite(x)) {
              NoteBad(kb, flat + c, 1);
            } else if (km != nullptr) {
              km[h * D + c] = std::max(km[h * D + c], std::fabs(x));
            } else if (!std::isfinite(x / cache.k_channel_scales[h * D + c])) {
              NoteBad(kb, flat + c, 2);
            }
          }
          LoadRow(vn, b, i, h, row.data());
          for (int64_t c = 0; c < D; ++c) {
            const float x = row[size_t(c)];
            if (!std::isfinite(x)) {
              NoteBad(vb, flat + c, 0);
            } else if (vm != nullptr) {
              vm[h * D + c] = std::max(vm[h * D + c], std::fabs(x));
            } else if (!std::isfinite(x / cache.v_channel_scales[h * D + c])) {
              NoteBad(vb, flat + c, 2);
            }
          }
        }
      }
    });
    BadValue kfirst, vfirst;
    for (int32_t w = 0; w < threads; ++w) {
      NoteBad(&kfirst, kbad[size_t(w)].index, kbad[size_t(w)].reason);
      NoteBad(&vfirst, vbad[size_t(w)].index, vbad[size_t(w)].reason);
    }
    if (kfirst.index != std::numeric_limits<int64_t>::max()) {
      return BadValueStatus("k_new", kfirst, kn);
    }
    if (vfirst.index != std::numeric_limits<int64_t>::max()) {
      return BadValueStatus("v_new", vfirst, vn);
    }
    // Validation is complete: from here on the cache is written.
    for (size_t j = 0; j < hd; ++j) {
      float km = 0.0f, vm = 0.0f;
      for (int32_t w = 0; w < threads; ++w) {
        if (calibrate_k) km = std::max(km, kmax[size_t(w) * hd + j]);
        if (calibrate_v) vm = std::max(vm, vmax[size_t(w) * hd + j]);
      }
      if (calibrate_k) cache.k_channel_scales[j] = kvquant::ChannelNormalizer(km);
      if (calibrate_v) cache.v_channel_scales[j] = kvquant::ChannelNormalizer(vm);
    }
  }

  const int64_t row_bytes = kvquant::RowBytes(cache.dtype, D);
  uint8_t* kbase = static_cast<uint8_t*>(cache.k);
  uint8_t* vbase = static_cast<uint8_t*>(cache.v);
  ParallelFor(threads, num_tasks, [&](int64_t task, int32_t) {
    std::vector<float> row(static_cast<size_t>(D));
    std::vector<double> angles(static_cast<size_t>(rope.angle_count()));
    const int64_t end = std::min(tokens, (task + 1) * tokens_per_task);
    for (int64_t tok = task * tokens_per_task; tok < end; ++tok) {
      const int64_t b = tok / n, i = tok % n, pos = lens[b] + i;
      const int64_t page = kvquant::PageOfToken(p.batch, b, pos, cache.page_size);
      const int64_t slot = pos % cache.page_size;
      if (rope.enabled()) rope.Angles(pos, angles.data());
      for (int64_t h = 0; h < H; ++h) {
        const int64_t r = kvquant::RowIndex(cache, page, slot, h);
        LoadRow(kn, b, i, h, row.data());
        if (rope.enabled()) rope.Apply(pos, angles.data(), row.data());
        StoreCacheRow(cache.dtype, row.data(), D,
                      quantized ? cache.k_channel_scales + h * D : nullptr, kbase + r * row_bytes,
                      quantized ? cache.k_scales + 2 * r : nullptr);
        LoadRow(vn, b, i, h, row.data());
        StoreCacheRow(cache.dtype, row.data(), D,
                      quantized ? cache.v_channel_scales + h * D : nullptr, vbase + r * row_bytes,
                      quantized ? cache.v_scales + 2 * r : nullptr);
      }
    }
  });
  return Status::Ok();
}
TESSERA_CATCH_ALL("AppendKV")

namespace {

// Threads for `work` elements of row-wise work: one below 2^15 (a thread start costs more).
int32_t RowThreads(const Context& ctx, int64_t work) {
  return work < (int64_t{1} << 15) ? 1 : ResolveThreads(ctx);
}

}  // namespace

Status ApplyRotary(const ApplyRotaryParams& p, const Context& ctx) try {
  const TensorView& x = p.x;
  if (x.rank != 4) return Invalid("x", "rank 4 [B, S, H, D]", "rank " + Str(x.rank));
  Status s = CheckRankAndStrides("x", x, true);
  if (!s.ok()) return s;
  if (!IsSupportedDType(x.dtype)) {
    return Invalid("x", "dtype f32, bf16 or f16", std::string("dtype ") + DTypeName(x.dtype));
  }
  const int64_t B = x.shape[0], S = x.shape[1], H = x.shape[2], D = x.shape[3];
  s = rotary::Validate(p.rotary, D);
  if (!s.ok()) return s;
  const int32_t* positions = I32Data(p.positions);
  if (positions != nullptr) {
    const int64_t shape[1] = {B};
    s = CheckI32View("positions", p.positions, 1, shape,
                     "shape [" + Str(B) + "] (one start position per sequence, x.shape[0])");
    if (!s.ok()) return s;
  }
  s = CheckDisjoint({ViewRegion("x", x)}, {ViewRegion("positions", p.positions)});
  if (!s.ok()) return s;
  if (p.rotary.rotary_dim == 0 || x.numel() == 0) return Status::Ok();
  int64_t max_position = S - 1;
  for (int64_t b = 0; b < B && positions != nullptr; ++b) {
    max_position = std::max<int64_t>(max_position, int64_t{positions[b]} + S - 1);
  }
  s = rotary::CheckXposRange(p.rotary, max_position);
  if (!s.ok()) return s;
  const rotary::Rotary rot(p.rotary, p.keys);
  const int64_t r = p.rotary.rotary_dim;
  const int64_t tokens = B * S;  // fits: x.numel() does
  const int64_t tokens_per_task = std::max<int64_t>(1, (int64_t{1} << 14) / (H * D));
  ParallelFor(RowThreads(ctx, x.numel()), CeilDiv(tokens, tokens_per_task),
              [&](int64_t task, int32_t) {
                std::vector<float> row(static_cast<size_t>(D));
                std::vector<double> angles(static_cast<size_t>(rot.angle_count()));
                const int64_t end = std::min(tokens, (task + 1) * tokens_per_task);
                for (int64_t tok = task * tokens_per_task; tok < end; ++tok) {
                  const int64_t b = tok / S, t = tok % S;
                  const int64_t pos = (positions != nullptr ? positions[b] : 0) + t;
                  if (pos == 0) continue;  // identity
                  rot.Angles(pos, angles.data());
                  for (int64_t h = 0; h < H; ++h) {
                    LoadRow(x, b, t, h, row.data());
                    rot.Apply(pos, angles.data(), row.data());
                    const int64_t base = b * x.strides[0] + t * x.strides[1] + h * x.strides[2];
                    // Only the rotated channels are written back: the others stay bitwise.
                    for (int64_t c = 0; c < r; ++c) {
                      StoreElement(x.dtype, x.data, base + c * x.strides[3], row[size_t(c)]);
                    }
                  }
                }
              });
  return Status::Ok();
}
TESSERA_CATCH_ALL("ApplyRotary")

Status ReadKV(const ReadKVParams& p, const Context& ctx) try {
  const KVCacheView& cache = p.cache;
  const KVBatchView& batch = p.batch;
  const int64_t b = p.b;
  Status s = ValidateKVCache(cache, batch, "cache", "batch");
  if (!s.ok()) return s;
  if (b < 0 || b >= batch.batch) {
    return Invalid("b", "a sequence index in [0, " + Str(batch.batch) + ") (batch.batch)", Str(b));
  }
  const int64_t len = kvquant::SeqLens(batch)[b], H = cache.num_kv_heads, D = cache.head_dim;
  const int64_t shape[3] = {len, H, D};
  const std::string what = "shape [" + Str(len) + ", " + Str(H) + ", " + Str(D) +
                           "] ([seq_lens[b], cache.num_kv_heads, cache.head_dim])";
  const struct {
    const char* name;
    const TensorView* view;
  } outs[] = {{"k_out", &p.k_out}, {"v_out", &p.v_out}};
  for (const auto& o : outs) {
    s = CheckShape(o.name, *o.view, 3, shape, what, true);
    if (!s.ok()) return s;
    if (o.view->dtype != DType::kF32) {
      return Invalid(
          o.name, "dtype f32",
          IsSupportedDType(o.view->dtype) ? DTypeName(o.view->dtype) : "an unknown dtype");
    }
  }
  std::vector<Region> inputs = KVCacheRegions(cache, "cache");
  for (Region& r : KVBatchRegions(batch, "batch")) inputs.push_back(std::move(r));
  s = CheckDisjoint({ViewRegion("k_out", p.k_out), ViewRegion("v_out", p.v_out)}, inputs);
  if (!s.ok()) return s;
  if (len == 0) return Status::Ok();
  const bool quantized = KVDTypeIsQuantized(cache.dtype);
  const int64_t row_bytes = kvquant::RowBytes(cache.dtype, D);
  const int64_t tokens_per_task = std::max<int64_t>(1, (int64_t{1} << 14) / (H * D));
  ParallelFor(
      RowThreads(ctx, len * H * D), CeilDiv(len, tokens_per_task), [&](int64_t task, int32_t) {
        std::vector<float> row(static_cast<size_t>(D));
        const int64_t end = std::min(len, (task + 1) * tokens_per_task);
        for (int64_t t = task * tokens_per_task; t < end; ++t) {
          const int64_t page = kvquant::PageOfToken(batch, b, t, cache.page_size);
          const int64_t slot = t % cache.page_size;
          for (int64_t h = 0; h < H; ++h) {
            const int64_t r = kvquant::RowIndex(cache, page, slot, h);
            for (int kv = 0; kv < 2; ++kv) {
              const uint8_t* src = static_cast<const uint8_t*>(kv == 0 ? cache.k : cache.v);
              const float* norm = kv == 0 ? cache.k_channel_scales : cache.v_channel_scales;
              const float* scales = kv == 0 ? cache.k_scales : cache.v_scales;
              LoadCacheRow(cache.dtype, src + r * row_bytes, D, quantized ? norm + h * D : nullptr,
                           quantized ? scales + 2 * r : nullptr, row.data());
              const TensorView& out = kv == 0 ? p.k_out : p.v_out;
              float* dst = static_cast<float*>(out.data) + t * out.strides[0] + h * out.strides[1];
              for (int64_t c = 0; c < D; ++c) dst[c * out.strides[2]] = row[size_t(c)];
            }
          }
        }
      });
  return Status::Ok();
}
TESSERA_CATCH_ALL("ReadKV")

}  // namespace tessera
