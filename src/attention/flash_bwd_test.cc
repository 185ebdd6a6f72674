// SPDX-License-Identifier: Apache-2.0
// The exact backward (AttentionBackward), every path forced in turn (Context.path) against the
// fp64 reference gradients with the gradient rules of tests/tolerances.h; the reference itself
// against fp64 central finite differences of the fp64 forward; the bug-class regressions that
// concern gradients; the bitwise guarantees (repeats, thread counts); and the validation of the
// backward's own arguments.
//
// Each backward call is preceded by the forward on the same path (its out and lse feed the
// backward, as in training). Gradients are written into NaN-prefilled tensors surrounded by
// 1 KiB guards; padding inside strided inputs is NaN too, so a kernel that reads or writes outside
// a view fails loudly.
//
// TESSERA_SMALL_TESTS=1 (sanitizer builds) shrinks the heavy shapes but keeps tile tails;
// TESSERA_SEED=<n> changes every random input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "attention_cases.h"
#include "backward_runs.h"
#include "core/attention_problem.h"
#include "path_harness.h"
#include "ref/attention_ref.h"
#include "tessera/attention.h"
#include "tessera/context.h"
#include "test_util.h"
#include "tolerances.h"

namespace tessera {
namespace {

using test::AlibiKind;
using test::Dense;
using test::Grads;
using test::Index;
using test::Inputs;
using test::Layout;
using test::MakeBackwardInputs;
using test::MakeBackwardParams;
using test::MakeGrads;
using test::MakeParams;
using test::MakeTensor;
using test::NeedsNaive;
using test::Outputs;
using test::PathsFor;
using test::Rng;
using test::Rule;
using test::RunBackward;
using test::RunBackwardOnly;
using test::RunForwardFor;
using test::SameBits;
using test::Spec;
using test::SpecName;
using test::Tensor;
using test::TokenShape;
using test::Unique;
using test::Varlen;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

bool Small() { return test::SmallTests(); }

// ---------------------------------------------------------------------------------------------
// Running the backward (the test problems and their inputs are in tests/attention_cases.h).

// fp64 reference gradients, and the naive same-precision ones / the magnitudes where a rule needs
// them, in the layouts of ref::AttentionBackwardF64. Rows outside every varlen sequence stay NaN.
struct Reference {
  std::vector<double> dq, dk, dv;
  std::vector<double> naive_dq, naive_dk, naive_dv;
  std::vector<double> mag_dq, mag_dk, mag_dv;
};

Reference ComputeReference(const Spec& s, const Inputs& in) {
  Reference r;
  const AttentionBackwardParams bp = MakeBackwardParams(s, in, nullptr, nullptr);
  const size_t nq = static_cast<size_t>(in.q.numel()), nk = static_cast<size_t>(in.k.numel());
  auto alloc = [&](std::vector<double>* a, std::vector<double>* b, std::vector<double>* c) {
    a->assign(nq, kNaN);
    b->assign(nk, kNaN);
    c->assign(nk, kNaN);
  };
  alloc(&r.dq, &r.dk, &r.dv);
  ref::AttentionBackwardF64(bp, r.dq.data(), r.dk.data(), r.dv.data());
  if (NeedsNaive(s)) {
    alloc(&r.naive_dq, &r.naive_dk, &r.naive_dv);
    test::AttentionBackwardNaive(bp, r.naive_dq.data(), r.naive_dk.data(), r.naive_dv.data());
  }
  if (s.dtype == DType::kF32 && s.rule == Rule::kStandard) {
    alloc(&r.mag_dq, &r.mag_dk, &r.mag_dv);
    test::AttentionBackwardMagnitude(bp, r.mag_dq.data(), r.mag_dk.data(), r.mag_dv.data());
  }
  return r;
}

// Checks one run's gradients against the references under the spec's rule.
void ExpectMatchesReference(const Spec& s, const Inputs& in, const Reference& ref, const Grads& g) {
  test::GradRule rule;
  rule.rule = s.rule;
  rule.softcap = s.softcap > 0.0f;
  rule.gqa = s.heads_q != s.heads_kv;
  std::vector<double> outside;
  const struct {
    const char* name;
    const Tensor* got;
    const std::vector<double>* want;
    const std::vector<double>* naive;
    const std::vector<double>* mag;
    int64_t covered, tokens;
  } grads[] = {
      {"dq", &g.dq, &ref.dq, &ref.naive_dq, &ref.mag_dq, in.covered_q(), in.tokens_q},
      {"dk", &g.dk, &ref.dk, &ref.naive_dk, &ref.mag_dk, in.covered_k(), in.tokens_k},
      {"dv", &g.dv, &ref.dv, &ref.naive_dv, &ref.mag_dv, in.covered_k(), in.tokens_k},
  };
  for (const auto& x : grads) {
    const std::vector<double> got = test::Prefix(x.got->ToVector(), x.covered, x.tokens, &outside);
    const std::vector<double> want = test::Prefix(*x.want, x.covered, x.tokens, nullptr);
    const std::vector<double> naive = x.naive->empty()
                                          ? std::vector<double>{}
                                          : test::Prefix(*x.naive, x.covered, x.tokens, nullptr);
    const std::vector<double> mag =
        x.mag->empty() ? std::vector<double>{} : test::Prefix(*x.mag, x.covered, x.tokens, nullptr);
    EXPECT_TRUE(test::CheckGradient(s.dtype, got, want, naive.empty() ? nullptr : &naive,
                                    mag.empty() ? nullptr : &mag, rule, x.name));
  }
  // Rows of tokens outside every sequence keep their NaN prefill.
  size_t written = 0;
  for (double x : outside) written += !std::isnan(x);
  EXPECT_EQ(written, 0u) << "gradient elements of tokens outside every sequence were written";
}

// The backward as an entry point of the shared harness (tests/path_harness.h).
struct BackwardEntry {
  using Reference = ::tessera::Reference;
  using Result = Grads;
  static Inputs MakeInputs(const Spec& s) { return MakeBackwardInputs(s); }
  static Reference ComputeReference(const Spec& s, const Inputs& in) {
    return ::tessera::ComputeReference(s, in);
  }
  static Status Run(const Spec& s, const Inputs& in, Path path, int32_t threads, Grads* g) {
    return RunBackward(s, in, path, threads, g);
  }
  static void ExpectMatchesReference(const Spec& s, const Inputs& in, const Reference& ref,
                                     const Grads& g) {
    ::tessera::ExpectMatchesReference(s, in, ref, g);
  }
};

// The main check: every path against the fp64 reference.
void CheckAllPaths(const Spec& s, const Inputs& in) { test::CheckAllPaths<BackwardEntry>(s, in); }
void CheckAllPaths(const Spec& s) { test::CheckAllPaths<BackwardEntry>(s); }

// Every element of dq, dk and dv is finite (the failure names each gradient that is not).
::testing::AssertionResult AllFinite(const Grads& g) {
  ::testing::AssertionResult all = ::testing::AssertionSuccess();
  for (const auto& [name, t] :
       {std::pair<const char*, const Tensor*>{"dq", &g.dq}, {"dk", &g.dk}, {"dv", &g.dv}}) {
    const ::testing::AssertionResult r = t->AllFinite();
    if (!r) {
      if (all) all = ::testing::AssertionFailure();
      all << name << ": " << r.message() << "; ";
    }
  }
  return all;
}

// ---------------------------------------------------------------------------------------------
// The reference against fp64 central finite differences of the fp64 forward reference.
//
// Loss L = sum over covered out elements of out * dout. Every input value is a multiple of 2^-6
// of modest size and the steps are 2^-8 and 2^-9, so q +- h is exact in f32 and the forward
// reference sees exactly the perturbed value. Richardson extrapolation of the two central
// differences leaves an O(h^4) truncation error.

double Loss(const Spec& s, const Inputs& in) {
  const AttentionParams p = MakeParams(s, in, nullptr);
  std::vector<double> out(static_cast<size_t>(in.q.numel()), 0.0);
  ref::AttentionForwardF64(p, out.data(), nullptr);
  const std::vector<double> dout = in.dout.ToVector();
  double loss = 0.0;
  for (size_t i = 0; i < out.size(); ++i) loss += out[i] * dout[i];
  return loss;
}

// Rounds every element to a multiple of 2^-6 in [-4, 4].
void Quantize(Tensor* t) {
  t->ForEach([&](const Index& i) {
    t->Set(i, std::clamp(std::round(t->Get(i) * 64.0) / 64.0, -4.0, 4.0));
  });
}

std::vector<double> FiniteDifferences(const Spec& s, Inputs* in, Tensor* x) {
  return test::FiniteDifferenceGradient(x, [&] { return Loss(s, *in); });
}

std::vector<Spec> FiniteDifferenceSpecs() {
  std::vector<Spec> specs;
  specs.push_back(Dense(5, 7, 2, 2, 8));
  Spec s = Dense(5, 8, 2, 1, 8);  // causal, Lq < Lk
  s.causal = true;
  specs.push_back(s);
  s = Dense(8, 5, 2, 2, 4);  // causal, Lq > Lk: fully masked rows
  s.causal = true;
  specs.push_back(s);
  s.align = MaskAlign::kTopLeft;  // top-left: every row sees a key
  specs.push_back(s);
  s = Dense(6, 8, 4, 2, 8);  // window
  s.window_left = 2;
  s.window_right = 1;
  specs.push_back(s);
  s = Dense(6, 7, 2, 1, 8);  // softcap reached: logits of a few units against a cap of 1
  s.softcap = 1.0f;
  s.q_mult = 3.0;
  specs.push_back(s);
  s = Dense(6, 7, 4, 1, 8);  // ALiBi per head, GQA 4:1
  s.alibi = AlibiKind::kPerHead;
  specs.push_back(s);
  s = Dense(7, 5, 4, 2, 4);  // ALiBi per batch with causal
  s.batch = 2;
  s.alibi = AlibiKind::kPerBatch;
  s.causal = true;
  specs.push_back(s);
  s = Dense(4, 6, 2, 1, 3);  // custom negative scale
  s.scale = -0.7f;
  specs.push_back(s);
  s = Varlen({3, 0, 5, 2}, {4, 3, 0, 6}, 2, 1, 4);  // an empty query sequence and one without keys
  s.causal = true;
  specs.push_back(s);
  s = Varlen({4, 6}, {6, 3}, 4, 2, 5);  // everything at once
  s.softcap = 1.5f;
  s.q_mult = 2.0;
  s.alibi = AlibiKind::kPerBatch;
  s.window_left = 3;
  s.window_right = 0;
  s.align = MaskAlign::kTopLeft;
  specs.push_back(s);
  return specs;
}

TEST(BackwardReference, MatchesFiniteDifferences) {
  for (const Spec& s : FiniteDifferenceSpecs()) {
    SCOPED_TRACE(test::Repro(s.Name()));
    Inputs in = MakeBackwardInputs(s);
    for (Tensor* t : {&in.q, &in.k, &in.v, &in.dout}) Quantize(t);
    const Reference ref = ComputeReference(s, in);
    EXPECT_TRUE(test::CheckClose(ref.dq, FiniteDifferences(s, &in, &in.q),
                                 test::kFiniteDifferenceCeiling, "dq vs finite differences"));
    EXPECT_TRUE(test::CheckClose(ref.dk, FiniteDifferences(s, &in, &in.k),
                                 test::kFiniteDifferenceCeiling, "dk vs finite differences"));
    EXPECT_TRUE(test::CheckClose(ref.dv, FiniteDifferences(s, &in, &in.v),
                                 test::kFiniteDifferenceCeiling, "dv vs finite differences"));
    // The gradients are not all ~0 (a case that tests nothing).
    double largest = 0.0;
    for (double x : ref.dq) largest = std::max(largest, std::fabs(x));
    EXPECT_GT(largest, 1e-2);
  }
}

// The naive same-precision backward is an honest f32 implementation: it meets the f32 gradient
// rules (that is what makes those rules achievable for a kernel).
TEST(BackwardReference, NaiveF32MeetsTheF32Rules) {
  for (bool causal : {false, true}) {
    Spec s = Dense(113, 203, 4, 2, 64);
    s.causal = causal;
    SCOPED_TRACE(test::Repro(s.Name()));
    const Inputs in = MakeBackwardInputs(s);
    const Reference ref = ComputeReference(s, in);
    std::vector<double> dq(ref.dq.size()), dk(ref.dk.size()), dv(ref.dv.size());
    test::AttentionBackwardNaive(MakeBackwardParams(s, in, nullptr, nullptr), dq.data(), dk.data(),
                                 dv.data());
    test::GradRule rule;
    rule.gqa = true;
    EXPECT_TRUE(test::CheckGradient(DType::kF32, dq, ref.dq, nullptr, &ref.mag_dq, rule, "dq"));
    EXPECT_TRUE(test::CheckGradient(DType::kF32, dk, ref.dk, nullptr, &ref.mag_dk, rule, "dk"));
    EXPECT_TRUE(test::CheckGradient(DType::kF32, dv, ref.dv, nullptr, &ref.mag_dv, rule, "dv"));
  }
}

// ---------------------------------------------------------------------------------------------
// The parameterized sweep: one test per spec, every path against fp64.

class Backward : public ::testing::TestWithParam<Spec> {};

TEST_P(Backward, MatchesReferenceOnEveryPath) { CheckAllPaths(GetParam()); }

// Sequence lengths 1, 17, 113, 203 for queries and keys independently (q > k and q < k), with
// and without a causal mask.
std::vector<Spec> ShapeSpecs() {
  std::vector<int64_t> lens = {1, 17, 113, 203};
  if (Small()) lens = {1, 17, 65};
  std::vector<Spec> specs;
  for (int64_t sq : lens) {
    for (int64_t sk : lens) {
      for (bool causal : {false, true}) {
        Spec s = Dense(sq, sk, 2, 1, 64);
        s.causal = causal;
        specs.push_back(s);
      }
    }
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Shapes, Backward, ::testing::ValuesIn(ShapeSpecs()), SpecName);

// Head dims 1, 40, 64, 72, 128, 256 on tile-tail lengths.
std::vector<Spec> HeadDimSpecs() {
  std::vector<Spec> specs;
  std::vector<std::pair<int64_t, int64_t>> shapes = {{17, 113}, {113, 17}};
  if (Small()) shapes = {{17, 65}};
  for (int64_t d : {1, 40, 64, 72, 128, 256}) {
    for (auto [sq, sk] : shapes) {
      for (bool causal : {false, true}) {
        Spec s = Dense(sq, sk, 2, 1, d);
        s.causal = causal;
        specs.push_back(s);
      }
    }
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(HeadDims, Backward, ::testing::ValuesIn(HeadDimSpecs()), SpecName);

// Every dtype: f32 with the ceilings, NMSE and relative rules; bf16/f16 with the ratio rule
// against the naive same-precision backward and the ceilings.
std::vector<Spec> DTypeSpecs() {
  std::vector<Spec> specs;
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int64_t d : {40, 64, 128, 256}) {
      for (bool causal : {false, true}) {
        // q < k with causal (bottom-right: every key seen), q > k without.
        Spec s = causal ? Dense(65, 129, 4, 2, d, dt) : Dense(129, 65, 4, 2, d, dt);
        if (Small()) s = Dense(17, 33, 4, 2, d, dt);
        s.causal = causal;
        specs.push_back(s);
      }
    }
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(DTypes, Backward, ::testing::ValuesIn(DTypeSpecs()), SpecName);

// GQA head mapping (class 16): 8:1, 6:2 and the class-16 list, Lq in {1, 17}, dK/dV summed over
// the group's query heads.
std::vector<Spec> GqaSpecs() {
  std::vector<std::pair<int64_t, int64_t>> heads = {{8, 8},  {8, 1},  {8, 2},  {6, 2},  {6, 3},
                                                    {12, 4}, {48, 2}, {40, 2}, {65, 5}, {27, 1}};
  std::vector<Spec> specs;
  for (auto [hq, hkv] : heads) {
    for (int64_t sq : {1, 17}) {
      Spec s = Dense(sq, 37, hq, hkv, 64);
      s.causal = true;
      specs.push_back(s);
    }
  }
  for (DType dt : {DType::kBF16, DType::kF16}) {
    Spec s = Dense(33, 65, 8, 1, 64, dt);
    s.causal = true;
    specs.push_back(s);
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Gqa, Backward, ::testing::ValuesIn(GqaSpecs()), SpecName);

// Masks: none, causal in both alignments, windows (0,0), (1,0), (0,1), (w,w), (Lk,0), causal +
// left window, one-sided windows, on q < k, q > k and q = k.
std::vector<Spec> MaskSpecs() {
  test::Shapes shapes = {{17, 113}, {113, 17}, {65, 65}};
  if (Small()) shapes = {{17, 40}, {40, 17}};
  std::vector<Spec> specs = test::MaskSweep(shapes, /*random_windows=*/0);
  // Low precision under masks that leave rows with few visible keys.
  for (DType dt : {DType::kBF16, DType::kF16}) {
    for (MaskAlign align : {MaskAlign::kBottomRight, MaskAlign::kTopLeft}) {
      Spec s = Dense(40, 17, 2, 1, 72, dt);
      s.causal = true;
      s.align = align;
      specs.push_back(s);
      s.causal = false;
      s.window_left = s.window_right = 5;
      specs.push_back(s);
    }
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Masks, Backward, ::testing::ValuesIn(MaskSpecs()), SpecName);

// Softcap 50 with q scaled by 50 so that the logits reach the cap (FlashAttention's test): the
// ratio rule with kGradSoftcapExtra, for every dtype (logits of ~50 make f32 itself
// ill-conditioned at the ceilings' level). A cap that is rarely reached keeps the f32 rules.
std::vector<Spec> SoftcapSpecs() {
  std::vector<Spec> specs;
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (bool causal : {false, true}) {
      Spec s = Dense(Small() ? 17 : 65, Small() ? 33 : 129, 2, 1, 64, dt);
      s.causal = causal;
      s.softcap = 50.0f;
      s.q_mult = 50.0;
      if (dt == DType::kF32) s.rule = Rule::kRatioOnly;
      specs.push_back(s);
    }
  }
  Spec s = Dense(65, 129, 2, 1, 64);
  s.softcap = 30.0f;
  s.causal = true;
  specs.push_back(s);
  s = Dense(65, 129, 4, 2, 72);  // a cap that bends most logits, no q scaling: f32 rules
  s.softcap = 1.0f;
  specs.push_back(s);
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Softcap, Backward, ::testing::ValuesIn(SoftcapSpecs()), SpecName);

// ALiBi slopes [Hq] and [B, Hq], with and without causal, both alignments; and ALiBi together
// with softcap and a window.
INSTANTIATE_TEST_SUITE_P(Alibi, Backward,
                         ::testing::ValuesIn(Unique(test::AlibiSweep({{17, 65}, {65, 17}}))),
                         SpecName);

// Custom scales, including 0 (every visible key weighs the same) and a negative one.
INSTANTIATE_TEST_SUITE_P(Scale, Backward, ::testing::ValuesIn(Unique(test::ScaleSweep(33, 65))),
                         SpecName);

// Varlen: zero-length sequences, Lq >> Lk, fewer tokens than sequences (class 6), tokens past
// the last sequence that must stay untouched (dq and dk/dv), both layouts.
std::vector<Spec> VarlenSpecs() {
  const int32_t big = Small() ? 65 : 203;
  std::vector<Spec> specs = test::VarlenSweep({
      {{0, 0, 0}, {0, 0, 0}},
      {{1, big, 1, 1}, {1, big, 1, 1}},
      {{76, 34, 146}, {1, 1, 1}},
      {{3, 0, 17, 0, 5}, {0, 4, 20, 0, 9}},
      {{17, 113, 1}, {113, 17, 40}},
  });
  // Rank-4 views, ALiBi per sequence, a window, softcap, bf16, a generic head dim.
  Spec s = test::VarlenMix();
  specs.push_back(s);
  s.softcap = 3.0f;
  s.extra_k_tokens = 4;
  specs.push_back(s);
  s.dtype = DType::kBF16;
  s.varlen_rank4 = false;
  s.extra_q_tokens = 5;
  specs.push_back(s);
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Varlen, Backward, ::testing::ValuesIn(VarlenSpecs()), SpecName);

// Tile tails (class 5): lengths around the usual tile sizes 32, 64 and 128 on either side,
// with NaN padding inside the inputs so a read past a row's head dim shows up.
std::vector<Spec> TailSpecs() {
  // Around the kernel's tiles: 96-key blocks (flash_bwd-inl.h kKeyBlock), 128-row query tiles
  // and 128-key forward tiles, and the SIMD widths below them.
  std::vector<int64_t> lens = {31, 32,  33,  63,  64,  65,  95,  96,
                               97, 127, 128, 129, 191, 193, 255, 257};
  if (Small()) lens = {31, 33, 63, 65, 97, 129};
  std::vector<Spec> specs;
  for (int64_t l : lens) {
    for (bool q_side : {true, false}) {
      Spec s = Dense(q_side ? l : 33, q_side ? 33 : l, 2, 1, 40);
      s.causal = true;
      s.in_layout = Layout::kPaddedDim;
      specs.push_back(s);
    }
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Tails, Backward, ::testing::ValuesIn(TailSpecs()), SpecName);

// ---------------------------------------------------------------------------------------------
// Identities.

// GQA = MHA with K/V repeated G times: dK/dV of a KV head are the sums of the repeated heads'.
TEST(BackwardIdentity, GqaEqualsRepeatedKv) {
  for (auto [hq, hkv] : {std::pair<int64_t, int64_t>{8, 2}, {6, 2}, {8, 1}}) {
    Spec s = Dense(17, 37, hq, hkv, 64);
    s.causal = true;
    SCOPED_TRACE(test::Repro(s.Name()));
    const Inputs in = MakeBackwardInputs(s);
    Spec mha;
    const Inputs rep = test::WithRepeatedKv(s, in, &mha);
    const int64_t group = hq / hkv;
    for (Path path : PathsFor(s.dim)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Grads a, b;
      ASSERT_TRUE(RunBackward(s, in, path, 0, &a).ok());
      ASSERT_TRUE(RunBackward(mha, rep, path, 0, &b).ok());
      EXPECT_TRUE(test::CheckClose(a.dq.ToVector(), b.dq.ToVector(),
                                   test::GradCeiling(s.dtype, false), "dq GQA vs repeated"));
      for (const auto& pair :
           {std::pair<const Tensor*, const Tensor*>{&a.dk, &b.dk}, {&a.dv, &b.dv}}) {
        std::vector<double> summed(static_cast<size_t>(pair.first->numel()), 0.0);
        size_t n = 0;
        pair.first->ForEach([&](const Index& i) {
          for (int64_t h = i[2] * group; h < (i[2] + 1) * group; ++h) {
            summed[n] += pair.second->Get({i[0], i[1], h, i[3]});
          }
          ++n;
        });
        EXPECT_TRUE(test::CheckClose(pair.first->ToVector(), summed,
                                     test::GradCeiling(s.dtype, false),
                                     "dk/dv GQA vs summed repeated heads"));
      }
    }
  }
}

// Varlen = a loop over single dense sequences (an identity, not promised bitwise: the gradient
// ceiling of the dtype against the dense runs).
TEST(BackwardIdentity, VarlenEqualsLoopOfSequences) {
  Spec s = Varlen({17, 0, 40, 5}, {33, 7, 40, 0}, 4, 2, 64);
  s.causal = true;
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeBackwardInputs(s);
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Grads all;
    ASSERT_TRUE(RunBackward(s, in, path, 0, &all).ok());
    for (size_t b = 0; b < s.seqlens_q.size(); ++b) {
      SCOPED_TRACE("sequence " + std::to_string(b));
      const int64_t q0 = in.cu_q[b], lq = s.seqlens_q[b], k0 = in.cu_k[b], lk = s.seqlens_k[b];
      Spec one = Dense(lq, lk, s.heads_q, s.heads_kv, s.dim);
      one.causal = true;
      Inputs single = MakeBackwardInputs(one);
      single.q = test::SliceTokens(in.q, q0, lq);
      single.dout = test::SliceTokens(in.dout, q0, lq);
      single.k = test::SliceTokens(in.k, k0, lk);
      single.v = test::SliceTokens(in.v, k0, lk);
      Grads alone;
      ASSERT_TRUE(RunBackward(one, single, path, 0, &alone).ok());
      const struct {
        const char* name;
        const Tensor* part;
        const Tensor* whole;
        int64_t t0;
      } grads[] = {{"dq", &alone.dq, &all.dq, q0},
                   {"dk", &alone.dk, &all.dk, k0},
                   {"dv", &alone.dv, &all.dv, k0}};
      for (const auto& x : grads) {
        const Tensor whole = test::SliceTokens(*x.whole, x.t0, x.part->shape(1));
        EXPECT_TRUE(test::CheckClose(whole.ToVector(), x.part->ToVector(),
                                     test::GradCeiling(s.dtype, false), x.name));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Bug-class regressions.

// Fully masked rows (class 1): dq rows exactly 0, no NaN anywhere; keys no row sees get
// dk = dv = 0 exactly.
TEST(BackwardRegression, FullyMaskedRows) {
  std::vector<Spec> specs = test::FullyMaskedSpecs(Small() ? 100 : 300);
  Spec wide = Dense(17, 113, 2, 1, 64);  // top-left causal, Lq < Lk: keys >= 17 seen by nobody
  wide.causal = true;
  wide.align = MaskAlign::kTopLeft;
  specs.push_back(wide);
  Spec right_only = Dense(64, 40, 2, 2, 40);  // window (0, -1), top-left: rows 40.. see nothing
  right_only.window_left = 0;
  right_only.window_right = -1;
  right_only.align = MaskAlign::kTopLeft;
  specs.push_back(right_only);

  for (const Spec& s : specs) {
    SCOPED_TRACE(test::Repro(s.Name()));
    const Inputs in = MakeBackwardInputs(s);
    int64_t empty_rows = 0, unseen_keys = 0;
    for (int64_t i = 0; i < s.seq_q; ++i) empty_rows += test::VisibleKeys(s, i) == 0;
    for (int64_t j = 0; j < s.seq_k; ++j) unseen_keys += !test::KeySeen(s, j);
    if (s.seq_q != s.seq_k) {  // the square band is PyTorch's regression: every row sees keys
      EXPECT_GT(empty_rows + unseen_keys, 0) << "the case lost its point";
    }
    CheckAllPaths(s, in);
    for (Path path : PathsFor(s.dim)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Grads g;
      ASSERT_TRUE(RunBackward(s, in, path, 0, &g).ok());
      EXPECT_TRUE(AllFinite(g));
      for (int64_t i = 0; i < s.seq_q; ++i) {
        if (test::VisibleKeys(s, i) != 0) continue;
        for (int64_t h = 0; h < s.heads_q; ++h) {
          for (int64_t d = 0; d < s.dim; ++d) {
            ASSERT_EQ(g.dq.Get({0, i, h, d}), 0.0) << "dq row " << i << " head " << h;
          }
        }
      }
      for (int64_t j = 0; j < s.seq_k; ++j) {
        if (test::KeySeen(s, j)) continue;
        for (int64_t h = 0; h < s.heads_kv; ++h) {
          for (int64_t d = 0; d < s.dim; ++d) {
            ASSERT_EQ(g.dk.Get({0, j, h, d}), 0.0) << "dk key " << j << " head " << h;
            ASSERT_EQ(g.dv.Get({0, j, h, d}), 0.0) << "dv key " << j << " head " << h;
          }
        }
      }
    }
  }
}

// Varlen with every 4th sequence having no keys: those rows get dq = 0, neighbours unaffected.
TEST(BackwardRegression, FullyMaskedVarlenSequences) {
  Spec s = test::EveryFourthSequenceWithoutKeys();
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeBackwardInputs(s);
  CheckAllPaths(s, in);
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Grads g;
    ASSERT_TRUE(RunBackward(s, in, path, 0, &g).ok());
    EXPECT_TRUE(AllFinite(g));
    for (size_t b = 0; b < s.seqlens_q.size(); b += 4) {
      for (int64_t t = in.cu_q[b]; t < in.cu_q[b + 1]; ++t) {
        for (int64_t h = 0; h < s.heads_q; ++h) {
          for (int64_t d = 0; d < s.dim; ++d) ASSERT_EQ(g.dq.Get({t, h, d}), 0.0);
        }
      }
    }
  }
}

// Sk = 0: every row has no key, dq = 0 (§4.2); dk and dv are empty.
TEST(BackwardRegression, NoKeys) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    Spec s = Dense(17, 0, 4, 2, 64, dt);
    s.batch = 2;
    SCOPED_TRACE(s.Name());
    const Inputs in = MakeBackwardInputs(s);
    for (Path path : PathsFor(s.dim)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Grads g;
      ASSERT_TRUE(RunBackward(s, in, path, 0, &g).ok());
      for (double x : g.dq.ToVector()) ASSERT_EQ(x, 0.0);
    }
  }
}

// Runs an empty backward on every path: exits 0 when each call succeeds and leaves the gradients
// bitwise untouched, 1 otherwise (inside EXPECT_EXIT, see test::RunOnEveryPathAndExit).
void RunEmptyBackwardAndExit(const AttentionBackwardParams& p,
                             const std::vector<const Tensor*>& grads, int64_t dim) {
  test::RunOnEveryPathAndExit([&](const Context& ctx) { return AttentionBackward(p, ctx); }, grads,
                              dim);
}

// B = 0 and Sq = Sk = 0 succeed without touching anything (empty problems are no-ops), with the
// natural row-major strides of the empty tensors (which contain zeros) and with all-non-zero
// strides; so does a varlen call with zero sequences.
TEST(BackwardRegression, EmptyProblemsAreNoOps) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  std::vector<Spec> specs;
  Spec s = Dense(17, 33, 2, 1, 64);
  s.batch = 0;
  specs.push_back(s);
  s = Dense(0, 0, 2, 1, 40);
  s.causal = true;
  specs.push_back(s);
  for (const Spec& e : specs) {
    for (bool natural_strides : {true, false}) {
      SCOPED_TRACE(e.Name() + (natural_strides ? " natural strides" : " non-zero strides"));
      const Inputs in = MakeBackwardInputs(e);
      Outputs fwd;
      ASSERT_TRUE(RunForwardFor(e, in, Path::kReference, &fwd).ok());
      Grads g = MakeGrads(e, in);
      if (!natural_strides) {
        for (Tensor* t : {&g.dq, &g.dk, &g.dv}) {
          *t = Tensor(e.dtype, t->shape(), test::StridesIgnoringEmptyDims(t->shape()));
        }
      }
      const AttentionBackwardParams p = MakeBackwardParams(e, in, &fwd, &g);
      EXPECT_EXIT(RunEmptyBackwardAndExit(p, {&g.dq, &g.dk, &g.dv}, e.dim),
                  ::testing::ExitedWithCode(0), "");
    }
  }
  // Varlen with zero sequences over a non-empty token axis: nothing belongs to a sequence.
  Tensor q(DType::kF32, {5, 2, 64}), k(DType::kF32, {4, 1, 64}), val(DType::kF32, {4, 1, 64});
  Tensor out(DType::kF32, {5, 2, 64}), lse(DType::kF32, {2, 5}), dout(DType::kF32, {5, 2, 64});
  Tensor dq(DType::kF32, {5, 2, 64}), dk(DType::kF32, {4, 1, 64}), dv(DType::kF32, {4, 1, 64});
  Rng rng(1);
  for (Tensor* t : {&q, &k, &val, &out, &lse, &dout}) t->FillNormal(rng);
  const std::vector<int32_t> cu = {0};
  AttentionBackwardParams p;
  p.forward.q = q.view();
  p.forward.k = k.view();
  p.forward.v = val.view();
  p.forward.out = out.view();
  p.forward.lse = lse.view();
  p.forward.cu_seqlens_q = test::I32View(cu);
  p.forward.cu_seqlens_k = test::I32View(cu);
  p.forward.num_seqs = 0;
  p.dout = dout.view();
  p.dq = dq.view();
  p.dk = dk.view();
  p.dv = dv.view();
  EXPECT_EXIT(RunEmptyBackwardAndExit(p, {&dq, &dk, &dv}, 64), ::testing::ExitedWithCode(0), "");
}

// Sq = 0 or Hq = 0 with keys present: no query sees any key, so dk = dv = 0 (attention.h), and
// dq (empty) is untouched.
TEST(BackwardRegression, NoQueriesGiveZeroKeyGradients) {
  std::vector<Spec> specs = {Dense(0, 33, 2, 1, 64), Dense(17, 33, 0, 1, 64)};
  specs[1].batch = 2;
  for (const Spec& s : specs) {
    SCOPED_TRACE(s.Name());
    const Inputs in = MakeBackwardInputs(s);
    for (Path path : PathsFor(s.dim)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Grads g;
      ASSERT_TRUE(RunBackward(s, in, path, 0, &g).ok());
      EXPECT_EQ(g.dq.numel(), 0);
      for (double x : g.dk.ToVector()) ASSERT_EQ(x, 0.0);
      for (double x : g.dv.ToVector()) ASSERT_EQ(x, 0.0);
    }
  }
}

// Path::kFast exists only for D in {64, 128, 256}; elsewhere the backward is an error and the
// gradients are untouched.
TEST(BackwardRegression, FastPathRejectsOtherHeadDims) {
  for (int64_t d : {1, 40, 63, 72, 96, 512}) {
    Spec s = Dense(17, 17, 2, 1, d);
    SCOPED_TRACE(s.Name());
    const Inputs in = MakeBackwardInputs(s);
    Outputs fwd;
    ASSERT_TRUE(RunForwardFor(s, in, Path::kFast, &fwd).ok());  // runs on kGeneric
    Grads g = MakeGrads(s, in);
    Context ctx;
    ctx.path = Path::kFast;
    const Status st = AttentionBackward(MakeBackwardParams(s, in, &fwd, &g), ctx);
    EXPECT_FALSE(st.ok());
    EXPECT_TRUE(st.code() == StatusCode::kUnimplemented ||
                st.code() == StatusCode::kInvalidArgument)
        << st.ToString();
    EXPECT_FALSE(st.message().empty());
    EXPECT_TRUE(g.dq.Unchanged());
    EXPECT_TRUE(g.dk.Unchanged());
    EXPECT_TRUE(g.dv.Unchanged());
  }
}

// Gradients with gaps (padded rows, head and token slices), pre-filled with NaN inside 1 KiB
// guards (class 18): every element written and finite, gaps and guards untouched (RunBackward
// checks gaps and guards on every call), and the values bitwise those of contiguous gradients.
TEST(BackwardRegression, OutputPoisonAndGuards) {
  for (Layout layout :
       {Layout::kPaddedDim, Layout::kHeadSliced, Layout::kSeqSliced, Layout::kHeadsMajor}) {
    Spec s = Dense(65, 129, 4, 2, 72);
    s.batch = 2;
    s.causal = true;
    s.grad_layout = layout;
    SCOPED_TRACE(test::Repro(s.Name()));
    const Inputs in = MakeBackwardInputs(s);
    Spec contiguous = s;
    contiguous.grad_layout = Layout::kContiguous;
    for (Path path : PathsFor(s.dim)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Grads g, c;
      ASSERT_TRUE(RunBackward(s, in, path, 0, &g).ok());
      EXPECT_TRUE(AllFinite(g));
      ASSERT_TRUE(RunBackward(contiguous, in, path, 0, &c).ok());
      EXPECT_TRUE(SameBits(g, c));
    }
  }
  // Varlen: gradients of tokens outside every sequence keep their NaN (checked against the
  // reference by ExpectMatchesReference), padded layout.
  Spec v = Varlen({9, 0, 30}, {12, 5, 30}, 2, 1, 64);
  v.extra_q_tokens = 4;
  v.extra_k_tokens = 3;
  v.grad_layout = Layout::kPaddedDim;
  CheckAllPaths(v);
}

// Runs `s` and the same problem in contiguous, aligned storage (a contiguous copy of `in`) on
// every path: the gradients must be bitwise equal.
void ExpectSameBitsAsContiguous(const Spec& s, const Inputs& in) {
  const Spec dense = test::ContiguousSpec(s);
  const Inputs copy = test::ContiguousInputs(s, in);
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Grads strided, contiguous;
    ASSERT_TRUE(RunBackward(s, in, path, 0, &strided).ok());
    ASSERT_TRUE(RunBackward(dense, copy, path, 0, &contiguous).ok());
    EXPECT_TRUE(SameBits(strided, contiguous));
  }
}

// Strided views of q, k, v, out and the gradients (class 10): bitwise equal to the contiguous
// run on the same path.
TEST(BackwardRegression, StrideMatrix) {
  struct Variant {
    Layout in, out, grad;
  };
  const std::vector<Variant> variants = {
      {Layout::kPaddedDim, Layout::kPaddedDim, Layout::kPaddedDim},
      {Layout::kHeadsMajor, Layout::kHeadSliced, Layout::kSeqSliced},
      {Layout::kSeqSliced, Layout::kHeadsMajor, Layout::kHeadSliced},
      {Layout::kBatchBroadcast, Layout::kContiguous, Layout::kHeadsMajor},
  };
  for (DType dt : {DType::kF32, DType::kBF16}) {
    for (const Variant& var : variants) {
      Spec s = Dense(Small() ? 17 : 65, Small() ? 33 : 129, 4, 2, 64, dt);
      s.batch = 2;
      s.causal = true;
      s.in_layout = var.in;
      s.out_layout = var.out;
      s.grad_layout = var.grad;
      SCOPED_TRACE(test::Repro(s.Name()));
      ExpectSameBitsAsContiguous(s, MakeBackwardInputs(s));
    }
  }
}

// The upstream gradient with strides unlike out's (class 20): contiguous, transposed-like
// (heads-major storage), strided slices of a bigger tensor (token slice, head slice, padded
// rows) and a stride-0 batch, each bitwise equal to the run with a contiguous copy of dout.
TEST(BackwardRegression, UpstreamGradientStrides) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    for (Layout layout : {Layout::kContiguous, Layout::kHeadsMajor, Layout::kSeqSliced,
                          Layout::kHeadSliced, Layout::kPaddedDim, Layout::kBatchBroadcast}) {
      Spec s = Dense(Small() ? 17 : 65, Small() ? 33 : 129, 4, 2, 64, dt);
      s.batch = 2;
      s.causal = true;
      s.dout_layout = layout;
      SCOPED_TRACE(test::Repro(s.Name()));
      const Inputs in = MakeBackwardInputs(s);
      ExpectSameBitsAsContiguous(s, in);
      if (layout == Layout::kHeadsMajor) CheckAllPaths(s, in);
    }
  }
}

// Base pointers 1, 2 and 3 elements past 64-byte alignment (class 11): correct, and bitwise
// equal to the aligned run on the same path.
TEST(BackwardRegression, MisalignedPointers) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    for (int64_t offset : {1, 3}) {
      Spec s = Dense(33, 65, 2, 1, 64, dt);
      s.causal = true;
      s.misalign = offset;
      SCOPED_TRACE(test::Repro(s.Name()));
      ExpectSameBitsAsContiguous(s, MakeBackwardInputs(s));
    }
  }
}

// A NaN in an unmasked q element is not hidden (class 17): the gradients of that row's query and
// of the keys it sees are NaN.
TEST(BackwardRegression, NanInQueryIsNotHidden) {
  Spec s = Dense(40, 40, 4, 2, 64);
  s.causal = true;
  SCOPED_TRACE(test::Repro(s.Name()));
  Inputs in = MakeBackwardInputs(s);
  const int64_t row = 21, head = 3;  // KV head 1; sees keys 0..21
  in.q.Set({0, row, head, 7}, kNaN);
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Grads g;
    ASSERT_TRUE(RunBackward(s, in, path, 0, &g).ok());
    EXPECT_TRUE(std::isnan(g.dq.Get({0, row, head, 0})));
    EXPECT_TRUE(std::isnan(g.dk.Get({0, 0, 1, 0})));
    EXPECT_TRUE(std::isnan(g.dv.Get({0, row, 1, 0})));
    // Query rows of the other KV head are not touched by it.
    EXPECT_TRUE(std::isfinite(g.dq.Get({0, row, 0, 0})));
  }
}

