// SPDX-License-Identifier: Apache-2.0
// The exact forward, every path forced in turn (Context.path) against the fp64 reference with the
// tolerance rules of tests/tolerances.h, plus the identities (varlen = loop, GQA = repeated K/V,
// window >= S = causal, batch = loop of singles, split + merge = one pass), the regressions of
// known bug classes (numbered below) and the bitwise guarantees (repeats, thread counts).
//
// Every kernel run writes into NaN-prefilled outputs surrounded by 1 KiB guards; padding inside
// strided inputs is NaN too, so a kernel that reads or writes outside a view fails loudly.
//
// TESSERA_SMALL_TESTS=1 (sanitizer builds) shrinks the heavy shapes but keeps tile tails;
// TESSERA_LONG_TESTS=1 adds large sweeps. TESSERA_SEED=<n> changes every random input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "attention/flash_tiles.h"
#include "attention_cases.h"
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
using test::Index;
using test::Inputs;
using test::Layout;
using test::MakeInputs;
using test::MakeOutputs;
using test::MakeParams;
using test::NeedsNaive;
using test::Outputs;
using test::PathsFor;
using test::Rng;
using test::Rule;
using test::RunForward;
using test::Spec;
using test::SpecName;
using test::Tensor;
using test::Unique;
using test::Varlen;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

bool Small() { return test::SmallTests(); }
bool Long() { return test::LongTests(); }

// ---------------------------------------------------------------------------------------------
// Checks against the reference (the test problems, their inputs and RunForward() are in
// tests/attention_cases.h).

// fp64 reference (and the naive same-precision one where a rule needs it), in the layouts of
// ref::AttentionForwardF64. Rows outside every varlen sequence stay NaN.
struct Reference {
  std::vector<double> out, lse, naive_out, naive_lse;
  std::vector<double> magnitude;  // sum_j p_ij |v_jd| (f32 standard rule only)
};

Reference ComputeReference(const Spec& s, const Inputs& in) {
  Reference r;
  const AttentionParams p = MakeParams(s, in, nullptr);
  const int64_t rows = in.q.numel() / s.dim;
  r.out.assign(static_cast<size_t>(rows * s.dim), kNaN);
  r.lse.assign(static_cast<size_t>(rows), kNaN);
  ref::AttentionForwardF64(p, r.out.data(), r.lse.data());
  if (s.dtype == DType::kF32 && s.rule == Rule::kStandard) {
    // The fp64 reference on |V| gives the magnitude of the terms behind each output element.
    Tensor abs_v = in.v.ContiguousCopy();
    abs_v.ForEach([&](const Index& i) { abs_v.Set(i, std::fabs(abs_v.Get(i))); });
    AttentionParams pa = p;
    pa.v = abs_v.view();
    r.magnitude.assign(r.out.size(), kNaN);
    ref::AttentionForwardF64(pa, r.magnitude.data(), nullptr);
  }
  if (NeedsNaive(s)) {
    r.naive_out.assign(r.out.size(), kNaN);
    r.naive_lse.assign(r.lse.size(), kNaN);
    test::AttentionForwardNaive(p, r.naive_out.data(), r.naive_lse.data());
  }
  return r;
}

// Splits an [.., T, Hq, D] output vector (or an [.., Hq, T] LSE vector) into the elements of
// covered tokens (returned) and those of uncovered ones (appended to `outside`).
std::vector<double> Covered(const Spec& s, const Inputs& in, const std::vector<double>& x,
                            bool is_lse, std::vector<double>* outside) {
  const int64_t covered = in.covered_q();
  if (!is_lse) return test::Prefix(x, covered, in.tokens_q, outside);
  if (covered == in.tokens_q) return x;
  std::vector<double> r;
  for (int64_t h = 0; h < s.heads_q; ++h) {
    for (int64_t t = 0; t < in.tokens_q; ++t) {
      const double value = x[static_cast<size_t>(h * in.tokens_q + t)];
      if (t < covered) {
        r.push_back(value);
      } else if (outside) {
        outside->push_back(value);
      }
    }
  }
  return r;
}

// Checks one run's outputs against the references under the spec's rule.
void ExpectMatchesReference(const Spec& s, const Inputs& in, const Reference& ref,
                            const Outputs& o) {
  std::vector<double> outside;
  const std::vector<double> got = Covered(s, in, o.out.ToVector(), false, &outside);
  const std::vector<double> want = Covered(s, in, ref.out, false, nullptr);
  const std::vector<double> naive =
      NeedsNaive(s) ? Covered(s, in, ref.naive_out, false, nullptr) : std::vector<double>{};
  const std::vector<double> magnitude =
      ref.magnitude.empty() ? std::vector<double>{} : Covered(s, in, ref.magnitude, false, nullptr);
  EXPECT_TRUE(test::CheckOutput(s.dtype, got, want, NeedsNaive(s) ? &naive : nullptr, s.rule,
                                magnitude.empty() ? nullptr : &magnitude));
  if (s.with_lse) {
    const std::vector<double> got_lse = Covered(s, in, o.lse.ToVector(), true, &outside);
    const std::vector<double> want_lse = Covered(s, in, ref.lse, true, nullptr);
    const std::vector<double> naive_lse =
        NeedsNaive(s) ? Covered(s, in, ref.naive_lse, true, nullptr) : std::vector<double>{};
    EXPECT_TRUE(test::CheckLse(got_lse, want_lse, NeedsNaive(s) ? &naive_lse : nullptr, s.rule));
  }
  // Rows outside every sequence keep their NaN prefill.
  size_t written = 0;
  for (double x : outside) written += !std::isnan(x);
  EXPECT_EQ(written, 0u) << "elements of tokens outside every sequence were written";
}

// The forward as an entry point of the shared harness (tests/path_harness.h).
struct ForwardEntry {
  using Reference = ::tessera::Reference;
  using Result = Outputs;
  static Inputs MakeInputs(const Spec& s) { return test::MakeInputs(s); }
  static Reference ComputeReference(const Spec& s, const Inputs& in) {
    return ::tessera::ComputeReference(s, in);
  }
  static Status Run(const Spec& s, const Inputs& in, Path path, int32_t threads, Outputs* o) {
    return RunForward(s, in, path, threads, o);
  }
  static void ExpectMatchesReference(const Spec& s, const Inputs& in, const Reference& ref,
                                     const Outputs& o) {
    ::tessera::ExpectMatchesReference(s, in, ref, o);
  }
};

// The main check: every path against the fp64 reference.
void CheckAllPaths(const Spec& s, const Inputs& in) { test::CheckAllPaths<ForwardEntry>(s, in); }
void CheckAllPaths(const Spec& s) { test::CheckAllPaths<ForwardEntry>(s); }

