// SPDX-License-Identifier: Apache-2.0
// The int8 / int4 KV quantizer through the public API (AppendKV, ReadKV), against the formula of
// tessera/kv_cache.h evaluated here by brute force: every stored code is the level nearest to
// y = x / n (ties to the even code), the row's minimum is code 0 and its maximum the top code
// (255 / 15), int4 codes sit in the documented nibbles, and ReadKV returns n * (min + step * code).
// Independent of kv_quant.h: the nearest level is searched over all 2^bits levels rather than
// computed by rounding a quotient.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "tessera/context.h"
#include "tessera/kv_cache.h"
#include "tessera/types.h"

namespace tessera {
namespace {

int Bits(KVDType dtype) { return dtype == KVDType::kInt8 ? 8 : 4; }

// One head's rows x [n, D] appended to a fresh single-page cache with caller-set normalizers
// `norm` [D] (K and V alike), the codes, (step, min) pairs and ReadKV values read back.
struct Stored {
  std::vector<uint32_t> codes;   // [n, D]
  std::vector<float> step, min;  // [n]
  std::vector<float> read;       // [n, D] ReadKV of K
  std::vector<uint8_t> bytes;    // [n, RowBytes] the raw K rows
};

void Store(KVDType dtype, const std::vector<float>& x, int64_t n, int64_t D,
           const std::vector<float>& norm, Stored* s) {
  KVCache cache;
  ASSERT_TRUE(cache.Allocate(dtype, 1, n, 1, D).ok());
  KVCacheView view = cache.view();
  for (int64_t c = 0; c < D; ++c) view.k_channel_scales[c] = view.v_channel_scales[c] = norm[c];
  std::vector<float> data = x;
  const int32_t zero = 0, len = static_cast<int32_t>(n);
  AppendKVParams ap;
  ap.k_new = MakeView4(data.data(), DType::kF32, 1, n, 1, D);
  ap.v_new = MakeView4(data.data(), DType::kF32, 1, n, 1, D);
  ap.cache = view;
  ap.batch.batch = 1;
  ap.batch.seq_lens = MakeView1(const_cast<int32_t*>(&zero), DType::kI32, 1);
  const Status st = AppendKV(ap, Context());
  ASSERT_TRUE(st.ok()) << st.ToString();

  const int64_t row_bytes = KVRowBytes(dtype, D);
  const uint8_t* k = static_cast<const uint8_t*>(view.k);
  s->bytes.assign(k, k + n * row_bytes);
  s->codes.assign(static_cast<size_t>(n * D), 0);
  for (int64_t t = 0; t < n; ++t) {
    s->step.push_back(view.k_scales[2 * t]);
    s->min.push_back(view.k_scales[2 * t + 1]);
    for (int64_t c = 0; c < D; ++c) {
      const uint8_t byte = k[t * row_bytes + (dtype == KVDType::kInt8 ? c : c / 2)];
      const uint32_t code = dtype == KVDType::kInt8 ? byte : (c % 2 ? byte >> 4 : byte & 0x0Fu);
      s->codes[static_cast<size_t>(t * D + c)] = code;
    }
  }
  s->read.assign(static_cast<size_t>(n * D), 0.0f);
  std::vector<float> v_read(s->read.size());
  KVBatchView batch;
  batch.batch = 1;
  batch.seq_lens = MakeView1(const_cast<int32_t*>(&len), DType::kI32, 1);
  ReadKVParams read;
  read.cache = view;
  read.batch = batch;
  read.b = 0;
  read.k_out = MakeView3(s->read.data(), DType::kF32, n, 1, D);
  read.v_out = MakeView3(v_read.data(), DType::kF32, n, 1, D);
  const Status rs = ReadKV(read, Context());
  ASSERT_TRUE(rs.ok()) << rs.ToString();
}

// The level of {min + k * step : k = 0 .. 2^bits - 1} nearest to y, ties to the even k, by
// search (exact in double for these magnitudes: k * step has at most 32 significant bits).
uint32_t NearestLevel(double y, double min, double step, int bits) {
  const uint32_t levels = (1u << bits) - 1u;
  if (step == 0.0) return 0;
  uint32_t best = 0;
  double best_d = std::fabs(y - min);
  for (uint32_t k = 1; k <= levels; ++k) {
    const double d = std::fabs(y - (min + static_cast<double>(k) * step));
    if (d < best_d || (d == best_d && k % 2 == 0)) {
      best = k;
      best_d = d;
    }
  }
  return best;
}

// Checks every stored row of x against the formula; `ties` counts the elements exactly halfway
// between two levels.
void ExpectMatchesTheFormula(KVDType dtype, const std::vector<float>& x, int64_t n, int64_t D,
                             const std::vector<float>& norm, const Stored& s, int* ties) {
  const int bits = Bits(dtype);
  const uint32_t top = (1u << bits) - 1u;
  for (int64_t t = 0; t < n; ++t) {
    SCOPED_TRACE("row " + std::to_string(t));
    std::vector<float> y(static_cast<size_t>(D));
    float lo = 0.0f, hi = 0.0f;
    for (int64_t c = 0; c < D; ++c) {
      y[static_cast<size_t>(c)] = x[static_cast<size_t>(t * D + c)] / norm[static_cast<size_t>(c)];
      if (c == 0 || y[static_cast<size_t>(c)] < lo) lo = y[static_cast<size_t>(c)];
      if (c == 0 || y[static_cast<size_t>(c)] > hi) hi = y[static_cast<size_t>(c)];
    }
    const float step = static_cast<float>((static_cast<double>(hi) - lo) / top);
    ASSERT_EQ(s.step[static_cast<size_t>(t)], step);
    ASSERT_EQ(s.min[static_cast<size_t>(t)], lo);
    for (int64_t c = 0; c < D; ++c) {
      const size_t i = static_cast<size_t>(t * D + c);
      const double yc = y[static_cast<size_t>(c)];
      const uint32_t want = NearestLevel(yc, lo, step, bits);
      const double q = step == 0.0f ? 0.0 : (yc - lo) / step;
      *ties += step != 0.0f && q - std::floor(q) == 0.5;
      EXPECT_EQ(s.codes[i], want) << "channel " << c << ": y = " << yc
                                  << ", (y - min) / step = " << q;
      // The extremes: the row's minimum is code 0, its maximum the top code (step > 0).
      if (yc == lo) {
        EXPECT_EQ(s.codes[i], 0u) << "channel " << c;
      }
      if (yc == hi && step > 0.0f) {
        EXPECT_EQ(s.codes[i], top) << "channel " << c;
      }
      // Dequantized: n * (min + step * code), in float, in that order.
      const float level = lo + step * static_cast<float>(s.codes[i]);
      EXPECT_EQ(s.read[i], norm[static_cast<size_t>(c)] * level) << "channel " << c;
    }
    if (dtype == KVDType::kInt4 && D % 2 == 1) {
      EXPECT_EQ(s.bytes[static_cast<size_t>(t * KVRowBytes(dtype, D) + D / 2)] >> 4, 0)
          << "odd D: the last high nibble";
    }
  }
}

// Rows built on an exact grid (step 1 after power-of-two normalizers) with values exactly halfway
// between two levels: nearbyint's ties-to-even, at both ends of the code range.
TEST(KVQuant, HalfwayValuesRoundToTheEvenCode) {
  for (KVDType dtype : {KVDType::kInt8, KVDType::kInt4}) {
    SCOPED_TRACE(KVDTypeName(dtype));
    const float top = static_cast<float>((1u << Bits(dtype)) - 1u);
    // y: the minimum 0, the maximum `top`, and halfway values; x = y * n.
    const std::vector<float> y = {0.0f,       top,        0.5f,       1.5f,  2.5f,       3.5f,
                                  top - 0.5f, top - 1.5f, top - 2.5f, 0.25f, top - 0.25f};
    const int64_t D = static_cast<int64_t>(y.size());
    std::vector<float> norm(static_cast<size_t>(D));
    for (int64_t c = 0; c < D; ++c) norm[static_cast<size_t>(c)] = std::ldexp(1.0f, int(c % 5) - 2);
    std::vector<float> x(y.size());
    for (size_t c = 0; c < y.size(); ++c) x[c] = y[c] * norm[c];
    Stored s;
    ASSERT_NO_FATAL_FAILURE(Store(dtype, x, 1, D, norm, &s));
    ASSERT_EQ(s.step[0], 1.0f);
    const std::vector<uint32_t> want = {0,
                                        static_cast<uint32_t>(top),
                                        0,
                                        2,
                                        2,
                                        4,
                                        static_cast<uint32_t>(top) - 1,  // top - 0.5: top odd
                                        static_cast<uint32_t>(top) - 1,  // top - 1.5
                                        static_cast<uint32_t>(top) - 3,  // top - 2.5
                                        0,
                                        static_cast<uint32_t>(top)};
    for (size_t c = 0; c < want.size(); ++c) EXPECT_EQ(s.codes[c], want[c]) << "y = " << y[c];
    int ties = 0;
    ExpectMatchesTheFormula(dtype, x, 1, D, norm, s, &ties);
    EXPECT_EQ(ties, 7);
  }
}

// Random rows of many shapes and scales, brute-forced element by element; rows with a single
// distinct value (step 0) and rows on a half-integer grid from 0 to the top code (step 1, so
// values land exactly halfway between levels) included.
TEST(KVQuant, RandomRowsMatchTheFormula) {
  std::mt19937_64 rng(0x5eed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (KVDType dtype : {KVDType::kInt8, KVDType::kInt4}) {
    const uint32_t top = (1u << Bits(dtype)) - 1u;
    int ties = 0;
    for (int64_t D : {1, 2, 7, 64, 129}) {
      SCOPED_TRACE(std::string(KVDTypeName(dtype)) + " D " + std::to_string(D));
      const int64_t n = 40;
      std::vector<float> norm(static_cast<size_t>(D));
      for (float& v : norm) v = std::ldexp(1.0f, static_cast<int>(rng() % 7) - 3);
      std::vector<float> x(static_cast<size_t>(n * D));
      for (int64_t t = 0; t < n; ++t) {
        const int kind = static_cast<int>(t % 4);
        const float scale = std::ldexp(1.0f, static_cast<int>(rng() % 21) - 10);
        for (int64_t c = 0; c < D; ++c) {
          float y = normal(rng) * scale;  // 0, 1: Gaussian rows
          if (kind == 2) {  // the grid: 0 and the top code present, then half-integers
            y = c == 0   ? 0.0f
                : c == 1 ? static_cast<float>(top)
                         : static_cast<float>(rng() % (2 * top + 1)) * 0.5f;
          }
          if (kind == 3) y = 3.25f;  // constant row: step 0
          x[static_cast<size_t>(t * D + c)] = y * norm[static_cast<size_t>(c)];
        }
      }
      Stored s;
      ASSERT_NO_FATAL_FAILURE(Store(dtype, x, n, D, norm, &s));
      ExpectMatchesTheFormula(dtype, x, n, D, norm, s, &ties);
    }
    EXPECT_GT(ties, 0) << "no halfway value was exercised";
  }
}

}  // namespace
}  // namespace tessera
