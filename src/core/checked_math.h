// SPDX-License-Identifier: Apache-2.0
// Internal: the one place where products and sums of user-given sizes are formed. Every size a
// caller controls (shapes, strides, windows, grid axes, block counts, split sizes) goes through
// these before it is used, so an overflow becomes an InvalidArgument naming the argument instead
// of a wrapped value that passes a later check.
#pragma once

#include <cstdint>
#include <limits>

namespace tessera {

// *out = a * b; false (and *out untouched) when the product does not fit in int64.
inline bool CheckedMul(int64_t a, int64_t b, int64_t* out) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) return false;
  *out = r;
  return true;
}

// *out = a + b; false (and *out untouched) when the sum does not fit in int64.
inline bool CheckedAdd(int64_t a, int64_t b, int64_t* out) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) return false;
  *out = r;
  return true;
}

// a * b, or INT64_MAX when it overflows: for sizes that are checked later (a saturated size is
// larger than any memory, so the check that follows rejects it).
inline int64_t SaturatingMul(int64_t a, int64_t b) {
  int64_t r;
  return CheckedMul(a, b, &r) ? r : std::numeric_limits<int64_t>::max();
}

// ceil(a / b) for a >= 0, b > 0, without forming a + b - 1.
inline int64_t CeilDiv(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

}  // namespace tessera