::testing::AssertionResult SameBits(const Outputs& a, const Outputs& b, bool with_lse) {
  ::testing::AssertionResult r = a.out.BitwiseEqual(b.out);
  if (!r) return r << " (out)";
  if (with_lse) {
    r = a.lse.BitwiseEqual(b.lse);
    if (!r) return r << " (lse)";
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// The parameterized sweep: one test per spec, every path against fp64.

class Forward : public ::testing::TestWithParam<Spec> {};

TEST_P(Forward, MatchesReferenceOnEveryPath) { CheckAllPaths(GetParam()); }

// Sequence lengths 0, 1, 17, 113, 203, 1024 for queries and keys independently (q > k and
// q < k), with and without a causal mask.
std::vector<Spec> ShapeSpecs() {
  std::vector<int64_t> lens = {0, 1, 17, 113, 203, 1024};
  if (Small()) lens = {0, 1, 17, 113};
  std::vector<Spec> specs;
  for (int64_t sq : lens) {
    for (int64_t sk : lens) {
      for (bool causal : {false, true}) {
        // The 1024-long cases are the expensive ones for the fp64 reference: causal only.
        if ((sq == 1024 || sk == 1024) && !causal && !(sq == 1024 && sk == 1024)) continue;
        Spec s = Dense(sq, sk, 2, 1, 64);
        s.causal = causal;
        specs.push_back(s);
      }
    }
  }
  if (Long()) {
    for (auto [sq, sk] : {std::pair<int64_t, int64_t>{1023, 1024}, {1024, 1023}, {2048, 2048}}) {
      Spec s = Dense(sq, sk, 2, 1, 128);
      s.causal = true;
      specs.push_back(s);
      s.dtype = DType::kBF16;
      specs.push_back(s);
    }
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Shapes, Forward, ::testing::ValuesIn(ShapeSpecs()), SpecName);

// Head dims 1, 40, 64, 72, 96, 128, 256, 512 on tile-tail lengths.
std::vector<Spec> HeadDimSpecs() {
  std::vector<Spec> specs;
  std::vector<std::pair<int64_t, int64_t>> shapes = {{17, 203}, {203, 17}, {113, 113}};
  if (Small()) shapes = {{17, 113}, {113, 17}};
  for (int64_t d : {1, 40, 64, 72, 96, 128, 256, 512}) {
    for (auto [sq, sk] : shapes) {
      for (bool causal : {false, true}) {
        Spec s = Dense(sq, sk, 2, 1, d);
        s.causal = causal;
        specs.push_back(s);
      }
    }
  }
  if (Long()) {
    for (int64_t d : {7, 59, 80, 111, 192}) {
      Spec s = Dense(203, 257, 2, 1, d);
      s.causal = true;
      specs.push_back(s);
    }
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(HeadDims, Forward, ::testing::ValuesIn(HeadDimSpecs()), SpecName);

// Every dtype with the ratio rule and the ceilings.
std::vector<Spec> DTypeSpecs() {
  std::vector<Spec> specs;
  std::vector<std::pair<int64_t, int64_t>> shapes = {{113, 203}, {203, 113}};
  if (Small()) shapes = {{17, 113}};
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int64_t d : {40, 64, 128, 256}) {
      for (auto [sq, sk] : shapes) {
        for (bool causal : {false, true}) {
          Spec s = Dense(sq, sk, 4, 2, d, dt);
          s.causal = causal;
          specs.push_back(s);
        }
      }
    }
  }
  if (Long()) {
    for (DType dt : {DType::kBF16, DType::kF16}) {
      for (int64_t d : {1, 72, 96, 512}) {
        Spec s = Dense(257, 509, 4, 1, d, dt);
        s.causal = true;
        specs.push_back(s);
      }
    }
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(DTypes, Forward, ::testing::ValuesIn(DTypeSpecs()), SpecName);

// Masks: none, causal in both alignments, sliding windows (0,0), (1,0), (0,1), (w,w), (Lk,0),
// causal + left window, and fixed pseudo-random windows, on q < k, q > k and q = k.
std::vector<Spec> MaskSpecs() {
  test::Shapes shapes = {{17, 113}, {113, 17}, {129, 129}, {64, 203}};
  if (Small()) shapes = {{17, 113}, {113, 17}, {65, 65}};
  std::vector<Spec> specs = test::MaskSweep(shapes, /*random_windows=*/3);
  // Low precision under masks that leave rows with few visible keys.
  for (DType dt : {DType::kBF16, DType::kF16}) {
    for (auto [sq, sk] : {std::pair<int64_t, int64_t>{17, 113}, {113, 17}}) {
      for (MaskAlign align : {MaskAlign::kBottomRight, MaskAlign::kTopLeft}) {
        Spec s = Dense(sq, sk, 2, 1, 96, dt);
        s.causal = true;
        s.align = align;
        specs.push_back(s);
        s.causal = false;
        s.window_left = s.window_right = 7;
        specs.push_back(s);
      }
    }
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Masks, Forward, ::testing::ValuesIn(MaskSpecs()), SpecName);

// Softcap 50 with q scaled by 50 so that the logits reach the cap (FlashAttention's test).
// Logits of magnitude ~50 make fp32 itself ill-conditioned at the 1e-5 level, so fp32 is held
// to the ratio rule against the naive fp32 computation; bf16/f16 get the standard rules.
std::vector<Spec> SoftcapSpecs() {
  std::vector<Spec> specs;
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int64_t d : {64, 96}) {
      for (bool causal : {false, true}) {
        Spec s = Dense(Small() ? 17 : 113, Small() ? 65 : 203, 2, 1, d, dt);
        s.causal = causal;
        s.softcap = 50.0f;
        s.q_mult = 50.0;
        if (dt == DType::kF32) s.rule = Rule::kRatioOnly;
        specs.push_back(s);
      }
    }
  }
  // A cap that is rarely reached: fp32 within the standard rules.
  Spec s = Dense(113, 203, 2, 1, 64);
  s.softcap = 30.0f;
  s.causal = true;
  specs.push_back(s);
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Softcap, Forward, ::testing::ValuesIn(SoftcapSpecs()), SpecName);

// ALiBi slopes [Hq] and [B, Hq], with and without causal, in both alignments; and ALiBi together
// with softcap and a window.
INSTANTIATE_TEST_SUITE_P(
    Alibi, Forward,
    ::testing::ValuesIn(Unique(test::AlibiSweep({{17, 113}, {113, 113}, {113, 17}}))), SpecName);

// Custom scales, including 0 (every visible key weighs the same) and a negative one.
INSTANTIATE_TEST_SUITE_P(Scale, Forward, ::testing::ValuesIn(Unique(test::ScaleSweep(65, 129))),
                         SpecName);

// Varlen: zero-length sequences, Lq >> Lk, fewer tokens than sequences (class 6),
// tokens past the last sequence that must stay untouched, both layouts.
std::vector<Spec> VarlenSpecs() {
  const int32_t big = Small() ? 129 : 1024;
  const int32_t mid = Small() ? 65 : 512;
  std::vector<Spec> specs = test::VarlenSweep({
      {{0, 0, 0}, {0, 0, 0}},
      {{1, mid, 1, 1}, {1, mid, 1, 1}},
      {{1, 1, 1, big, 1, 1, 1, 1}, {1, 1, 1, big, 1, 1, 1, 1}},
      {{76, 34, 146}, {1, 1, 1}},
      {{3, 0, 17, 0, 5}, {0, 4, 20, 0, 9}},
      {{17, 113, 1}, {113, 17, 203}},
  });
  // Rank-4 views, ALiBi per sequence, a window, bf16, generic head dim.
  Spec s = test::VarlenMix();
  specs.push_back(s);
  s.dtype = DType::kBF16;
  s.varlen_rank4 = false;
  s.extra_q_tokens = 5;
  specs.push_back(s);
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Varlen, Forward, ::testing::ValuesIn(VarlenSpecs()), SpecName);

// Tile tails (class 5): for each tile size T of the kernel (the query block of a GQA
// group, the key tile) L in {1, 2, T-1, T, T+1, 2T-1, 2T+1} plus primes, for Lq and Lk
// independently; inputs padded with NaN so that a read past a row's head dim or a tile's end
// shows up.
std::vector<int64_t> TailLengths(int64_t tile) {
  return {1, 2, tile - 1, tile, tile + 1, 2 * tile - 1, 2 * tile + 1};
}

std::vector<Spec> TailSpecs() {
  std::set<int64_t> key_lens = {97, 113, 127, 131, 203, 251, 257};
  for (int64_t l : TailLengths(flash::kKeyTile)) key_lens.insert(l);
  if (Long()) key_lens.insert(509);
  std::vector<Spec> specs;
  // Key tails with a fixed query length, and the same lengths on the query side (G = 1).
  for (int64_t l : key_lens) {
    for (bool q_side : {true, false}) {
      Spec s = Dense(q_side ? l : 131, q_side ? 131 : l, 1, 1, 64);
      s.causal = true;
      s.q_layout = s.kv_layout = Layout::kPaddedDim;
      specs.push_back(s);
    }
  }
  // Query tails per GQA group: the query block is QueryBlock(G) positions.
  for (auto [hq, hkv] : {std::pair<int64_t, int64_t>{1, 1}, {6, 2}, {8, 1}}) {
    const int64_t block = flash::QueryBlock(hq / hkv);
    std::set<int64_t> lens;
    for (int64_t l : TailLengths(block)) lens.insert(std::max<int64_t>(l, 1));
    for (int64_t l : lens) {
      Spec s = Dense(l, 37, hq, hkv, 40);
      s.causal = true;
      s.q_layout = s.kv_layout = Layout::kPaddedDim;
      specs.push_back(s);
    }
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(Tails, Forward, ::testing::ValuesIn(TailSpecs()), SpecName);

// Ill-conditioned inputs, held to the ratio rule (classes 2 and 4).
std::vector<Spec> RatioSpecs() {
  std::vector<Spec> specs;
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    // |logit| ~ 1e4.
    Spec s = Dense(65, 129, 2, 1, 64, dt);
    s.q_mult = 1e4;
    s.causal = true;
    s.rule = Rule::kRatioOnly;
    specs.push_back(s);
  }
  return Unique(specs);
}
INSTANTIATE_TEST_SUITE_P(LargeLogits, Forward, ::testing::ValuesIn(RatioSpecs()), SpecName);

// ---------------------------------------------------------------------------------------------
// GQA head mapping (class 16): against fp64 and against MHA with K/V explicitly repeated.

struct GqaCase {
  int64_t hq, hkv, sq;
};

class Gqa : public ::testing::TestWithParam<GqaCase> {};

TEST_P(Gqa, MatchesReferenceAndRepeatedKv) {
  const GqaCase c = GetParam();
  Spec s = Dense(c.sq, 37, c.hq, c.hkv, 64);
  s.causal = true;
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeInputs(s);
  CheckAllPaths(s, in);

  // The same problem with K/V repeated G times per head.
  Spec mha;
  const Inputs rep = test::WithRepeatedKv(s, in, &mha);
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Outputs a, b;
    ASSERT_TRUE(RunForward(s, in, path, 0, &a).ok());
    ASSERT_TRUE(RunForward(mha, rep, path, 0, &b).ok());
    EXPECT_TRUE(test::CheckClose(a.out.ToVector(), b.out.ToVector(), test::IdentityCeiling(s.dtype),
                                 "out vs repeated K/V"));
    EXPECT_TRUE(test::CheckClose(a.lse.ToVector(), b.lse.ToVector(), test::kLseCeiling,
                                 "lse vs repeated K/V"));
  }
}

std::vector<GqaCase> GqaCases() {
  std::vector<GqaCase> cases;
  for (auto [hq, hkv] : std::vector<std::pair<int64_t, int64_t>>{
           {8, 8}, {8, 1}, {8, 2}, {6, 3}, {6, 2}, {12, 4}, {48, 2}, {40, 2}, {65, 5}, {27, 1}}) {
    for (int64_t sq : {1, 17}) cases.push_back({hq, hkv, sq});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Heads, Gqa, ::testing::ValuesIn(GqaCases()),
                         [](const ::testing::TestParamInfo<GqaCase>& p) {
                           return "hq" + std::to_string(p.param.hq) + "_hkv" +
                                  std::to_string(p.param.hkv) + "_sq" + std::to_string(p.param.sq);
                         });

// ---------------------------------------------------------------------------------------------
// Identities.

TEST(ForwardIdentity, VarlenEqualsLoopOverSequences) {
  Spec s = Varlen({17, 0, 113, 5, 64}, {113, 9, 17, 0, 64}, 4, 2, 64);
  s.causal = true;
  s.alibi = AlibiKind::kPerBatch;
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeInputs(s);
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Outputs packed;
    ASSERT_TRUE(RunForward(s, in, path, 0, &packed).ok());
    const std::vector<double> out = packed.out.ToVector(), lse = packed.lse.ToVector();
    for (size_t b = 0; b < s.seqlens_q.size(); ++b) {
      SCOPED_TRACE("sequence " + std::to_string(b));
      const int64_t q0 = in.cu_q[b], lq = s.seqlens_q[b], k0 = in.cu_k[b], lk = s.seqlens_k[b];
      Spec one = Dense(lq, lk, s.heads_q, s.heads_kv, s.dim);
      one.causal = s.causal;
      one.alibi = AlibiKind::kPerHead;
      Inputs single = MakeInputs(one);
      single.q = test::SliceTokens(in.q, q0, lq);
      single.k = test::SliceTokens(in.k, k0, lk);
      single.v = test::SliceTokens(in.v, k0, lk);
      for (int64_t h = 0; h < s.heads_q; ++h) {
        single.slopes.Set({h}, in.slopes.Get({static_cast<int64_t>(b), h}));
      }
      Outputs alone;
      ASSERT_TRUE(RunForward(one, single, path, 0, &alone).ok());
      const std::vector<double> a_out = alone.out.ToVector(), a_lse = alone.lse.ToVector();
      const size_t row = static_cast<size_t>(s.heads_q * s.dim);
      std::vector<double> p_out(out.begin() + static_cast<std::ptrdiff_t>(q0 * row),
                                out.begin() + static_cast<std::ptrdiff_t>((q0 + lq) * row));
      std::vector<double> p_lse;
      for (int64_t h = 0; h < s.heads_q; ++h) {
        for (int64_t t = 0; t < lq; ++t) {
          p_lse.push_back(lse[static_cast<size_t>(h * in.tokens_q + q0 + t)]);
        }
      }
      EXPECT_TRUE(test::CheckClose(p_out, a_out, test::IdentityCeiling(s.dtype), "out"));
      EXPECT_TRUE(test::CheckClose(p_lse, a_lse, test::kLseCeiling, "lse"));
    }
  }
}

// The window identities compare two runs of the same path on the same inputs.
void ExpectSameAttention(const Spec& a, const Spec& b) {
  SCOPED_TRACE(a.Name() + " vs " + b.Name());
  const Inputs in = MakeInputs(a);
  for (Path path : PathsFor(a.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Outputs x, y;
    ASSERT_TRUE(RunForward(a, in, path, 0, &x).ok());
    ASSERT_TRUE(RunForward(b, in, path, 0, &y).ok());
    EXPECT_TRUE(test::CheckClose(x.out.ToVector(), y.out.ToVector(), test::IdentityCeiling(a.dtype),
                                 "out"));
    EXPECT_TRUE(test::CheckClose(x.lse.ToVector(), y.lse.ToVector(), test::kLseCeiling, "lse"));
  }
}

TEST(ForwardIdentity, WindowCoveringEveryKeyEqualsCausal) {
  for (auto [sq, sk] : {std::pair<int64_t, int64_t>{113, 203}, {203, 113}, {129, 129}}) {
    for (MaskAlign align : {MaskAlign::kBottomRight, MaskAlign::kTopLeft}) {
      Spec causal = Dense(sq, sk, 2, 1, 64);
      causal.causal = true;
      causal.align = align;
      Spec window = causal;
      window.causal = false;
      window.window_left = std::max(sq, sk);  // wl >= S
      window.window_right = 0;
      ExpectSameAttention(causal, window);
      window.window_left = -1;  // (-1, 0)
      ExpectSameAttention(causal, window);
      Spec capped = causal;  // causal caps any right window at 0
      capped.window_right = 5;
      ExpectSameAttention(causal, capped);
    }
  }
}

TEST(ForwardIdentity, BatchEqualsLoopOfSingles) {
  // Bitwise on the same path: a row's result does not depend on the rest of the batch.
  for (int64_t batch : {5, 12}) {
    Spec s = Dense(Small() ? 17 : 113, Small() ? 33 : 203, 4, 2, 64);
    s.batch = batch;
    s.causal = true;
    s.alibi = AlibiKind::kPerBatch;
    SCOPED_TRACE(test::Repro(s.Name()));
    const Inputs in = MakeInputs(s);
    for (Path path : PathsFor(s.dim)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Outputs all;
      ASSERT_TRUE(RunForward(s, in, path, 0, &all).ok());
      for (int64_t b : {int64_t{0}, int64_t{3}, batch - 1}) {
        Spec one = s;
        one.batch = 1;
        Inputs single = MakeInputs(one);
        for (const auto& pair : {std::pair<Tensor*, const Tensor*>{&single.q, &in.q},
                                 {&single.k, &in.k},
                                 {&single.v, &in.v}}) {
          Tensor* dst = pair.first;
          const Tensor* src = pair.second;
          dst->ForEach([&](const Index& i) { dst->Set(i, src->Get({b, i[1], i[2], i[3]})); });
        }
        single.slopes.ForEach([&](const Index& i) {
          single.slopes.Set(i, in.slopes.Get({b, i[1]}));
        });
        Outputs alone;
        ASSERT_TRUE(RunForward(one, single, path, 0, &alone).ok());
        Tensor row_out(s.dtype, {1, s.seq_q, s.heads_q, s.dim});
        row_out.ForEach([&](const Index& i) {
          row_out.Set(i, all.out.Get({b, i[1], i[2], i[3]}));
        });
        Tensor row_lse(DType::kF32, {1, s.heads_q, s.seq_q});
        row_lse.ForEach([&](const Index& i) { row_lse.Set(i, all.lse.Get({b, i[1], i[2]})); });
        EXPECT_TRUE(row_out.BitwiseEqual(alone.out)) << "batch entry " << b;
        EXPECT_TRUE(row_lse.BitwiseEqual(alone.lse)) << "batch entry " << b;
      }
    }
  }
}

// Merges two attention states (O, LSE) in fp64, as tessera/merge.h defines MergeStates.
void MergeStates(const std::vector<double>& o1, const std::vector<double>& l1,
                 const std::vector<double>& o2, const std::vector<double>& l2, int64_t dim,
                 std::vector<double>* o, std::vector<double>* l, int64_t heads, int64_t seq) {
  o->assign(o1.size(), 0.0);
  l->assign(l1.size(), 0.0);
  // out [1, S, H, D], lse [1, H, S]
  for (int64_t t = 0; t < seq; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const size_t li = static_cast<size_t>(h * seq + t);
      const double a = l1[li], b = l2[li], m = std::max(a, b);
      double lse = -kInf, wa = 0.0, wb = 0.0;
      if (m != -kInf) {
        lse = m + std::log(std::exp(a - m) + std::exp(b - m));
        wa = std::exp(a - lse);
        wb = std::exp(b - lse);
      }
      (*l)[li] = lse;
      for (int64_t d = 0; d < dim; ++d) {
        const size_t oi = static_cast<size_t>((t * heads + h) * dim + d);
        (*o)[oi] = m == -kInf ? 0.0 : wa * o1[oi] + wb * o2[oi];
      }
    }
  }
}

TEST(ForwardIdentity, SplitKeysAndMergeEqualsOnePass) {
  // No mask: splitting the keys of a causal problem would move its bottom-right alignment.
  for (int64_t split : {0, 1, 100, 128}) {
    Spec s = Dense(113, 203, 2, 1, 64);
    s.softcap = split == 100 ? 20.0f : 0.0f;
    SCOPED_TRACE(test::Repro(s.Name()) + " split at " + std::to_string(split));
    const Inputs in = MakeInputs(s);
    const Reference ref = ComputeReference(s, in);
    Spec lo = s, hi = s;
    lo.seq_k = split;
    hi.seq_k = s.seq_k - split;
    Inputs a = MakeInputs(lo), b = MakeInputs(hi);
    a.q.FromVector(in.q.ToVector());
    b.q.FromVector(in.q.ToVector());
    for (const auto& pair : {std::pair<Inputs*, int64_t>{&a, 0}, {&b, split}}) {
      Inputs* part = pair.first;
      const int64_t k0 = pair.second;
      part->k.ForEach([&](const Index& i) {
        part->k.Set(i, in.k.Get({i[0], i[1] + k0, i[2], i[3]}));
      });
      part->v.ForEach([&](const Index& i) {
        part->v.Set(i, in.v.Get({i[0], i[1] + k0, i[2], i[3]}));
      });
    }
    for (Path path : PathsFor(s.dim)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Outputs whole, first, second;
      ASSERT_TRUE(RunForward(s, in, path, 0, &whole).ok());
      ASSERT_TRUE(RunForward(lo, a, path, 0, &first).ok());
      ASSERT_TRUE(RunForward(hi, b, path, 0, &second).ok());
      std::vector<double> o, l;
      MergeStates(first.out.ToVector(), first.lse.ToVector(), second.out.ToVector(),
                  second.lse.ToVector(), s.dim, &o, &l, s.heads_q, s.seq_q);
      EXPECT_TRUE(test::CheckClose(o, whole.out.ToVector(), test::IdentityCeiling(s.dtype),
                                   "merged out vs one pass"));
      EXPECT_TRUE(
          test::CheckClose(l, whole.lse.ToVector(), test::kLseCeiling, "merged lse vs one pass"));
      EXPECT_TRUE(test::CheckOutput(s.dtype, o, ref.out, nullptr, Rule::kStandard, &ref.magnitude));
      EXPECT_TRUE(test::CheckLse(l, ref.lse));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Bug-class regressions.

// Fully masked rows give output exactly 0 and LSE exactly -inf, never NaN (class 1).
TEST(ForwardRegression, FullyMaskedRows) {
  const int64_t n = Small() ? 150 : 600;
  std::vector<Spec> specs = test::FullyMaskedSpecs(n);
  Spec br_window = Dense(n, n / 2, 2, 2, 40);  // bottom-right window: first half of rows empty
  br_window.window_left = 9;
  br_window.window_right = 0;
  specs.push_back(br_window);
  Spec right_only = Dense(64, 40, 1, 1, 64);  // window (0, -1), top-left: row i sees j >= i,
  right_only.window_left = 0;                 // so rows 40.. see nothing
  right_only.window_right = -1;
  right_only.align = MaskAlign::kTopLeft;
  specs.push_back(right_only);

  for (const Spec& s : specs) {
    SCOPED_TRACE(test::Repro(s.Name()));
    const Inputs in = MakeInputs(s);
    int64_t empty_rows = 0;
    for (int64_t i = 0; i < s.seq_q; ++i) empty_rows += test::VisibleKeys(s, i) == 0;
    if (s.seq_q > s.seq_k + 9 || s.causal) {
      EXPECT_GT(empty_rows, 0) << "the case lost its point";
    }
    CheckAllPaths(s, in);
    for (Path path : PathsFor(s.dim)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Outputs o;
      ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
      EXPECT_TRUE(o.out.AllFinite());
      for (int64_t i = 0; i < s.seq_q; ++i) {
        if (test::VisibleKeys(s, i) != 0) continue;
        for (int64_t h = 0; h < s.heads_q; ++h) {
          for (int64_t d = 0; d < s.dim; ++d) {
            ASSERT_EQ(o.out.Get({0, i, h, d}), 0.0) << "row " << i << " head " << h;
          }
          ASSERT_EQ(o.lse.Get({0, h, i}), -kInf) << "row " << i << " head " << h;
        }
      }
    }
  }
}

// Varlen with every 4th sequence having no keys: those rows are 0 / -inf, neighbours unaffected.
TEST(ForwardRegression, FullyMaskedVarlenSequences) {
  Spec s = test::EveryFourthSequenceWithoutKeys();
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeInputs(s);
  CheckAllPaths(s, in);
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Outputs o;
    ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
    EXPECT_TRUE(o.out.AllFinite());
    for (size_t b = 0; b < s.seqlens_q.size(); b += 4) {
      for (int64_t t = in.cu_q[b]; t < in.cu_q[b + 1]; ++t) {
        for (int64_t h = 0; h < s.heads_q; ++h) {
          for (int64_t d = 0; d < s.dim; ++d) ASSERT_EQ(o.out.Get({t, h, d}), 0.0);
          ASSERT_EQ(o.lse.Get({h, t}), -kInf);
        }
      }
    }
  }
}

// Sk = 0: every row has no key (class 7 / §4.2).
TEST(ForwardRegression, NoKeys) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    Spec s = Dense(17, 0, 4, 2, 64, dt);
    s.batch = 2;
    SCOPED_TRACE(s.Name());
    const Inputs in = MakeInputs(s);
    for (Path path : PathsFor(s.dim)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Outputs o;
      ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
      for (double x : o.out.ToVector()) ASSERT_EQ(x, 0.0);
      for (double x : o.lse.ToVector()) ASSERT_EQ(x, -kInf);
    }
  }
}

// Runs an empty forward on every path: exits 0 when each call succeeds and leaves its outputs
// bitwise untouched, 1 otherwise (inside EXPECT_EXIT, see test::RunOnEveryPathAndExit).
void RunEmptyForwardAndExit(const AttentionParams& p, const std::vector<const Tensor*>& outputs,
                            int64_t dim) {
  test::RunOnEveryPathAndExit([&](const Context& ctx) { return AttentionForward(p, ctx); }, outputs,
                              dim);
}

// B = 0, Sq = 0, Hq = 0 and num_seqs = 0 succeed without touching the outputs (empty problems are
// no-ops), with the natural row-major strides of the empty outputs (which contain zeros) and
// with all-non-zero strides.
TEST(ForwardRegression, EmptyProblemsAreNoOps) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  std::vector<Spec> specs;
  Spec s = Dense(17, 33, 2, 1, 64);
  s.batch = 0;
  specs.push_back(s);
  specs.push_back(Dense(0, 33, 2, 1, 64));
  s = Dense(0, 0, 2, 1, 40);
  s.causal = true;
  specs.push_back(s);
  specs.push_back(Dense(17, 33, 0, 1, 64));  // no query heads: Hq = 0 is divisible by Hkv
  for (const Spec& e : specs) {
    for (bool natural_strides : {true, false}) {
      SCOPED_TRACE(e.Name() + (natural_strides ? " natural strides" : " non-zero strides"));
      const Inputs in = MakeInputs(e);
      Outputs o = MakeOutputs(e, in);
      if (!natural_strides) {
        o.out = Tensor(e.dtype, o.out.shape(), test::StridesIgnoringEmptyDims(o.out.shape()));
        o.lse = Tensor(DType::kF32, o.lse.shape(), test::StridesIgnoringEmptyDims(o.lse.shape()));
      }
      const AttentionParams p = MakeParams(e, in, &o);
      EXPECT_EXIT(RunEmptyForwardAndExit(p, {&o.out, &o.lse}, e.dim), ::testing::ExitedWithCode(0),
                  "");
    }
  }
  // Varlen with zero sequences over a non-empty token axis: nothing belongs to a sequence.
  Tensor q(DType::kF32, {5, 2, 64}), k(DType::kF32, {4, 1, 64}), v(DType::kF32, {4, 1, 64});
  Tensor out(DType::kF32, {5, 2, 64}), lse(DType::kF32, {2, 5});
  Rng rng(1);
  q.FillNormal(rng);
  k.FillNormal(rng);
  v.FillNormal(rng);
  const std::vector<int32_t> cu = {0};
  AttentionParams p;
  p.q = q.view();
  p.k = k.view();
  p.v = v.view();
  p.out = out.view();
  p.lse = lse.view();
  p.cu_seqlens_q = test::I32View(cu);
  p.cu_seqlens_k = test::I32View(cu);
  p.num_seqs = 0;
  EXPECT_EXIT(RunEmptyForwardAndExit(p, {&out, &lse}, 64), ::testing::ExitedWithCode(0), "");
}

// Path::kFast exists only for D in {64, 128, 256}; elsewhere it is an error, outputs untouched.
TEST(ForwardRegression, FastPathRejectsOtherHeadDims) {
  for (int64_t d : {1, 40, 63, 72, 96, 512}) {
    Spec s = Dense(17, 17, 2, 1, d);
    SCOPED_TRACE(s.Name());
    const Inputs in = MakeInputs(s);
    Outputs o = MakeOutputs(s, in);
    Context ctx;
    ctx.path = Path::kFast;
    const Status st = AttentionForward(MakeParams(s, in, &o), ctx);
    EXPECT_FALSE(st.ok());
    EXPECT_TRUE(st.code() == StatusCode::kUnimplemented ||
                st.code() == StatusCode::kInvalidArgument)
        << st.ToString();
    EXPECT_FALSE(st.message().empty());
    EXPECT_TRUE(o.out.Unchanged());
    EXPECT_TRUE(o.lse.Unchanged());
  }
}

// Large magnitudes (class 4): constant inputs at 256 (f16) and 133120 (bf16), whose logits
// overflow 16-bit arithmetic, and values near dtype max / L, whose unnormalized sum would
// overflow a 16-bit accumulator. Finite, and within the ratio rule.
TEST(ForwardRegression, LargeMagnitudeInputs) {
  struct Case {
    DType dtype;
    double qk;     // constant value of q and k
    double v_max;  // largest finite value of the dtype
  };
  for (const Case& c : {Case{DType::kF16, 256.0, 65504.0}, Case{DType::kBF16, 133120.0, 3.38e38}}) {
    for (bool causal : {false, true}) {
      Spec s = Dense(33, 129, 2, 1, 64, c.dtype);
      s.causal = causal;
      s.rule = Rule::kRatioOnly;
      SCOPED_TRACE(s.Name());
      Inputs in = MakeInputs(s);
      Rng rng(test::SeedFor(s.Name() + "values"));
      in.q.ForEach([&](const Index& i) { in.q.Set(i, c.qk); });
      in.k.ForEach([&](const Index& i) { in.k.Set(i, c.qk); });
      const double v_scale = c.v_max / static_cast<double>(s.seq_k) * 0.9;
      in.v.ForEach([&](const Index& i) { in.v.Set(i, v_scale * rng.Uniform(0.5, 1.0)); });
      CheckAllPaths(s, in);
      for (Path path : PathsFor(s.dim)) {
        Outputs o;
        ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
        EXPECT_TRUE(o.out.AllFinite()) << PathName(path);
        EXPECT_TRUE(o.lse.AllFinite()) << PathName(path);
      }
    }
  }
}

// Valid logits near -2e4 next to masked keys (class 2): masked keys get exactly nothing and
// the rows still match fp64. Only a true -inf mask survives this.
TEST(ForwardRegression, VeryNegativeLogits) {
  for (DType dt : {DType::kF32, DType::kBF16}) {
    Spec s = Dense(65, 129, 2, 1, 64, dt);
    s.causal = true;
    s.rule = Rule::kRatioOnly;
    SCOPED_TRACE(s.Name());
    Inputs in = MakeInputs(s);
    Rng rng(test::SeedFor(s.Name() + "values"));
    // s = scale * q.k ~ -2e4 * (1 + small): q_d = -2e4 / (scale * D), k_d = 1 + 0.01 N(0, 1).
    const double qd = -2e4 / (0.125 * 64.0);
    in.q.ForEach([&](const Index& i) { in.q.Set(i, qd); });
    in.k.ForEach([&](const Index& i) { in.k.Set(i, 1.0 + 0.01 * rng.Normal()); });
    CheckAllPaths(s, in);
  }
}

// Runs `s` and the same problem in contiguous, aligned storage (a contiguous copy of `in`) on
// every path: the outputs must be bitwise equal.
void ExpectSameBitsAsContiguous(const Spec& s, const Inputs& in) {
  const Spec dense = test::ContiguousSpec(s);
  const Inputs copy = test::ContiguousInputs(s, in);
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Outputs strided, contiguous;
    ASSERT_TRUE(RunForward(s, in, path, 0, &strided).ok());
    ASSERT_TRUE(RunForward(dense, copy, path, 0, &contiguous).ok());
    EXPECT_TRUE(SameBits(strided, contiguous, true));
  }
}

// Strided views (class 10): each layout variant is bitwise equal to the contiguous copy on the
// same path.
TEST(ForwardRegression, StrideMatrix) {
  struct Variant {
    Layout q, kv, out;
  };
  const std::vector<Variant> variants = {
      {Layout::kPaddedDim, Layout::kPaddedDim, Layout::kPaddedDim},
      {Layout::kHeadSliced, Layout::kHeadSliced, Layout::kHeadSliced},
      {Layout::kHeadsMajor, Layout::kHeadsMajor, Layout::kHeadsMajor},
      {Layout::kSeqSliced, Layout::kSeqSliced, Layout::kSeqSliced},
      {Layout::kContiguous, Layout::kBatchBroadcast, Layout::kContiguous},
      {Layout::kHeadsMajor, Layout::kPaddedDim, Layout::kSeqSliced},
      {Layout::kPaddedDim, Layout::kHeadsMajor, Layout::kHeadSliced},
  };
  for (DType dt : {DType::kF32, DType::kBF16}) {
    for (int64_t d : {40, 64}) {
      for (const Variant& var : variants) {
        Spec s = Dense(Small() ? 17 : 113, Small() ? 33 : 203, 4, 2, d, dt);
        s.batch = 2;
        s.causal = true;
        s.q_layout = var.q;
        s.kv_layout = var.kv;
        s.out_layout = var.out;
        SCOPED_TRACE(test::Repro(s.Name()));
        ExpectSameBitsAsContiguous(s, MakeInputs(s));
      }
    }
  }
  // Varlen through strided views.
  Spec s = Varlen({17, 0, 40}, {33, 5, 40}, 4, 2, 64);
  s.causal = true;
  s.q_layout = Layout::kHeadsMajor;
  s.kv_layout = Layout::kPaddedDim;
  s.out_layout = Layout::kHeadSliced;
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeInputs(s);
  CheckAllPaths(s, in);
  ExpectSameBitsAsContiguous(s, in);
}

// Base pointers 1, 2 and 3 elements past 64-byte alignment (class 11): correct, and bitwise
// equal to the aligned run on the same path.
TEST(ForwardRegression, MisalignedPointers) {
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (int64_t offset : {1, 2, 3}) {
      Spec s = Dense(33, 65, 2, 1, 64, dt);
      s.causal = true;
      s.misalign = offset;
      SCOPED_TRACE(test::Repro(s.Name()));
      const Inputs in = MakeInputs(s);
      CheckAllPaths(s, in);
      ExpectSameBitsAsContiguous(s, in);
    }
  }
}

// Outputs with gaps (padded rows, a padded LSE) and no LSE at all (class 18): every element
// written and finite, gaps and guards untouched. RunForward() checks gaps and guards on every call.
TEST(ForwardRegression, OutputPoisonAndGuards) {
  for (bool with_lse : {true, false}) {
    Spec s = Dense(65, 129, 4, 2, 72);
    s.batch = 2;
    s.causal = true;
    s.out_layout = Layout::kPaddedDim;
    s.with_lse = with_lse;
    SCOPED_TRACE(test::Repro(s.Name()));
    const Inputs in = MakeInputs(s);
    CheckAllPaths(s, in);
    for (Path path : PathsFor(s.dim)) {
      Outputs o;
      ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
      EXPECT_TRUE(o.out.AllFinite()) << PathName(path);
      if (with_lse) {
        EXPECT_TRUE(o.lse.AllFinite()) << PathName(path);
      }
    }
  }
}

// Repeated runs are bitwise identical (class 12), with a batch large enough for races to show.
TEST(ForwardDeterminism, RepeatedRunsAreBitwiseIdentical) {
  Spec s = Dense(Small() ? 17 : 64, Small() ? 33 : 96, 4, 2, 64);
  s.batch = Small() ? 8 : 60;
  s.causal = true;
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs in = MakeInputs(s);
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    const int repeats = path == Path::kReference || Small() ? 3 : 50;
    Outputs first;
    ASSERT_TRUE(RunForward(s, in, path, 0, &first).ok());
    for (int r = 1; r < repeats; ++r) {
      Outputs again;
      ASSERT_TRUE(RunForward(s, in, path, 0, &again).ok());
      ASSERT_TRUE(SameBits(first, again, true)) << "repeat " << r;
    }
  }
}

