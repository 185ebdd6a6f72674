// SPDX-License-Identifier: Apache-2.0
// FastExp2 (simd/fast_exp-inl.h) on every SIMD target this file compiles and the CPU runs, against
// std::exp2 in double: the largest error in ulps over its whole domain, the values it promises
// exactly (powers of two, 0 for masked scores, the clamp at 2^127) and NaN propagation.
//
// The copies are called directly, one per target (foreach_target registers each below), rather
// than through dynamic dispatch: this test never changes which target the rest of the binary runs
// (TESSERA_TEST_TARGET, tests/test_main.cc).

// The registry of per-target copies: once, before foreach_target re-includes this file.
#ifndef TESSERA_SIMD_FAST_EXP_TEST_REGISTRY_
#define TESSERA_SIMD_FAST_EXP_TEST_REGISTRY_
#include <cstddef>
#include <cstdint>
#include <map>

namespace tessera {
namespace fast_exp_test {
// Writes FastExp2(x[i]) to out[i] for n a multiple of kBlock.
using Exp2Array = void (*)(const float* x, float* out, size_t n);
inline constexpr size_t kBlock = 64;  // a multiple of every target's float lane count
inline std::map<int64_t, Exp2Array>& Copies() {
  static std::map<int64_t, Exp2Array> copies;
  return copies;
}
inline bool Register(int64_t target, Exp2Array fn) {
  Copies()[target] = fn;
  return true;
}
}  // namespace fast_exp_test
}  // namespace tessera
#endif  // TESSERA_SIMD_FAST_EXP_TEST_REGISTRY_

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "simd/fast_exp_test.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include "simd/fast_exp-inl.h"

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

