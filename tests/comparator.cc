// SPDX-License-Identifier: Apache-2.0
#include "comparator.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "test_tensor.h"

namespace tessera {
namespace test {

::testing::AssertionResult CheckNonFinite(const std::vector<double>& got,
                                          const std::vector<double>& ref, const char* what) {
  if (got.size() != ref.size()) {
    return ::testing::AssertionFailure()
           << what << ": " << got.size() << " elements vs " << ref.size() << " in the reference";
  }
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], r = ref[i];
    if (std::isnan(r)) {
      return ::testing::AssertionFailure()
             << what << "[" << i << "]: the reference is NaN (got " << FormatDouble(g)
             << "); a test that expects NaN must say so";
    }
    if (std::isfinite(g) && std::isfinite(r)) continue;
    if (std::isinf(g) && std::isinf(r) && (g > 0) == (r > 0)) continue;
    return ::testing::AssertionFailure()
           << what << "[" << i << "]: got " << FormatDouble(g) << ", reference " << FormatDouble(r)
           << " (non-finite on one side or infinities of different sign)";
  }
  return ::testing::AssertionSuccess();
}

double MaxAbsError(const std::vector<double>& got, const std::vector<double>& ref) {
  double err = 0.0;
  for (size_t i = 0; i < got.size() && i < ref.size(); ++i) {
    if (std::isfinite(got[i]) && std::isfinite(ref[i])) {
      err = std::max(err, std::fabs(got[i] - ref[i]));
    }
  }
  return err;
}

double Nmse(const std::vector<double>& got, const std::vector<double>& ref) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < got.size() && i < ref.size(); ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(ref[i])) continue;
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  if (num == 0.0) return 0.0;
  return den == 0.0 ? std::numeric_limits<double>::infinity() : num / den;
}

double Ulp(DType dtype, double x) {
  const float a = RoundTo(dtype, static_cast<float>(std::fabs(x)));
  if (!std::isfinite(a)) return 0.0;
  float next;
  switch (dtype) {
    case DType::kF32:
      next = std::nextafter(a, std::numeric_limits<float>::infinity());
      break;
    case DType::kBF16:
      next = BF16ToFloat(static_cast<uint16_t>(FloatToBF16(a) + 1));
      break;
    case DType::kF16:
      next = F16ToFloat(static_cast<uint16_t>(FloatToF16(a) + 1));
      break;
    default:
      return 0.0;
  }
  if (!std::isfinite(next)) return 0.0;
  return static_cast<double>(next) - static_cast<double>(a);
}

double NoiseFloor(DType dtype, const std::vector<double>& ref) {
  const float shift = static_cast<float>(kNoiseFloorShift);
  double worst = 0.0, largest = 0.0;
  for (double r : ref) {
    if (!std::isfinite(r)) continue;
    largest = std::max(largest, std::fabs(r));
    const float x = RoundTo(dtype, static_cast<float>(r));
    const float y = RoundTo(dtype, RoundTo(dtype, x + shift) - shift);
    worst = std::max(worst, std::fabs(static_cast<double>(y) - static_cast<double>(x)));
  }
  // Where the shift is below one ulp (f16 values in the hundreds), x + 0.3 - 0.3 can round back
  // to x everywhere and the literal formula gives 0; the floor's intent, one rounding at the
  // reference's magnitude, is then half an ulp of the largest |ref|.
  return kNoiseFloorFactor * std::max(worst, 0.5 * Ulp(dtype, largest));
}

namespace {

// Index of the element with the largest |got - ref| (finite on both sides).
size_t WorstIndex(const std::vector<double>& got, const std::vector<double>& ref) {
  size_t worst = 0;
  double err = -1.0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(ref[i])) continue;
    const double e = std::fabs(got[i] - ref[i]);
    if (e > err) {
      err = e;
      worst = i;
    }
  }
  return worst;
}

