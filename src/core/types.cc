// SPDX-License-Identifier: Apache-2.0
#include "tessera/types.h"

#include <algorithm>
#include <cstring>

#include "core/checked_math.h"
#include "tessera/version.h"

namespace tessera {

const char* Version() { return TESSERA_VERSION_STRING; }

size_t DTypeSize(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kF16:
      return 2;
    case DType::kU8:
      return 1;
    case DType::kBool:
      return 1;
    case DType::kI32:
      return 4;
  }
  return 0;
}

const char* DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "f32";
    case DType::kBF16:
      return "bf16";
    case DType::kF16:
      return "f16";
    case DType::kU8:
      return "u8";
    case DType::kBool:
      return "bool";
    case DType::kI32:
      return "i32";
  }
  return "unknown";
}

// A rank past 4 (rejected by every op) counts the 4 dims a view holds: nothing reads past them.
int64_t TensorView::numel() const {
  const int dims = std::min(rank, 4);
  int64_t n = 1;
  for (int i = 0; i < dims; ++i) {
    if (shape[i] == 0) return 0;
  }
  for (int i = 0; i < dims; ++i) n = SaturatingMul(n, shape[i]);
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int i = std::min(rank, 4) - 1; i >= 0; --i) {
    if (shape[i] != 1 && strides[i] != expected) return false;
    expected = SaturatingMul(expected, shape[i]);
  }
  return true;
}

TensorView MakeContiguousView(void* data, DType dtype, int32_t rank, const int64_t* shape) {
  TensorView view;
  view.data = data;
  view.dtype = dtype;
  view.rank = rank;
  int64_t stride = 1;
  for (int i = std::min(rank, 4) - 1; i >= 0; --i) {  // rank > 4: rejected by every op
    view.shape[i] = shape[i];
    view.strides[i] = stride;
    stride = SaturatingMul(stride, shape[i]);  // an overflowing shape is rejected by every op
  }
  return view;
}

TensorView MakeView4(void* data, DType dtype, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
  const int64_t shape[4] = {d0, d1, d2, d3};
  return MakeContiguousView(data, dtype, 4, shape);
}

TensorView MakeView3(void* data, DType dtype, int64_t d0, int64_t d1, int64_t d2) {
  const int64_t shape[3] = {d0, d1, d2};
  return MakeContiguousView(data, dtype, 3, shape);
}

TensorView MakeView1(void* data, DType dtype, int64_t d0) {
  const int64_t shape[1] = {d0};
  return MakeContiguousView(data, dtype, 1, shape);
}

static uint32_t FloatBits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

static float BitsFloat(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

uint16_t FloatToBF16(float x) {
  uint32_t u = FloatBits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

float BF16ToFloat(uint16_t x) { return BitsFloat(static_cast<uint32_t>(x) << 16); }

uint16_t FloatToF16(float x) {
  const uint32_t u = FloatBits(x);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (abs < 0x38800000u) {
    // Subnormal or zero in f16: value = abs_float * 2^24 rounded to an integer (nearest even).
    const float scaled = BitsFloat(abs) * 16777216.0f;  // exact: power-of-two scaling
    const float rounded = __builtin_nearbyintf(scaled);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(rounded));
  }
  // Normal: rebias exponent 127 -> 15 and round the mantissa from 23 to 10 bits.
  uint32_t h = abs - 0x38000000u;
  h += 0xfffu + ((h >> 13) & 1u);
  return static_cast<uint16_t>(sign | (h >> 13));
}

float F16ToFloat(uint16_t x) {
  const uint32_t sign = static_cast<uint32_t>(x & 0x8000u) << 16;
  const uint32_t exp = (x >> 10) & 0x1fu;
  const uint32_t mant = x & 0x3ffu;
  if (exp == 0) {
    const float value = static_cast<float>(mant) * (1.0f / 16777216.0f);
    return sign ? -value : value;
  }
  if (exp == 31) return BitsFloat(sign | 0x7f800000u | (mant << 13));
  return BitsFloat(sign | ((exp + 112u) << 23) | (mant << 13));
}

}  // namespace tessera