void FastExp2Array(const float* x, float* out, size_t n) {
  const hn::ScalableTag<float> df;
  const size_t lanes = hn::Lanes(df);
  for (size_t i = 0; i < n; i += lanes) hn::StoreU(FastExp2(df, hn::LoadU(df, x + i)), df, out + i);
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

// Outside the target's attributes: the registration runs at start-up on any CPU.
namespace tessera {
namespace HWY_NAMESPACE {
[[maybe_unused]] const bool kFastExp2Registered =
    fast_exp_test::Register(HWY_TARGET, &FastExp2Array);
}  // namespace HWY_NAMESPACE
}  // namespace tessera

#if HWY_ONCE
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace tessera {
namespace fast_exp_test {
namespace {

// Largest error of FastExp2 in float ulps of exp2(x), over the inputs whose result is a normal
// float (x in [-126, 127]). Measured: 0.92 ulp on the FMA targets (AVX2 and up), 1.14 on SSE4,
// SSSE3 and scalar (MulAdd is a multiply and an add there). A coefficient of 1, ln 2 or
// ln^2 2 / 2 off by 20 of its ulps gives 1.8 to 41 ulps (measured), past this bound; the higher
// ones, scaled by |f|^3 <= 1/8 and less, move the result by under 0.25 ulp.
constexpr double kMaxUlp = 1.25;

constexpr float kInf = std::numeric_limits<float>::infinity();

// Every (compiled, CPU-supported) target once, by name.
std::vector<int64_t> Targets() {
  std::vector<int64_t> targets;
  for (const auto& entry : Copies()) {
    if (hwy::SupportedTargets() & entry.first) targets.push_back(entry.first);
  }
  return targets;
}

std::string TargetParamName(const ::testing::TestParamInfo<int64_t>& info) {
  return hwy::TargetName(info.param);
}

class FastExp2 : public ::testing::TestWithParam<int64_t> {
 protected:
  // FastExp2 on this test's target, element by element.
  std::vector<float> Eval(std::vector<float> x) const {
    const size_t n = x.size();
    x.resize((n + kBlock - 1) / kBlock * kBlock, 0.0f);
    std::vector<float> out(x.size());
    Copies().at(GetParam())(x.data(), out.data(), x.size());
    out.resize(n);
    return out;
  }
  float Eval1(float x) const { return Eval({x})[0]; }
};

// The float ulp at a normal value `ref` (> 0): 2^(exponent - 23).
double UlpAt(double ref) {
  int e;
  std::frexp(ref, &e);  // ref = m 2^e, m in [0.5, 1)
  return std::ldexp(1.0, e - 1 - 23);
}

// The inputs of the accuracy sweep: a grid of step 2^-12 over [-126, 127], every float within 64
// ulps of each integer and half-integer (where round(x) switches and |f| reaches 0.5), tiny |x|
// (f near 0 in a binade of its own), and 2^20 uniform random floats.
std::vector<float> SweepInputs() {
  std::vector<float> x;
  for (int64_t i = -126 * 4096; i <= 127 * 4096; ++i) x.push_back(static_cast<float>(i) / 4096.0f);
  for (int64_t h = -252; h <= 254; ++h) {
    float a = static_cast<float>(h) / 2.0f, b = a;
    for (int k = 0; k < 64; ++k) {
      a = std::nextafter(a, -kInf);
      b = std::nextafter(b, kInf);
      if (a >= -126.0f) x.push_back(a);
      if (b <= 127.0f) x.push_back(b);
    }
  }
  for (int e = -149; e <= -1; ++e) {
    x.push_back(std::ldexp(1.0f, e));
    x.push_back(-std::ldexp(1.0f, e));
  }
  std::mt19937 rng(12345);
  std::uniform_real_distribution<float> uniform(-126.0f, 127.0f);
  for (int i = 0; i < (1 << 20); ++i) x.push_back(uniform(rng));
  return x;
}

// Largest ulp error over `x` (all with normal exp2), and where.
double MaxUlpError(const std::vector<float>& x, const std::vector<float>& got, float* worst_x) {
  double worst = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double ref = std::exp2(static_cast<double>(x[i]));
    const double err = std::fabs(static_cast<double>(got[i]) - ref) / UlpAt(ref);
    if (!(err <= worst)) {  // NaN counts as the worst
      worst = err;
      *worst_x = x[i];
    }
  }
  return worst;
}

TEST_P(FastExp2, WithinTheUlpBoundOverItsDomain) {
  const std::vector<float> x = SweepInputs();
  float worst_x = 0.0f;
  const double worst = MaxUlpError(x, Eval(x), &worst_x);
  RecordProperty("max_ulp", std::to_string(worst));
  EXPECT_LE(worst, kMaxUlp) << "at x = " << worst_x << " (" << x.size() << " inputs)";
}

// Integers give 2^n exactly (f = 0: the polynomial is exactly 1), 0 gives 1.
TEST_P(FastExp2, PowersOfTwoAreExact) {
  std::vector<float> x;
  for (int n = -126; n <= 127; ++n) x.push_back(static_cast<float>(n));
  x.push_back(-0.0f);
  const std::vector<float> got = Eval(x);
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(got[i], std::ldexp(1.0f, static_cast<int>(x[i]))) << "x = " << x[i];
  }
}

// Below the normal range: x < -126.5 (round(x) = -127, the exponent field 0) gives exactly +0,
// -inf included (the probability of a masked key), never -0 or NaN; x in [-126.5, -126) gives the
// subnormal p 2^-126, within kMaxUlp of the smallest subnormal.
TEST_P(FastExp2, UnderflowsToExactlyZero) {
  const std::vector<float> zeros = {
      -kInf,   -std::numeric_limits<float>::max(), -1e30f, -1000.0f, -200.0f, -128.0f,
      -127.0f, std::nextafter(-126.5f, -kInf)};
  const std::vector<float> got = Eval(zeros);
  for (size_t i = 0; i < zeros.size(); ++i) {
    EXPECT_EQ(got[i], 0.0f) << "x = " << zeros[i];
    EXPECT_FALSE(std::signbit(got[i])) << "x = " << zeros[i] << " gave -0";
  }
  std::vector<float> x;
  for (float v = -126.5f; v < -126.0f; v += 1.0f / 65536.0f) x.push_back(v);
  const std::vector<float> sub = Eval(x);
  const double smallest = std::ldexp(1.0, -149);
  for (size_t i = 0; i < x.size(); ++i) {
    const double ref = std::exp2(static_cast<double>(x[i]));
    EXPECT_LE(std::fabs(static_cast<double>(sub[i]) - ref), kMaxUlp * smallest)
        << "x = " << x[i] << ": got " << sub[i] << ", exp2 " << ref;
  }
}

// Above 127 the argument is clamped: exp2 gives 2^127 exactly, never inf.
TEST_P(FastExp2, ClampsAtTwoToThe127) {
  const std::vector<float> x = {127.0f,  std::nextafter(127.0f, kInf),      127.5f, 128.0f,
                                1000.0f, std::numeric_limits<float>::max(), kInf};
  const std::vector<float> got = Eval(x);
  for (size_t i = 0; i < x.size(); ++i) {
    EXPECT_EQ(got[i], std::ldexp(1.0f, 127)) << "x = " << x[i];
  }
}

// NaN stays NaN, next to finite lanes that stay correct (no lane leaks into another).
TEST_P(FastExp2, NanPropagates) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> x(kBlock);
  for (size_t i = 0; i < x.size(); ++i) x[i] = i % 3 == 0 ? nan : -static_cast<float>(i) / 8.0f;
  const std::vector<float> got = Eval(x);
  for (size_t i = 0; i < x.size(); ++i) {
    if (i % 3 == 0) {
      EXPECT_TRUE(std::isnan(got[i])) << "lane " << i << ": " << got[i];
    } else {
      const double ref = std::exp2(static_cast<double>(x[i]));
      EXPECT_LE(std::fabs(got[i] - ref), kMaxUlp * UlpAt(ref)) << "lane " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Targets, FastExp2, ::testing::ValuesIn(Targets()), TargetParamName);

}  // namespace
}  // namespace fast_exp_test
}  // namespace tessera
#endif  // HWY_ONCE