// err(got) <= ratio * err(naive) + floor + extra_floor, or the `fallback` ceiling where the naive
// computation itself overflowed.
::testing::AssertionResult CheckRatio(DType dtype, const std::vector<double>& got,
                                      const std::vector<double>& ref,
                                      const std::vector<double>* naive, Ceiling fallback,
                                      const char* what, double ratio = kForwardRatio,
                                      double extra_floor = 0.0) {
  if (naive == nullptr || naive->size() != ref.size()) {
    return ::testing::AssertionFailure() << what << ": the ratio rule needs the naive output";
  }
  // A naive computation that overflows (inf or NaN where fp64 is finite) bounds nothing: the
  // ratio rule would compare with an infinite error. The dtype's ceiling applies instead.
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isfinite(ref[i]) && !std::isfinite((*naive)[i])) {
      return CheckClose(got, ref, fallback, what);
    }
  }
  const double err = MaxAbsError(got, ref);
  const double naive_err = MaxAbsError(*naive, ref);
  const double floor = NoiseFloor(dtype, ref) + extra_floor;
  const double bound = ratio * naive_err + floor;
  if (err <= bound) return ::testing::AssertionSuccess();
  const size_t w = WorstIndex(got, ref);
  return ::testing::AssertionFailure()
         << what << ": ratio rule failed: err " << FormatDouble(err) << " > " << ratio
         << " * naive err " << FormatDouble(naive_err) << " + floor " << FormatDouble(floor)
         << "; worst element " << w << ": got " << FormatDouble(got[w]) << ", ref "
         << FormatDouble(ref[w]);
}

}  // namespace

