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
  if (rotary.xpos_scale_base != 0.0f) {
    if (!(rotary.xpos_scale_base > 0.0f && std::isfinite(rotary.xpos_scale_base))) {
      return Status::InvalidArgument(Expected("rotary.xpos_scale_base",
                                              "0 (off) or a positive finite value",
                                              std::to_string(rotary.xpos_scale_base)));
    }
    if (!(rotary.xpos_gamma > 0.0f && std::isfinite(rotary.xpos_gamma))) {
      return Status::InvalidArgument(Expected("rotary.xpos_gamma", "a positive finite value",
                                              std::to_string(rotary.xpos_gamma)));
    }
    if (r == 0) {
      return Status::InvalidArgument(
          "rotary.xpos_scale_base: expected a rotary_dim > 0 with xPos, got rotary_dim = 0");
    }
  }
  return Status::Ok();
}

// |ln zeta_c| * p / xpos_scale_base may reach this: past it the key scale nears the f32 range.
constexpr double kMaxXposExponent = 80.0;

// xPos's scale exponent at the largest position stays within kMaxXposExponent (plain RoPE:
// always). `max_position`: the largest position the call rotates.
inline Status CheckXposRange(const RotaryParams& rotary, int64_t max_position) {
  if (rotary.xpos_scale_base == 0.0f || rotary.rotary_dim == 0) return Status::Ok();
  const double gamma = rotary.xpos_gamma;
  const double exponent = static_cast<double>(max_position) /
                          static_cast<double>(rotary.xpos_scale_base) *
                          std::fabs(std::log(gamma / (1.0 + gamma)));
  if (exponent > kMaxXposExponent) {
    return Status::InvalidArgument(Expected(
        "rotary.xpos_scale_base",
        "positions p with p / scale_base * |ln zeta_0| <= 80 (the key scale zeta^-p / scale_base "
        "within the f32 range)",
        "position " + std::to_string(max_position) + " with scale_base " +
            std::to_string(rotary.xpos_scale_base)));
  }
  return Status::Ok();
}

// The frequencies of one RotaryParams (computed once per call) and the rotation of a row.
class Rotary {
 public:
  // keys: xPos's key form (zeta^-p), else the query form (zeta^p); no effect without xPos.
  explicit Rotary(const RotaryParams& rotary, bool keys = true)
      : half_(rotary.rotary_dim / 2), interleaved_(rotary.interleaved) {
    theta_.resize(static_cast<size_t>(half_));
    const double r = static_cast<double>(rotary.rotary_dim);
    for (int64_t c = 0; c < half_; ++c) {
      theta_[size_t(c)] =
          std::pow(static_cast<double>(rotary.base), -2.0 * static_cast<double>(c) / r);
    }
    if (rotary.xpos_scale_base > 0.0f) {
      // ln zeta_c / scale_base, signed for the side: the scale at p is exp(p * log_scale_c).
      const double gamma = rotary.xpos_gamma, sign = keys ? -1.0 : 1.0;
      log_scale_.resize(static_cast<size_t>(half_));
      for (int64_t c = 0; c < half_; ++c) {
        log_scale_[size_t(c)] =
            sign * std::log((2.0 * static_cast<double>(c) / r + gamma) / (1.0 + gamma)) /
            static_cast<double>(rotary.xpos_scale_base);
      }
    }
  }

  bool enabled() const { return half_ > 0; }

  // cos / sin of position * theta_c into angles[2 * half] (cos_0, sin_0, cos_1, ...), times
  // xPos's scale of pair c at that position.
  void Angles(int64_t position, double* angles) const {
    for (int64_t c = 0; c < half_; ++c) {
      const double a = static_cast<double>(position) * theta_[size_t(c)];
      const double scale = log_scale_.empty()
                               ? 1.0
                               : std::exp(static_cast<double>(position) * log_scale_[size_t(c)]);
      angles[2 * c] = std::cos(a) * scale;
      angles[2 * c + 1] = std::sin(a) * scale;
    }
  }
  int64_t angle_count() const { return 2 * half_; }

  // Rotates (and with xPos scales) the first rotary_dim channels of x in place; position 0
  // leaves x as it is.
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
  std::vector<double> log_scale_;  // xPos: ln zeta_c / scale_base, signed for the side
};

}  // namespace rotary
}  // namespace tessera
