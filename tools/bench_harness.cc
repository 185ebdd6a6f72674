// SPDX-License-Identifier: Apache-2.0
#include "bench_harness.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace tessera {
namespace cli {
namespace bench {

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

bool TensorElements(const std::string& what, const std::vector<int64_t>& dims, int64_t* n,
                    std::string* error) {
  int64_t bound = 1;  // the product with zeros as ones, which bounds every partial product
  for (int64_t d : dims) {
    const int64_t factor = std::max<int64_t>(d, 1);
    if (bound > kMaxElements / factor) {
      std::string text;
      for (int64_t e : dims) text += (text.empty() ? "" : ", ") + std::to_string(e);
      *error = "expected tensors that fit in memory; " + what + " = [" + text +
               "] is too large (more than 2^56 elements)";
      return false;
    }
    bound *= factor;
  }
  int64_t product = 1;
  for (int64_t d : dims) product *= d;
  *n = product;
  return true;
}

void FillRandom(void* dst, DType dtype, int64_t n, uint64_t seed) {
  Random rng(seed);
  switch (dtype) {
    case DType::kF32: {
      float* p = static_cast<float*>(dst);
      for (int64_t i = 0; i < n; ++i) p[i] = rng.Next();
      break;
    }
    case DType::kBF16: {
      uint16_t* p = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) p[i] = FloatToBF16(rng.Next());
      break;
    }
    case DType::kF16: {
      uint16_t* p = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) p[i] = FloatToF16(rng.Next());
      break;
    }
    default:  // ParseDType admits only the float types
      break;
  }
}

void FillRandomAsF32(float* dst, DType dtype, int64_t n, uint64_t seed) {
  Random rng(seed);
  for (int64_t i = 0; i < n; ++i) {
    const float x = rng.Next();
    dst[i] = dtype == DType::kBF16  ? BF16ToFloat(FloatToBF16(x))
             : dtype == DType::kF16 ? F16ToFloat(FloatToF16(x))
                                    : x;
  }
}

float ToFloat(const void* data, DType dtype, int64_t i) {
  switch (dtype) {
    case DType::kF32:
      return static_cast<const float*>(data)[i];
    case DType::kBF16:
      return BF16ToFloat(static_cast<const uint16_t*>(data)[i]);
    case DType::kF16:
      return F16ToFloat(static_cast<const uint16_t*>(data)[i]);
    default:  // ParseDType admits only the float types
      break;
  }
  return 0.0f;
}

AlignedBytes RandomBuffer(DType dtype, int64_t n, uint64_t seed, bool as_f32) {
  const size_t elem = as_f32 ? sizeof(float) : DTypeSize(dtype);
  AlignedBytes buf = AllocateAligned(static_cast<size_t>(n) * elem);
  if (!buf) return buf;
  if (as_f32) {
    FillRandomAsF32(reinterpret_cast<float*>(buf.get()), dtype, n, seed);
  } else {
    FillRandom(buf.get(), dtype, n, seed);
  }
  return buf;
}

void FillNormalish(float* dst, int64_t n, Random* rng) {
  constexpr float kScale = 0.8660254f;
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = (rng->Next() + rng->Next() + rng->Next() + rng->Next()) * kScale;
  }
}

float* AllocateF32(int64_t n, AlignedBytes* buffer) {
  *buffer = AllocateAligned(static_cast<size_t>(n) * sizeof(float));
  return reinterpret_cast<float*>(buffer->get());
}

std::string Fixed(double x, int precision) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.*f", precision, x);
  return buf;
}

double MaxAbsDiff(const void* got, DType dtype, const float* want, int64_t n) {
  double max_diff = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = std::fabs(static_cast<double>(ToFloat(got, dtype, i)) - want[i]);
    if (!(d <= max_diff)) max_diff = d;  // also propagates NaN
  }
  return max_diff;
}

double MaxOrNaN(double a, double b) { return std::isnan(a) || a > b ? a : b; }

double MillisecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

}  // namespace bench
}  // namespace cli
}  // namespace tessera
