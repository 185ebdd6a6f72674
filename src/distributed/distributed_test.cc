// SPDX-License-Identifier: Apache-2.0
// Sequence-parallel attention over an in-process group (ranks as threads): ring and Ulysses,
// forward and backward, against the single-process kernels on the whole sequence; shard plans;
// errors on every rank. The same drivers run under mpirun in tests/mpi (MPI communicator).
#include "tessera/distributed.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "distributed_cases.h"
#include "tessera/attention.h"

namespace tessera {
namespace {

// Runs fn(rank, comm) on P threads, one per rank of a local group.
void RunGroup(int size, const std::function<void(int, Communicator&)>& fn) {
  auto comms = MakeLocalGroup(size);
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) threads.emplace_back([&, r] { fn(r, *comms[r]); });
  for (auto& t : threads) t.join();
}

using test::Algo;
using test::Case;

void CheckCase(const Case& c) {
  SCOPED_TRACE(test::Name(c));
  std::vector<std::string> errors(c.ranks);
  RunGroup(c.ranks, [&](int r, Communicator& comm) { errors[r] = test::CheckRank(c, r, comm); });
  for (int r = 0; r < c.ranks; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

TEST(RingAttention, MatchesSingleProcess) {
  for (int ranks : {1, 2, 3, 4})
    for (ShardLayout layout : {ShardLayout::kContiguous, ShardLayout::kZigzag})
      for (bool causal : {false, true}) {
        CheckCase({Algo::kRing, ranks, layout, causal, {2, 53, 4, 2, 16}, {}});
      }
}

TEST(RingAttention, UnevenAndEmptyShards) {
  CheckCase({Algo::kRing, 3, ShardLayout::kContiguous, true, {1, 40, 2, 1, 32}, {17, 0, 23}});
  CheckCase({Algo::kRing, 4, ShardLayout::kContiguous, false, {1, 9, 2, 2, 8}, {0, 5, 0, 4}});
  // Fewer tokens than 2P chunks: zigzag shards of 0 tokens.
  CheckCase({Algo::kRing, 4, ShardLayout::kZigzag, true, {1, 5, 2, 2, 16}, {}});
}

// Sliding windows by global position: blocks outside the window are skipped, the others cut.
TEST(RingAttention, SlidingWindows) {
  for (int ranks : {2, 3, 4})
    for (ShardLayout layout : {ShardLayout::kContiguous, ShardLayout::kZigzag}) {
      CheckCase({Algo::kRing, ranks, layout, true, {1, 61, 2, 1, 16}, {}, 7, -1});
      CheckCase({Algo::kRing, ranks, layout, false, {1, 61, 2, 1, 16}, {}, 5, 3});
      CheckCase({Algo::kRing, ranks, layout, false, {1, 61, 2, 1, 16}, {}, -1, 0});
      CheckCase({Algo::kRing, ranks, layout, true, {1, 61, 2, 1, 16}, {}, 0, -1});
      CheckCase({Algo::kUlysses, 2, layout, true, {1, 61, 2, 2, 16}, {}, 9, -1});
    }
  CheckCase(
      {Algo::kRing, 3, ShardLayout::kContiguous, false, {1, 40, 2, 1, 16}, {17, 0, 23}, 4, 12});
}

TEST(RingAttention, FastHeadDim) {
  CheckCase({Algo::kRing, 2, ShardLayout::kZigzag, true, {1, 150, 2, 1, 64}, {}});
}

TEST(UlyssesAttention, MatchesSingleProcess) {
  for (int ranks : {1, 2, 4})
    for (ShardLayout layout : {ShardLayout::kContiguous, ShardLayout::kZigzag})
      for (bool causal : {false, true}) {
        CheckCase({Algo::kUlysses, ranks, layout, causal, {2, 37, 8, 4, 16}, {}});
      }
  CheckCase({Algo::kUlysses, 3, ShardLayout::kContiguous, true, {1, 30, 6, 3, 16}, {11, 0, 19}});
}

void CheckLasp2(const test::Lasp2Case& c) {
  SCOPED_TRACE(test::Name(c));
  std::vector<std::string> errors(c.ranks);
  RunGroup(c.ranks,
           [&](int r, Communicator& comm) { errors[r] = test::CheckLasp2Rank(c, r, comm); });
  for (int r = 0; r < c.ranks; ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

TEST(Lasp2, MatchesSingleProcess) {
  using V = test::LinearVariant;
  for (int ranks : {1, 2, 3, 4})
    for (V variant : {V::kPlain, V::kDecay, V::kGla, V::kScalarGla, V::kNormalizedElu}) {
      CheckLasp2({variant, ranks, {2, 53, 4, 2, 16}, {}});
    }
  CheckLasp2({V::kTaylor, 3, {1, 40, 2, 1, 8}, {}});
}

TEST(Lasp2, UnevenAndEmptyShards) {
  using V = test::LinearVariant;
  for (V variant : {V::kDecay, V::kGla, V::kNormalizedElu}) {
    CheckLasp2({variant, 4, {1, 50, 2, 2, 16}, {13, 0, 30, 7}});
  }
}

TEST(Lasp2, NonCausalIsAnError) {
  RunGroup(2, [&](int, Communicator& comm) {
    const int64_t n = 4, h = 2, d = 8;
    std::vector<float> x(n * h * d, 0.5f), out(x.size(), -7.0f);
    Lasp2Params p;
    p.local.q = MakeView4(x.data(), DType::kF32, 1, n, h, d);
    p.local.k = p.local.q;
    p.local.v = p.local.q;
    p.local.out = MakeView4(out.data(), DType::kF32, 1, n, h, d);
    p.local.causal = false;
    Status st = Lasp2Forward(p, comm, Context());
    EXPECT_FALSE(st.ok());
    EXPECT_NE(st.message().find("causal"), std::string::npos) << st.message();
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float v) { return v == -7.0f; }));
  });
}

TEST(RingSteps, FinishForwardChecksItsViews) {
  std::vector<float> acc(2 * 3 * 4, 1.0f), acc_lse(3 * 2, 0.0f), out(acc.size(), -7.0f),
      lse(acc_lse.size(), -7.0f);
  const TensorView acc_v = MakeView4(acc.data(), DType::kF32, 1, 3, 2, 4);
  const TensorView acc_lse_v = MakeView3(acc_lse.data(), DType::kF32, 1, 2, 3);
  Status st = RingFinishForward(acc_v, acc_lse_v, MakeView4(out.data(), DType::kF32, 1, 2, 3, 4),
                                MakeView3(lse.data(), DType::kF32, 1, 2, 3));
  EXPECT_NE(st.message().find("out: expected shape"), std::string::npos) << st.message();
  st = RingFinishForward(acc_v, MakeView3(acc_lse.data(), DType::kF32, 1, 3, 2),
                         MakeView4(out.data(), DType::kF32, 1, 3, 2, 4),
                         MakeView3(lse.data(), DType::kF32, 1, 2, 3));
  EXPECT_NE(st.message().find("acc_lse"), std::string::npos) << st.message();
  st = RingFinishForward(acc_v, acc_lse_v, MakeView4(acc.data(), DType::kF32, 1, 3, 2, 4),
                         TensorView());
  EXPECT_NE(st.message().find("overlap"), std::string::npos) << st.message();
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return x == -7.0f; }));
  EXPECT_TRUE(std::all_of(lse.begin(), lse.end(), [](float x) { return x == -7.0f; }));
  st = RingFinishForward(acc_v, acc_lse_v, MakeView4(out.data(), DType::kF32, 1, 3, 2, 4),
                         MakeView3(lse.data(), DType::kF32, 1, 2, 3));
  EXPECT_TRUE(st.ok()) << st.message();
  EXPECT_EQ(out[5], 1.0f);
}

