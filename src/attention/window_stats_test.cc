// SPDX-License-Identifier: Apache-2.0
// The window statistics of the forward (AttentionStats): every path against the fp64 reference
// (ref::AttentionStatsF64) on awkward shapes, the identities (mass of a row sums to 1, the GQA sum
// is the sum of the heads, the statistics do not change the forward's outputs), thread-count
// determinism, and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "attention_cases.h"
#include "ref/attention_ref.h"
#include "tessera/attention.h"
#include "tessera/context.h"
#include "test_util.h"
#include "tolerances.h"

namespace tessera {
namespace {

using test::Inputs;
using test::Outputs;
using test::Spec;
using test::Tensor;

struct StatsCase {
  Spec spec;
  int64_t window = 1;
  bool sum_gqa_group = false;
  std::string name;
};

void PrintTo(const StatsCase& c, std::ostream* os) { *os << c.name; }

struct StatsOutputs {
  Tensor mass, mass_sq, entropy;
};

StatsOutputs MakeStatsOutputs(const StatsCase& c) {
  const Spec& s = c.spec;
  const int64_t heads = c.sum_gqa_group ? s.heads_kv : s.heads_q;
  StatsOutputs o;
  // Padded rows: the kernel must write through the strides.
  o.mass = Tensor(DType::kF32, {s.batch, heads, s.seq_k},
                  Tensor::PaddedStrides({s.batch, heads, s.seq_k}, 3));
  o.mass_sq = Tensor(DType::kF32, {s.batch, heads, s.seq_k});
  o.entropy = Tensor(DType::kF32, {s.batch, s.heads_q, c.window},
                     Tensor::PaddedStrides({s.batch, s.heads_q, c.window}, 1));
  return o;
}

AttentionParams WithStats(AttentionParams p, const StatsCase& c, StatsOutputs* o) {
  p.stats.window = c.window;
  p.stats.sum_gqa_group = c.sum_gqa_group;
  p.stats.key_mass = o->mass.view();
  p.stats.key_mass_sq = o->mass_sq.view();
  p.stats.row_entropy = o->entropy.view();
  return p;
}

::testing::AssertionResult Near(const char* what, const Tensor& got,
                                const std::vector<double>& want, test::Ceiling c) {
  const std::vector<double> g = got.ToVector();
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(std::fabs(g[i] - want[i]) <= c.atol + c.rtol * std::fabs(want[i]))) {
      return ::testing::AssertionFailure() << what << "[" << i << "] = " << test::FormatDouble(g[i])
                                           << ", reference " << test::FormatDouble(want[i]);
    }
  }
  return ::testing::AssertionSuccess();
}

std::vector<StatsCase> Cases() {
  std::vector<StatsCase> cases;
  auto add = [&](Spec s, int64_t window, bool sum, const std::string& name) {
    cases.push_back(StatsCase{std::move(s), window, sum, name});
  };
  add(test::Dense(37, 37, 2, 2, 64), 5, false, "Mha");
  // Keys across chunks of the statistics pass (512) with a tail, GQA summed and not.
  Spec gqa = test::Dense(40, 1100, 4, 2, 48);
  add(gqa, 32, false, "GqaChunks");
  add(gqa, 32, true, "GqaChunksSummed");
  Spec causal = test::Dense(70, 70, 2, 1, 80, DType::kBF16);
  causal.causal = true;
  add(causal, 17, true, "CausalBf16");
  Spec window = test::Dense(50, 90, 2, 2, 32, DType::kF16);
  window.causal = true;
  window.window_left = 9;
  add(window, 50, false, "WindowF16WholeQuery");
  Spec top_left = test::Dense(30, 20, 1, 1, 40);
  top_left.causal = true;
  top_left.align = MaskAlign::kTopLeft;  // the last rows see every key, the first ones few
  add(top_left, 30, false, "TopLeftCausal");
  Spec mods = test::Dense(25, 300, 3, 1, 72);
  mods.softcap = 8.0f;
  mods.alibi = test::AlibiKind::kPerHead;
  mods.batch = 2;
  add(mods, 1, true, "SoftcapAlibiBatch");
  Spec odd = test::Dense(9, 13, 2, 2, 7);  // head dim below a vector
  odd.kv_layout = test::Layout::kHeadsMajor;
  odd.q_layout = test::Layout::kPaddedDim;
  add(odd, 9, false, "TinyDimStrided");
  // Every row past the first sees no key (window_right 0, window_left 0, top-left, Sk < Sq).
  Spec empty_rows = test::Dense(6, 3, 1, 1, 16);
  empty_rows.window_left = 0;
  empty_rows.window_right = 0;
  empty_rows.align = MaskAlign::kTopLeft;
  add(empty_rows, 6, false, "RowsWithoutKeys");
  // Few queries: the forward routes to the decode kernel.
  add(test::Dense(4, 700, 4, 1, 64, DType::kBF16), 4, true, "DecodeRoute");
  return cases;
}