::testing::AssertionResult CheckClose(const std::vector<double>& got,
                                      const std::vector<double>& ref, Ceiling ceiling,
                                      const char* what) {
  ::testing::AssertionResult nf = CheckNonFinite(got, ref, what);
  if (!nf) return nf;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(ref[i])) continue;
    const double e = std::fabs(got[i] - ref[i]);
    const double limit = ceiling.atol + ceiling.rtol * std::fabs(ref[i]);
    if (!(e <= limit)) {
      return ::testing::AssertionFailure()
             << what << "[" << i << "]: got " << FormatDouble(got[i]) << ", ref "
             << FormatDouble(ref[i]) << ", |diff| " << FormatDouble(e) << " > atol " << ceiling.atol
             << " + rtol " << ceiling.rtol << " * |ref| (max abs error "
             << FormatDouble(MaxAbsError(got, ref)) << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult CheckOutput(DType dtype, const std::vector<double>& got,
                                       const std::vector<double>& ref,
                                       const std::vector<double>* naive, Rule rule,
                                       const std::vector<double>* magnitude) {
  ::testing::AssertionResult nf = CheckNonFinite(got, ref, "out");
  if (!nf) return nf;
  if (rule == Rule::kRatioOnly || dtype != DType::kF32) {
    ::testing::AssertionResult r = CheckRatio(dtype, got, ref, naive, OutputCeiling(dtype), "out");
    if (!r) return r;
  }
  if (rule == Rule::kRatioOnly) return ::testing::AssertionSuccess();

  ::testing::AssertionResult c = CheckClose(got, ref, OutputCeiling(dtype), "out (ceiling)");
  if (!c) return c;
  if (dtype == DType::kF32) {
    const double nmse = Nmse(got, ref);
    if (!(nmse <= kF32MaxNmse)) {
      return ::testing::AssertionFailure()
             << "out: NMSE " << FormatDouble(nmse) << " > " << kF32MaxNmse;
    }
    const bool have_mag = magnitude != nullptr && magnitude->size() == ref.size();
    for (size_t i = 0; i < got.size(); ++i) {
      const double mag = have_mag ? (*magnitude)[i] : std::fabs(ref[i]);
      if (!std::isfinite(ref[i]) || !(mag > kF32RelErrMinMagnitude)) continue;
      const double rel = std::fabs(got[i] - ref[i]) / mag;
      if (!(rel <= kF32MaxRelErr)) {
        return ::testing::AssertionFailure()
               << "out[" << i << "]: relative error " << FormatDouble(rel) << " > " << kF32MaxRelErr
               << " (got " << FormatDouble(got[i]) << ", ref " << FormatDouble(ref[i])
               << ", magnitude " << FormatDouble(mag) << ")";
      }
    }
  }
  return ::testing::AssertionSuccess();
}

Ceiling GradCeiling(DType dtype, bool gqa) {
  switch (dtype) {
    case DType::kF32:
      return kGradCeilingF32;
    case DType::kBF16:
      return gqa ? kGradCeilingBF16Gqa : kGradCeilingBF16;
    case DType::kF16:
      return kGradCeilingF16;
    default:  // mask dtypes carry no gradient
      break;
  }
  return kGradCeilingF32;
}

::testing::AssertionResult CheckGradient(DType dtype, const std::vector<double>& got,
                                         const std::vector<double>& ref,
                                         const std::vector<double>* naive,
                                         const std::vector<double>* magnitude, GradRule rule,
                                         const char* what) {
  ::testing::AssertionResult nf = CheckNonFinite(got, ref, what);
  if (!nf) return nf;
  const Ceiling ceiling = GradCeiling(dtype, rule.gqa);
  if (rule.rule == Rule::kRatioOnly || dtype != DType::kF32) {
    ::testing::AssertionResult r = CheckRatio(dtype, got, ref, naive, ceiling, what, kGradRatio,
                                              rule.softcap ? kGradSoftcapExtra : 0.0);
    if (!r) return r;
  }
  if (rule.rule == Rule::kRatioOnly) return ::testing::AssertionSuccess();

  const std::string ceiling_what = std::string(what) + " (ceiling)";
  ::testing::AssertionResult c = CheckClose(got, ref, ceiling, ceiling_what.c_str());
  if (!c) return c;
  if (dtype == DType::kF32) {
    // A gradient that cancels to exactly 0 everywhere (one visible key per row: dS = P (dP - D)
    // = 0) has no scale for NMSE; the ceilings and the magnitude rule bound the residue.
    double ref_energy = 0.0;
    for (double r : ref) ref_energy += std::isfinite(r) ? r * r : 0.0;
    const double nmse = ref_energy == 0.0 ? 0.0 : Nmse(got, ref);
    if (!(nmse <= kF32MaxNmse)) {
      return ::testing::AssertionFailure()
             << what << ": NMSE " << FormatDouble(nmse) << " > " << kF32MaxNmse;
    }
    const bool have_mag = magnitude != nullptr && magnitude->size() == ref.size();
    for (size_t i = 0; i < got.size(); ++i) {
      const double mag = have_mag ? (*magnitude)[i] : std::fabs(ref[i]);
      if (!std::isfinite(ref[i]) || !(mag > kF32RelErrMinMagnitude)) continue;
      const double rel = std::fabs(got[i] - ref[i]) / mag;
      if (!(rel <= kF32MaxRelErr)) {
        return ::testing::AssertionFailure()
               << what << "[" << i << "]: relative error " << FormatDouble(rel) << " > "
               << kF32MaxRelErr << " (got " << FormatDouble(got[i]) << ", ref "
               << FormatDouble(ref[i]) << ", magnitude " << FormatDouble(mag) << ")";
      }
    }
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult CheckLse(const std::vector<double>& got, const std::vector<double>& ref,
                                    const std::vector<double>* naive, Rule rule) {
  if (rule == Rule::kRatioOnly) {
    ::testing::AssertionResult nf = CheckNonFinite(got, ref, "lse");
    if (!nf) return nf;
    return CheckRatio(DType::kF32, got, ref, naive, kLseCeiling, "lse");
  }
  return CheckClose(got, ref, kLseCeiling, "lse");
}

}  // namespace test
}  // namespace tessera
