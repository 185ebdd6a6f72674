// SPDX-License-Identifier: Apache-2.0
// KV cache: storage round trips for every dtype (exact for f32, the dtype's rounding for bf16 /
// f16, within half a quantization step for int8 / int4), paged layouts equal to the contiguous
// one, appends that compose, capacity and page-id checks that write nothing on error, channel
// normalizer calibration, RoPE against an fp64 formula, and argument errors that name the
// argument.
#include "tessera/kv_cache.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kvcache/kv_quant.h"
#include "kvcache/kv_validate.h"

namespace tessera {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr KVDType kAllKVDTypes[] = {KVDType::kF32, KVDType::kBF16, KVDType::kF16, KVDType::kInt8,
                                    KVDType::kInt4};

std::vector<float> Random(size_t n, uint64_t seed, float mult = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng) * mult;
  return v;
}

float RoundTo(DType dtype, float x) {
  switch (dtype) {
    case DType::kF32:
      return x;
    case DType::kBF16:
      return BF16ToFloat(FloatToBF16(x));
    case DType::kF16:
      return F16ToFloat(FloatToF16(x));
    default:  // the mask dtypes (u8, bool, i32) hold no K/V
      return x;
  }
}

float RoundToKV(KVDType dtype, float x) {
  switch (dtype) {
    case KVDType::kBF16:
      return RoundTo(DType::kBF16, x);
    case KVDType::kF16:
      return RoundTo(DType::kF16, x);
    default:
      return x;
  }
}

bool BitwiseEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// A [B, n, H, D] input tensor stored in `dtype` (values rounded to it) with contiguous layout.
struct Input {
  DType dtype = DType::kF32;
  int64_t shape[4] = {0, 0, 0, 0};
  std::vector<uint8_t> bytes;

  Input(const std::vector<float>& values, DType dt, int64_t B, int64_t n, int64_t H, int64_t D)
      : dtype(dt), shape{B, n, H, D}, bytes(values.size() * DTypeSize(dt)) {
    for (size_t i = 0; i < values.size(); ++i) {
      if (dt == DType::kF32) {
        std::memcpy(bytes.data() + 4 * i, &values[i], 4);
      } else {
        const uint16_t h = dt == DType::kBF16 ? FloatToBF16(values[i]) : FloatToF16(values[i]);
        std::memcpy(bytes.data() + 2 * i, &h, 2);
      }
    }
  }
  float at(size_t i) const {
    if (dtype == DType::kF32) {
      float x;
      std::memcpy(&x, bytes.data() + 4 * i, 4);
      return x;
    }
    uint16_t h;
    std::memcpy(&h, bytes.data() + 2 * i, 2);
    return dtype == DType::kBF16 ? BF16ToFloat(h) : F16ToFloat(h);
  }
  TensorView view() {
    return MakeView4(bytes.data(), dtype, shape[0], shape[1], shape[2], shape[3]);
  }
};

// An i32 [n] view of int32 values (read only).
TensorView I32(const int32_t* data, int64_t n) {
  return MakeView1(const_cast<int32_t*>(data), DType::kI32, n);
}

// An i32 [rows, cols] view (read only).
TensorView I32(const int32_t* data, int64_t rows, int64_t cols) {
  const int64_t shape[2] = {rows, cols};
  return MakeContiguousView(const_cast<int32_t*>(data), DType::kI32, 2, shape);
}

// Sequence lengths and an optional block table [batch, max_pages].
struct Batch {
  std::vector<int32_t> lens;
  std::vector<int32_t> table;  // empty: contiguous
  int64_t max_pages = 0;

  KVBatchView view() const {
    KVBatchView v;
    v.batch = static_cast<int64_t>(lens.size());
    v.seq_lens = I32(lens.data(), v.batch);
    if (!table.empty()) v.block_table = I32(table.data(), v.batch, max_pages);
    return v;
  }
  // Sequence b alone (a batch of one sharing this table's row b).
  KVBatchView one(int64_t b) const {
    KVBatchView v = view();
    v.batch = 1;
    v.seq_lens = I32(lens.data() + b, 1);
    if (!table.empty()) v.block_table = I32(table.data() + b * max_pages, 1, max_pages);
    return v;
  }
};

// Page b of a contiguous pool as a one-page cache of its own (where Batch::one(b) puts sequence b).
KVCacheView SequencePage(const KVCacheView& c, int64_t b) {
  KVCacheView v = c;
  const int64_t rows = c.page_size * c.num_kv_heads;
  v.num_pages = 1;
  v.k = static_cast<uint8_t*>(c.k) + b * rows * KVRowBytes(c.dtype, c.head_dim);
  v.v = static_cast<uint8_t*>(c.v) + b * rows * KVRowBytes(c.dtype, c.head_dim);
  if (KVDTypeIsQuantized(c.dtype)) {
    v.k_scales = c.k_scales + 2 * b * rows;
    v.v_scales = c.v_scales + 2 * b * rows;
  }
  return v;
}

// Every byte of the cache: pool, per-row scales and channel normalizers.
std::vector<uint8_t> CacheBytes(const KVCacheView& c) {
  const int64_t rows = c.num_pages * c.page_size * c.num_kv_heads;
  const size_t pool = static_cast<size_t>(rows * KVRowBytes(c.dtype, c.head_dim));
  std::vector<uint8_t> out;
  auto add = [&out](const void* p, size_t n) {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    out.insert(out.end(), b, b + n);
  };
  add(c.k, pool);
  add(c.v, pool);
  if (KVDTypeIsQuantized(c.dtype)) {
    add(c.k_scales, size_t(rows) * 2 * sizeof(float));
    add(c.v_scales, size_t(rows) * 2 * sizeof(float));
    add(c.k_channel_scales, size_t(c.num_kv_heads * c.head_dim) * sizeof(float));
    add(c.v_channel_scales, size_t(c.num_kv_heads * c.head_dim) * sizeof(float));
  }
  return out;
}

Status Append(const KVCacheView& cache, const KVBatchView& batch, Input& k, Input& v,
              const RotaryParams& rotary = RotaryParams(), int32_t threads = 2) {
  AppendKVParams p;
  p.k_new = k.view();
  p.v_new = v.view();
  p.cache = cache;
  p.batch = batch;
  p.rotary = rotary;
  Context ctx;
  ctx.num_threads = threads;
  return AppendKV(p, ctx);
}

struct ReadBack {
  std::vector<float> k, v;
};

ReadBack Read(const KVCacheView& cache, const KVBatchView& batch, int64_t b) {
  const int64_t len = kvquant::SeqLens(batch)[b], H = cache.num_kv_heads, D = cache.head_dim;
  ReadBack r{std::vector<float>(size_t(len * H * D), kNaN),
             std::vector<float>(size_t(len * H * D), kNaN)};
  const Status s =
      ReadKV(ReadKVParams{cache, batch, b, MakeView3(r.k.data(), DType::kF32, len, H, D),
                          MakeView3(r.v.data(), DType::kF32, len, H, D)},
             Context());
  EXPECT_TRUE(s.ok()) << s.ToString();
  return r;
}

::testing::AssertionResult ErrorNames(const Status& s, const std::string& name) {
  if (s.ok()) return ::testing::AssertionFailure() << "expected an error naming " << name;
  if (s.code() != StatusCode::kInvalidArgument) {
    return ::testing::AssertionFailure() << "expected InvalidArgument, got " << s.ToString();
  }
  if (s.message().find(name) == std::string::npos) {
    return ::testing::AssertionFailure() << "message does not name " << name << ": " << s.message();
  }
  return ::testing::AssertionSuccess();
}

// Sets every channel normalizer of a quantized cache to a positive value (so appends do not
// calibrate and every append quantizes the same way).
void PresetNormalizers(const KVCacheView& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(0.5f, 2.0f);
  for (int64_t i = 0; i < c.num_kv_heads * c.head_dim; ++i) {
    c.k_channel_scales[i] = dist(rng);
    c.v_channel_scales[i] = dist(rng);
  }
}

// fp64 RoPE of channel pair (x1, x2) of pair index c.
void RopeRef(double x1, double x2, int64_t c, int64_t r, double base, int64_t pos, double* y1,
             double* y2) {
  const double a = static_cast<double>(pos) * std::pow(base, -2.0 * double(c) / double(r));
  *y1 = x1 * std::cos(a) - x2 * std::sin(a);
  *y2 = x1 * std::sin(a) + x2 * std::cos(a);
}

// ---------------------------------------------------------------------------------------------
// Dtypes and the owning cache.