// Thread-count invariance (class 13): 1, 2, 3 and 7 threads give the same bits.
TEST(ForwardDeterminism, ThreadCountInvariance) {
  for (int64_t d : {40, 64}) {
    Spec s = Dense(Small() ? 65 : 203, Small() ? 65 : 203, 8, 2, d);
    s.batch = 3;
    s.causal = true;
    SCOPED_TRACE(test::Repro(s.Name()));
    const Inputs in = MakeInputs(s);
    for (Path path : PathsFor(d)) {
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Outputs one;
      ASSERT_TRUE(RunForward(s, in, path, 1, &one).ok());
      for (int32_t threads : {2, 3, 7}) {
        Outputs many;
        ASSERT_TRUE(RunForward(s, in, path, threads, &many).ok());
        EXPECT_TRUE(SameBits(one, many, true)) << threads << " threads";
      }
    }
  }
  // Varlen with very uneven sequences, where the split of work across threads matters most.
  Spec v = Varlen({1, 200, 3, 64, 0, 129}, {300, 200, 3, 1, 7, 129}, 4, 1, 64);
  v.causal = true;
  SCOPED_TRACE(test::Repro(v.Name()));
  const Inputs in = MakeInputs(v);
  for (Path path : PathsFor(v.dim)) {
    Outputs one, three;
    ASSERT_TRUE(RunForward(v, in, path, 1, &one).ok());
    ASSERT_TRUE(RunForward(v, in, path, 3, &three).ok());
    EXPECT_TRUE(SameBits(one, three, true)) << PathName(path);
  }
}

