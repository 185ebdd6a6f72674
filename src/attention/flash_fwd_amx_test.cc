// SPDX-License-Identifier: Apache-2.0
// The bf16 forward on a dot-product unit (flash_fwd_amx.cc), each engine the CPU has (AMX tiles,
// AVX512-BF16 vectors): against the fp64 reference under the bf16 ratio rule (tests/tolerances.h)
// on shapes with tile tails, head dims 32..256, GQA, causal and window masks in both alignments,
// strided and misaligned views; against the Highway kernel; bitwise determinism across thread
// counts and layouts; and the calls it leaves to the Highway kernel. An engine's tests are skipped
// where the CPU (or the OS) lacks it, or TESSERA_DISABLE_AMX / TESSERA_DISABLE_AVX512BF16 is set.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "attention_cases.h"
#include "bf16_engines.h"
#include "comparator.h"
#include "core/amx.h"
#include "naive_attention.h"
#include "ref/attention_ref.h"
#include "tessera/attention.h"
#include "tessera/context.h"
#include "tessera/system.h"
#include "test_util.h"
#include "tolerances.h"

namespace tessera {
namespace {

using test::Avx512Bf16Scope;
using test::Bf16;
using test::Dense;
using test::Inputs;
using test::Layout;
using test::MakeInputs;
using test::MakeParams;
using test::Outputs;
using test::RunForward;
using test::Spec;

// Path::kAuto (the AMX kernel) against fp64 under the bf16 rule, and against the Highway kernel
// (Path::kGeneric) within the identity ceiling.
void CheckAmx(const Spec& s) {
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeInputs(s);
  const AttentionParams p = MakeParams(s, in, nullptr);
  const int64_t rows = in.q.numel() / s.dim;
  std::vector<double> out(static_cast<size_t>(rows * s.dim)), lse(static_cast<size_t>(rows));
  std::vector<double> naive_out(out.size()), naive_lse(lse.size());
  ref::AttentionForwardF64(p, out.data(), lse.data());
  test::AttentionForwardNaive(p, naive_out.data(), naive_lse.data());

  Outputs amx, highway;
  ASSERT_TRUE(RunForward(s, in, Path::kAuto, 2, &amx).ok());
  ASSERT_TRUE(RunForward(s, in, Path::kGeneric, 2, &highway).ok());
  EXPECT_TRUE(test::CheckOutput(s.dtype, amx.out.ToVector(), out, &naive_out));
  EXPECT_TRUE(test::CheckClose(amx.out.ToVector(), highway.out.ToVector(),
                               test::IdentityCeiling(s.dtype), "AMX vs Highway"));
  if (s.with_lse) {
    EXPECT_TRUE(test::CheckLse(amx.lse.ToVector(), lse));
  }
}

class AmxForward : public ::testing::TestWithParam<Spec> {};

TEST_P(AmxForward, MatchesReference) {
  SKIP_WITHOUT_AMX();
  CheckAmx(GetParam());
}

class Avx512Bf16Forward : public ::testing::TestWithParam<Spec> {};

TEST_P(Avx512Bf16Forward, MatchesReference) {
  Avx512Bf16Scope scope;
  SKIP_WITHOUT_AVX512BF16(scope);
  CheckAmx(GetParam());
}

std::vector<Spec> AmxSpecs() {
  std::vector<Spec> specs;
  // Tails of every tile size (16 rows, 32-row groups, 32-key chunks, 128-key blocks, 128-row
  // tasks), Sq != Sk both ways; 17 rows is the smallest shape past the decode route.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {17, 17}, {17, 200}, {33, 31}, {100, 257}, {257, 100}, {129, 129}, {300, 520}};
  for (auto [sq, sk] : shapes) {
    for (int64_t d : {64, 128}) {
      for (int mask = 0; mask < 3; ++mask) {
        Spec s = Bf16(sq, sk, 2, 1, d);
        s.causal = mask != 0;
        if (mask == 2) s.align = MaskAlign::kTopLeft;
        specs.push_back(s);
      }
    }
  }
  for (int64_t d : {32, 96, 160, 256}) {
    Spec s = Bf16(130, 170, 2, 2, d);
    specs.push_back(s);
    s.causal = true;
    specs.push_back(s);
  }
  test::AppendSharedBf16Cases(&specs);
  {  // no LSE, a batch
    Spec s = Bf16(70, 90, 4, 2, 64);
    s.batch = 3;
    s.with_lse = false;
    specs.push_back(s);
  }
  // Strided and misaligned views.
  for (Layout l :
       {Layout::kPaddedDim, Layout::kHeadSliced, Layout::kHeadsMajor, Layout::kSeqSliced}) {
    Spec s = Bf16(90, 110, 4, 2, 64);
    s.causal = true;
    s.q_layout = l;
    s.kv_layout = l;
    s.out_layout = l == Layout::kSeqSliced ? Layout::kContiguous : l;
    s.misalign = 3;
    specs.push_back(s);
  }
  return test::Unique(specs);
}

INSTANTIATE_TEST_SUITE_P(Sweep, AmxForward, ::testing::ValuesIn(AmxSpecs()), test::SpecName);
INSTANTIATE_TEST_SUITE_P(Sweep, Avx512Bf16Forward, ::testing::ValuesIn(AmxSpecs()), test::SpecName);

// Bitwise identical for 1, 2 and 3 threads, on repeats, and for strided against contiguous views.
void CheckDeterminism() {
  Spec strided = Bf16(300, 400, 4, 2, 128);
  strided.batch = 2;
  strided.causal = true;
  strided.q_layout = Layout::kHeadsMajor;
  strided.kv_layout = Layout::kPaddedDim;
  strided.out_layout = Layout::kHeadSliced;
  strided.misalign = 1;
  const Inputs in_strided = MakeInputs(strided);
  const Spec s = test::ContiguousSpec(strided);
  const Inputs in = test::ContiguousInputs(strided, in_strided);
  Outputs one;
  ASSERT_TRUE(RunForward(s, in, Path::kAuto, 1, &one).ok());
  for (int32_t threads : {1, 2, 3}) {
    Outputs again;
    ASSERT_TRUE(RunForward(s, in, Path::kAuto, threads, &again).ok());
    EXPECT_TRUE(one.out.BitwiseEqual(again.out)) << threads << " threads";
    EXPECT_TRUE(one.lse.BitwiseEqual(again.lse)) << threads << " threads";
  }
  Outputs o;
  ASSERT_TRUE(RunForward(strided, in_strided, Path::kAuto, 2, &o).ok());
  EXPECT_TRUE(one.out.BitwiseEqual(o.out));
  EXPECT_TRUE(one.lse.BitwiseEqual(o.lse));
}

TEST(AmxForwardDeterminism, ThreadsRepeatsAndLayouts) {
  SKIP_WITHOUT_AMX();
  CheckDeterminism();
}

TEST(Avx512Bf16ForwardDeterminism, ThreadsRepeatsAndLayouts) {
  Avx512Bf16Scope scope;
  SKIP_WITHOUT_AVX512BF16(scope);
  CheckDeterminism();
}

// The two engines compute the same products in different orders: close, not equal.
TEST(Avx512Bf16ForwardRouting, EnginesAgreeAndDiffer) {
  SKIP_WITHOUT_AMX();
  Spec s = Bf16(150, 300, 4, 2, 128);
  s.causal = true;
  const Inputs in = MakeInputs(s);
  Outputs amx, vec;
  ASSERT_TRUE(RunForward(s, in, Path::kAuto, 2, &amx).ok());
  {
    Avx512Bf16Scope scope;
    SKIP_WITHOUT_AVX512BF16(scope);
    ASSERT_TRUE(RunForward(s, in, Path::kAuto, 2, &vec).ok());
  }
  EXPECT_FALSE(amx.out.BitwiseEqual(vec.out));
  EXPECT_TRUE(test::CheckClose(amx.out.ToVector(), vec.out.ToVector(),
                               test::IdentityCeiling(s.dtype), "AMX vs AVX512-BF16"));
}

// A copy of `t` whose head dim has stride 2 (every other element a NaN gap).
test::Tensor WithDimStride2(const test::Tensor& t) {
  std::vector<int64_t> strides(t.shape().size());
  int64_t stride = 2;
  for (size_t i = strides.size(); i-- > 0;) {
    strides[i] = stride;
    stride *= t.shape()[i];
  }
  test::Tensor r(t.dtype(), t.shape(), strides);
  t.ForEach([&](const test::Index& i) { r.Set(i, t.Get(i)); });
  return r;
}

// Head-dim strides other than 1 are gathered: the same bits as contiguous inputs.
TEST(AmxForwardDeterminism, HeadDimStrideIsGathered) {
  SKIP_WITHOUT_AMX();
  Spec s = Bf16(70, 150, 2, 1, 64);
  s.causal = true;
  const Inputs in = MakeInputs(s);
  const AttentionParams p = MakeParams(s, in, nullptr);
  Outputs want;
  ASSERT_TRUE(RunForward(s, in, Path::kAuto, 2, &want).ok());
  test::Tensor q = WithDimStride2(in.q), k = WithDimStride2(in.k), v = WithDimStride2(in.v);
  Outputs got = test::MakeOutputs(s, in);
  AttentionParams ps = p;
  ps.q = q.view();
  ps.k = k.view();
  ps.v = v.view();
  ps.out = got.out.view();
  ps.lse = got.lse.view();
  ASSERT_TRUE(AttentionForward(ps, Context{}).ok());
  EXPECT_TRUE(want.out.BitwiseEqual(got.out));
  EXPECT_TRUE(want.lse.BitwiseEqual(got.lse));
}

// The AMX kernel runs on Path::kAuto (its bits differ from the Highway kernel's), and options it
// does not implement run the Highway kernel exactly as before (Path::kFast's bits).
TEST(AmxForwardRouting, AutoRunsAmxAndFallbacksRunHighway) {
  SKIP_WITHOUT_AMX();
  const auto run = [](const Spec& s, const Inputs& in, Path path) {
    Outputs o;
    EXPECT_TRUE(RunForward(s, in, path, 2, &o).ok());
    return o;
  };
  {
    const Spec s = Bf16(100, 100, 2, 1, 64);
    const Inputs in = MakeInputs(s);
    EXPECT_FALSE(run(s, in, Path::kAuto).out.BitwiseEqual(run(s, in, Path::kFast).out));
  }
  std::vector<Spec> fallbacks;
  Spec softcap = Bf16(100, 100, 2, 1, 64);
  softcap.softcap = 20.0f;
  fallbacks.push_back(softcap);
  Spec alibi = Bf16(100, 100, 2, 1, 64);
  alibi.alibi = test::AlibiKind::kPerHead;
  fallbacks.push_back(alibi);
  Spec f32 = Dense(100, 100, 2, 1, 64);
  fallbacks.push_back(f32);
  Spec varlen = test::Varlen({40, 60}, {50, 70}, 2, 1, 64);
  varlen.dtype = DType::kBF16;
  fallbacks.push_back(varlen);
  for (const Spec& s : fallbacks) {
    SCOPED_TRACE(s.Name());
    const Inputs in = MakeInputs(s);
    const Outputs a = run(s, in, Path::kAuto), b = run(s, in, Path::kFast);
    EXPECT_TRUE(a.out.BitwiseEqual(b.out));
    EXPECT_TRUE(a.lse.BitwiseEqual(b.lse));
  }
  // A head dim that is not a multiple of 32 (72: generic instantiation on both paths).
  const Spec d72 = Bf16(100, 100, 2, 1, 72);
  const Inputs in72 = MakeInputs(d72);
  EXPECT_TRUE(run(d72, in72, Path::kAuto).out.BitwiseEqual(run(d72, in72, Path::kGeneric).out));
}

// A forced SIMD target turns the AMX kernel off until "auto" restores the default.
TEST(AmxForwardRouting, ForcedSimdTargetDisablesAmx) {
  SKIP_WITHOUT_AMX();
  const std::vector<std::string> targets = SupportedSimdTargets();
  ASSERT_GE(targets.size(), 2u);
  ASSERT_TRUE(SetSimdTarget(targets[1]).ok());
  EXPECT_FALSE(AmxEnabled());
  EXPECT_EQ(Bf16DotEngine(), Bf16Dot::kNone);
  ASSERT_TRUE(SetSimdTarget("auto").ok());
  EXPECT_TRUE(AmxEnabled());
  EXPECT_EQ(Bf16DotEngine(), Bf16Dot::kAmx);
}

// The bf16 engine: the probe measures a positive rate ratio exactly where the CPU has
// AVX512-BF16; the engine chosen is AMX where enabled, else follows the probe; overrides force an
// engine only where it is usable and are cleared again.
TEST(Bf16DotEngine, FollowsProbeAndOverrides) {
  const double speedup = Avx512Bf16SpeedupOverFma();
  EXPECT_EQ(speedup > 0.0, Avx512Bf16Supported()) << speedup;
  const Bf16Dot chosen = Bf16DotEngine();
  if (AmxEnabled()) {
    EXPECT_EQ(chosen, Bf16Dot::kAmx);
  } else {
    EXPECT_EQ(chosen, Avx512Bf16Usable() && speedup >= 1.3 ? Bf16Dot::kAvx512Bf16 : Bf16Dot::kNone);
  }
  SetBf16DotOverrideForTesting(Bf16Dot::kNone);
  EXPECT_EQ(Bf16DotEngine(), Bf16Dot::kNone);
  SetBf16DotOverrideForTesting(Bf16Dot::kAvx512Bf16);
  EXPECT_EQ(Bf16DotEngine(), Avx512Bf16Usable() ? Bf16Dot::kAvx512Bf16 : Bf16Dot::kNone);
  ClearBf16DotOverrideForTesting();
  EXPECT_EQ(Bf16DotEngine(), chosen);
}

}  // namespace
}  // namespace tessera