TEST(ShardPlan, ZigzagCut) {
  std::vector<std::vector<ShardSegment>> segs;
  ASSERT_TRUE(PlanShards(ShardLayout::kZigzag, {3, 3}, &segs).ok());  // chunks 2,2,1,1 of 6
  ASSERT_EQ(segs[0].size(), 2u);
  EXPECT_EQ(segs[0][0].global_start, 0);
  EXPECT_EQ(segs[0][0].length, 2);
  EXPECT_EQ(segs[0][1].global_start, 5);
  EXPECT_EQ(segs[0][1].length, 1);
  EXPECT_EQ(segs[1][0].global_start, 2);
  EXPECT_EQ(segs[1][1].global_start, 4);
  EXPECT_EQ(segs[1][1].local_start, 2);
  Status st = PlanShards(ShardLayout::kZigzag, {4, 2}, &segs);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("shard of rank 0"), std::string::npos) << st.message();
}

// A bad argument on one rank, or options that differ across ranks: every rank returns an error
// (none hangs), and no output is written.
TEST(RingAttention, ErrorsOnEveryRank) {
  for (int bad_kind = 0; bad_kind < 3; ++bad_kind) {
    SCOPED_TRACE(bad_kind);
    std::vector<std::string> msgs(3);
    // One char per rank, not vector<bool>: its bits share words, and the ranks are threads.
    std::vector<char> untouched(3, 0);
    RunGroup(3, [&](int r, Communicator& comm) {
      const int64_t n = 8, h = 2, d = 16;
      std::vector<float> q(n * h * d, 0.5f), k(q), v(q), out(q.size(), -7.0f);
      SequenceParallelParams p;
      p.local.q = MakeView4(q.data(), DType::kF32, 1, n, h, d);
      p.local.k = MakeView4(k.data(), DType::kF32, 1, n, h, d);
      p.local.v = MakeView4(v.data(), DType::kF32, 1, n, h, d);
      p.local.out = MakeView4(out.data(), DType::kF32, 1, n, h, d);
      if (r == 1 && bad_kind == 0) p.local.k.shape[3] = 8;   // wrong head dim on rank 1
      if (r == 2 && bad_kind == 1) p.local.causal = true;    // options differ
      if (r == 1 && bad_kind == 2) p.local.window_left = 4;  // differs on one rank
      Status st = RingAttentionForward(p, comm, Context());
      msgs[r] = st.message();
      untouched[r] =
          !st.ok() && std::all_of(out.begin(), out.end(), [](float x) { return x == -7.0f; });
    });
    for (int r = 0; r < 3; ++r) {
      EXPECT_TRUE(untouched[r]) << "rank " << r << ": " << msgs[r];
    }
    if (bad_kind == 0) {
      EXPECT_NE(msgs[1].find("k"), std::string::npos) << msgs[1];
      EXPECT_NE(msgs[0].find("rank 1"), std::string::npos) << msgs[0];
    }
    if (bad_kind == 1) {
      EXPECT_NE(msgs[0].find("causal"), std::string::npos) << msgs[0];
    }
    if (bad_kind == 2) {
      EXPECT_NE(msgs[1].find("window_left"), std::string::npos) << msgs[1];
    }
  }
}