// K/V are packed once per head (strided f32 rows, every bf16 / f16 row converted to f32), in
// rounds of heads under a byte budget: the same bits for every budget (0: no packing, tasks read
// the caller's rows; 1 byte: one head per round; the default: every head at once), with windows,
// a layout with a head-dim stride, and f16 / bf16 inputs. Contiguous f32 K/V and masks are never
// packed (nothing to compare: same code path).
TEST(ForwardPacking, SameBitsForEveryBudget) {
  const int64_t default_budget = flash::ForwardPackBudget().load();
  std::vector<Spec> specs;
  Spec s = Dense(Small() ? 200 : 700, Small() ? 230 : 900, 8, 2, 64);
  s.batch = 2;
  specs.push_back(s);
  s.causal = true;
  specs.push_back(s);
  s.causal = false;
  s.window_left = 300;
  s.window_right = 20;
  specs.push_back(s);
  Spec padded = Dense(Small() ? 200 : 500, Small() ? 200 : 500, 8, 2, 40);
  padded.kv_layout = Layout::kPaddedDim;
  specs.push_back(padded);
  for (DType dtype : {DType::kF16, DType::kBF16}) {
    Spec half = Dense(Small() ? 200 : 600, Small() ? 200 : 600, 8, 2, 128, dtype);
    half.causal = true;
    specs.push_back(half);
  }
  for (const Spec& spec : specs) {
    SCOPED_TRACE(test::Repro(spec.Name()));
    const Inputs in = MakeInputs(spec);
    for (Path path : PathsFor(spec.dim)) {
      if (path == Path::kReference) continue;
      SCOPED_TRACE(std::string("path ") + PathName(path));
      Outputs packed, one_head, unpacked;
      flash::ForwardPackBudget().store(default_budget);
      ASSERT_TRUE(RunForward(spec, in, path, 2, &packed).ok());
      flash::ForwardPackBudget().store(1);
      ASSERT_TRUE(RunForward(spec, in, path, 3, &one_head).ok());
      flash::ForwardPackBudget().store(0);
      ASSERT_TRUE(RunForward(spec, in, path, 2, &unpacked).ok());
      EXPECT_TRUE(SameBits(packed, unpacked, true));
      EXPECT_TRUE(SameBits(one_head, unpacked, true));
    }
  }
  flash::ForwardPackBudget().store(default_budget);
}