TEST(KVCache, DTypeNamesAndRowBytes) {
  EXPECT_STREQ(KVDTypeName(KVDType::kF32), "f32");
  EXPECT_STREQ(KVDTypeName(KVDType::kBF16), "bf16");
  EXPECT_STREQ(KVDTypeName(KVDType::kF16), "f16");
  EXPECT_STREQ(KVDTypeName(KVDType::kInt8), "int8");
  EXPECT_STREQ(KVDTypeName(KVDType::kInt4), "int4");
  EXPECT_FALSE(KVDTypeIsQuantized(KVDType::kF32));
  EXPECT_FALSE(KVDTypeIsQuantized(KVDType::kF16));
  EXPECT_TRUE(KVDTypeIsQuantized(KVDType::kInt8));
  EXPECT_TRUE(KVDTypeIsQuantized(KVDType::kInt4));
  EXPECT_EQ(KVRowBytes(KVDType::kF32, 7), 28);
  EXPECT_EQ(KVRowBytes(KVDType::kBF16, 7), 14);
  EXPECT_EQ(KVRowBytes(KVDType::kF16, 7), 14);
  EXPECT_EQ(KVRowBytes(KVDType::kInt8, 7), 7);
  EXPECT_EQ(KVRowBytes(KVDType::kInt4, 7), 4);
  EXPECT_EQ(KVRowBytes(KVDType::kInt4, 128), 64);
  EXPECT_EQ(KVRowBytes(KVDType::kF32, 0), 0);
  EXPECT_EQ(KVRowBytes(KVDType::kInt4, -3), 0);
}

TEST(KVCache, AllocateZeroedViewsAndBytes) {
  KVCache q;
  ASSERT_TRUE(q.Allocate(KVDType::kInt8, 3, 16, 2, 64).ok());
  const KVCacheView v = q.view();
  EXPECT_EQ(v.dtype, KVDType::kInt8);
  EXPECT_EQ(v.num_pages, 3);
  EXPECT_EQ(v.page_size, 16);
  EXPECT_EQ(v.num_kv_heads, 2);
  EXPECT_EQ(v.head_dim, 64);
  ASSERT_NE(v.k, nullptr);
  ASSERT_NE(v.v, nullptr);
  ASSERT_NE(v.k_scales, nullptr);
  ASSERT_NE(v.v_channel_scales, nullptr);
  const int64_t rows = 3 * 16 * 2;
  EXPECT_EQ(q.bytes(), 2 * rows * 64 + 4 * (2 * rows * 2 + 2 * 2 * 64));
  for (uint8_t b : CacheBytes(v)) ASSERT_EQ(b, 0);

  KVCache f;
  ASSERT_TRUE(f.Allocate(KVDType::kF16, 2, 5, 3, 7).ok());
  const KVCacheView fv = f.view();
  EXPECT_EQ(f.bytes(), 2 * (2 * 5 * 3) * 14);
  EXPECT_EQ(fv.k_scales, nullptr);
  EXPECT_EQ(fv.k_channel_scales, nullptr);
  // The contiguous layout may use any page size (the capacity per sequence).
  KVCache big;
  EXPECT_TRUE(big.Allocate(KVDType::kInt4, 1, 1000, 1, 3).ok());
}

TEST(KVCache, AllocateErrorsNameTheArgument) {
  KVCache c;
  EXPECT_TRUE(ErrorNames(c.Allocate(KVDType::kF32, 0, 16, 2, 64), "num_pages"));
  EXPECT_TRUE(ErrorNames(c.Allocate(KVDType::kF32, 4, 0, 2, 64), "page_size"));
  EXPECT_TRUE(ErrorNames(c.Allocate(KVDType::kF32, 4, 16, -1, 64), "num_kv_heads"));
  EXPECT_TRUE(ErrorNames(c.Allocate(KVDType::kF32, 4, 16, 2, 0), "head_dim"));
  EXPECT_TRUE(ErrorNames(c.Allocate(KVDType::kF32, 4, 16, 2, 513), "head_dim"));
  EXPECT_TRUE(ErrorNames(c.Allocate(static_cast<KVDType>(9), 4, 16, 2, 64), "dtype"));
  EXPECT_EQ(c.bytes(), 0);
  EXPECT_EQ(c.view().k, nullptr);
}

// ---------------------------------------------------------------------------------------------
// Round trips and layouts.

TEST(AppendKV, RoundTripIsExactOrTheDTypeRounding) {
  const int64_t B = 2, n = 7, H = 3, D = 5, cap = 9;
  const DType in_dtypes[] = {DType::kF32, DType::kBF16, DType::kF16};
  const KVDType cache_dtypes[] = {KVDType::kF32, KVDType::kBF16, KVDType::kF16};
  const auto kv = Random(size_t(B * n * H * D), 11), vv = Random(size_t(B * n * H * D), 12, 3.0f);
  for (DType in : in_dtypes) {
    for (KVDType cd : cache_dtypes) {
      SCOPED_TRACE(std::string("input ") + DTypeName(in) + ", cache " + KVDTypeName(cd));
      KVCache cache;
      ASSERT_TRUE(cache.Allocate(cd, B, cap, H, D).ok());
      Batch batch{{0, 2}, {}, 0};
      Input k(kv, in, B, n, H, D), v(vv, in, B, n, H, D);
      ASSERT_TRUE(Append(cache.view(), batch.view(), k, v).ok());
      Batch after{{7, 9}, {}, 0};
      for (int64_t b = 0; b < B; ++b) {
        const ReadBack r = Read(cache.view(), after.view(), b);
        std::vector<float> ek(r.k.size(), 0.0f), ev(r.v.size(), 0.0f);
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t j = 0; j < H * D; ++j) {
            const size_t src = size_t((b * n + i) * H * D + j);
            const size_t dst = size_t((batch.lens[size_t(b)] + i) * H * D + j);
            ek[dst] = RoundToKV(cd, k.at(src));
            ev[dst] = RoundToKV(cd, v.at(src));
          }
        }
        EXPECT_TRUE(BitwiseEqual(r.k, ek)) << "b=" << b;
        EXPECT_TRUE(BitwiseEqual(r.v, ev)) << "b=" << b;
      }
    }
  }
}

TEST(AppendKV, StridedInputsAndOutputs) {
  const int64_t B = 2, n = 4, H = 3, D = 6;
  const auto kv = Random(size_t(B * n * H * D), 21), vv = Random(size_t(B * n * H * D), 22);
  KVCache a, c;
  ASSERT_TRUE(a.Allocate(KVDType::kBF16, B, 8, H, D).ok());
  ASSERT_TRUE(c.Allocate(KVDType::kBF16, B, 8, H, D).ok());
  Batch batch{{1, 3}, {}, 0};
  Input k(kv, DType::kF32, B, n, H, D), v(vv, DType::kF32, B, n, H, D);
  ASSERT_TRUE(Append(a.view(), batch.view(), k, v).ok());
  // The same values through [B, H, n, D] storage with padded rows, viewed as [B, n, H, D].
  const int64_t pad = 3, row = D + pad;
  std::vector<float> kt(size_t(B * H * n * row), kNaN), vt(kt.size(), kNaN);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) {
          kt[size_t(((b * H + h) * n + i) * row + d)] = kv[size_t(((b * n + i) * H + h) * D + d)];
          vt[size_t(((b * H + h) * n + i) * row + d)] = vv[size_t(((b * n + i) * H + h) * D + d)];
        }
  AppendKVParams p;
  p.k_new = MakeView4(kt.data(), DType::kF32, B, n, H, D);
  p.k_new.strides[0] = H * n * row;
  p.k_new.strides[1] = row;
  p.k_new.strides[2] = n * row;
  p.v_new = p.k_new;
  p.v_new.data = vt.data();
  p.cache = c.view();
  p.batch = batch.view();
  ASSERT_TRUE(AppendKV(p, Context()).ok());
  EXPECT_EQ(CacheBytes(a.view()), CacheBytes(c.view()));

  // ReadKV into a strided [len, H, D] view (channel stride 2) writes only its elements.
  Batch after{{5, 7}, {}, 0};
  const ReadBack dense = Read(a.view(), after.view(), 1);
  std::vector<float> ko(size_t(7 * H * D * 2), -1.0f), vo(ko.size(), -1.0f);
  TensorView kov = MakeView3(ko.data(), DType::kF32, 7, H, D), vov = kov;
  kov.strides[0] = H * D * 2;
  kov.strides[1] = D * 2;
  kov.strides[2] = 2;
  vov = kov;
  vov.data = vo.data();
  ASSERT_TRUE(ReadKV(ReadKVParams{a.view(), after.view(), 1, kov, vov}, Context()).ok());
  for (size_t i = 0; i < dense.k.size(); ++i) {
    ASSERT_EQ(ko[2 * i], dense.k[i]);
    ASSERT_EQ(vo[2 * i], dense.v[i]);
    ASSERT_EQ(ko[2 * i + 1], -1.0f);
  }
}

