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

std::vector<float> Random(int64_t n, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}

struct Shape {
  int64_t b, n, hq, hkv, d;
};

// Global positions of each rank's rows under a layout.
std::vector<std::vector<int64_t>> Rows(ShardLayout layout, const std::vector<int64_t>& lengths) {
  std::vector<std::vector<ShardSegment>> segs;
  EXPECT_TRUE(PlanShards(layout, lengths, &segs).ok());
  std::vector<std::vector<int64_t>> rows(lengths.size());
  for (size_t r = 0; r < lengths.size(); ++r)
    for (const auto& s : segs[r])
      for (int64_t i = 0; i < s.length; ++i) rows[r].push_back(s.global_start + i);
  return rows;
}

// Rows `rows` of a [B, N, H, D] tensor, as a [B, rows, H, D] tensor.
std::vector<float> Gather(const std::vector<float>& x, const Shape& s, int64_t h,
                          const std::vector<int64_t>& rows) {
  std::vector<float> out;
  for (int64_t b = 0; b < s.b; ++b)
    for (int64_t t : rows)
      for (int64_t i = 0; i < h * s.d; ++i) out.push_back(x[(b * s.n + t) * h * s.d + i]);
  return out;
}

double MaxRelDiff(const std::vector<float>& got, const std::vector<float>& want) {
  double scale = 1e-30, diff = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    scale = std::max(scale, double(std::fabs(want[i])));
    diff = std::max(diff, double(std::fabs(got[i] - want[i])));
  }
  return diff / std::max(1.0, scale);
}

enum class Algo { kRing, kUlysses };

struct Case {
  Algo algo;
  int ranks;
  ShardLayout layout;
  bool causal;
  Shape shape;
  std::vector<int64_t> lengths;  // empty: even / zigzag cut
};

std::string Name(const Case& c) {
  return std::string(c.algo == Algo::kRing ? "ring" : "ulysses") + " P=" + std::to_string(c.ranks) +
         " " + ShardLayoutName(c.layout) + (c.causal ? " causal" : "") +
         " N=" + std::to_string(c.shape.n) + " Hq=" + std::to_string(c.shape.hq) +
         " Hkv=" + std::to_string(c.shape.hkv);
}

std::vector<int64_t> Lengths(const Case& c) {
  if (!c.lengths.empty()) return c.lengths;
  std::vector<int64_t> l(c.ranks);
  for (int r = 0; r < c.ranks; ++r) {
    l[r] = c.layout == ShardLayout::kZigzag
               ? ZigzagShardLength(c.shape.n, c.ranks, r)
               : c.shape.n / c.ranks + (r < c.shape.n % c.ranks ? 1 : 0);
  }
  return l;
}

