// SPDX-License-Identifier: Apache-2.0
// Tests of src/approx/agent.cc: against the fp64 reference of the same algorithm (segment
// pooling, biases, dwc, GQA, strided views), the n = S limit against the composition computed by
// the exact kernel twice, determinism across thread counts, and the rejected knobs.
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

struct AgentCase {
  int64_t batch = 2, seq = 37, heads_q = 4, heads_kv = 2, dim = 16, agents = 5;
  bool biases = false, dwc = false, strided = false;
};

struct AgentRun {
  Tensor q, k, v, out, agent_bias, query_bias, dwc;
  ApproxParams params;

  explicit AgentRun(const AgentCase& c, const std::string& name) {
    test::Rng rng(test::SeedFor(name));
    const int64_t pad = c.strided ? 3 : 0;
    auto make = [&](int64_t h) {
      const std::vector<int64_t> shape = {c.batch, c.seq, h, c.dim};
      return Tensor(DType::kF32, shape, Tensor::PaddedStrides(shape, pad));
    };
    q = make(c.heads_q);
    k = make(c.heads_kv);
    v = make(c.heads_kv);
    out = make(c.heads_q);
    q.FillNormal(rng);
    k.FillNormal(rng);
    v.FillNormal(rng);
    params.method = ApproxMethod::kAgent;
    params.q = q.view();
    params.k = k.view();
    params.v = v.view();
    params.out = out.view();
    params.agent.agents = c.agents;
    if (c.biases) {
      agent_bias = Tensor(DType::kF32, {c.heads_q, c.agents, c.seq});
      query_bias = Tensor(DType::kF32, {1, c.seq, c.agents});  // one bias shared by the heads
      agent_bias.FillNormal(rng, 0.5);
      query_bias.FillNormal(rng, 0.5);
      params.agent.agent_bias = agent_bias.view();
      params.agent.query_bias = query_bias.view();
    }
    if (c.dwc) {
      dwc = make(c.heads_q);
      dwc.FillNormal(rng, 0.1);
      params.agent.dwc = dwc.view();
    }
  }
};

TEST(AgentAttention, MatchesReference) {
  struct Named {
    std::string name;
    AgentCase c;
  };
  std::vector<Named> cases;
  cases.push_back({"plain", {}});
  AgentCase biased;
  biased.biases = biased.dwc = biased.strided = true;
  cases.push_back({"biases + dwc, strided", biased});
  AgentCase one;
  one.agents = 1;
  one.heads_kv = 1;
  cases.push_back({"one agent, MQA", one});
  AgentCase wide;
  wide.seq = 70;
  wide.agents = 70;
  wide.dim = 8;
  wide.biases = true;
  cases.push_back({"n = S", wide});
  for (const Named& n : cases) {
    SCOPED_TRACE(n.name + " " + test::Repro(n.name));
    AgentRun run(n.c, n.name);
    Context ctx;
    ctx.num_threads = 2;
    ASSERT_TRUE(ApproxAttention(run.params, ctx).ok());
    std::vector<double> ref(static_cast<size_t>(run.out.numel()));
    ref::AgentForwardF64(run.params, ref.data());
    EXPECT_TRUE(test::CheckClose(run.out.ToVector(), ref, test::kOutputCeilingF32, "out"));
    EXPECT_TRUE(run.out.OutsideViewUntouched());
  }
}

// A = Q when every segment is one row: softmax(s Q Q^T) applied to softmax(s Q K^T) V.
TEST(AgentAttention, AgentsEqualQueriesIsTheComposition) {
  AgentCase c;
  c.seq = 45;
  c.agents = 45;
  AgentRun run(c, "composition");
  Context ctx;
  ASSERT_TRUE(ApproxAttention(run.params, ctx).ok());

  Tensor mid(DType::kF32, {c.batch, c.seq, c.heads_q, c.dim});
  Tensor want(DType::kF32, {c.batch, c.seq, c.heads_q, c.dim});
  AttentionParams first;
  first.q = run.q.view();
  first.k = run.k.view();
  first.v = run.v.view();
  first.out = mid.view();
  ASSERT_TRUE(AttentionForward(first, ctx).ok());
  AttentionParams second;
  second.q = run.q.view();
  second.k = run.q.view();
  second.v = mid.view();
  second.out = want.view();
  ASSERT_TRUE(AttentionForward(second, ctx).ok());
  EXPECT_TRUE(test::CheckClose(run.out.ToVector(), want.ToVector(),
                               test::IdentityCeiling(DType::kF32), "agent vs composition"));
}

TEST(AgentAttention, SameBitsForEveryThreadCount) {
  AgentCase c;
  c.seq = 300;
  c.agents = 7;
  c.biases = c.dwc = true;
  AgentRun one(c, "threads"), two(c, "threads");
  Context ctx1, ctx2;
  ctx1.num_threads = 1;
  ctx2.num_threads = 2;
  ASSERT_TRUE(ApproxAttention(one.params, ctx1).ok());
  ASSERT_TRUE(ApproxAttention(two.params, ctx2).ok());
  EXPECT_TRUE(one.out.BitwiseEqual(two.out));
}

TEST(AgentAttention, BadKnobsAreRejected) {
  AgentCase c;
  c.biases = c.dwc = true;
  struct Bad {
    std::string name, field;
    std::function<void(AgentRun&)> set;
  };
  Tensor wrong_bias(DType::kF32, {c.heads_q, c.agents + 1, c.seq});
  Tensor wrong_query_bias(DType::kF32, {2, c.seq, c.agents});
  Tensor lse(DType::kF32, {c.batch, c.heads_q, c.seq});
  Tensor wrong_dwc(DType::kF32, {c.batch, c.seq, c.heads_q, c.dim + 1});
  const std::vector<Bad> bad = {
      {"no agents", "agent.agents", [](AgentRun& r) { r.params.agent.agents = 0; }},
      {"more agents than tokens", "agent.agents",
       [&](AgentRun& r) { r.params.agent.agents = c.seq + 1; }},
      {"causal", "causal", [](AgentRun& r) { r.params.causal = true; }},
      {"lse", "lse", [&](AgentRun& r) { r.params.lse = lse.view(); }},
      {"agent bias rows", "agent.agent_bias",
       [&](AgentRun& r) { r.params.agent.agent_bias = wrong_bias.view(); }},
      {"query bias heads", "agent.query_bias",
       [&](AgentRun& r) { r.params.agent.query_bias = wrong_query_bias.view(); }},
      {"dwc dim", "agent.dwc", [&](AgentRun& r) { r.params.agent.dwc = wrong_dwc.view(); }},
      {"dwc is out", "agent.dwc", [](AgentRun& r) { r.params.agent.dwc = r.out.view(); }},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.name);
    AgentRun run(c, "bad");
    b.set(run);
    run.out.Snapshot();
    const Status s = ApproxAttention(run.params, Context());
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find(b.field), std::string::npos) << s.message();
    EXPECT_TRUE(run.out.Unchanged());
  }
}

}  // namespace
}  // namespace tessera
