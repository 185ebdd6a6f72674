// SPDX-License-Identifier: Apache-2.0
// The AMX bf16 backward (flash_bwd_amx.cc): gradients against the fp64 reference under the bf16
// ratio rule (tests/tolerances.h) on lengths that are not multiples of the tiles, head dims
// 32..256, GQA, causal and window masks in both alignments, custom scales, batches, strided and
// misaligned views; bitwise determinism across thread counts; and the calls it leaves to the
// Highway kernel. Skipped where the CPU (or the OS) offers no AMX, or TESSERA_DISABLE_AMX is set.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "attention_cases.h"
#include "backward_runs.h"
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

using test::Bf16;
using test::Dense;
using test::Grads;
using test::Inputs;
using test::Layout;
using test::Outputs;
using test::RunBackward;
using test::RunBackwardOnly;
using test::SameBits;
using test::Spec;
using test::Tensor;

// Path::kAuto (the AMX kernel) against the fp64 reference gradients under the bf16 ratio rule.
void CheckAmx(const Spec& s) {
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = test::MakeBackwardInputs(s);
  const AttentionBackwardParams bp = test::MakeBackwardParams(s, in, nullptr, nullptr);
  const size_t nq = static_cast<size_t>(in.q.numel()), nk = static_cast<size_t>(in.k.numel());
  std::vector<double> dq(nq), dk(nk), dv(nk), naive_dq(nq), naive_dk(nk), naive_dv(nk);
  ref::AttentionBackwardF64(bp, dq.data(), dk.data(), dv.data());
  test::AttentionBackwardNaive(bp, naive_dq.data(), naive_dk.data(), naive_dv.data());
  Grads g;
  ASSERT_TRUE(RunBackward(s, in, Path::kAuto, 2, &g).ok());
  test::GradRule rule;
  rule.gqa = s.heads_q != s.heads_kv;
  EXPECT_TRUE(test::CheckGradient(s.dtype, g.dq.ToVector(), dq, &naive_dq, nullptr, rule, "dq"));
  EXPECT_TRUE(test::CheckGradient(s.dtype, g.dk.ToVector(), dk, &naive_dk, nullptr, rule, "dk"));
  EXPECT_TRUE(test::CheckGradient(s.dtype, g.dv.ToVector(), dv, &naive_dv, nullptr, rule, "dv"));
}

class AmxBackward : public ::testing::TestWithParam<Spec> {};

TEST_P(AmxBackward, MatchesReference) {
  SKIP_WITHOUT_AMX();
  CheckAmx(GetParam());
}

std::vector<Spec> AmxSpecs() {
  std::vector<Spec> specs;
  // Lengths that are not multiples of the 16-row tiles, 32-element chunks or 64-row blocks,
  // Sq != Sk both ways; 1 query row (a backward never takes the decode route).
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {1, 1}, {1, 17}, {17, 17}, {17, 100}, {100, 17}, {65, 130}, {100, 1000}, {1000, 100}};
  for (auto [sq, sk] : shapes) {
    for (int mask = 0; mask < 3; ++mask) {
      Spec s = Bf16(sq, sk, 2, 1, 64);
      s.causal = mask != 0;
      if (mask == 2) s.align = MaskAlign::kTopLeft;
      specs.push_back(s);
    }
  }
  for (int64_t d : {32, 64, 96, 128, 160, 256}) {
    Spec s = Bf16(130, 170, 2, 2, d);
    specs.push_back(s);
    s.causal = true;
    specs.push_back(s);
  }
  test::AppendSharedBf16Cases(&specs);
  {  // a batch
    Spec s = Bf16(70, 90, 4, 2, 64);
    s.batch = 3;
    specs.push_back(s);
  }
  // Strided and misaligned views of every tensor.
  for (Layout l :
       {Layout::kPaddedDim, Layout::kHeadSliced, Layout::kHeadsMajor, Layout::kSeqSliced}) {
    Spec s = Bf16(90, 110, 4, 2, 64);
    s.causal = true;
    s.in_layout = l;
    s.dout_layout = l;
    s.out_layout = l;
    s.grad_layout = l;
    s.misalign = 3;
    specs.push_back(s);
  }
  return test::Unique(specs);
}

INSTANTIATE_TEST_SUITE_P(Sweep, AmxBackward, ::testing::ValuesIn(AmxSpecs()), test::SpecName);

// Bitwise identical for 1, 2 and 3 threads and on repeats (the dQ partials are summed in an
// order fixed by the shape), and for strided against contiguous views.
TEST(AmxBackwardDeterminism, ThreadsRepeatsAndLayouts) {
  SKIP_WITHOUT_AMX();
  Spec strided = Bf16(300, 400, 4, 2, 128);
  strided.batch = 2;
  strided.causal = true;
  strided.in_layout = Layout::kHeadsMajor;
  strided.dout_layout = Layout::kPaddedDim;
  strided.grad_layout = Layout::kHeadSliced;
  strided.misalign = 1;
  const Inputs in_strided = test::MakeBackwardInputs(strided);
  const Spec s = test::ContiguousSpec(strided);
  const Inputs in = test::ContiguousInputs(strided, in_strided);
  Grads one;
  ASSERT_TRUE(RunBackward(s, in, Path::kAuto, 1, &one).ok());
  for (int32_t threads : {1, 2, 3}) {
    Grads again;
    ASSERT_TRUE(RunBackward(s, in, Path::kAuto, threads, &again).ok());
    EXPECT_TRUE(SameBits(one, again)) << threads << " threads";
  }
  Grads g;
  ASSERT_TRUE(RunBackward(strided, in_strided, Path::kAuto, 2, &g).ok());
  EXPECT_TRUE(SameBits(one, g));
}

