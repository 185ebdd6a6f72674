// SPDX-License-Identifier: Apache-2.0
#include "ref/longconv_ref.h"

#include <cstdint>

namespace tessera {
namespace ref {
namespace {

double At(const TensorView& t, int64_t i0, int64_t i1, int64_t i2) {
  const float* p = static_cast<const float*>(t.data);
  return static_cast<double>(p[i0 * t.strides[0] + i1 * t.strides[1] + i2 * t.strides[2]]);
}

}  // namespace

std::vector<double> LongConvF64(const LongConvParams& p) {
  const int64_t B = p.u.shape[0], N = p.u.shape[1], C = p.u.shape[2], L = p.filter.shape[0];
  std::vector<double> y(static_cast<size_t>(B * N * C), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < N; ++t) {
      for (int64_t c = 0; c < C; ++c) {
        double acc = 0.0;
        for (int64_t s = 0; s <= t && s < L; ++s) {
          acc += At(p.filter, s, c, 0) * At(p.u, b, t - s, c);
        }
        if (p.bias.data != nullptr) acc += At(p.bias, c, 0, 0) * At(p.u, b, t, c);
        y[static_cast<size_t>((b * N + t) * C + c)] = acc;
      }
    }
  }
  return y;
}

}  // namespace ref
}  // namespace tessera
