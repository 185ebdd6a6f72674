// SPDX-License-Identifier: Apache-2.0
// Tests of src/approx/hilo.cc: against the fp64 reference of the same algorithm (partial edge
// windows, GQA groups split between Hi-Fi and Lo-Fi heads, lse, strided views), the two exact
// limits (a window covering the grid, s = 1), determinism across thread counts, and the rejected
// knobs.
#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "comparator.h"
#include "ref/approx_agent_ref.h"
#include "tessera/approx.h"
#include "tessera/attention.h"
#include "test_tensor.h"
#include "tolerances.h"

namespace tessera {
namespace {

using test::Tensor;

struct HiLoCase {
  int64_t batch = 2, grid_h = 5, grid_w = 7, heads_q = 4, heads_kv = 2, dim = 16;
  int64_t window = 2, lofi_heads = 1;
  bool strided = false, lse = true;
  int64_t seq() const { return grid_h * grid_w; }
};

struct HiLoRun {
  Tensor q, k, v, out, lse;
  ApproxParams params;

  HiLoRun(const HiLoCase& c, const std::string& name) {
    test::Rng rng(test::SeedFor(name));
    const int64_t pad = c.strided ? 5 : 0;
    auto make = [&](int64_t h) {
      const std::vector<int64_t> shape = {c.batch, c.seq(), h, c.dim};
      return Tensor(DType::kF32, shape, Tensor::PaddedStrides(shape, pad));
    };
    q = make(c.heads_q);
    k = make(c.heads_kv);
    v = make(c.heads_kv);
    out = make(c.heads_q);
    lse = Tensor(DType::kF32, {c.batch, c.heads_q, c.seq()});
    q.FillNormal(rng);
    k.FillNormal(rng);
    v.FillNormal(rng);
    params.method = ApproxMethod::kHiLo;
    params.q = q.view();
    params.k = k.view();
    params.v = v.view();
    params.out = out.view();
    if (c.lse) params.lse = lse.view();
    params.hilo.grid_h = c.grid_h;
    params.hilo.grid_w = c.grid_w;
    params.hilo.window = c.window;
    params.hilo.lofi_heads = c.lofi_heads;
  }
};

TEST(HiLo, MatchesReference) {
  struct Named {
    std::string name;
    HiLoCase c;
  };
  std::vector<Named> cases;
  cases.push_back({"5x7 s2, a GQA group split", {}});
  HiLoCase c3;
  c3.window = 3;
  c3.lofi_heads = 2;
  c3.strided = true;
  c3.heads_kv = 4;
  cases.push_back({"5x7 s3 strided, MHA", c3});
  HiLoCase hi;
  hi.grid_h = 8;
  hi.grid_w = 4;
  hi.lofi_heads = 0;
  hi.heads_kv = 1;
  cases.push_back({"8x4 s2 all Hi-Fi, MQA", hi});
  HiLoCase lo;
  lo.window = 4;
  lo.lofi_heads = 4;
  cases.push_back({"5x7 s4 all Lo-Fi", lo});
  HiLoCase rows;
  rows.grid_h = 6;
  rows.grid_w = 3;
  rows.window = 3;
  rows.batch = 1;
  cases.push_back({"6x3 s3, one sequence (windows already contiguous: no gather)", rows});
  for (const Named& n : cases) {
    SCOPED_TRACE(n.name + " " + test::Repro(n.name));
    HiLoRun run(n.c, n.name);
    Context ctx;
    ctx.num_threads = 2;
    ASSERT_TRUE(ApproxAttention(run.params, ctx).ok());
    std::vector<double> ref(static_cast<size_t>(run.out.numel()));
    std::vector<double> ref_lse(static_cast<size_t>(run.lse.numel()));
    ref::HiLoForwardF64(run.params, ref.data(), ref_lse.data());
    EXPECT_TRUE(test::CheckClose(run.out.ToVector(), ref, test::kOutputCeilingF32, "out"));
    EXPECT_TRUE(test::CheckLse(run.lse.ToVector(), ref_lse));
    EXPECT_TRUE(run.out.OutsideViewUntouched());
  }
}

// Full attention of the same inputs by the exact kernel.
Tensor FullAttention(const HiLoRun& run, Tensor* lse) {
  Tensor out(DType::kF32, run.out.shape());
  AttentionParams p;
  p.q = run.q.view();
  p.k = run.k.view();
  p.v = run.v.view();
  p.out = out.view();
  p.lse = lse->view();
  EXPECT_TRUE(AttentionForward(p, Context()).ok());
  return out;
}

TEST(HiLo, ExactLimits) {
  struct Limit {
    std::string name;
    int64_t window, lofi_heads;
  };
  // A window covering the grid makes every Hi-Fi head full attention; s = 1 pools nothing, so
  // every Lo-Fi head is full attention too.
  const std::vector<Limit> limits = {
      {"window covers the grid, all Hi-Fi", 9, 0},
      {"window 1, all Lo-Fi", 1, 4},
  };
  for (const Limit& l : limits) {
    SCOPED_TRACE(l.name);
    HiLoCase c;
    c.window = l.window;
    c.lofi_heads = l.lofi_heads;
    HiLoRun run(c, l.name);
    ASSERT_TRUE(ApproxAttention(run.params, Context()).ok());
    Tensor full_lse(DType::kF32, run.lse.shape());
    const Tensor full = FullAttention(run, &full_lse);
    EXPECT_TRUE(test::CheckClose(run.out.ToVector(), full.ToVector(),
                                 test::IdentityCeiling(DType::kF32), "out vs full attention"));
    EXPECT_TRUE(test::CheckClose(run.lse.ToVector(), full_lse.ToVector(), test::kLseCeiling,
                                 "lse vs full attention"));
  }
}

TEST(HiLo, SameBitsForEveryThreadCount) {
  HiLoCase c;
  c.grid_h = 13;
  c.grid_w = 21;
  c.window = 4;
  HiLoRun one(c, "threads"), two(c, "threads");
  Context ctx1, ctx2;
  ctx1.num_threads = 1;
  ctx2.num_threads = 2;
  ASSERT_TRUE(ApproxAttention(one.params, ctx1).ok());
  ASSERT_TRUE(ApproxAttention(two.params, ctx2).ok());
  EXPECT_TRUE(one.out.BitwiseEqual(two.out));
  EXPECT_TRUE(one.lse.BitwiseEqual(two.lse));
}

TEST(HiLo, BadKnobsAreRejected) {
  struct Bad {
    std::string name, field;
    std::function<void(ApproxParams&)> set;
  };
  const HiLoCase c;
  const std::vector<Bad> bad = {
      {"grid product", "hilo.grid_h * hilo.grid_w", [](ApproxParams& p) { p.hilo.grid_w = 6; }},
      {"grid too large", "hilo.grid_h * hilo.grid_w",
       [](ApproxParams& p) { p.hilo.grid_h = int64_t{1} << 40; }},
      {"grid_h 0", "hilo.grid_h", [](ApproxParams& p) { p.hilo.grid_h = 0; }},
      {"grid_w -1", "hilo.grid_w", [](ApproxParams& p) { p.hilo.grid_w = -1; }},
      {"window 0", "hilo.window", [](ApproxParams& p) { p.hilo.window = 0; }},
      {"lofi_heads -1", "hilo.lofi_heads", [](ApproxParams& p) { p.hilo.lofi_heads = -1; }},
      {"lofi_heads > Hq", "hilo.lofi_heads",
       [&](ApproxParams& p) { p.hilo.lofi_heads = c.heads_q + 1; }},
      {"causal", "causal", [](ApproxParams& p) { p.causal = true; }},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.name);
    HiLoRun run(c, "bad");
    b.set(run.params);
    run.out.Snapshot();
    run.lse.Snapshot();
    const Status s = ApproxAttention(run.params, Context());
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find(b.field), std::string::npos) << s.message();
    EXPECT_TRUE(run.out.Unchanged());
    EXPECT_TRUE(run.lse.Unchanged());
  }
}

}  // namespace
}  // namespace tessera