// Appends sequence by sequence (B = 1 each, so lengths differ), then one token to every sequence
// at once (B = 3, different positions); the paged cache reads back as the contiguous one.
TEST(AppendKV, PagedShuffledTableMatchesContiguous) {
  const int64_t H = 2, D = 8;
  for (KVDType dtype : kAllKVDTypes) {
    for (int64_t ps : {1, 16, 256}) {
      SCOPED_TRACE(std::string(KVDTypeName(dtype)) + " page_size " + std::to_string(ps));
      const std::vector<int32_t> total = {int32_t(2 * ps + 3), int32_t(ps), 1};
      const int64_t B = 3;
      std::vector<int64_t> pages_of(B);
      int64_t used = 0, max_pages = 0;
      for (int64_t b = 0; b < B; ++b) {
        pages_of[size_t(b)] = (total[size_t(b)] + ps - 1) / ps;
        used += pages_of[size_t(b)];
        max_pages = std::max(max_pages, pages_of[size_t(b)]);
      }
      const int64_t num_pages = 3 * used;
      std::vector<int32_t> perm(static_cast<size_t>(num_pages));
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), std::mt19937_64(uint64_t(ps) * 7 + 1));
      Batch paged{{0, 0, 0}, std::vector<int32_t>(size_t(B * (max_pages + 1)), -1), max_pages + 1};
      int64_t next = 0;
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t i = 0; i < pages_of[size_t(b)]; ++i) {
          paged.table[size_t(b * (max_pages + 1) + i)] = perm[size_t(next++)];
        }
      }
      Batch contiguous{{0, 0, 0}, {}, 0};
      KVCache pc, cc;
      ASSERT_TRUE(pc.Allocate(dtype, num_pages, ps, H, D).ok());
      ASSERT_TRUE(cc.Allocate(dtype, B, 2 * ps + 3, H, D).ok());
      RotaryParams rot;
      rot.rotary_dim = 6;
      rot.interleaved = ps == 16;
      std::vector<float> all_k, all_v;  // f32 inputs in append order, for the exact check
      for (int64_t b = 0; b < B; ++b) {
        const int64_t m = total[size_t(b)] - 1;
        if (m == 0) continue;
        const auto kv = Random(size_t(m * H * D), uint64_t(100 + b)),
                   vv = Random(size_t(m * H * D), uint64_t(200 + b));
        Input k(kv, DType::kF32, 1, m, H, D), v(vv, DType::kF32, 1, m, H, D);
        ASSERT_TRUE(Append(pc.view(), paged.one(b), k, v, rot).ok());
        ASSERT_TRUE(Append(SequencePage(cc.view(), b), contiguous.one(b), k, v, rot).ok());
        paged.lens[size_t(b)] = contiguous.lens[size_t(b)] = int32_t(m);
      }
      const auto kv = Random(size_t(B * H * D), 300), vv = Random(size_t(B * H * D), 301);
      Input k(kv, DType::kF32, B, 1, H, D), v(vv, DType::kF32, B, 1, H, D);
      ASSERT_TRUE(Append(pc.view(), paged.view(), k, v, rot).ok());
      ASSERT_TRUE(Append(cc.view(), contiguous.view(), k, v, rot).ok());
      paged.lens = contiguous.lens = total;
      for (int64_t b = 0; b < B; ++b) {
        const ReadBack rp = Read(pc.view(), paged.view(), b);
        const ReadBack rc = Read(cc.view(), contiguous.view(), b);
        EXPECT_TRUE(BitwiseEqual(rp.k, rc.k)) << "b=" << b;
        EXPECT_TRUE(BitwiseEqual(rp.v, rc.v)) << "b=" << b;
        if (dtype == KVDType::kF32) {
          // Values (V is not rotated) land at their positions.
          const size_t last = size_t((total[size_t(b)] - 1) * H * D);
          for (size_t j = 0; j < size_t(H * D); ++j) {
            ASSERT_EQ(rp.v[last + j], vv[size_t(b * H * D) + j]);
          }
          if (total[size_t(b)] > 1) {
            const auto first = Random(size_t((total[size_t(b)] - 1) * H * D), uint64_t(200 + b));
            for (size_t j = 0; j < first.size(); ++j) ASSERT_EQ(rp.v[j], first[j]);
          }
        }
      }
    }
  }
}

TEST(AppendKV, TwoAppendsEqualOne) {
  const int64_t B = 2, H = 2, D = 10, ps = 4, max_pages = 4;
  const KVDType dtypes[] = {KVDType::kF32, KVDType::kBF16, KVDType::kInt8, KVDType::kInt4};
  const auto kv = Random(size_t(B * 6 * H * D), 31), vv = Random(size_t(B * 6 * H * D), 32);
  RotaryParams rot;
  rot.rotary_dim = D;
  for (KVDType dtype : dtypes) {
    SCOPED_TRACE(KVDTypeName(dtype));
    const std::vector<int32_t> table = {5, 2, 7, 0, 1, 3, 6, 4};
    KVCache one, two;
    ASSERT_TRUE(one.Allocate(dtype, 8, ps, H, D).ok());
    ASSERT_TRUE(two.Allocate(dtype, 8, ps, H, D).ok());
    if (KVDTypeIsQuantized(dtype)) {
      PresetNormalizers(one.view(), 5);
      PresetNormalizers(two.view(), 5);
    }
    Batch b1{{3, 0}, table, max_pages};
    Input k6(kv, DType::kF32, B, 6, H, D), v6(vv, DType::kF32, B, 6, H, D);
    ASSERT_TRUE(Append(one.view(), b1.view(), k6, v6, rot).ok());

    std::vector<float> k5, v5, k1, v1;
    for (int64_t b = 0; b < B; ++b) {
      const auto kb = kv.begin() + b * 6 * H * D, vb = vv.begin() + b * 6 * H * D;
      k5.insert(k5.end(), kb, kb + 5 * H * D);
      v5.insert(v5.end(), vb, vb + 5 * H * D);
      k1.insert(k1.end(), kb + 5 * H * D, kb + 6 * H * D);
      v1.insert(v1.end(), vb + 5 * H * D, vb + 6 * H * D);
    }
    Input ik5(k5, DType::kF32, B, 5, H, D), iv5(v5, DType::kF32, B, 5, H, D);
    Input ik1(k1, DType::kF32, B, 1, H, D), iv1(v1, DType::kF32, B, 1, H, D);
    Batch b2{{3, 0}, table, max_pages};
    ASSERT_TRUE(Append(two.view(), b2.view(), ik5, iv5, rot).ok());
    b2.lens = {8, 5};
    ASSERT_TRUE(Append(two.view(), b2.view(), ik1, iv1, rot).ok());
    EXPECT_EQ(CacheBytes(one.view()), CacheBytes(two.view()));
  }
}