// NaN policy (class 17): a NaN in an unmasked q row makes that row NaN and leaves every other
// element bitwise as in a clean run; NaN in k or v poisons exactly the rows that see that key.
TEST(ForwardRegression, NanInInputsStaysInTheAffectedRows) {
  Spec s = Dense(40, 40, 4, 2, 64);
  s.causal = true;
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs clean = MakeInputs(s);
  const int64_t row = 21, head = 1, key = 30;
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Outputs base;
    ASSERT_TRUE(RunForward(s, clean, path, 0, &base).ok());

    // NaN in q[row, head]: out[row, head, :] and lse[head, row] are NaN, all else unchanged.
    {
      Inputs in = MakeInputs(s);
      in.q.Set({0, row, head, 7}, kNaN);
      Outputs o;
      ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
      o.out.ForEach([&](const Index& i) {
        const bool hit = i[1] == row && i[2] == head;
        const double x = o.out.Get(i), y = base.out.Get(i);
        if (hit) {
          EXPECT_TRUE(std::isnan(x)) << "out[" << i[1] << ", " << i[2] << ", " << i[3] << "]";
        } else {
          EXPECT_EQ(std::memcmp(&x, &y, sizeof(x)), 0)
              << "out[" << i[1] << ", " << i[2] << ", " << i[3] << "] changed";
        }
      });
      o.lse.ForEach([&](const Index& i) {
        const bool hit = i[1] == head && i[2] == row;
        EXPECT_EQ(std::isnan(o.lse.Get(i)), hit) << "lse[" << i[1] << ", " << i[2] << "]";
        if (!hit) {
          EXPECT_EQ(o.lse.Get(i), base.lse.Get(i));
        }
      });
    }
    // NaN in k[key] of KV head 0: rows that see the key (row >= key under causal Sq = Sk) of
    // query heads 0 and 1 are NaN.
    {
      Inputs in = MakeInputs(s);
      in.k.Set({0, key, 0, 3}, kNaN);
      Outputs o;
      ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
      o.lse.ForEach([&](const Index& i) {
        const bool hit = i[1] < 2 && i[2] >= key;
        EXPECT_EQ(std::isnan(o.lse.Get(i)), hit) << "lse[" << i[1] << ", " << i[2] << "]";
      });
    }
    // NaN in v[key, KV head 1, column 5]: column 5 of the rows that see the key is NaN and
    // every other column is unchanged. Rows that do not see the key may still get a NaN in
    // column 5 when they share a query block with a row that does (0 * NaN in the P.V tile),
    // as documented in attention.h; otherwise they are unchanged.
    {
      Inputs in = MakeInputs(s);
      in.v.Set({0, key, 1, 5}, kNaN);
      Outputs o;
      ASSERT_TRUE(RunForward(s, in, path, 0, &o).ok());
      o.out.ForEach([&](const Index& i) {
        const bool hit = i[2] >= 2 && i[1] >= key && i[3] == 5;
        const double x = o.out.Get(i), y = base.out.Get(i);
        if (hit) {
          EXPECT_TRUE(std::isnan(x)) << "out[" << i[1] << ", " << i[2] << ", " << i[3] << "]";
        } else if (i[3] != 5 || !std::isnan(x)) {
          EXPECT_EQ(std::memcmp(&x, &y, sizeof(x)), 0)
              << "out[" << i[1] << ", " << i[2] << ", " << i[3] << "] changed";
        }
      });
      for (double x : o.lse.ToVector()) EXPECT_TRUE(std::isfinite(x));
    }
  }
}

