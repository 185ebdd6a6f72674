// SPDX-License-Identifier: Apache-2.0
// Test cases of the sequence-parallel drivers, shared by the in-process tests
// (src/distributed/distributed_test.cc, ranks as threads) and the MPI tests (tests/mpi, ranks as
// processes under mpirun): every rank runs the forward and backward on its shard and compares
// out, lse, dq, dk, dv with the same rows of the single-process kernels on the whole sequence.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/distributed.h"

namespace tessera {
namespace test {

struct Shape {
  int64_t b, n, hq, hkv, d;
};

enum class Algo { kRing, kUlysses };

struct Case {
  Algo algo;
  int ranks;
  ShardLayout layout;
  bool causal;
  Shape shape;
  std::vector<int64_t> lengths;  // empty: the even cut (contiguous) or the zigzag cut
  int64_t window_left = -1, window_right = -1;  // sliding window (global positions)
};

std::string Name(const Case& c);
// Runs case `c` as rank `rank` of `comm` (comm.size() == c.ranks); "" when every output of this
// rank matches, else what differed (or the error).
std::string CheckRank(const Case& c, int rank, Communicator& comm);

// LASP-2 (linear attention): contiguous shards of the given lengths (empty: the even cut).
enum class LinearVariant { kPlain, kDecay, kGla, kScalarGla, kNormalizedElu, kTaylor };
struct Lasp2Case {
  LinearVariant variant;
  int ranks;
  Shape shape;  // d is Dk = Dv
  std::vector<int64_t> lengths;
};
std::string Name(const Lasp2Case& c);
// Forward out and dq, dk, dv (and dgates for GLA) of this rank against the single-process
// LinearAttentionForward / LinearAttentionBackward on the whole sequence.
std::string CheckLasp2Rank(const Lasp2Case& c, int rank, Communicator& comm);

}  // namespace test
}  // namespace tessera