TEST(AppendKV, CapacityExactFitWorksAndOneMoreIsAnErrorThatWritesNothing) {
  const int64_t H = 2, D = 4;
  // Paged: 3 pages of 4 = 12 tokens per sequence.
  for (int64_t n : {4, 5}) {
    KVCache c;
    ASSERT_TRUE(c.Allocate(KVDType::kF32, 6, 4, H, D).ok());
    Batch batch{{0, 8}, {0, 1, 2, 3, 4, 5}, 3};
    const auto kv = Random(size_t(2 * n * H * D), 41);
    Input k(kv, DType::kF32, 2, n, H, D), v(kv, DType::kF32, 2, n, H, D);
    const auto before = CacheBytes(c.view());
    const Status s = Append(c.view(), batch.view(), k, v);
    if (n == 4) {
      EXPECT_TRUE(s.ok()) << s.ToString();
    } else {
      EXPECT_TRUE(ErrorNames(s, "block_table"));
      EXPECT_NE(s.message().find("13"), std::string::npos) << s.message();
      EXPECT_EQ(CacheBytes(c.view()), before);
    }
  }
  // A full sequence takes n = 0 but not n = 1.
  {
    KVCache c;
    ASSERT_TRUE(c.Allocate(KVDType::kInt8, 3, 4, H, D).ok());
    Batch batch{{12}, {2, 0, 1}, 3};
    std::vector<float> none;
    Input k0(none, DType::kF32, 1, 0, H, D), v0(none, DType::kF32, 1, 0, H, D);
    EXPECT_TRUE(Append(c.view(), batch.view(), k0, v0).ok());
    const auto kv = Random(size_t(H * D), 42);
    Input k(kv, DType::kF32, 1, 1, H, D), v(kv, DType::kF32, 1, 1, H, D);
    const auto before = CacheBytes(c.view());
    EXPECT_TRUE(ErrorNames(Append(c.view(), batch.view(), k, v), "block_table"));
    EXPECT_EQ(CacheBytes(c.view()), before);
  }
  // Contiguous: the page size is the capacity.
  for (int64_t n : {4, 5}) {
    KVCache c;
    ASSERT_TRUE(c.Allocate(KVDType::kF16, 2, 6, H, D).ok());
    Batch batch{{2, 0}, {}, 0};
    const auto kv = Random(size_t(2 * n * H * D), 43);
    Input k(kv, DType::kF32, 2, n, H, D), v(kv, DType::kF32, 2, n, H, D);
    const auto before = CacheBytes(c.view());
    const Status s = Append(c.view(), batch.view(), k, v);
    if (n == 4) {
      EXPECT_TRUE(s.ok()) << s.ToString();
    } else {
      EXPECT_TRUE(ErrorNames(s, "page_size"));
      EXPECT_EQ(CacheBytes(c.view()), before);
    }
  }
}

TEST(AppendKV, OutOfRangePageIdIsAnErrorNamingBlockTable) {
  const int64_t H = 1, D = 4, num_pages = 4;
  for (int32_t bad : {-1, int32_t(num_pages)}) {
    KVCache c;
    ASSERT_TRUE(c.Allocate(KVDType::kInt4, num_pages, 2, H, D).ok());
    const auto kv = Random(size_t(2 * 3 * H * D), 51);
    Input k(kv, DType::kF32, 2, 3, H, D), v(kv, DType::kF32, 2, 3, H, D);
    const auto before = CacheBytes(c.view());
    // Sequence 1's second page (tokens 2..3) is the bad one.
    Batch batch{{0, 0}, {0, 1, 2, bad}, 2};
    const Status s = Append(c.view(), batch.view(), k, v);
    EXPECT_TRUE(ErrorNames(s, "block_table[1][1]"));
    EXPECT_NE(s.message().find(std::to_string(bad)), std::string::npos) << s.message();
    EXPECT_EQ(CacheBytes(c.view()), before);
    // ReadKV checks the pages of existing tokens too.
    Batch existing{{0, 3}, {0, 1, 2, bad}, 2};
    std::vector<float> out(size_t(3 * H * D));
    const TensorView ov = MakeView3(out.data(), DType::kF32, 3, H, D);
    EXPECT_TRUE(ErrorNames(ReadKV(ReadKVParams{c.view(), existing.view(), 0, ov, ov}, Context()),
                           "block_table[1][1]"));
  }
  // Entries past the pages a sequence uses are not read.
  KVCache c;
  ASSERT_TRUE(c.Allocate(KVDType::kF32, num_pages, 2, H, D).ok());
  const auto kv = Random(size_t(2 * H * D), 52);
  Input k(kv, DType::kF32, 2, 1, H, D), v(kv, DType::kF32, 2, 1, H, D);
  Batch batch{{0, 1}, {3, -1, -7, 2, 99, 1234}, 3};
  EXPECT_TRUE(Append(c.view(), batch.view(), k, v).ok());
}

TEST(KVCache, ValidateNamesTheCallersArguments) {
  KVCache c;
  ASSERT_TRUE(c.Allocate(KVDType::kF16, 2, 16, 1, 8).ok());
  const std::vector<int32_t> lens = {5}, table = {2};
  KVBatchView kv;
  kv.batch = 1;
  kv.seq_lens = I32(lens.data(), 1);
  kv.block_table = I32(table.data(), 1, 1);
  const Status s = ValidateKVCache(c.view(), kv, "params.cache", "params.kv");
  EXPECT_TRUE(ErrorNames(s, "params.kv.block_table[0][0]"));
  EXPECT_NE(s.message().find("[0, 2)"), std::string::npos) << s.message();
  KVCacheView bad = c.view();
  bad.v = nullptr;
  EXPECT_TRUE(ErrorNames(ValidateKVCache(bad, kv, "params.cache", "params.kv"), "params.cache.v"));
  kv.batch = 0;
  kv.seq_lens = TensorView();
  EXPECT_TRUE(ValidateKVCache(c.view(), kv, "cache", "batch").ok());
}

// ---------------------------------------------------------------------------------------------
// Quantization.

TEST(KVCache, QuantizedRoundTripWithinHalfAStep) {
  const int64_t H = 2, n = 33;
  for (KVDType dtype : {KVDType::kInt8, KVDType::kInt4}) {
    for (int64_t D : {1, 7, 64, 128}) {
      SCOPED_TRACE(std::string(KVDTypeName(dtype)) + " D=" + std::to_string(D));
      const int bits = kvquant::Bits(dtype);
      KVCache c;
      ASSERT_TRUE(c.Allocate(dtype, 1, n, H, D).ok());
      // Channels of different scales, so the normalizers matter.
      auto kv = Random(size_t(n * H * D), uint64_t(61 + D)),
           vv = Random(size_t(n * H * D), uint64_t(62 + D));
      for (size_t i = 0; i < kv.size(); ++i) {
        kv[i] *= 0.05f + float(i % size_t(D) % 5);
        vv[i] *= 3.0f / (1.0f + float(i % size_t(D) % 3));
      }
      Batch batch{{0}, {}, 0};
      Input k(kv, DType::kF32, 1, n, H, D), v(vv, DType::kF32, 1, n, H, D);
      ASSERT_TRUE(Append(c.view(), batch.view(), k, v).ok());
      const KVCacheView cv = c.view();
      // Calibration from this (first) append: sqrt(max_t |x|).
      for (int64_t hc = 0; hc < H * D; ++hc) {
        float km = 0.0f, vm = 0.0f;
        for (int64_t t = 0; t < n; ++t) {
          km = std::max(km, std::fabs(kv[size_t(t * H * D + hc)]));
          vm = std::max(vm, std::fabs(vv[size_t(t * H * D + hc)]));
        }
        ASSERT_EQ(cv.k_channel_scales[hc], std::sqrt(km));
        ASSERT_EQ(cv.v_channel_scales[hc], std::sqrt(vm));
      }
      batch.lens = {int32_t(n)};
      const ReadBack r = Read(cv, batch.view(), 0);
      const int64_t row_bytes = KVRowBytes(dtype, D);
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t h = 0; h < H; ++h) {
          const int64_t row = kvquant::RowIndex(cv, 0, t, h);
          for (int kvi = 0; kvi < 2; ++kvi) {
            const auto& x = kvi == 0 ? kv : vv;
            const auto& xr = kvi == 0 ? r.k : r.v;
            const float* norm = (kvi == 0 ? cv.k_channel_scales : cv.v_channel_scales) + h * D;
            const float step = (kvi == 0 ? cv.k_scales : cv.v_scales)[2 * row];
            const uint8_t* codes =
                static_cast<const uint8_t*>(kvi == 0 ? cv.k : cv.v) + row * row_bytes;
            uint32_t lo = 255, hi = 0;
            for (int64_t d = 0; d < D; ++d) {
              const size_t i = size_t((t * H + h) * D + d);
              // Half a step; the 1e-6 covers the fp32 rounding of x / n, min + step * code and
              // n * (...) for these magnitudes (|x| < ~20).
              const double bound = double(norm[d]) * step / 2 * (1 + 1e-5) + 1e-6;
              ASSERT_LE(std::fabs(double(xr[i]) - double(x[i])), bound)
                  << "t=" << t << " h=" << h << " d=" << d << (kvi ? " v" : " k");
              const uint32_t code = kvquant::CodeAt(codes, bits, d);
              lo = std::min(lo, code);
              hi = std::max(hi, code);
            }
            // The row's min maps to code 0 and (with step > 0) its max to the top code.
            EXPECT_EQ(lo, 0u);
            if (step > 0) {
              EXPECT_EQ(hi, (1u << bits) - 1);
            }
            if (bits == 4 && D % 2 == 1) {
              EXPECT_EQ(codes[row_bytes - 1] >> 4, 0);
            }
          }
        }
      }
    }
  }
}

