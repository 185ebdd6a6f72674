// SPDX-License-Identifier: Apache-2.0
// Internal: one tensor element read as f32 / written from f32 (rounded to nearest even for the
// 16-bit types), whatever the dtype (u8 / bool / i32 mask elements convert as integers). The scalar
// path of every kernel and reference output.
#pragma once

#include <cstdint>

#include "tessera/types.h"

namespace tessera {

inline float LoadElement(DType dtype, const void* base, int64_t i) {
  switch (dtype) {
    case DType::kF32:
      return static_cast<const float*>(base)[i];
    case DType::kBF16:
      return BF16ToFloat(static_cast<const uint16_t*>(base)[i]);
    case DType::kF16:
      return F16ToFloat(static_cast<const uint16_t*>(base)[i]);
    case DType::kU8:
    case DType::kBool:
      return static_cast<const uint8_t*>(base)[i];
    case DType::kI32:
      return static_cast<float>(static_cast<const int32_t*>(base)[i]);
  }
  return 0.0f;
}

// The element as double, exact for every dtype (i32 included): the references' loads.
inline double LoadElementF64(DType dtype, const void* base, int64_t i) {
  if (dtype == DType::kI32) return static_cast<const int32_t*>(base)[i];
  return LoadElement(dtype, base, i);
}

inline void StoreElement(DType dtype, void* base, int64_t i, float x) {
  switch (dtype) {
    case DType::kF32:
      static_cast<float*>(base)[i] = x;
      return;
    case DType::kBF16:
      static_cast<uint16_t*>(base)[i] = FloatToBF16(x);
      return;
    case DType::kF16:
      static_cast<uint16_t*>(base)[i] = FloatToF16(x);
      return;
    case DType::kU8:
    case DType::kBool:
      static_cast<uint8_t*>(base)[i] = static_cast<uint8_t>(x);
      return;
    case DType::kI32:
      static_cast<int32_t*>(base)[i] = static_cast<int32_t>(x);
      return;
  }
}

}  // namespace tessera
