// SPDX-License-Identifier: Apache-2.0
// Internal: the log-sum-exp merge of one row's attention states, shared by MergeStates and the
// decode kernel's split reduction.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace tessera {

// Merges `parts` states of one row: lse[r] and O_r = row(r, buffer), a pointer to dim f32 values
// (its own, or `buffer`, dim floats it may fill). Writes the merged O to out[0..dim) and returns
// the merged LSE. Parts are summed in ascending r; empty parts (LSE = -inf) are skipped, so their
// O is never read; all-empty gives (0, -inf); a NaN LSE poisons the row. LSEs are natural-log,
// or base 2 when `base2`. LseT is float (MergeStates) or double (decode's internal partials,
// whose LSEs near -2e4 would lose 1e-3 to f32 rounding).
template <class LseT, class RowOf>
float MergeStateRow(int64_t parts, const LseT* lse, size_t dim, const RowOf& row, float* buffer,
                    float* out, bool base2 = false) {
  constexpr LseT kNegInf = -std::numeric_limits<LseT>::infinity();
  auto exp_fn = [base2](double x) { return base2 ? std::exp2(x) : std::exp(x); };
  auto log_fn = [base2](double x) { return base2 ? std::log2(x) : std::log(x); };
  LseT max_lse = kNegInf;
  for (int64_t r = 0; r < parts; ++r) {
    const LseT l = lse[r];
    if (!std::isnan(max_lse) && (std::isnan(l) || l > max_lse)) max_lse = l;
  }
  for (size_t c = 0; c < dim; ++c) out[c] = 0.0f;
  if (max_lse == kNegInf) return -std::numeric_limits<float>::infinity();
  double sum = 0.0;
  for (int64_t r = 0; r < parts; ++r) sum += exp_fn(double(lse[r]) - max_lse);
  const LseT merged = static_cast<LseT>(max_lse + log_fn(sum));
  bool first = true;
  for (int64_t r = 0; r < parts; ++r) {
    if (lse[r] == kNegInf) continue;
    const float w = static_cast<float>(exp_fn(double(lse[r]) - double(merged)));
    // The first part is assigned, not added to 0, so a lone part (weight 1) comes back bitwise,
    // signed zeros included. Whole rows at a time, so the loops vectorize.
    const float* x = row(r, buffer);
    if (first) {
      for (size_t c = 0; c < dim; ++c) out[c] = w * x[c];
    } else {
      for (size_t c = 0; c < dim; ++c) out[c] += w * x[c];
    }
    first = false;
  }
  return static_cast<float>(merged);
}

}  // namespace tessera