// ---------------------------------------------------------------------------------------------
// Determinism: bitwise identical repeats and thread counts.

// 50 repeated backward runs are bitwise identical (class 12).
TEST(BackwardDeterminism, RepeatedRunsAreBitwiseIdentical) {
  Spec s = Dense(Small() ? 33 : 113, Small() ? 33 : 113, 4, 4, 64);
  s.batch = 2;
  s.causal = true;
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeBackwardInputs(s);
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    const int repeats = path == Path::kReference || Small() ? 3 : 50;
    Outputs fwd;
    ASSERT_TRUE(RunForwardFor(s, in, path, &fwd).ok());
    Grads first;
    ASSERT_TRUE(RunBackwardOnly(s, in, &fwd, path, 0, &first).ok());
    for (int r = 1; r < repeats; ++r) {
      Grads again;
      ASSERT_TRUE(RunBackwardOnly(s, in, &fwd, path, 0, &again).ok());
      ASSERT_TRUE(SameBits(first, again)) << "repeat " << r;
    }
  }
}

// Races need many concurrent tasks to show: forward + backward repeated 50 times at batch 60,
// each repeat on 2 threads, bitwise identical.
TEST(BackwardDeterminism, RepeatedForwardBackwardAtBatch60) {
  Spec s = Dense(17, 23, 4, 2, 16);
  s.batch = 60;
  s.causal = true;
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeBackwardInputs(s);
  Outputs fwd_first;
  ASSERT_TRUE(RunForwardFor(s, in, Path::kAuto, &fwd_first).ok());
  Grads first;
  ASSERT_TRUE(RunBackwardOnly(s, in, &fwd_first, Path::kAuto, 2, &first).ok());
  const int repeats = Small() ? 5 : 50;
  for (int r = 1; r < repeats; ++r) {
    Outputs fwd;
    ASSERT_TRUE(RunForwardFor(s, in, Path::kAuto, &fwd).ok());
    ASSERT_EQ(fwd.out.ToVector(), fwd_first.out.ToVector()) << "forward, repeat " << r;
    Grads again;
    ASSERT_TRUE(RunBackwardOnly(s, in, &fwd, Path::kAuto, 2, &again).ok());
    ASSERT_TRUE(SameBits(first, again)) << "repeat " << r;
  }
}