// A wrapper whose own checks failed joins the agreement with its error: the other ranks' call
// fails naming it, and nobody waits.
TEST(RingAttention, JoinWithErrorFailsTheOtherRanks) {
  std::vector<std::string> msgs(3);
  RunGroup(3, [&](int r, Communicator& comm) {
    const int64_t n = 4, h = 2, d = 8;
    std::vector<float> q(n * h * d, 0.5f), out(q.size(), -7.0f);
    if (r == 2) {
      msgs[r] = JoinWithError(comm, Status::InvalidArgument("q: a wrapper's own check")).message();
      return;
    }
    SequenceParallelParams p;
    p.local.q = MakeView4(q.data(), DType::kF32, 1, n, h, d);
    p.local.k = p.local.q;
    p.local.v = p.local.q;
    p.local.out = MakeView4(out.data(), DType::kF32, 1, n, h, d);
    msgs[r] = RingAttentionForward(p, comm, Context()).message();
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return x == -7.0f; }));
  });
  EXPECT_NE(msgs[0].find("rank 2"), std::string::npos) << msgs[0];
  EXPECT_NE(msgs[1].find("rank 2"), std::string::npos) << msgs[1];
  EXPECT_NE(msgs[2].find("wrapper"), std::string::npos) << msgs[2];
}

TEST(UlyssesAttention, HeadsNotDivisibleIsAnError) {
  RunGroup(3, [&](int, Communicator& comm) {
    const int64_t n = 4, h = 4, d = 8;
    std::vector<float> q(n * h * d, 0.5f), out(q.size());
    SequenceParallelParams p;
    p.local.q = MakeView4(q.data(), DType::kF32, 1, n, h, d);
    p.local.k = p.local.q;
    p.local.v = p.local.q;
    p.local.out = MakeView4(out.data(), DType::kF32, 1, n, h, d);
    Status st = UlyssesAttentionForward(p, comm, Context());
    EXPECT_FALSE(st.ok());
    EXPECT_NE(st.message().find("divisible"), std::string::npos) << st.message();
  });
}

}  // namespace
}  // namespace tessera
