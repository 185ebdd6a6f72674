// SPDX-License-Identifier: Apache-2.0
// Internal: the random draws of HyperAttention (hyper_attention.cc), shared with its fp64
// reference (ref/approx_hyper_ref.cc) so that both see the same hyperplanes and the same sampled
// keys. Every draw is a pure function of the seed and of where it is used (head, hyperplane,
// coordinate; or batch, head, causal piece, block, step), never of the thread count or of the
// order in which the work runs.
#pragma once

#include <cmath>
#include <cstdint>

namespace tessera {
namespace approx {

// SplitMix64's finalizer: a bijective mix of 64 bits.
inline uint64_t HyperMix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// 64 random bits for the tuple (seed, stream, a, b, c, d).
inline uint64_t HyperBits(uint64_t seed, uint64_t stream, uint64_t a, uint64_t b, uint64_t c,
                          uint64_t d) {
  uint64_t x = HyperMix(seed ^ HyperMix(stream));
  x = HyperMix(x ^ a);
  x = HyperMix(x ^ b);
  x = HyperMix(x ^ c);
  return HyperMix(x ^ d);
}

// A uniform double in (0, 1) from 64 bits (53 bits of mantissa, never 0).
inline double HyperUniform(uint64_t bits) {
  return (static_cast<double>(bits >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

constexpr uint64_t kHyperStreamProjection = 1;
constexpr uint64_t kHyperStreamSample = 2;

// Entry `dim` of hyperplane `bit` of query head `head`: a standard Gaussian (Box-Muller). The same
// hyperplanes serve every batch entry and every causal piece of the head.
inline double HyperProjection(uint64_t seed, int64_t head, int64_t bit, int64_t dim) {
  const auto h = static_cast<uint64_t>(head), b = static_cast<uint64_t>(bit),
             d = static_cast<uint64_t>(dim);
  const double u1 = HyperUniform(HyperBits(seed, kHyperStreamProjection, h, b, d, 0));
  const double u2 = HyperUniform(HyperBits(seed, kHyperStreamProjection, h, b, d, 1));
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

// Step `step` of Floyd's sampling for query block `block` of the non-causal piece whose queries
// start at position `q_start` (distinct for every piece of one head), head `head`, batch `batch`:
// a uniform integer in [0, step] (step < 2^32).
inline int64_t HyperSampleDraw(uint64_t seed, int64_t batch, int64_t head, int64_t q_start,
                               int64_t block, int64_t step) {
  const uint64_t bits =
      HyperBits(seed, kHyperStreamSample, static_cast<uint64_t>(batch), static_cast<uint64_t>(head),
                static_cast<uint64_t>(q_start),
                static_cast<uint64_t>(block) * 0x100000000ull + static_cast<uint64_t>(step));
  const auto r = static_cast<int64_t>(HyperUniform(bits) * static_cast<double>(step + 1));
  return r > step ? step : r;
}

}  // namespace approx
}  // namespace tessera