TEST(KVCache, ConstantRowHasStepZeroAndRoundTripsExactly) {
  const int64_t H = 1, D = 6;
  for (KVDType dtype : {KVDType::kInt8, KVDType::kInt4}) {
    KVCache c;
    ASSERT_TRUE(c.Allocate(dtype, 1, 2, H, D).ok());
    const KVCacheView cv = c.view();
    // Power-of-two normalizers make x / n and n * (x / n) exact.
    const float norms[D] = {1.0f, 2.0f, 0.5f, 4.0f, 0.25f, 8.0f};
    for (int64_t d = 0; d < D; ++d) cv.k_channel_scales[d] = cv.v_channel_scales[d] = norms[d];
    std::vector<float> kv(size_t(2 * D)), vv(size_t(2 * D), 0.0f);
    for (int64_t d = 0; d < D; ++d) {
      kv[size_t(d)] = -3.7f * norms[d];
      kv[size_t(D + d)] = 1.25e-3f * norms[d];
    }
    Batch batch{{0}, {}, 0};
    Input k(kv, DType::kF32, 1, 2, H, D), v(vv, DType::kF32, 1, 2, H, D);
    ASSERT_TRUE(Append(cv, batch.view(), k, v).ok());
    EXPECT_EQ(cv.k_scales[0], 0.0f);
    EXPECT_EQ(cv.k_scales[1], -3.7f);
    EXPECT_EQ(cv.v_scales[0], 0.0f);
    batch.lens = {2};
    const ReadBack r = Read(cv, batch.view(), 0);
    EXPECT_TRUE(BitwiseEqual(r.k, kv));
    EXPECT_TRUE(BitwiseEqual(r.v, vv));
  }
}

