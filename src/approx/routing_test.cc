// SPDX-License-Identifier: Apache-2.0
// Tests of src/approx/routing.cc: against the fp64 reference of the same algorithm (outputs, LSE,
// the EMA centroid update), one cluster of every token against the exact kernel, determinism
// across thread counts, and bad knobs.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "comparator.h"
#include "ref/approx_routing_ref.h"
#include "tessera/approx.h"
#include "tessera/attention.h"
#include "test_tensor.h"

namespace tessera {
namespace {

using test::Rng;
using test::Tensor;

struct Inputs {
  Tensor q, k, v, centroids;
  Inputs(int64_t B, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, int64_t C, const std::string& n)
      : q(DType::kF32, {B, S, Hq, D}),
        k(DType::kF32, {B, S, Hkv, D}),
        v(DType::kF32, {B, S, Hkv, D}),
        centroids(DType::kF32, {Hq, C, D}) {
    Rng rng(test::SeedFor(n));
    q.FillNormal(rng);
    k.FillNormal(rng);
    v.FillNormal(rng);
    centroids.FillNormal(rng);
  }
  ApproxParams Params(int64_t clusters, int64_t window, bool causal) const {
    ApproxParams p;
    p.method = ApproxMethod::kRouting;
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.causal = causal;
    p.routing.clusters = clusters;
    p.routing.window = window;
    p.routing.centroids = centroids.view();
    p.routing.ema = 0.75f;
    return p;
  }
};

struct Case {
  int64_t window;
  bool causal;
};

class RoutingTest : public ::testing::TestWithParam<Case> {};

TEST_P(RoutingTest, MatchesF64) {
  const Case c = GetParam();
  const int64_t B = 2, S = 96, Hq = 4, Hkv = 2, D = 32, C = 4;
  const std::string name = "routing_w" + std::to_string(c.window) + (c.causal ? "_causal" : "");
  Inputs in(B, S, Hq, Hkv, D, C, name);
  Tensor out(DType::kF32, {B, S, Hq, D}), lse(DType::kF32, {B, Hq, S}),
      updated(DType::kF32, {Hq, C, D});
  ApproxParams p = in.Params(C, c.window, c.causal);
  p.out = out.view();
  p.lse = lse.view();
  p.routing.updated_centroids = updated.view();
  Context ctx;
  ctx.num_threads = 2;
  const Status s = ApproxAttention(p, ctx);
  ASSERT_TRUE(s.ok()) << s.message();
  std::vector<double> ref_out(static_cast<size_t>(out.numel())), ref_lse(lse.numel()),
      ref_upd(updated.numel()), mag(ref_out.size());
  ref::RoutingForwardF64(p, ref_out.data(), ref_lse.data(), ref_upd.data());
  Tensor vabs(DType::kF32, {B, S, Hkv, D});
  in.v.ForEach([&](const test::Index& i) { vabs.Set(i, std::fabs(in.v.Get(i))); });
  ApproxParams pa = p;
  pa.v = vabs.view();
  ref::RoutingForwardF64(pa, mag.data(), nullptr, nullptr);
  EXPECT_TRUE(
      test::CheckOutput(DType::kF32, out.ToVector(), ref_out, nullptr, test::Rule::kStandard, &mag))
      << test::Repro(name);
  EXPECT_TRUE(test::CheckLse(lse.ToVector(), ref_lse)) << test::Repro(name);
  EXPECT_TRUE(test::CheckClose(updated.ToVector(), ref_upd, test::kOutputCeilingF32, "centroids"))
      << test::Repro(name);

  for (int32_t threads : {1, 3}) {
    Tensor out2(DType::kF32, {B, S, Hq, D}), lse2(DType::kF32, {B, Hq, S}),
        upd2(DType::kF32, {Hq, C, D});
    p.out = out2.view();
    p.lse = lse2.view();
    p.routing.updated_centroids = upd2.view();
    ctx.num_threads = threads;
    ASSERT_TRUE(ApproxAttention(p, ctx).ok());
    EXPECT_TRUE(out2.BitwiseEqual(out)) << "threads " << threads;
    EXPECT_TRUE(lse2.BitwiseEqual(lse)) << "threads " << threads;
    EXPECT_TRUE(upd2.BitwiseEqual(updated)) << "threads " << threads;
  }
}

// window 0: S / C = 24 per cluster (tokens in several clusters or none); 40: overlapping.
INSTANTIATE_TEST_SUITE_P(Windows, RoutingTest,
                         ::testing::Values(Case{0, false}, Case{0, true}, Case{40, false},
                                           Case{40, true}));

// One cluster taking every token is exact attention, causal or not.
TEST(Routing, OneClusterIsExactAttention) {
  const int64_t B = 1, S = 200, Hq = 4, Hkv = 2, D = 64;
  Inputs in(B, S, Hq, Hkv, D, 1, "routing_one_cluster");
  for (bool causal : {true, false}) {
    Tensor out(DType::kF32, {B, S, Hq, D}), lse(DType::kF32, {B, Hq, S});
    Tensor eout(DType::kF32, {B, S, Hq, D}), else_(DType::kF32, {B, Hq, S});
    ApproxParams p = in.Params(1, 0, causal);
    p.out = out.view();
    p.lse = lse.view();
    ASSERT_TRUE(ApproxAttention(p, Context()).ok());
    AttentionParams a;
    a.q = in.q.view();
    a.k = in.k.view();
    a.v = in.v.view();
    a.out = eout.view();
    a.lse = else_.view();
    a.causal = causal;
    ASSERT_TRUE(AttentionForward(a, Context()).ok());
    EXPECT_TRUE(test::CheckClose(out.ToVector(), eout.ToVector(),
                                 test::IdentityCeiling(DType::kF32), "out"))
        << "causal " << causal;
    EXPECT_TRUE(test::CheckClose(lse.ToVector(), else_.ToVector(), test::kLseCeiling, "lse"));
  }
}

TEST(Routing, BadKnobsWriteNothing) {
  const int64_t B = 1, S = 32, Hq = 2, Hkv = 1, D = 16, C = 4;
  Inputs in(B, S, Hq, Hkv, D, C, "routing_bad");
  Tensor wrong(DType::kF32, {Hq, C + 1, D});
  Tensor out(DType::kF32, {B, S, Hq, D}), updated(DType::kF32, {Hq, C, D});
  out.Snapshot();
  updated.Snapshot();
  const auto expect_error = [&](ApproxParams p, const std::string& field) {
    p.out = out.view();
    if (p.routing.updated_centroids.data == nullptr) p.routing.updated_centroids = updated.view();
    const Status s = ApproxAttention(p, Context());
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << field;
    EXPECT_NE(s.message().find(field), std::string::npos) << s.message();
    EXPECT_TRUE(out.Unchanged()) << field;
    EXPECT_TRUE(updated.Unchanged()) << field;
  };
  expect_error(in.Params(0, 0, true), "routing.clusters");
  expect_error(in.Params(S + 1, 0, true), "routing.clusters");
  expect_error(in.Params(C, S + 1, true), "routing.window");
  expect_error(in.Params(C, -1, true), "routing.window");
  ApproxParams p = in.Params(C, 0, true);
  for (float ema : {1.0f, -0.25f, std::numeric_limits<float>::quiet_NaN()}) {
    p.routing.ema = ema;
    expect_error(p, "routing.ema");
  }
  p = in.Params(C, 0, true);
  p.routing.centroids = TensorView();
  expect_error(p, "routing.centroids");
  p.routing.centroids = wrong.view();
  expect_error(p, "routing.centroids");
  p = in.Params(C, 0, true);
  p.routing.updated_centroids = wrong.view();
  expect_error(p, "routing.updated_centroids");
}

}  // namespace
}  // namespace tessera
