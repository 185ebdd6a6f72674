// SPDX-License-Identifier: Apache-2.0
// `tessera run --dist` and `tessera bench --dist`: sequence-parallel exact attention
// (tessera/distributed.h: ring attention, Ulysses) across the ranks of an MPI job.
//
//   mpirun -np P tessera run --dist ring|ulysses [--layout contiguous|zigzag] --q Q.npy ...
//   mpirun -np P tessera bench --dist ring|ulysses --seq N --heads H --dim D [--json]
//
// Every rank reads the whole inputs, keeps its shard (the layout's cut), runs the driver over
// MakeMpiCommunicator(MPI_COMM_WORLD), and rank 0 gathers the shards of the outputs and writes the
// files. MPI is initialized only for --dist (and finalized before the command returns); without
// mpirun the process is a singleton job of one rank. A build without MPI (TESSERA_MPI off)
// refuses --dist, naming the option to build with.
//
// Errors never leave a rank waiting for another: the option checks are the same on every rank
// and run before MPI starts, the loading of the inputs is agreed with one collective, the drivers
// agree on their own arguments, and publishing is agreed afterwards. Every rank exits 2 on an
// error; rank 0 prints it, other ranks print their own prefixed with "rank R:".
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bench_harness.h"
#include "tessera/distributed.h"

namespace CLI {
class App;
}  // namespace CLI

namespace tessera {
namespace cli {

enum class DistAlgorithm : int32_t { kRing, kUlysses };

// "ring", "ulysses".
const char* DistAlgorithmName(DistAlgorithm algorithm);

// Parses --dist: "ring" or "ulysses"; false with *error naming --dist otherwise.
bool ParseDistAlgorithm(const std::string& text, DistAlgorithm* algorithm, std::string* error);
// Parses --layout: "contiguous" or "zigzag"; false with *error naming --layout otherwise.
bool ParseShardLayout(const std::string& text, ShardLayout* layout, std::string* error);

// The name of the first option given to `command` that `allowed` does not list ("" when none):
// the options --dist would otherwise ignore are refused by name.
std::string FirstOptionNotIn(const CLI::App& command, const std::vector<std::string>& allowed);

// The token count of every rank: contiguous, the even cut (the first total % size ranks one token
// longer); zigzag, chunks r and 2P - 1 - r of the 2P-chunk cut (ZigzagShardLength).
std::vector<int64_t> ShardLengths(ShardLayout layout, int64_t total, int size);

// --- run --dist ------------------------------------------------------------------------------
struct DistRunOptions {
  std::string dist = "ring";
  std::string layout = "contiguous";
  std::string q, k, v, out, lse;
  std::string dout, dq, dk, dv;  // backward: all four or none
  bool causal = false;
  std::optional<float> scale;
  float softcap = 0.0f;
  int32_t threads = 0;
  std::string path = "auto";
  bool verbose = false;
};

// Runs the command on this rank; returns the process exit code.
int RunDist(const DistRunOptions& o);

// The options `run --dist` takes (with the exact op's files and flags).
const std::vector<std::string>& DistRunOptionNames();

// --- bench --dist ----------------------------------------------------------------------------
struct DistBenchOptions {
  std::string dist;
  std::string layout = "contiguous";
  bool backward = false;
};

// Times the driver on random shards (bench_dist.cc); rank 0 prints the result.
int BenchDist(const bench::BenchOptions& o, const DistBenchOptions& d);

// The options `bench --dist` takes, and the help text of its report (the JSON keys).
const std::vector<std::string>& DistBenchOptionNames();
std::string DistBenchHelp();

// --- shared by run and bench -----------------------------------------------------------------

// MPI for one command: Start initializes MPI (MPI_Init_thread, asking for the thread level under
// which the communicator's exchanges overlap compute) and builds the communicator over
// MPI_COMM_WORLD; the destructor frees the communicator, then finalizes MPI. Without MPI in the
// build, Start returns null with *error naming --dist and the build option.
class DistSession {
 public:
  static std::unique_ptr<DistSession> Start(std::string* error);
  ~DistSession();
  DistSession(const DistSession&) = delete;
  DistSession& operator=(const DistSession&) = delete;

  Communicator& comm() { return *comm_; }
  int rank() const { return comm_->rank(); }
  int size() const { return comm_->size(); }
  // Whether MPI granted the thread level the overlap needs.
  bool overlaps() const { return overlaps_; }

 private:
  DistSession() = default;
  std::unique_ptr<Communicator> comm_;
  bool overlaps_ = false;
};

// Prints an error of this rank, "tessera COMMAND: MESSAGE" on rank 0 and "tessera COMMAND: rank R:
// MESSAGE" on the others, and returns kExitError.
int DistFail(const std::string& command, int rank, const std::string& message);

// One collective over every rank's local checks (`local_error` empty: passed). True when every
// rank passed. Otherwise false on every rank, *error this rank's own message or, where this rank
// passed, the first failing rank's ("rank R: ..."), and *own whether it is this rank's.
bool AgreeAllOk(Communicator& comm, const std::string& local_error, std::string* error, bool* own);

}  // namespace cli
}  // namespace tessera