// Thread-count invariance (class 13): 1, 2 and 3 threads give the same bits.
TEST(BackwardDeterminism, ThreadCountInvariance) {
  std::vector<Spec> specs;
  for (int64_t d : {40, 64}) {
    Spec s = Dense(Small() ? 65 : 129, Small() ? 65 : 203, 8, 2, d);
    s.batch = 2;
    s.causal = true;
    specs.push_back(s);
  }
  // Varlen with very uneven sequences, where the split of work across threads matters most.
  Spec v = Varlen({1, 150, 3, 64, 0, 129}, {200, 150, 3, 1, 7, 129}, 4, 1, 64);
  v.causal = true;
  specs.push_back(v);
  for (const Spec& s : specs) {
    SCOPED_TRACE(test::Repro(s.Name()));
    const Inputs in = MakeBackwardInputs(s);
    for (Path path : PathsFor(s.dim)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Outputs fwd;
      ASSERT_TRUE(RunForwardFor(s, in, path, &fwd).ok());
      Grads one;
      ASSERT_TRUE(RunBackwardOnly(s, in, &fwd, path, 1, &one).ok());
      for (int32_t threads : {2, 3}) {
        Grads many;
        ASSERT_TRUE(RunBackwardOnly(s, in, &fwd, path, threads, &many).ok());
        EXPECT_TRUE(SameBits(one, many)) << threads << " threads";
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Validation: every bad backward argument gives kInvalidArgument with a
// message naming it, on every path and from ValidateAttentionBackward directly, and no gradient
// is written.

constexpr int64_t kB = 2, kSq = 5, kSk = 7, kHq = 4, kHkv = 2, kD = 8;
constexpr double kSentinel = -7.25;

class BackwardValidation : public ::testing::Test {
 protected:
  BackwardValidation() {
    Rng rng(20250101);
    auto input = [&](DType dt, std::vector<int64_t> shape) {
      Tensor t(dt, std::move(shape));
      t.FillNormal(rng);
      return t;
    };
    q_ = input(DType::kF32, {kB, kSq, kHq, kD});
    k_ = input(DType::kF32, {kB, kSk, kHkv, kD});
    v_ = input(DType::kF32, {kB, kSk, kHkv, kD});
    dout_ = input(DType::kF32, {kB, kSq, kHq, kD});
    out_ = Tensor(DType::kF32, {kB, kSq, kHq, kD});
    lse_ = Tensor(DType::kF32, {kB, kHq, kSq});
    dq_ = Gradient(DType::kF32, {kB, kSq, kHq, kD});
    dk_ = Gradient(DType::kF32, {kB, kSk, kHkv, kD});
    dv_ = Gradient(DType::kF32, {kB, kSk, kHkv, kD});
    AttentionParams& f = params_.forward;
    f.q = q_.view();
    f.k = k_.view();
    f.v = v_.view();
    f.out = out_.view();
    f.lse = lse_.view();
    f.causal = true;
    Context ctx;
    ctx.path = Path::kReference;
    EXPECT_TRUE(AttentionForward(f, ctx).ok());
    params_.dout = dout_.view();
    params_.dq = dq_.view();
    params_.dk = dk_.view();
    params_.dv = dv_.view();
  }

  static Tensor Gradient(DType dtype, std::vector<int64_t> shape) {
    Tensor t(dtype, std::move(shape));
    t.FillSlots(kSentinel);
    t.Snapshot();
    return t;
  }

  // `p` must be rejected with `code` and a message naming `arg`; no gradient may change (those
  // of the fixture and any in `extra`).
  void ExpectRejected(const AttentionBackwardParams& p, const std::string& arg,
                      const std::vector<const Tensor*>& extra = {},
                      StatusCode code = StatusCode::kInvalidArgument) {
    AttentionBackwardProblem problem;
    const Status direct = ValidateAttentionBackward(p, &problem);
    EXPECT_EQ(direct.code(), code) << "ValidateAttentionBackward: " << direct.ToString();
    std::vector<const Tensor*> grads = {&dq_, &dk_, &dv_};
    grads.insert(grads.end(), extra.begin(), extra.end());
    test::ExpectRejectedOnEveryPath([&](const Context& ctx) { return AttentionBackward(p, ctx); },
                                    code, arg, grads);
  }

  Tensor q_, k_, v_, dout_, out_, lse_, dq_, dk_, dv_;
  AttentionBackwardParams params_;
};

TEST_F(BackwardValidation, TheValidCallSucceeds) {
  AttentionBackwardProblem problem;
  EXPECT_TRUE(ValidateAttentionBackward(params_, &problem).ok());
  Context ctx;
  ctx.path = Path::kReference;
  const Status st = AttentionBackward(params_, ctx);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(dq_.AllFinite());
  EXPECT_TRUE(dk_.AllFinite());
  EXPECT_TRUE(dv_.AllFinite());
}

TEST_F(BackwardValidation, MissingLse) {
  AttentionBackwardParams p = params_;
  p.forward.lse = TensorView();
  ExpectRejected(p, "lse");
}

TEST_F(BackwardValidation, ForwardArgumentErrorsPropagate) {
  AttentionBackwardParams p = params_;
  Tensor k3(DType::kF32, {kB, kSk, 3, kD});  // 3 KV heads do not divide 4 query heads
  p.forward.k = k3.view();
  ExpectRejected(p, "k");
  p = params_;
  p.forward.scale = std::numeric_limits<float>::infinity();
  ExpectRejected(p, "scale");
  p = params_;
  Tensor lse_bad(DType::kF32, {kB, kHq, kSq + 1});
  p.forward.lse = lse_bad.view();
  ExpectRejected(p, "lse");
}

struct GradArg {
  const char* name;
  TensorView AttentionBackwardParams::*member;
  std::vector<int64_t> shape;  // its valid shape
};

std::vector<GradArg> GradArgs() {
  return {{"dout", &AttentionBackwardParams::dout, {kB, kSq, kHq, kD}},
          {"dq", &AttentionBackwardParams::dq, {kB, kSq, kHq, kD}},
          {"dk", &AttentionBackwardParams::dk, {kB, kSk, kHkv, kD}},
          {"dv", &AttentionBackwardParams::dv, {kB, kSk, kHkv, kD}}};
}

TEST_F(BackwardValidation, WrongShape) {
  for (const GradArg& a : GradArgs()) {
    SCOPED_TRACE(a.name);
    for (int dim = 0; dim < 4; ++dim) {
      std::vector<int64_t> shape = a.shape;
      shape[static_cast<size_t>(dim)] += 1;
      Tensor t = Gradient(DType::kF32, shape);
      AttentionBackwardParams p = params_;
      p.*a.member = t.view();
      ExpectRejected(p, a.name, {&t});
    }
    // Rank 3 where rank 4 is expected.
    Tensor t = Gradient(DType::kF32, {a.shape[1], a.shape[2], a.shape[3]});
    AttentionBackwardParams p = params_;
    p.*a.member = t.view();
    ExpectRejected(p, a.name, {&t});
  }
}

TEST_F(BackwardValidation, WrongDType) {
  for (const GradArg& a : GradArgs()) {
    for (DType dt : {DType::kBF16, DType::kF16}) {
      SCOPED_TRACE(std::string(a.name) + " " + DTypeName(dt));
      Tensor t = Gradient(dt, a.shape);
      AttentionBackwardParams p = params_;
      p.*a.member = t.view();
      ExpectRejected(p, a.name, {&t});
    }
    SCOPED_TRACE(std::string(a.name) + " unknown dtype");
    AttentionBackwardParams p = params_;
    (p.*a.member).dtype = static_cast<DType>(7);
    ExpectRejected(p, a.name);
  }
}

TEST_F(BackwardValidation, NullData) {
  for (const GradArg& a : GradArgs()) {
    SCOPED_TRACE(a.name);
    AttentionBackwardParams p = params_;
    (p.*a.member).data = nullptr;
    ExpectRejected(p, a.name);
  }
}

TEST_F(BackwardValidation, ZeroStrideOnWrittenGradients) {
  for (const GradArg& a : GradArgs()) {
    if (std::string(a.name) == "dout") continue;  // an input: stride 0 broadcasts (see below)
    for (int dim = 0; dim < 4; ++dim) {
      SCOPED_TRACE(std::string(a.name) + " dim " + std::to_string(dim));
      AttentionBackwardParams p = params_;
      (p.*a.member).strides[dim] = 0;
      ExpectRejected(p, a.name);
    }
  }
  for (const GradArg& a : GradArgs()) {
    SCOPED_TRACE(a.name);
    AttentionBackwardParams p = params_;
    (p.*a.member).strides[3] = -1;
    ExpectRejected(p, a.name);
  }
}

// A stride-0 dout (an upstream gradient broadcast along a dim) is valid and reads as the
// materialized broadcast.
TEST_F(BackwardValidation, BroadcastUpstreamGradientIsValid) {
  AttentionBackwardParams p = params_;
  p.dout.strides[1] = 0;  // every query row reads dout row 0
  Tensor materialized(DType::kF32, {kB, kSq, kHq, kD});
  materialized.ForEach([&](const Index& i) {
    materialized.Set(i, dout_.Get({i[0], 0, i[2], i[3]}));
  });
  Context ctx;
  ctx.path = Path::kReference;
  ASSERT_TRUE(AttentionBackward(p, ctx).ok());
  Tensor dq = Gradient(DType::kF32, {kB, kSq, kHq, kD});
  Tensor dk = Gradient(DType::kF32, {kB, kSk, kHkv, kD});
  Tensor dv = Gradient(DType::kF32, {kB, kSk, kHkv, kD});
  AttentionBackwardParams m = params_;
  m.dout = materialized.view();
  m.dq = dq.view();
  m.dk = dk.view();
  m.dv = dv.view();
  ASSERT_TRUE(AttentionBackward(m, ctx).ok());
  EXPECT_TRUE(dq_.BitwiseEqual(dq));
  EXPECT_TRUE(dk_.BitwiseEqual(dk));
  EXPECT_TRUE(dv_.BitwiseEqual(dv));
}

// Varlen: gradients must have the layout of their forward tensor (rank included).
TEST_F(BackwardValidation, VarlenGradientLayout) {
  const int64_t tq = 9, tk = 11;
  Rng rng(7);
  Tensor q(DType::kF32, {tq, kHq, kD}), k(DType::kF32, {tk, kHkv, kD}),
      v(DType::kF32, {tk, kHkv, kD}), dout(DType::kF32, {tq, kHq, kD});
  for (Tensor* t : {&q, &k, &v, &dout}) t->FillNormal(rng);
  Tensor out(DType::kF32, {tq, kHq, kD}), lse(DType::kF32, {kHq, tq});
  Tensor dq = Gradient(DType::kF32, {tq, kHq, kD});
  Tensor dk = Gradient(DType::kF32, {tk, kHkv, kD});
  Tensor dv = Gradient(DType::kF32, {tk, kHkv, kD});
  const std::vector<int32_t> cu_q = {0, 4, 9}, cu_k = {0, 6, 11};
  AttentionBackwardParams p;
  p.forward.q = q.view();
  p.forward.k = k.view();
  p.forward.v = v.view();
  p.forward.out = out.view();
  p.forward.lse = lse.view();
  p.forward.cu_seqlens_q = test::I32View(cu_q);
  p.forward.cu_seqlens_k = test::I32View(cu_k);
  p.forward.num_seqs = 2;
  Context ctx;
  ctx.path = Path::kReference;
  ASSERT_TRUE(AttentionForward(p.forward, ctx).ok());
  p.dout = dout.view();
  p.dq = dq.view();
  p.dk = dk.view();
  p.dv = dv.view();
  AttentionBackwardProblem problem;
  ASSERT_TRUE(ValidateAttentionBackward(p, &problem).ok());
  Tensor dq4 = Gradient(DType::kF32, {1, tq, kHq, kD});  // rank 4 while q is rank 3
  AttentionBackwardParams bad = p;
  bad.dq = dq4.view();
  ExpectRejected(bad, "dq", {&dq, &dk, &dv, &dq4});
  Tensor dk_short = Gradient(DType::kF32, {tk - 1, kHkv, kD});
  bad = p;
  bad.dk = dk_short.view();
  ExpectRejected(bad, "dk", {&dq, &dk, &dv, &dk_short});
}

}  // namespace
}  // namespace tessera