// Forward and backward of one case: every rank's shard of out, lse, dq, dk, dv against the same
// rows of the single-process results.
void CheckCase(const Case& c) {
  SCOPED_TRACE(Name(c));
  const Shape& s = c.shape;
  const auto q = Random(s.b * s.n * s.hq * s.d, 1), k = Random(s.b * s.n * s.hkv * s.d, 2),
             v = Random(s.b * s.n * s.hkv * s.d, 3), dout = Random(s.b * s.n * s.hq * s.d, 4);
  std::vector<float> out(q.size()), lse(s.b * s.hq * s.n), dq(q.size()), dk(k.size()), dv(v.size());
  AttentionParams full;
  full.q = MakeView4(const_cast<float*>(q.data()), DType::kF32, s.b, s.n, s.hq, s.d);
  full.k = MakeView4(const_cast<float*>(k.data()), DType::kF32, s.b, s.n, s.hkv, s.d);
  full.v = MakeView4(const_cast<float*>(v.data()), DType::kF32, s.b, s.n, s.hkv, s.d);
  full.out = MakeView4(out.data(), DType::kF32, s.b, s.n, s.hq, s.d);
  full.lse = MakeView3(lse.data(), DType::kF32, s.b, s.hq, s.n);
  full.causal = c.causal;
  Context ctx;
  ctx.num_threads = 1;
  ASSERT_TRUE(AttentionForward(full, ctx).ok());
  AttentionBackwardParams fb;
  fb.forward = full;
  fb.dout = MakeView4(const_cast<float*>(dout.data()), DType::kF32, s.b, s.n, s.hq, s.d);
  fb.dq = MakeView4(dq.data(), DType::kF32, s.b, s.n, s.hq, s.d);
  fb.dk = MakeView4(dk.data(), DType::kF32, s.b, s.n, s.hkv, s.d);
  fb.dv = MakeView4(dv.data(), DType::kF32, s.b, s.n, s.hkv, s.d);
  ASSERT_TRUE(AttentionBackward(fb, ctx).ok());

  const auto lengths = Lengths(c);
  const auto rows = Rows(c.layout, lengths);
  std::vector<std::string> errors(c.ranks);
  std::vector<double> worst(c.ranks, 0.0);
  RunGroup(c.ranks, [&](int r, Communicator& comm) {
    const int64_t n = lengths[r];
    auto lq = Gather(q, s, s.hq, rows[r]), lk = Gather(k, s, s.hkv, rows[r]),
         lv = Gather(v, s, s.hkv, rows[r]), ldout = Gather(dout, s, s.hq, rows[r]);
    std::vector<float> lout(lq.size(), NAN), llse(s.b * s.hq * n, NAN), ldq(lq.size(), NAN),
        ldk(lk.size(), NAN), ldv(lv.size(), NAN);
    SequenceParallelParams p;
    p.layout = c.layout;
    p.local.q = MakeView4(lq.data(), DType::kF32, s.b, n, s.hq, s.d);
    p.local.k = MakeView4(lk.data(), DType::kF32, s.b, n, s.hkv, s.d);
    p.local.v = MakeView4(lv.data(), DType::kF32, s.b, n, s.hkv, s.d);
    p.local.out = MakeView4(lout.data(), DType::kF32, s.b, n, s.hq, s.d);
    p.local.lse = MakeView3(llse.data(), DType::kF32, s.b, s.hq, n);
    p.local.causal = c.causal;
    Context one;
    one.num_threads = 1;
    Status st = c.algo == Algo::kRing ? RingAttentionForward(p, comm, one)
                                      : UlyssesAttentionForward(p, comm, one);
    if (!st.ok()) {
      errors[r] = st.ToString();
      return;
    }
    SequenceParallelBackwardParams bp;
    bp.layout = c.layout;
    bp.local.forward = p.local;
    bp.local.dout = MakeView4(ldout.data(), DType::kF32, s.b, n, s.hq, s.d);
    bp.local.dq = MakeView4(ldq.data(), DType::kF32, s.b, n, s.hq, s.d);
    bp.local.dk = MakeView4(ldk.data(), DType::kF32, s.b, n, s.hkv, s.d);
    bp.local.dv = MakeView4(ldv.data(), DType::kF32, s.b, n, s.hkv, s.d);
    st = c.algo == Algo::kRing ? RingAttentionBackward(bp, comm, one)
                               : UlyssesAttentionBackward(bp, comm, one);
    if (!st.ok()) {
      errors[r] = st.ToString();
      return;
    }
    std::vector<float> want_lse;
    for (int64_t b = 0; b < s.b; ++b)
      for (int64_t h = 0; h < s.hq; ++h)
        for (int64_t t : rows[r]) want_lse.push_back(lse[(b * s.hq + h) * s.n + t]);
    const double e_out = MaxRelDiff(lout, Gather(out, s, s.hq, rows[r]));
    const double e_lse = MaxRelDiff(llse, want_lse);
    const double e_dq = MaxRelDiff(ldq, Gather(dq, s, s.hq, rows[r]));
    const double e_dk = MaxRelDiff(ldk, Gather(dk, s, s.hkv, rows[r]));
    const double e_dv = MaxRelDiff(ldv, Gather(dv, s, s.hkv, rows[r]));
    worst[r] = std::max({e_out, e_lse, e_dq, e_dk, e_dv});
    if (!(e_out <= 2e-6 && e_lse <= 2e-6 && e_dq <= 2e-5 && e_dk <= 2e-5 && e_dv <= 2e-5)) {
      errors[r] = "rank " + std::to_string(r) + ": out " + std::to_string(e_out) + " lse " +
                  std::to_string(e_lse) + " dq " + std::to_string(e_dq) + " dk " +
                  std::to_string(e_dk) + " dv " + std::to_string(e_dv);
    }
  });
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
    std::vector<bool> untouched(3, false);
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
      if (r == 1 && bad_kind == 2) p.local.window_left = 4;  // unsupported on one rank
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
