// SPDX-License-Identifier: Apache-2.0
// The sequence-parallel drivers under mpirun with the MPI communicator (ctest: mpi_ranks_1..4).
// Every rank runs the same cases on its shard; each compares its outputs with the single-process
// kernels (tests/distributed_cases.cc). A failing rank exits non-zero, and so does mpirun.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "distributed_cases.h"
#include "tessera/distributed_mpi.h"

namespace tessera {
namespace {

Communicator* g_comm = nullptr;

using test::Algo;
using test::Case;

void Check(const Case& c) {
  SCOPED_TRACE(test::Name(c));
  EXPECT_EQ(test::CheckRank(c, g_comm->rank(), *g_comm), "") << "rank " << g_comm->rank();
}

TEST(MpiRing, MatchesSingleProcess) {
  const int p = g_comm->size();
  for (ShardLayout layout : {ShardLayout::kContiguous, ShardLayout::kZigzag})
    for (bool causal : {false, true})
      Check({Algo::kRing, p, layout, causal, {2, 53, 4, 2, 16}, {}});
  Check({Algo::kRing, p, ShardLayout::kZigzag, true, {1, 150, 2, 1, 64}, {}});
}

TEST(MpiRing, UnevenAndEmptyShards) {
  const int p = g_comm->size();
  // Rank 0 gets nothing; the others 7, 8, 9, ... tokens.
  std::vector<int64_t> lengths(p, 0);
  int64_t n = 0;
  for (int r = 1; r < p; ++r) n += lengths[r] = 6 + r;
  if (p == 1) n = lengths[0] = 11;
  Check({Algo::kRing, p, ShardLayout::kContiguous, true, {1, n, 2, 1, 32}, lengths});
  // Fewer tokens than 2P zigzag chunks.
  Check({Algo::kRing, p, ShardLayout::kZigzag, true, {1, 2 * p - 1, 2, 2, 16}, {}});
}

TEST(MpiUlysses, MatchesSingleProcess) {
  const int p = g_comm->size();
  const int64_t hq = 2 * p * (p == 3 ? 1 : 2), hkv = hq / 2;
  for (ShardLayout layout : {ShardLayout::kContiguous, ShardLayout::kZigzag})
    for (bool causal : {false, true})
      Check({Algo::kUlysses, p, layout, causal, {2, 37, hq, hkv, 16}, {}});
}

TEST(MpiLasp2, MatchesSingleProcess) {
  using V = test::LinearVariant;
  const int p = g_comm->size();
  for (V variant : {V::kPlain, V::kDecay, V::kGla, V::kScalarGla, V::kNormalizedElu}) {
    SCOPED_TRACE(test::Name(test::Lasp2Case{variant, p, {2, 53, 4, 2, 16}, {}}));
    EXPECT_EQ(test::CheckLasp2Rank({variant, p, {2, 53, 4, 2, 16}, {}}, g_comm->rank(), *g_comm),
              "");
  }
}

// One rank's bad argument is an error on every rank, and no rank hangs.
TEST(MpiErrors, BadArgumentOnOneRank) {
  const int p = g_comm->size();
  const int bad = p - 1;
  const int64_t n = 8, h = 2, d = 16;
  std::vector<float> q(n * h * d, 0.5f), out(q.size(), -7.0f);
  SequenceParallelParams params;
  params.local.q = MakeView4(q.data(), DType::kF32, 1, n, h, d);
  params.local.k = params.local.q;
  params.local.v = params.local.q;
  params.local.out = MakeView4(out.data(), DType::kF32, 1, n, h, d);
  if (g_comm->rank() == bad) params.local.v.shape[3] = 8;
  Status st = RingAttentionForward(params, *g_comm, Context());
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](float x) { return x == -7.0f; }));
  if (g_comm->rank() != bad) {
    EXPECT_NE(st.message().find("rank " + std::to_string(bad)), std::string::npos) << st.message();
  }
  // Options that differ across ranks.
  params.local.v.shape[3] = d;
  params.local.causal = g_comm->rank() == bad && p > 1;
  st = RingAttentionForward(params, *g_comm, Context());
  if (p > 1) {
    EXPECT_FALSE(st.ok());
    EXPECT_NE(st.message().find("causal"), std::string::npos) << st.message();
  } else {
    EXPECT_TRUE(st.ok()) << st.message();
  }
}

}  // namespace
}  // namespace tessera

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, tessera::kMpiThreadLevelForOverlap, &provided);
  ::testing::InitGoogleTest(&argc, argv);
  int result = 0;
  {
    std::unique_ptr<tessera::Communicator> comm = tessera::MakeMpiCommunicator(MPI_COMM_WORLD);
    tessera::g_comm = comm.get();
    result = RUN_ALL_TESTS();
    // Every rank learns whether any failed, so mpirun's status reflects all of them.
    int any = result != 0 ? 1 : 0, all_any = 0;
    MPI_Allreduce(&any, &all_any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    result = all_any;
  }
  MPI_Finalize();
  return result;
}
