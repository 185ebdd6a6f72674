// SPDX-License-Identifier: Apache-2.0
// `tessera run --dist` and `tessera bench --dist`: sequence-parallel attention
// (tessera/distributed.h) across the ranks of an MPI job: exact attention by ring attention or
// Ulysses, linear attention by LASP-2.
//
//   mpirun -np P tessera run --dist ring|ulysses [--layout contiguous|zigzag] --q Q.npy ...
//   mpirun -np P tessera run --op linear --dist lasp2 [--variant ...] --q Q.npy ...
//   mpirun -np P tessera bench --dist ring|ulysses --seq N --heads H --dim D [--json]
//   mpirun -np P tessera bench --op linear --dist lasp2 --seq N --heads H --dim D [--json]
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
#include "cmd_run_linear.h"
#include "tessera/distributed.h"

namespace CLI {
class App;
}  // namespace CLI

namespace tessera {
namespace cli {

// ring and ulysses run exact attention (--op exact of run, forward of bench), lasp2 linear
// attention (--op linear).
enum class DistAlgorithm : int32_t { kRing, kUlysses, kLasp2 };

// "ring", "ulysses", "lasp2".
const char* DistAlgorithmName(DistAlgorithm algorithm);

// Parses --dist: "ring", "ulysses" or "lasp2"; false with *error naming --dist otherwise.
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
  std::string window;  // "left,right" by global position (-1: unbounded), "" for none
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

// What is wrong with --op and the other options given to `run --dist` ("" when nothing): ring and
// ulysses take the exact op, lasp2 the linear op (an error names both options), and each only the
// options its driver takes (the first other one is named).
std::string DistRunOptionError(const CLI::App& command, const std::string& op,
                               const std::string& dist);

// --- run --op linear --dist lasp2 ----------------------------------------------------------------
// Every rank loads the whole inputs, keeps its contiguous shard (the even cut; the gates cut along
// their token axis like q), runs Lasp2Forward (and Lasp2Backward with --dout), and rank 0 gathers
// out (dq, dk, dv, dgates) and writes them. `o` holds the linear op's options (cmd_run_linear.h);
// `layout` is --layout, which must be contiguous. Returns the process exit code.
int RunDistLinear(const LinearRunOptions& o, const std::string& layout);

// --- bench --dist ----------------------------------------------------------------------------
struct DistBenchOptions {
  std::string dist;
  std::string layout = "contiguous";
  bool backward = false;
};

// Times the driver on random shards (bench_dist.cc); rank 0 prints the result. With lasp2, `o`
// holds the linear op's options (o.normalize resolved from the flags).
int BenchDist(const bench::BenchOptions& o, const DistBenchOptions& d);

// What is wrong with --op and the other options given to `bench --dist` ("" when nothing): ring
// and ulysses time exact attention (--op left at its default), lasp2 the linear op (--op linear),
// each with only the options its driver takes.
std::string DistBenchOptionError(const CLI::App& command, const bench::BenchOptions& o,
                                 const DistBenchOptions& d);

// The help text of the report of `bench --dist` (the JSON keys).
std::string DistBenchHelp();

// LASP-2 has no exact window: *error names --window (given, not 0) or --variant based (whose
// default window is kBasedWindow) when `choice` has one.
bool CheckNoWindowForLasp2(const LinearOptionText& text, const LinearChoice& choice,
                           std::string* error);

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

// The pairing of --op and --dist ("" when they go together; also a bad --dist): ring and ulysses
// run exact attention (`exact_op`: `op` is the command's exact op), lasp2 linear attention (--op
// linear); the error names both options.
std::string OpDistError(const std::string& op, const std::string& dist, bool exact_op);

// The error of an option `run` or `bench` takes that --dist lasp2 does not: "NAME: not with
// --dist lasp2 (why)".
std::string Lasp2OptionError(const std::string& name);

// Prints an error of this rank, "tessera COMMAND: MESSAGE" on rank 0 and "tessera COMMAND: rank R:
// MESSAGE" on the others, and returns kExitError.
int DistFail(const std::string& command, int rank, const std::string& message);

// One collective over every rank's local checks (`local_error` empty: passed). True when every
// rank passed. Otherwise false on every rank, *error this rank's own message or, where this rank
// passed, the first failing rank's ("rank R: ..."), and *own whether it is this rank's.
bool AgreeAllOk(Communicator& comm, const std::string& local_error, std::string* error, bool* own);

}  // namespace cli
}  // namespace tessera