class WindowStatsTest : public ::testing::TestWithParam<StatsCase> {};

TEST_P(WindowStatsTest, MatchesReferenceOnEveryPath) {
  const StatsCase& c = GetParam();
  const Inputs in = test::MakeInputs(c.spec);
  const std::vector<Path> paths = {Path::kReference, Path::kAuto, Path::kGeneric};
  std::vector<double> mass(static_cast<size_t>(
      c.spec.batch * c.spec.seq_k * (c.sum_gqa_group ? c.spec.heads_kv : c.spec.heads_q)));
  std::vector<double> mass_sq(mass.size());
  std::vector<double> entropy(static_cast<size_t>(c.spec.batch * c.spec.heads_q * c.window));
  {
    Outputs o = test::MakeOutputs(c.spec, in);
    StatsOutputs so = MakeStatsOutputs(c);
    ref::AttentionStatsF64(WithStats(test::MakeParams(c.spec, in, &o), c, &so), mass.data(),
                           mass_sq.data(), entropy.data());
  }
  Tensor first_mass;
  for (Path path : paths) {
    for (int32_t threads : {1, 2}) {
      SCOPED_TRACE(std::string("path ") + std::to_string(static_cast<int>(path)) + ", threads " +
                   std::to_string(threads));
      Outputs o = test::MakeOutputs(c.spec, in);
      StatsOutputs so = MakeStatsOutputs(c);
      Context ctx;
      ctx.path = path;
      ctx.num_threads = threads;
      ASSERT_TRUE(AttentionForward(WithStats(test::MakeParams(c.spec, in, &o), c, &so), ctx).ok());
      EXPECT_TRUE(so.mass.OutsideViewUntouched());
      EXPECT_TRUE(so.entropy.OutsideViewUntouched());
      EXPECT_TRUE(Near("key_mass", so.mass, mass, test::kStatsCeiling));
      EXPECT_TRUE(Near("key_mass_sq", so.mass_sq, mass_sq, test::kStatsCeiling));
      EXPECT_TRUE(Near("row_entropy", so.entropy, entropy, test::kEntropyCeiling));
      // The statistics leave the forward's own outputs as they are without them.
      Outputs plain = test::MakeOutputs(c.spec, in);
      ASSERT_TRUE(AttentionForward(test::MakeParams(c.spec, in, &plain), ctx).ok());
      EXPECT_TRUE(plain.out.BitwiseEqual(o.out));
      if (threads == 1) {
        first_mass = so.mass.ContiguousCopy();
      } else {
        EXPECT_TRUE(first_mass.BitwiseEqual(so.mass)) << "the thread count changed the bits";
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, WindowStatsTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<StatsCase>& c) { return c.param.name; });

// Each window row's probabilities sum to 1, so the key mass sums to the number of rows that see
// a key; the GQA sum is the sum of the per-head masses.
TEST(WindowStats, MassIdentities) {
  Spec s = test::Dense(48, 600, 4, 2, 64);
  s.causal = true;
  const Inputs in = test::MakeInputs(s);
  StatsCase per_head{s, 20, false, ""}, summed{s, 20, true, ""};
  Outputs o1 = test::MakeOutputs(s, in), o2 = test::MakeOutputs(s, in);
  StatsOutputs a = MakeStatsOutputs(per_head), b = MakeStatsOutputs(summed);
  ASSERT_TRUE(AttentionForward(WithStats(test::MakeParams(s, in, &o1), per_head, &a), {}).ok());
  ASSERT_TRUE(AttentionForward(WithStats(test::MakeParams(s, in, &o2), summed, &b), {}).ok());
  for (int64_t h = 0; h < s.heads_q; ++h) {
    double total = 0.0;
    for (int64_t j = 0; j < s.seq_k; ++j) total += a.mass.Get({0, h, j});
    EXPECT_NEAR(total, 20.0, 20.0 * test::kStatsCeiling.rtol);
  }
  for (int64_t hk = 0; hk < s.heads_kv; ++hk) {
    for (int64_t j = 0; j < s.seq_k; ++j) {
      const double sum = a.mass.Get({0, 2 * hk, j}) + a.mass.Get({0, 2 * hk + 1, j});
      EXPECT_NEAR(b.mass.Get({0, hk, j}), sum, test::kStatsCeiling.atol + 1e-6 * sum);
    }
  }
}

// The caller's LSE or the call's own: the same statistics, bitwise.
TEST(WindowStats, SameBitsWithAndWithoutLse) {
  Spec s = test::Dense(33, 333, 2, 2, 64);
  const Inputs in = test::MakeInputs(s);
  StatsCase c{s, 8, false, ""};
  Spec no_lse = s;
  no_lse.with_lse = false;
  Outputs o1 = test::MakeOutputs(s, in), o2 = test::MakeOutputs(no_lse, in);
  StatsOutputs a = MakeStatsOutputs(c), b = MakeStatsOutputs(c);
  ASSERT_TRUE(AttentionForward(WithStats(test::MakeParams(s, in, &o1), c, &a), {}).ok());
  ASSERT_TRUE(AttentionForward(WithStats(test::MakeParams(no_lse, in, &o2), c, &b), {}).ok());
  EXPECT_TRUE(a.mass.BitwiseEqual(b.mass));
  EXPECT_TRUE(a.entropy.BitwiseEqual(b.entropy));
}

TEST(WindowStats, BadInput) {
  Spec s = test::Dense(16, 40, 4, 2, 32);
  const Inputs in = test::MakeInputs(s);
  StatsCase c{s, 4, false, ""};
  auto expect_error = [&](const AttentionParams& p, StatusCode code, const std::string& needle,
                          Outputs* o) {
    o->out.Snapshot();
    const Status st = AttentionForward(p, {});
    EXPECT_EQ(st.code(), code) << st.message();
    EXPECT_NE(st.message().find(needle), std::string::npos) << st.message();
    EXPECT_TRUE(o->out.Unchanged());
  };
  {
    Outputs o = test::MakeOutputs(s, in);
    StatsOutputs so = MakeStatsOutputs(c);
    AttentionParams p = WithStats(test::MakeParams(s, in, &o), c, &so);
    p.stats.window = 17;
    expect_error(p, StatusCode::kInvalidArgument, "stats.window", &o);
    p.stats.window = -1;
    expect_error(p, StatusCode::kInvalidArgument, "stats.window", &o);
    p.stats.window = 0;  // outputs set but off
    expect_error(p, StatusCode::kInvalidArgument, "stats.window", &o);
  }
  {
    Outputs o = test::MakeOutputs(s, in);
    StatsOutputs so = MakeStatsOutputs(c);
    AttentionParams p = WithStats(test::MakeParams(s, in, &o), c, &so);
    p.stats.key_mass = TensorView();
    expect_error(p, StatusCode::kInvalidArgument, "stats.key_mass", &o);
  }
  {
    Outputs o = test::MakeOutputs(s, in);
    StatsCase summed{s, 4, true, ""};
    StatsOutputs so = MakeStatsOutputs(c);  // per-head shape while summing over the group
    AttentionParams p = WithStats(test::MakeParams(s, in, &o), summed, &so);
    p.stats.key_mass = so.mass.view();
    expect_error(p, StatusCode::kInvalidArgument, "[B, Hkv, Sk]", &o);
  }
  {
    Outputs o = test::MakeOutputs(s, in);
    StatsOutputs so = MakeStatsOutputs(c);
    AttentionParams p = WithStats(test::MakeParams(s, in, &o), c, &so);
    Tensor wrong(DType::kBF16, {s.batch, s.heads_q, c.window});
    p.stats.row_entropy = wrong.view();
    expect_error(p, StatusCode::kInvalidArgument, "stats.row_entropy", &o);
    p.stats.row_entropy = so.entropy.view();
    p.stats.key_mass_sq = p.stats.key_mass;  // two outputs on the same memory
    expect_error(p, StatusCode::kInvalidArgument, "stats.key_mass", &o);
  }
  {
    Outputs o = test::MakeOutputs(s, in);
    StatsOutputs so = MakeStatsOutputs(c);
    AttentionParams p = WithStats(test::MakeParams(s, in, &o), c, &so);
    p.mask.score = ScoreFunction::kSigmoid;
    p.lse = TensorView();
    expect_error(p, StatusCode::kInvalidArgument, "sigmoid", &o);
  }
  {
    Outputs o = test::MakeOutputs(s, in);
    StatsOutputs so = MakeStatsOutputs(c);
    AttentionParams p = WithStats(test::MakeParams(s, in, &o), c, &so);
    p.mask.sink_tokens = 2;
    expect_error(p, StatusCode::kUnimplemented, "stats", &o);
  }
  {
    // The backward writes no statistics.
    Outputs o = test::MakeOutputs(s, in);
    StatsOutputs so = MakeStatsOutputs(c);
    AttentionBackwardParams bp;
    bp.forward = WithStats(test::MakeParams(s, in, &o), c, &so);
    bp.dout = o.out.view();
    const Status st = AttentionBackward(bp, {});
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("forward.stats.window"), std::string::npos) << st.message();
  }
}

}  // namespace
}  // namespace tessera