TEST(KVCache, ChannelNormalizersCalibrateOnceFromTheFirstAppend) {
  const int64_t H = 2, D = 4, n = 3;
  KVCache c;
  ASSERT_TRUE(c.Allocate(KVDType::kInt8, 2, 16, H, D).ok());
  const KVCacheView cv = c.view();
  Batch batch{{0, 0}, {}, 0};
  // An empty append does not calibrate.
  std::vector<float> none;
  Input k0(none, DType::kF32, 2, 0, H, D), v0(none, DType::kF32, 2, 0, H, D);
  ASSERT_TRUE(Append(cv, batch.view(), k0, v0).ok());
  for (int64_t i = 0; i < H * D; ++i) ASSERT_EQ(cv.k_channel_scales[i], 0.0f);

  auto kv = Random(size_t(2 * n * H * D), 71), vv = Random(size_t(2 * n * H * D), 72);
  for (int64_t t = 0; t < 2 * n; ++t) vv[size_t(t * H * D + 3)] = 0.0f;  // an all-zero channel
  RotaryParams rot;
  rot.rotary_dim = 4;
  Input k(kv, DType::kF32, 2, n, H, D), v(vv, DType::kF32, 2, n, H, D);
  batch.lens = {2, 5};
  ASSERT_TRUE(Append(cv, batch.view(), k, v, rot).ok());
  // K is calibrated after RoPE: rotate a copy at the same positions.
  std::vector<float> kr = kv;
  ASSERT_TRUE(ApplyRotary(ApplyRotaryParams{MakeView4(kr.data(), DType::kF32, 2, n, H, D),
                                            I32(batch.lens.data(), 2), rot},
                          Context())
                  .ok());
  std::vector<float> k_norm(size_t(H * D)), v_norm(size_t(H * D));
  for (int64_t hc = 0; hc < H * D; ++hc) {
    float km = 0.0f, vm = 0.0f;
    for (int64_t t = 0; t < 2 * n; ++t) {
      km = std::max(km, std::fabs(kr[size_t(t * H * D + hc)]));
      vm = std::max(vm, std::fabs(vv[size_t(t * H * D + hc)]));
    }
    EXPECT_EQ(cv.k_channel_scales[hc], std::sqrt(km));
    EXPECT_EQ(cv.v_channel_scales[hc], vm == 0.0f ? 1.0f : std::sqrt(vm));
    k_norm[size_t(hc)] = cv.k_channel_scales[hc];
    v_norm[size_t(hc)] = cv.v_channel_scales[hc];
  }
  EXPECT_EQ(cv.v_channel_scales[3], 1.0f);
  // A second append with larger values keeps them.
  for (float& x : kv) x *= 10.0f;
  Input k2(kv, DType::kF32, 2, 1, H, D), v2(kv, DType::kF32, 2, 1, H, D);
  batch.lens = {2 + int32_t(n), 5 + int32_t(n)};
  ASSERT_TRUE(Append(cv, batch.view(), k2, v2, rot).ok());
  EXPECT_EQ(0, std::memcmp(cv.k_channel_scales, k_norm.data(), k_norm.size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(cv.v_channel_scales, v_norm.data(), v_norm.size() * sizeof(float)));
}

TEST(KVCache, NonFiniteValuesAreRejectedByQuantizedCaches) {
  const int64_t B = 2, n = 3, H = 2, D = 5;
  for (KVDType dtype : {KVDType::kInt8, KVDType::kInt4}) {
    KVCache c;
    ASSERT_TRUE(c.Allocate(dtype, B, 8, H, D).ok());
    Batch batch{{0, 1}, {}, 0};
    auto kv = Random(size_t(B * n * H * D), 81), vv = Random(size_t(B * n * H * D), 82);
    kv[size_t(((1 * n + 2) * H + 0) * D + 3)] = kNaN;  // [1, 2, 0, 3]
    kv[size_t(((1 * n + 2) * H + 1) * D + 0)] = kNaN;  // a later one
    Input k(kv, DType::kF32, B, n, H, D), v(vv, DType::kF32, B, n, H, D);
    const auto before = CacheBytes(c.view());
    Status s = Append(c.view(), batch.view(), k, v);
    EXPECT_TRUE(ErrorNames(s, "k_new"));
    EXPECT_NE(s.message().find("[1, 2, 0, 3]"), std::string::npos) << s.message();
    EXPECT_EQ(CacheBytes(c.view()), before);

    auto kf = Random(size_t(B * n * H * D), 83);
    vv[size_t(((0 * n + 1) * H + 1) * D + 4)] = -kInf;  // [0, 1, 1, 4]
    Input k2(kf, DType::kF32, B, n, H, D), v2(vv, DType::kF32, B, n, H, D);
    s = Append(c.view(), batch.view(), k2, v2, RotaryParams{4, 100.0f, true}, 4);
    EXPECT_TRUE(ErrorNames(s, "v_new"));
    EXPECT_NE(s.message().find("[0, 1, 1, 4]"), std::string::npos) << s.message();
    EXPECT_EQ(CacheBytes(c.view()), before);
  }
  // Float caches store non-finite values as they are.
  KVCache f;
  ASSERT_TRUE(f.Allocate(KVDType::kF32, 1, 2, 1, 2).ok());
  std::vector<float> kv = {kNaN, kInf};
  Input k(kv, DType::kF32, 1, 1, 1, 2), v(kv, DType::kF32, 1, 1, 1, 2);
  Batch batch{{0}, {}, 0};
  ASSERT_TRUE(Append(f.view(), batch.view(), k, v).ok());
  batch.lens = {1};
  const ReadBack r = Read(f.view(), batch.view(), 0);
  EXPECT_TRUE(std::isnan(r.k[0]));
  EXPECT_EQ(r.v[1], kInf);
}

TEST(KVCache, AppendIsBitwiseIndependentOfThreads) {
  const int64_t B = 2, n = 300, H = 4, D = 64;
  const auto kv = Random(size_t(B * n * H * D), 91), vv = Random(size_t(B * n * H * D), 92);
  RotaryParams rot;
  rot.rotary_dim = 32;
  for (KVDType dtype : {KVDType::kInt8, KVDType::kF16}) {
    std::vector<uint8_t> ref;
    for (int32_t threads : {1, 4, 7}) {
      KVCache c;
      ASSERT_TRUE(c.Allocate(dtype, 40, 32, H, D).ok());
      // Disjoint pages for the two sequences, scattered over the pool.
      std::vector<int32_t> table(40);
      for (int32_t i = 0; i < 40; ++i) table[size_t(i)] = (i * 7) % 40;
      Batch batch{{5, 0}, table, 20};
      Input k(kv, DType::kF32, B, n, H, D), v(vv, DType::kF32, B, n, H, D);
      ASSERT_TRUE(Append(c.view(), batch.view(), k, v, rot, threads).ok());
      if (ref.empty()) {
        ref = CacheBytes(c.view());
      } else {
        EXPECT_EQ(CacheBytes(c.view()), ref) << "threads=" << threads;
      }
    }
  }
}

TEST(KVCache, QuantizeHelpers) {
  EXPECT_EQ(kvquant::ChannelNormalizer(0.0f), 1.0f);
  EXPECT_EQ(kvquant::ChannelNormalizer(4.0f), 2.0f);
  // int4 packing: channel 2i low nibble, 2i + 1 high nibble, odd D's last high nibble 0.
  const float x[3] = {0.0f, 15.0f, 5.0f}, norm[3] = {1.0f, 1.0f, 1.0f};
  uint8_t codes[2] = {0xFF, 0xFF};
  float step = 0, min = 0;
  kvquant::QuantizeRow(x, 3, norm, 4, codes, &step, &min);
  EXPECT_EQ(step, 1.0f);
  EXPECT_EQ(min, 0.0f);
  EXPECT_EQ(codes[0], 0xF0);
  EXPECT_EQ(codes[1], 0x05);
  float out[3];
  kvquant::DequantizeRow(codes, 3, norm, 4, step, min, out);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(out[i], x[i]);
}

// ---------------------------------------------------------------------------------------------
// RoPE.

TEST(Rotary, MatchesTheFp64FormulaInBothForms) {
  const int64_t S = 5, H = 2;
  const std::vector<int32_t> positions = {0, 100000};  // sequence 0 starts at 0: identity
  for (int64_t D : {6, 64}) {
    for (int64_t r : {D, D / 2 - (D / 2) % 2}) {
      for (bool interleaved : {false, true}) {
        for (float base : {10000.0f, 500000.0f}) {
          SCOPED_TRACE("D=" + std::to_string(D) + " r=" + std::to_string(r) +
                       (interleaved ? " interleaved" : " half-split") +
                       " base=" + std::to_string(base));
          auto x = Random(size_t(2 * S * H * D), uint64_t(D * 31 + r));
          x[size_t(3)] = -0.0f;  // position 0 keeps even signed zeros
          std::vector<float> y = x;
          const RotaryParams rot{r, base, interleaved};
          ASSERT_TRUE(ApplyRotary(ApplyRotaryParams{MakeView4(y.data(), DType::kF32, 2, S, H, D),
                                                    I32(positions.data(), 2), rot},
                                  Context())
                          .ok());
          for (int64_t b = 0; b < 2; ++b) {
            for (int64_t s = 0; s < S; ++s) {
              const int64_t pos = positions[size_t(b)] + s;
              for (int64_t h = 0; h < H; ++h) {
                const size_t row = size_t(((b * S + s) * H + h) * D);
                if (pos == 0) {
                  ASSERT_EQ(0, std::memcmp(&x[row], &y[row], size_t(D) * sizeof(float)));
                  continue;
                }
                for (int64_t c = 0; c < r / 2; ++c) {
                  const size_t i1 = row + size_t(interleaved ? 2 * c : c);
                  const size_t i2 = row + size_t(interleaved ? 2 * c + 1 : c + r / 2);
                  double e1, e2;
                  RopeRef(x[i1], x[i2], c, r, base, pos, &e1, &e2);
                  const double tol = 1e-6 * (std::fabs(x[i1]) + std::fabs(x[i2]));
                  ASSERT_NEAR(y[i1], e1, tol) << "pos=" << pos << " c=" << c;
                  ASSERT_NEAR(y[i2], e2, tol) << "pos=" << pos << " c=" << c;
                }
                // Channels past rotary_dim pass through bitwise.
                ASSERT_EQ(0, std::memcmp(&x[row + size_t(r)], &y[row + size_t(r)],
                                         size_t(D - r) * sizeof(float)));
              }
            }
          }
        }
      }
    }
  }
}

// xPos: each pair is the RoPE rotation times zeta_c^(+-p / scale_base) (queries +, keys -), so a
// query-key dot product depends on the distance only; AppendKV stores the key form (the same
// bits as ApplyRotary with keys); positions past the f32 range of the key scale are refused.
TEST(Rotary, XposScalesPairsAndKeepsDotProductsRelative) {
  const int64_t H = 1, D = 8, r = 8;
  const double gamma = 0.4, scale_base = 64.0;
  for (bool interleaved : {false, true}) {
    SCOPED_TRACE(interleaved ? "interleaved" : "half-split");
    RotaryParams rot{r, 10000.0f, interleaved};
    rot.xpos_scale_base = static_cast<float>(scale_base);
    rot.xpos_gamma = static_cast<float>(gamma);
    const auto x = Random(size_t(D), 5), y = Random(size_t(D), 6);
    // Row t of a sequence starting at `start`, rotated in the query or the key form.
    const auto rotate = [&](const std::vector<float>& v, int32_t start, bool keys) {
      std::vector<float> out = v;
      ApplyRotaryParams ap{MakeView4(out.data(), DType::kF32, 1, 1, H, D), I32(&start, 1), rot};
      ap.keys = keys;
      EXPECT_TRUE(ApplyRotary(ap, Context()).ok());
      return out;
    };
    for (const int32_t pos : {1, 37, 300}) {
      const auto q = rotate(x, pos, false), k = rotate(x, pos, true);
      for (int64_t c = 0; c < r / 2; ++c) {
        const size_t i1 = size_t(interleaved ? 2 * c : c);
        const size_t i2 = size_t(interleaved ? 2 * c + 1 : c + r / 2);
        double e1, e2;
        RopeRef(x[i1], x[i2], c, r, 10000.0, pos, &e1, &e2);
        const double zeta = (2.0 * static_cast<double>(c) / r + gamma) / (1.0 + gamma);
        const double up = std::pow(zeta, pos / scale_base),
                     down = std::pow(zeta, -pos / scale_base);
        ASSERT_NEAR(q[i1], e1 * up, 1e-5 * up) << pos;
        ASSERT_NEAR(q[i2], e2 * up, 1e-5 * up) << pos;
        ASSERT_NEAR(k[i1], e1 * down, 1e-5 * down) << pos;
        ASSERT_NEAR(k[i2], e2 * down, 1e-5 * down) << pos;
      }
    }
    const auto dot = [&](int32_t m, int32_t n) {
      const auto q = rotate(x, m, false), k = rotate(y, n, true);
      double acc = 0.0;
      for (int64_t i = 0; i < D; ++i) acc += static_cast<double>(q[size_t(i)]) * k[size_t(i)];
      return acc;
    };
    EXPECT_NEAR(dot(9, 4), dot(209, 204), 1e-4 * std::fabs(dot(9, 4)) + 1e-6);
    EXPECT_NEAR(dot(4, 9), dot(1004, 1009), 1e-4 * std::fabs(dot(4, 9)) + 1e-6);
    // AppendKV stores the key form.
    KVCache c;
    ASSERT_TRUE(c.Allocate(KVDType::kF32, 1, 64, H, D).ok());
    Batch batch{{40}, {}, 0};
    Input k(y, DType::kF32, 1, 1, H, D), v(y, DType::kF32, 1, 1, H, D);
    ASSERT_TRUE(Append(c.view(), batch.view(), k, v, rot).ok());
    batch.lens = {41};
    const auto stored = Read(c.view(), batch.view(), 0).k;
    EXPECT_TRUE(
        BitwiseEqual(std::vector<float>(stored.end() - D, stored.end()), rotate(y, 40, true)));
    // Past the range: 1e6 / 64 * |ln(0.4 / 1.4)| is far beyond 80.
    std::vector<float> z = x;
    const int32_t far = 1000000;
    const Status st = ApplyRotary(
        ApplyRotaryParams{MakeView4(z.data(), DType::kF32, 1, 1, H, D), I32(&far, 1), rot},
        Context());
    EXPECT_TRUE(ErrorNames(st, "rotary.xpos_scale_base")) << st.ToString();
    EXPECT_TRUE(BitwiseEqual(z, x));
    RotaryParams bad = rot;
    bad.xpos_gamma = -1.0f;
    EXPECT_TRUE(ErrorNames(
        ApplyRotary(ApplyRotaryParams{MakeView4(z.data(), DType::kF32, 1, 1, H, D), {}, bad},
                    Context()),
        "rotary.xpos_gamma"));
    bad = rot;
    bad.rotary_dim = 0;
    EXPECT_TRUE(ErrorNames(
        ApplyRotary(ApplyRotaryParams{MakeView4(z.data(), DType::kF32, 1, 1, H, D), {}, bad},
                    Context()),
        "rotary.xpos_scale_base"));
  }
}

TEST(Rotary, PositionZeroIsTheIdentityEvenForSignedZeros) {
  const int64_t H = 1, D = 4;
  // Rotated exactly, (1.5, -0) would become (1.5 - 0 * 0, 1.5 * 0 + -0) = (1.5, +0).
  std::vector<float> x = {1.5f, -0.0f, -0.0f, 2.0f};
  for (bool interleaved : {false, true}) {
    const RotaryParams rot{D, 10000.0f, interleaved};
    std::vector<float> y = x;
    ASSERT_TRUE(ApplyRotary(ApplyRotaryParams{MakeView4(y.data(), DType::kF32, 1, 1, H, D),
                                              TensorView(), rot},
                            Context())
                    .ok());
    EXPECT_TRUE(BitwiseEqual(x, y));
    KVCache c;
    ASSERT_TRUE(c.Allocate(KVDType::kF32, 1, 2, H, D).ok());
    Batch batch{{0}, {}, 0};
    Input k(x, DType::kF32, 1, 1, H, D), v(x, DType::kF32, 1, 1, H, D);
    ASSERT_TRUE(Append(c.view(), batch.view(), k, v, rot).ok());
    batch.lens = {1};
    EXPECT_TRUE(BitwiseEqual(Read(c.view(), batch.view(), 0).k, x));
  }
}

TEST(Rotary, SixteenBitAndStridedInPlace) {
  const int64_t B = 1, S = 3, H = 2, D = 8, r = 8, pad = 2;
  const auto x = Random(size_t(B * S * H * D), 95);
  for (DType dtype : {DType::kBF16, DType::kF16}) {
    // [B, S, H, D] with rows padded by 2 elements that must stay untouched.
    Input storage(std::vector<float>(size_t(B * S * H * (D + pad)), 7.0f), dtype, 1, 1, 1,
                  B * S * H * (D + pad));
    TensorView v = MakeView4(storage.bytes.data(), dtype, B, S, H, D);
    v.strides[2] = D + pad;
    v.strides[1] = H * (D + pad);
    v.strides[0] = S * H * (D + pad);
    for (int64_t t = 0; t < S * H; ++t) {
      for (int64_t d = 0; d < D; ++d) {
        const float val = x[size_t(t * D + d)];
        const uint16_t h = dtype == DType::kBF16 ? FloatToBF16(val) : FloatToF16(val);
        std::memcpy(storage.bytes.data() + 2 * (t * (D + pad) + d), &h, 2);
      }
    }
    const int32_t start = 3;
    ASSERT_TRUE(ApplyRotary(ApplyRotaryParams{v, I32(&start, 1), RotaryParams{r, 10000.0f, false}},
                            Context())
                    .ok());
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t t = s * H + h;
        for (int64_t c = 0; c < r / 2; ++c) {
          const float x1 = RoundTo(dtype, x[size_t(t * D + c)]);
          const float x2 = RoundTo(dtype, x[size_t(t * D + c + r / 2)]);
          double e1, e2;
          RopeRef(x1, x2, c, r, 10000.0, start + s, &e1, &e2);
          EXPECT_EQ(storage.at(size_t(t * (D + pad) + c)), RoundTo(dtype, float(e1)));
          EXPECT_EQ(storage.at(size_t(t * (D + pad) + c + r / 2)), RoundTo(dtype, float(e2)));
        }
        EXPECT_EQ(storage.at(size_t(t * (D + pad) + D)), 7.0f);
        EXPECT_EQ(storage.at(size_t(t * (D + pad) + D + 1)), 7.0f);
      }
    }
  }
}