// NaN stored at key positions a row never sees does not leak into it: tessera never reads
// masked keys (class 17). Here the NaN keys are visible to no row at all.
TEST(ForwardRegression, NanInMaskedKeysDoesNotLeak) {
  Spec s = Dense(40, 200, 2, 1, 64);
  s.window_left = 20;
  s.window_right = 0;
  s.align = MaskAlign::kTopLeft;  // rows see keys [i - 20, i]: keys >= 40 are never visible
  SCOPED_TRACE(test::Repro(s.Name()));
  const Inputs clean = MakeInputs(s);
  Inputs in = MakeInputs(s);
  for (int64_t j = 40; j < s.seq_k; ++j) {
    for (int64_t d = 0; d < s.dim; ++d) {
      in.k.Set({0, j, 0, d}, kNaN);
      in.v.Set({0, j, 0, d}, kNaN);
    }
  }
  for (Path path : PathsFor(s.dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    Outputs a, b;
    ASSERT_TRUE(RunForward(s, clean, path, 0, &a).ok());
    ASSERT_TRUE(RunForward(s, in, path, 0, &b).ok());
    EXPECT_TRUE(b.out.AllFinite());
    EXPECT_TRUE(SameBits(a, b, true));
  }
}

}  // namespace
}  // namespace tessera