// The AMX kernel runs on Path::kAuto (its bits differ from the Highway kernel's), and options it
// does not implement run the Highway kernel exactly as before (Path::kFast's bits).
TEST(AmxBackwardRouting, AutoRunsAmxAndFallbacksRunHighway) {
  SKIP_WITHOUT_AMX();
  const auto run = [](const Spec& s, const Inputs& in, Path path) {
    Grads g;
    EXPECT_TRUE(RunBackward(s, in, path, 2, &g).ok());
    return g;
  };
  {
    const Spec s = Bf16(100, 100, 2, 1, 64);
    const Inputs in = test::MakeBackwardInputs(s);
    EXPECT_FALSE(run(s, in, Path::kAuto).dk.BitwiseEqual(run(s, in, Path::kFast).dk));
  }
  std::vector<Spec> fallbacks;
  Spec softcap = Bf16(100, 100, 2, 1, 64);
  softcap.softcap = 20.0f;
  fallbacks.push_back(softcap);
  Spec alibi = Bf16(100, 100, 2, 1, 64);
  alibi.alibi = test::AlibiKind::kPerHead;
  fallbacks.push_back(alibi);
  fallbacks.push_back(Dense(100, 100, 2, 1, 64));
  Spec varlen = test::Varlen({40, 60}, {50, 70}, 2, 1, 64);
  varlen.dtype = DType::kBF16;
  fallbacks.push_back(varlen);
  for (const Spec& s : fallbacks) {
    SCOPED_TRACE(s.Name());
    const Inputs in = test::MakeBackwardInputs(s);
    EXPECT_TRUE(SameBits(run(s, in, Path::kAuto), run(s, in, Path::kFast)));
  }
  // A head dim that is not a multiple of 32 (72: generic instantiation on both paths).
  const Spec d72 = Bf16(100, 100, 2, 1, 72);
  const Inputs in72 = test::MakeBackwardInputs(d72);
  EXPECT_TRUE(SameBits(run(d72, in72, Path::kAuto), run(d72, in72, Path::kGeneric)));
}

// A forced SIMD target turns the AMX backward off (Path::kAuto runs that target's Highway kernel)
// until "auto" restores the default.
TEST(AmxBackwardRouting, ForcedSimdTargetRunsHighway) {
  SKIP_WITHOUT_AMX();
  const std::vector<std::string> targets = SupportedSimdTargets();
  ASSERT_GE(targets.size(), 2u);
  const Spec s = Bf16(100, 120, 2, 1, 64);
  const Inputs in = test::MakeBackwardInputs(s);
  Grads amx;
  ASSERT_TRUE(RunBackward(s, in, Path::kAuto, 2, &amx).ok());
  ASSERT_TRUE(SetSimdTarget(targets[1]).ok());
  EXPECT_FALSE(AmxEnabled());
  Grads forced_auto, forced_fast;
  const Status a = RunBackward(s, in, Path::kAuto, 2, &forced_auto);
  const Status b = RunBackward(s, in, Path::kFast, 2, &forced_fast);
  ASSERT_TRUE(SetSimdTarget("auto").ok());
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE(b.ok());
  EXPECT_TRUE(SameBits(forced_auto, forced_fast));
  EXPECT_FALSE(forced_auto.dk.BitwiseEqual(amx.dk));
  EXPECT_TRUE(AmxEnabled());
}

// The engine override of the tests: kNone forces the Highway backward, and so does the
// AVX512-BF16 engine (the backward only has an AMX kernel); clearing it restores AMX. Every
// backward here reads the same forward outputs.
TEST(AmxBackwardRouting, EngineOverrideRunsHighway) {
  SKIP_WITHOUT_AMX();
  const Spec s = Bf16(100, 120, 2, 1, 64);
  const Inputs in = test::MakeBackwardInputs(s);
  Outputs fwd;
  ASSERT_TRUE(test::RunForward(s, in, Path::kFast, 2, &fwd).ok());
  Grads amx, fast;
  ASSERT_TRUE(RunBackwardOnly(s, in, &fwd, Path::kAuto, 2, &amx).ok());
  ASSERT_TRUE(RunBackwardOnly(s, in, &fwd, Path::kFast, 2, &fast).ok());
  EXPECT_FALSE(amx.dk.BitwiseEqual(fast.dk));
  for (Bf16Dot engine : {Bf16Dot::kNone, Bf16Dot::kAvx512Bf16}) {
    SetBf16DotOverrideForTesting(engine);
    Grads g;
    const Status st = RunBackwardOnly(s, in, &fwd, Path::kAuto, 2, &g);
    ClearBf16DotOverrideForTesting();
    ASSERT_TRUE(st.ok());
    EXPECT_TRUE(SameBits(g, fast)) << static_cast<int>(engine);
  }
  Grads again;
  ASSERT_TRUE(RunBackwardOnly(s, in, &fwd, Path::kAuto, 2, &again).ok());
  EXPECT_TRUE(SameBits(again, amx));
}

}  // namespace
}  // namespace tessera