TEST(Rotary, AppendWithRotaryEqualsApplyRotaryThenAppend) {
  const int64_t B = 2, n = 5, H = 2, D = 12;
  struct Case {
    DType in;
    KVDType cache;
  } cases[] = {{DType::kF32, KVDType::kF32},
               {DType::kF32, KVDType::kInt8},
               {DType::kF32, KVDType::kInt4},
               {DType::kBF16, KVDType::kBF16},
               {DType::kF16, KVDType::kF16}};
  const auto kv = Random(size_t(B * n * H * D), 97), vv = Random(size_t(B * n * H * D), 98);
  for (const Case& cs : cases) {
    for (bool interleaved : {false, true}) {
      SCOPED_TRACE(std::string(DTypeName(cs.in)) + " -> " + KVDTypeName(cs.cache) +
                   (interleaved ? " interleaved" : ""));
      const RotaryParams rot{8, 10000.0f, interleaved};
      Batch batch{{3, 0}, {1, 4, 0, 2, 5, 3}, 3};
      KVCache a, b;
      ASSERT_TRUE(a.Allocate(cs.cache, 6, 4, H, D).ok());
      ASSERT_TRUE(b.Allocate(cs.cache, 6, 4, H, D).ok());
      Input k(kv, cs.in, B, n, H, D), v(vv, cs.in, B, n, H, D);
      ASSERT_TRUE(Append(a.view(), batch.view(), k, v, rot).ok());
      Input kr(kv, cs.in, B, n, H, D);
      ASSERT_TRUE(
          ApplyRotary(ApplyRotaryParams{kr.view(), I32(batch.lens.data(), 2), rot}, Context())
              .ok());
      ASSERT_TRUE(Append(b.view(), batch.view(), kr, v).ok());
      EXPECT_EQ(CacheBytes(a.view()), CacheBytes(b.view()));
    }
  }
}

TEST(Rotary, BadArgumentsNameTheArgument) {
  std::vector<float> x(2 * 3 * 4 * 8, 1.0f);
  const std::vector<float> before = x;
  TensorView v = MakeView4(x.data(), DType::kF32, 2, 3, 4, 8);
  EXPECT_TRUE(
      ErrorNames(ApplyRotary(ApplyRotaryParams{v, {}, RotaryParams{3, 10000.0f, false}}, Context()),
                 "rotary.rotary_dim"));
  EXPECT_TRUE(ErrorNames(
      ApplyRotary(ApplyRotaryParams{v, {}, RotaryParams{10, 10000.0f, false}}, Context()),
      "rotary.rotary_dim"));
  EXPECT_TRUE(ErrorNames(
      ApplyRotary(ApplyRotaryParams{v, {}, RotaryParams{-2, 10000.0f, false}}, Context()),
      "rotary.rotary_dim"));
  EXPECT_TRUE(
      ErrorNames(ApplyRotary(ApplyRotaryParams{v, {}, RotaryParams{8, 0.0f, false}}, Context()),
                 "rotary.base"));
  EXPECT_TRUE(
      ErrorNames(ApplyRotary(ApplyRotaryParams{v, {}, RotaryParams{8, kNaN, false}}, Context()),
                 "rotary.base"));
  EXPECT_TRUE(ErrorNames(ApplyRotary(ApplyRotaryParams{MakeView3(x.data(), DType::kF32, 6, 4, 8),
                                                       {},
                                                       RotaryParams{8, 10000.0f, false}},
                                     Context()),
                         "x"));
  TensorView aliased = v;
  aliased.strides[1] = 0;
  EXPECT_TRUE(ErrorNames(
      ApplyRotary(ApplyRotaryParams{aliased, {}, RotaryParams{8, 10000.0f, false}}, Context()),
      "x"));
  // positions: i32 [B] with unit stride.
  const std::vector<int32_t> starts = {0, 3, 7};
  const RotaryParams rot{8, 10000.0f, false};
  TensorView pos = I32(starts.data(), 2);
  pos.dtype = DType::kF32;
  EXPECT_TRUE(ErrorNames(ApplyRotary(ApplyRotaryParams{v, pos, rot}, Context()), "positions"));
  EXPECT_TRUE(ErrorNames(ApplyRotary(ApplyRotaryParams{v, I32(starts.data(), 3), rot}, Context()),
                         "positions"));
  pos = I32(starts.data(), 2);
  pos.strides[0] = 2;
  const Status strided = ApplyRotary(ApplyRotaryParams{v, pos, rot}, Context());
  EXPECT_TRUE(ErrorNames(strided, "positions"));
  EXPECT_NE(strided.message().find("stride"), std::string::npos) << strided.message();
  pos = I32(starts.data(), 1, 2);
  EXPECT_TRUE(ErrorNames(ApplyRotary(ApplyRotaryParams{v, pos, rot}, Context()), "positions"));
  EXPECT_TRUE(BitwiseEqual(x, before));
  // rotary_dim 0 is a no-op.
  EXPECT_TRUE(
      ApplyRotary(ApplyRotaryParams{v, {}, RotaryParams{0, 10000.0f, false}}, Context()).ok());
  EXPECT_TRUE(BitwiseEqual(x, before));
}

