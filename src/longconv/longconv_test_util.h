// SPDX-License-Identifier: Apache-2.0
// Test helper of the long-convolution suites (longconv_test, h3_test, ssm_test).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace tessera {
namespace test {

// max |got - ref| / max |ref|: the error relative to the output's scale. A non-finite output
// fails outright (std::max would skip a NaN).
template <typename T>
double RelErrorToScale(const std::vector<T>& got, const std::vector<double>& ref) {
  double err = 0.0, scale = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double x = static_cast<double>(got[i]);
    if (!std::isfinite(x)) return std::numeric_limits<double>::infinity();
    err = std::max(err, std::abs(x - ref[i]));
    scale = std::max(scale, std::abs(ref[i]));
  }
  return scale > 0.0 ? err / scale : err;
}

}  // namespace test
}  // namespace tessera
