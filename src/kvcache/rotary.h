// SPDX-License-Identifier: Apache-2.0
// Internal: RoPE (RotaryParams, tessera/kv_cache.h) as the cache code applies it, shared by
// AppendKV / ApplyRotary (kv_cache.cc) and CompactKV's re-indexing (kvpolicy/kv_compact.cc), so
// a key rotated at position p and a stored key rotated on by delta use the same arithmetic.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/check.h"
#include "tessera/kv_cache.h"
#include "tessera/status.h"

namespace tessera {
namespace rotary {

// rotary_dim 0 (disabled) or even and <= head_dim; a positive finite base when enabled.
inline Status Validate(const RotaryParams& rotary, int64_t head_dim) {
  const int64_t r = rotary.rotary_dim;
  if (r < 0 || r % 2 != 0 || r > head_dim) {
    return Status::InvalidArgument(Expected(
        "rotary.rotary_dim",
        "0 (disabled) or an even value in 2.." + std::to_string(head_dim) + " (the head dim)",
        std::to_string(r)));
  }
  if (r > 0 && !(rotary.base > 0.0f && std::isfinite(rotary.base))) {
    return Status::InvalidArgument(
        Expected("rotary.base", "a positive finite value", std::to_string(rotary.base)));
  }
  return Status::Ok();
}

// The frequencies of one RotaryParams (computed once per call) and the rotation of a row.
class Rotary {
 public:
  explicit Rotary(const RotaryParams& rotary)
      : half_(rotary.rotary_dim / 2), interleaved_(rotary.interleaved) {
    theta_.resize(static_cast<size_t>(half_));
    const double r = static_cast<double>(rotary.rotary_dim);
    for (int64_t c = 0; c < half_; ++c) {
      theta_[size_t(c)] =
          std::pow(static_cast<double>(rotary.base), -2.0 * static_cast<double>(c) / r);
    }
  }

  bool enabled() const { return half_ > 0; }

  // cos / sin of position * theta_c into angles[2 * half] (cos_0, sin_0, cos_1, ...).
  void Angles(int64_t position, double* angles) const {
    for (int64_t c = 0; c < half_; ++c) {
      const double a = static_cast<double>(position) * theta_[size_t(c)];
      angles[2 * c] = std::cos(a);
      angles[2 * c + 1] = std::sin(a);
    }
  }
  int64_t angle_count() const { return 2 * half_; }

  // Rotates the first rotary_dim channels of x in place; position 0 leaves x as it is.
  void Apply(int64_t position, const double* angles, float* x) const {
    if (position == 0) return;
    for (int64_t c = 0; c < half_; ++c) {
      const int64_t i1 = interleaved_ ? 2 * c : c;
      const int64_t i2 = interleaved_ ? 2 * c + 1 : c + half_;
      const double x1 = x[i1], x2 = x[i2];
      const double cs = angles[2 * c], sn = angles[2 * c + 1];
      x[i1] = static_cast<float>(x1 * cs - x2 * sn);
      x[i2] = static_cast<float>(x1 * sn + x2 * cs);
    }
  }

 private:
  int64_t half_;
  bool interleaved_;
  std::vector<double> theta_;
};

}  // namespace rotary
}  // namespace tessera