// ---------------------------------------------------------------------------------------------
// Argument errors.

TEST(AppendKV, BadArgumentsNameTheArgumentAndWriteNothing) {
  const int64_t B = 2, n = 3, H = 2, D = 8;
  KVCache c;
  ASSERT_TRUE(c.Allocate(KVDType::kInt8, 6, 4, H, D).ok());
  const auto kv = Random(size_t(B * n * H * D), 101);
  Input k(kv, DType::kF32, B, n, H, D), v(kv, DType::kF32, B, n, H, D);
  Input k16(kv, DType::kBF16, B, n, H, D);
  const std::vector<int32_t> lens = {0, 2}, table = {0, 1, 2, 3, 4, 5};
  const std::vector<int32_t> negative_lens = {0, -1};
  auto base = [&]() {
    AppendKVParams p;
    p.k_new = k.view();
    p.v_new = v.view();
    p.cache = c.view();
    p.batch.batch = B;
    p.batch.seq_lens = I32(lens.data(), B);
    p.batch.block_table = I32(table.data(), B, 3);
    return p;
  };
  ASSERT_TRUE(AppendKV(base(), Context()).ok());
  const auto before = CacheBytes(c.view());
  std::vector<float> partial(size_t(H * D), 1.0f);
  partial[5] = 0.0f;

  struct Case {
    const char* name;
    std::function<void(AppendKVParams&)> edit;
  };
  const std::vector<Case> cases = {
      {"k_new",
       [&](AppendKVParams& p) { p.k_new = MakeView3(k.bytes.data(), DType::kF32, B * n, H, D); }},
      {"v_new", [&](AppendKVParams& p) { p.v_new = k16.view(); }},
      {"v_new", [&](AppendKVParams& p) { p.v_new.shape[1] = 2; }},
      {"k_new", [&](AppendKVParams& p) { p.k_new.data = nullptr; }},
      {"k_new", [&](AppendKVParams& p) { p.k_new.strides[2] = -1; }},
      {"k_new", [&](AppendKVParams& p) { p.k_new.dtype = static_cast<DType>(7); }},
      {"rotary.rotary_dim", [&](AppendKVParams& p) { p.rotary.rotary_dim = 3; }},
      {"rotary.rotary_dim", [&](AppendKVParams& p) { p.rotary.rotary_dim = D + 2; }},
      {"rotary.base",
       [&](AppendKVParams& p) {
         p.rotary = RotaryParams{4, -1.0f, false};
       }},
      {"batch.batch", [&](AppendKVParams& p) { p.batch.batch = 1; }},
      {"batch.seq_lens", [&](AppendKVParams& p) { p.batch.seq_lens = TensorView(); }},
      {"batch.seq_lens[1]",
       [&](AppendKVParams& p) { p.batch.seq_lens = I32(negative_lens.data(), B); }},
      {"batch.seq_lens", [&](AppendKVParams& p) { p.batch.seq_lens.dtype = DType::kF32; }},
      {"batch.seq_lens", [&](AppendKVParams& p) { p.batch.seq_lens.shape[0] = B + 1; }},
      {"batch.seq_lens", [&](AppendKVParams& p) { p.batch.seq_lens.rank = 2; }},
      {"batch.seq_lens", [&](AppendKVParams& p) { p.batch.seq_lens.strides[0] = 2; }},
      {"batch.block_table", [&](AppendKVParams& p) { p.batch.block_table.shape[1] = 0; }},
      {"batch.block_table", [&](AppendKVParams& p) { p.batch.block_table.dtype = DType::kU8; }},
      {"batch.block_table", [&](AppendKVParams& p) { p.batch.block_table.shape[0] = 1; }},
      {"batch.block_table", [&](AppendKVParams& p) { p.batch.block_table.rank = 1; }},
      {"batch.block_table", [&](AppendKVParams& p) { p.batch.block_table.strides[1] = 2; }},
      {"batch.batch",
       [&](AppendKVParams& p) {
         p.batch.block_table = TensorView();  // contiguous: 2 sequences need 2 pages (ok) ...
         p.cache.num_pages = 1;               // ... but the pool has 1
       }},
      {"num_kv_heads", [&](AppendKVParams& p) { p.cache.num_kv_heads = 1; }},
      {"head_dim", [&](AppendKVParams& p) { p.cache.head_dim = 4; }},
      {"cache.head_dim", [&](AppendKVParams& p) { p.cache.head_dim = 513; }},
      {"cache.dtype", [&](AppendKVParams& p) { p.cache.dtype = static_cast<KVDType>(5); }},
      {"cache.k", [&](AppendKVParams& p) { p.cache.k = nullptr; }},
      {"cache.v_scales", [&](AppendKVParams& p) { p.cache.v_scales = nullptr; }},
      {"cache.k_channel_scales", [&](AppendKVParams& p) { p.cache.k_channel_scales = nullptr; }},
      {"cache.num_pages", [&](AppendKVParams& p) { p.cache.num_pages = 0; }},
      {"cache.page_size", [&](AppendKVParams& p) { p.cache.page_size = 512; }},
      {"cache.k_channel_scales",
       [&](AppendKVParams& p) { p.cache.k_channel_scales = partial.data(); }},
  };
  for (const Case& cs : cases) {
    AppendKVParams p = base();
    cs.edit(p);
    const Status s = AppendKV(p, Context());
    EXPECT_TRUE(ErrorNames(s, cs.name));
    EXPECT_EQ(CacheBytes(c.view()), before) << cs.name;
  }
  // The batch mismatch also says where the expected batch comes from.
  AppendKVParams p = base();
  Input k1(std::vector<float>(size_t(n * H * D)), DType::kF32, 1, n, H, D);
  p.k_new = p.v_new = k1.view();
  const Status s = AppendKV(p, Context());
  EXPECT_TRUE(ErrorNames(s, "k_new"));
  EXPECT_NE(s.message().find("batch.batch"), std::string::npos) << s.message();
}

TEST(KVCache, ReadKVBadArgumentsNameTheArgument) {
  const int64_t H = 2, D = 4;
  KVCache c;
  ASSERT_TRUE(c.Allocate(KVDType::kF16, 2, 4, H, D).ok());
  Batch batch{{3, 1}, {}, 0};
  std::vector<float> k(size_t(3 * H * D), -1.0f), v = k;
  std::vector<uint16_t> k16(k.size());
  const TensorView kv = MakeView3(k.data(), DType::kF32, 3, H, D);
  const TensorView vv = MakeView3(v.data(), DType::kF32, 3, H, D);
  EXPECT_TRUE(ErrorNames(ReadKV(ReadKVParams{c.view(), batch.view(), -1, kv, vv}, Context()),
                         "b: expected"));
  EXPECT_TRUE(ErrorNames(ReadKV(ReadKVParams{c.view(), batch.view(), 2, kv, vv}, Context()),
                         "b: expected"));
  EXPECT_TRUE(
      ErrorNames(ReadKV(ReadKVParams{c.view(), batch.view(), 1, kv, vv}, Context()), "k_out"));
  EXPECT_TRUE(ErrorNames(ReadKV(ReadKVParams{c.view(), batch.view(), 0, kv,
                                             MakeView3(k16.data(), DType::kBF16, 3, H, D)},
                                Context()),
                         "v_out"));
  EXPECT_TRUE(ErrorNames(
      ReadKV(ReadKVParams{c.view(), batch.view(), 0, MakeView3(nullptr, DType::kF32, 3, H, D), vv},
             Context()),
      "k_out"));
  EXPECT_TRUE(ErrorNames(ReadKV(ReadKVParams{c.view(), batch.view(), 0,
                                             MakeView4(k.data(), DType::kF32, 1, 3, H, D), vv},
                                Context()),
                         "k_out"));
  Batch too_long{{5, 1}, {}, 0};
  EXPECT_TRUE(ErrorNames(ReadKV(ReadKVParams{c.view(), too_long.view(), 0, kv, vv}, Context()),
                         "batch.seq_lens[0]"));
  for (float x : k) EXPECT_EQ(x, -1.0f);
  // An empty sequence reads into empty views, null data included.
  Batch empty{{0}, {}, 0};
  EXPECT_TRUE(
      ReadKV(ReadKVParams{c.view(), empty.view(), 0, MakeView3(nullptr, DType::kF32, 0, H, D),
                          MakeView3(nullptr, DType::kF32, 0, H, D)},
             Context())
          .ok());
}

}  // namespace
}  // namespace tessera
