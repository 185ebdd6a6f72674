// SPDX-License-Identifier: Apache-2.0
// The comparator: how a kernel's output, LSE or gradient is judged against the fp64 reference
// (the rules and their thresholds are in tolerances.h), and the non-finite policy every check
// shares.
#pragma once

#include <gtest/gtest.h>

#include <vector>

#include "tessera/types.h"
#include "tolerances.h"

namespace tessera {
namespace test {

// Comparator policy on non-finite values: fails when NaN or +-inf occurs on exactly one side,
// when infinities differ in sign, or when the reference is NaN (a test that expects NaN checks
// it explicitly). Both sides equal infinities pass.
::testing::AssertionResult CheckNonFinite(const std::vector<double>& got,
                                          const std::vector<double>& ref, const char* what);

// max |got - ref| over elements finite on both sides.
double MaxAbsError(const std::vector<double>& got, const std::vector<double>& ref);
// sum (got - ref)^2 / sum ref^2 over finite elements (0 when both sums are 0).
double Nmse(const std::vector<double>& got, const std::vector<double>& ref);
// 2 * max |(ref + 0.3 - 0.3) - ref| evaluated in `dtype` (ref rounded to dtype first), and at
// least one ulp of the largest |ref| (see the comment in the .cc).
double NoiseFloor(DType dtype, const std::vector<double>& ref);
// Distance from |x| (rounded to `dtype`) to the next larger value of the dtype; 0 at the top.
double Ulp(DType dtype, double x);

enum class Rule {
  kStandard,   // f32: ceilings + NMSE + relative error; bf16/f16: ratio rule + ceilings
  kRatioOnly,  // ill-conditioned inputs (huge logits or values): ratio rule, any dtype
};

// Checks a forward output (values converted to double from `dtype`) against the fp64 reference.
// `naive` is the naive same-precision output, required for bf16/f16 and for kRatioOnly.
// `magnitude` is sum_j p_ij |v_jd| per element (the fp64 reference run on |V|), the scale of the
// fp32 relative-error rule (tolerances.h); without it |ref| is used.
::testing::AssertionResult CheckOutput(DType dtype, const std::vector<double>& got,
                                       const std::vector<double>& ref,
                                       const std::vector<double>* naive,
                                       Rule rule = Rule::kStandard,
                                       const std::vector<double>* magnitude = nullptr);
// Checks an LSE against the fp64 reference (kLseCeiling; -inf must match exactly). Under
// kRatioOnly the naive same-precision LSE bounds the error instead.
::testing::AssertionResult CheckLse(const std::vector<double>& got, const std::vector<double>& ref,
                                    const std::vector<double>* naive = nullptr,
                                    Rule rule = Rule::kStandard);
// Element-wise |got - ref| <= atol + rtol * |ref|, with the non-finite policy.
::testing::AssertionResult CheckClose(const std::vector<double>& got,
                                      const std::vector<double>& ref, Ceiling ceiling,
                                      const char* what);

// The gradient ceiling of a dtype (tolerances.h); `gqa` selects the looser bf16 GQA ceiling.
Ceiling GradCeiling(DType dtype, bool gqa);

// How CheckGradient judges one gradient.
struct GradRule {
  Rule rule = Rule::kStandard;
  bool softcap = false;  // the ratio rule's floor gains kGradSoftcapExtra
  bool gqa = false;      // bf16 GQA ceiling
};

// Checks a gradient (dq, dk or dv; values converted to double from `dtype`) against the fp64
// reference:
//   bf16/f16 and kRatioOnly: err <= kGradRatio * err(naive) + floor (+ kGradSoftcapExtra);
//   kStandard: the gradient ceiling of the dtype, and for f32 NMSE <= kF32MaxNmse and a relative
//   error <= kF32MaxRelErr against `magnitude` (AttentionBackwardMagnitude) where it exceeds
//   kF32RelErrMinMagnitude.
// `naive` (AttentionBackwardNaive) is required for bf16/f16 and for kRatioOnly.
::testing::AssertionResult CheckGradient(DType dtype, const std::vector<double>& got,
                                         const std::vector<double>& ref,
                                         const std::vector<double>* naive,
                                         const std::vector<double>* magnitude, GradRule rule,
                                         const char* what);

}  // namespace test
}  // namespace tessera
