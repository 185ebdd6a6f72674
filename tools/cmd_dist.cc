// SPDX-License-Identifier: Apache-2.0
// `tessera run --dist` (cmd_dist.h): every rank loads the whole .npy inputs, keeps the rows of its
// shard, runs the driver (ring or Ulysses for the exact op, LASP-2 for the linear op), and sends
// its shard of each output to rank 0 (one pairwise exchange per rank through the same
// communicator), which puts the rows back in global order and publishes the files. Also the pieces
// `bench --dist` shares: the MPI session, the agreement on local checks, the shard cut, the
// pairing of --op and --dist.
#include "cmd_dist.h"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <iomanip>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "cli_common.h"
#include "npy.h"
#include "output_files.h"
#include "tessera/attention.h"

#if defined(TESSERA_HAVE_MPI)
#include <mpi.h>

#include "tessera/distributed_mpi.h"
#endif

namespace tessera {
namespace cli {

const char* DistAlgorithmName(DistAlgorithm algorithm) {
  switch (algorithm) {
    case DistAlgorithm::kRing:
      return "ring";
    case DistAlgorithm::kUlysses:
      return "ulysses";
    case DistAlgorithm::kLasp2:
      return "lasp2";
  }
  return "?";
}

bool ParseDistAlgorithm(const std::string& text, DistAlgorithm* algorithm, std::string* error) {
  for (DistAlgorithm a : {DistAlgorithm::kRing, DistAlgorithm::kUlysses, DistAlgorithm::kLasp2}) {
    if (text == DistAlgorithmName(a)) {
      *algorithm = a;
      return true;
    }
  }
  *error =
      "--dist: expected ring or ulysses (exact attention) or lasp2 (linear attention, with --op "
      "linear), got '" +
      text + "'";
  return false;
}

std::string OpDistError(const std::string& op, const std::string& dist, bool exact_op) {
  DistAlgorithm algorithm = DistAlgorithm::kRing;
  std::string error;
  if (!ParseDistAlgorithm(dist, &algorithm, &error)) return error;
  const bool linear_op = op == "linear";
  if (algorithm == DistAlgorithm::kLasp2 && !linear_op) {
    return "--dist lasp2 and --op " + op +
           ": LASP-2 runs linear attention; expected --op linear with it";
  }
  if (algorithm != DistAlgorithm::kLasp2 && linear_op) {
    return "--op linear and --dist " + dist +
           ": ring and ulysses run exact attention; linear attention runs sequence-parallel with "
           "--dist lasp2";
  }
  if (algorithm != DistAlgorithm::kLasp2 && !exact_op) {
    return "--op " + op + ": not with --dist (ring and ulysses run exact attention)";
  }
  return "";
}

std::string Lasp2OptionError(const std::string& name) {
  std::string why =
      "LASP-2 runs causal chunked linear attention: the linear op's variants and feature maps, "
      "--normalize and --chunk";
  if (name == "--non-causal") {
    why = "LASP-2 is causal: each rank continues the state of the ranks before it";
  } else if (name == "--prefix") {
    why = "the prefix form needs the prefix's keys on every rank";
  } else if (name == "--window") {
    why = "the exact window reaches across shards";
  } else if (name.rfind("--form", 0) == 0) {
    why = "LASP-2 runs the chunked form";
  } else if (name == "--state-in" || name == "--state-out" || name == "--normalizer-in" ||
             name == "--normalizer-out") {
    why = "the driver hands the states between the ranks";
  }
  return name + ": not with --dist lasp2 (" + why + ")";
}

bool CheckNoWindowForLasp2(const LinearOptionText& text, const LinearChoice& choice,
                           std::string* error) {
  if (choice.window == 0) return true;
  if (!text.window.empty()) {
    *error = Lasp2OptionError("--window") + "; expected --window 0 or none, got " + text.window;
  } else {
    *error = "--variant " + std::string(LinearVariantName(choice.variant)) +
             ": its exact window (--window " + std::to_string(choice.window) +
             " by default) reaches across shards; expected --window 0 with --dist lasp2";
  }
  return false;
}

bool ParseShardLayout(const std::string& text, ShardLayout* layout, std::string* error) {
  if (text == "contiguous") {
    *layout = ShardLayout::kContiguous;
  } else if (text == "zigzag") {
    *layout = ShardLayout::kZigzag;
  } else {
    *error = "--layout: expected contiguous or zigzag, got '" + text + "'";
    return false;
  }
  return true;
}

std::string FirstOptionNotIn(const CLI::App& command, const std::vector<std::string>& allowed) {
  for (const CLI::Option* opt : command.get_options()) {
    if (opt->count() == 0) continue;
    // get_name() is empty for a hidden option (--path): its long name instead.
    const std::string name =
        opt->get_lnames().empty() ? opt->get_name() : "--" + opt->get_lnames()[0];
    if (std::find(allowed.begin(), allowed.end(), name) == allowed.end()) return name;
  }
  return "";
}

std::vector<int64_t> ShardLengths(ShardLayout layout, int64_t total, int size) {
  std::vector<int64_t> lengths(size);
  for (int r = 0; r < size; ++r) {
    lengths[r] = layout == ShardLayout::kZigzag ? ZigzagShardLength(total, size, r)
                                                : total / size + (r < total % size ? 1 : 0);
  }
  return lengths;
}

// --- The MPI session -------------------------------------------------------------------------

#if defined(TESSERA_HAVE_MPI)
std::unique_ptr<DistSession> DistSession::Start(std::string* error) {
  int provided = MPI_THREAD_SINGLE;
  if (MPI_Init_thread(nullptr, nullptr, kMpiThreadLevelForOverlap, &provided) != MPI_SUCCESS) {
    *error = "--dist: MPI_Init_thread failed";
    return nullptr;
  }
  std::unique_ptr<DistSession> session(new DistSession());
  session->overlaps_ = provided >= kMpiThreadLevelForOverlap;
  session->comm_ = MakeMpiCommunicator(MPI_COMM_WORLD);
  return session;
}

DistSession::~DistSession() {
  comm_.reset();  // its worker and its duplicate of MPI_COMM_WORLD go before MPI does
  MPI_Finalize();
}
#else
std::unique_ptr<DistSession> DistSession::Start(std::string* error) {
  *error =
      "--dist: this tessera was built without MPI; reconfigure with -DTESSERA_MPI=ON (needs an "
      "MPI library, e.g. Debian's libopenmpi-dev) to run sequence-parallel attention";
  return nullptr;
}

DistSession::~DistSession() = default;
#endif

int DistFail(const std::string& command, int rank, const std::string& message) {
  return Fail(command, rank == 0 ? message : "rank " + std::to_string(rank) + ": " + message);
}

bool AgreeAllOk(Communicator& comm, const std::string& local_error, std::string* error, bool* own) {
  // One fixed-size record per rank: a pass flag and the start of the message, so rank 0 can print
  // what failed elsewhere.
  constexpr size_t kRecord = 1024;
  std::vector<char> mine(kRecord, 0), all(kRecord * comm.size(), 0);
  mine[0] = local_error.empty() ? 1 : 0;
  std::memcpy(mine.data() + 1, local_error.data(), std::min(local_error.size(), kRecord - 2));
  const Status gathered = comm.AllGather(mine.data(), kRecord, all.data());
  *own = true;
  if (!gathered.ok()) {
    *error = gathered.ToString();
    return false;
  }
  if (!local_error.empty()) {
    *error = local_error;
    return false;
  }
  for (int r = 0; r < comm.size(); ++r) {
    const char* record = all.data() + r * kRecord;
    if (record[0] == 1) continue;
    *own = false;
    *error = "rank " + std::to_string(r) + ": " + std::string(record + 1);
    return false;
  }
  return true;
}

namespace {

const char* kRun = "run";

// Copies a shard's rows between a tensor of the whole sequence and the shard's own tensor. Both
// are C-order [outer, rows, row_bytes] (q-like [B, S, H, D]: outer B, a row H * D elements; an LSE
// [B, H, S]: outer B * H, a row one float); `segments` place the shard's rows in the sequence.
void CopyShardRows(const std::vector<ShardSegment>& segments, int64_t outer, int64_t row_bytes,
                   uint8_t* whole, int64_t whole_rows, uint8_t* shard, int64_t shard_rows,
                   bool to_shard) {
  for (int64_t o = 0; o < outer; ++o) {
    for (const ShardSegment& s : segments) {
      if (s.length == 0) continue;
      uint8_t* w = whole + (o * whole_rows + s.global_start) * row_bytes;
      uint8_t* p = shard + (o * shard_rows + s.local_start) * row_bytes;
      const size_t bytes = static_cast<size_t>(s.length * row_bytes);
      if (to_shard) {
        std::memcpy(p, w, bytes);
      } else {
        std::memcpy(w, p, bytes);
      }
    }
  }
}

// Allocates *array of `dtype` and `shape`; "" or what could not be allocated.
std::string Allocate(const char* what, DType dtype, std::vector<int64_t> shape, NpyArray* array) {
  array->dtype = dtype;
  array->shape = std::move(shape);
  array->data = AllocateAligned(array->nbytes());
  if (!array->data) {
    return std::string("cannot allocate ") + what + " (" + std::to_string(array->nbytes()) +
           " bytes)";
  }
  return "";
}

// The product of shape[from..].
int64_t Elements(const std::vector<int64_t>& shape, size_t from) {
  int64_t n = 1;
  for (size_t i = from; i < shape.size(); ++i) n *= shape[i];
  return n;
}

// The cut of the sequence over the ranks, fixed by the first input loaded.
struct ShardPlan {
  ShardLayout layout = ShardLayout::kContiguous;
  int rank = 0;
  int size = 1;
  int64_t total = -1;  // the whole sequence's tokens; -1 until the first input is loaded
  std::vector<int64_t> lengths;
  std::vector<std::vector<ShardSegment>> segments;
  int64_t rows() const { return lengths[rank]; }
};

// Loads the whole input given to `flag` (its tokens on axis 1: [B, S, ...], of one of the ranks
// `dims`, described by `layout`, of one of the dtypes `dtypes`, any when empty) and keeps this
// rank's rows in *shard. The first input fixes the plan's sequence length and cut; the others must
// have as many tokens. *whole_shape (optional) gets the whole input's shape. "" or the error.
std::string LoadShard(const char* flag, const std::string& path, const std::vector<size_t>& dims,
                      const char* layout, const std::vector<DType>& dtypes, ShardPlan* plan,
                      NpyArray* shard, std::vector<int64_t>* whole_shape = nullptr) {
  NpyArray whole;
  std::string error;
  if (!(dtypes.empty() ? LoadNpy(path, &whole, &error) : LoadNpy(path, dtypes, &whole, &error))) {
    return dtypes.empty() ? error : std::string(flag) + " " + error;
  }
  if (std::find(dims.begin(), dims.end(), whole.shape.size()) == dims.end()) {
    return std::string(flag) + " " + path + ": expected a rank-" + std::to_string(dims[0]) +
           " array " + layout + ", got shape " + ShapeToString(whole.shape);
  }
  if (plan->total < 0) {
    plan->total = whole.shape[1];
    plan->lengths = ShardLengths(plan->layout, plan->total, plan->size);
    const Status planned = PlanShards(plan->layout, plan->lengths, &plan->segments);
    if (!planned.ok()) return planned.ToString();
  } else if (whole.shape[1] != plan->total) {
    return std::string(flag) + " " + path + ": expected the " + std::to_string(plan->total) +
           " tokens of --q (sequence-parallel attention needs Sq == Sk), got shape " +
           ShapeToString(whole.shape);
  }
  std::vector<int64_t> shape = whole.shape;
  shape[1] = plan->rows();
  error = Allocate("the input shard", whole.dtype, shape, shard);
  if (!error.empty()) return error;
  CopyShardRows(plan->segments[plan->rank], whole.shape[0],
                Elements(whole.shape, 2) * int64_t(DTypeSize(whole.dtype)), whole.data.get(),
                plan->total, shard->data.get(), plan->rows(), true);
  if (whole_shape != nullptr) *whole_shape = whole.shape;
  return "";
}

// An output of the run: this rank's shard and, on rank 0, the whole sequence; the rows are on
// axis 1 of [outer, rows, row] (see CopyShardRows).
struct ShardedOutput {
  const char* flag;
  const std::string* path;
  NpyArray shard;
  NpyArray whole;
  int64_t outer = 0;
  int64_t row_bytes = 0;
};

// Adds an output of `dtype` whose whole shape is `whole_shape`, the tokens on axis `axis` (1 for
// [B, S, ...], 2 for an LSE [B, H, S]), and allocates this rank's shard of it and, on rank 0, the
// whole. "" or what could not be allocated.
std::string AddOutput(const char* flag, const std::string& path, DType dtype,
                      const std::vector<int64_t>& whole_shape, size_t axis, const ShardPlan& plan,
                      std::vector<ShardedOutput>* outputs) {
  ShardedOutput out;
  out.flag = flag;
  out.path = &path;
  out.outer = 1;
  for (size_t i = 0; i < axis; ++i) out.outer *= whole_shape[i];
  out.row_bytes = Elements(whole_shape, axis + 1) * int64_t(DTypeSize(dtype));
  std::vector<int64_t> shape = whole_shape;
  shape[axis] = plan.rows();
  std::string error = Allocate("the output shard", dtype, shape, &out.shard);
  if (error.empty() && plan.rank == 0) {
    error = Allocate("the output", dtype, whole_shape, &out.whole);
  }
  outputs->push_back(std::move(out));
  return error;
}

// Rank 0 receives every other rank's packed outputs (bytes[r] from rank r) through pairwise
// exchanges, in rank order; the other ranks send theirs. All exchanges are waited for, even after
// an error, so no buffer is left in use.
Status GatherToRoot(Communicator& comm, const std::vector<uint8_t>& mine,
                    const std::vector<int64_t>& bytes,
                    std::vector<std::vector<uint8_t>>* gathered) {
  const int rank = comm.rank(), size = comm.size();
  Status result;
  if (rank != 0) {
    int64_t handle = -1;
    result = comm.StartExchange(mine.data(), static_cast<int64_t>(mine.size()), 0, nullptr, 0, 0,
                                &handle);
    if (result.ok()) result = comm.WaitExchange(handle, nullptr);
    return result;
  }
  gathered->assign(size, {});
  (*gathered)[0] = mine;
  std::vector<int64_t> handles;
  for (int r = 1; r < size; ++r) {
    (*gathered)[r].resize(bytes[r]);
    int64_t handle = -1;
    result = comm.StartExchange(nullptr, 0, r, (*gathered)[r].data(), bytes[r], r, &handle);
    if (!result.ok()) break;
    handles.push_back(handle);
  }
  for (int64_t handle : handles) {
    const Status waited = comm.WaitExchange(handle, nullptr);
    if (result.ok()) result = waited;
  }
  return result;
}

// Agrees on every rank's local checks (`local` empty: passed). True when all passed; otherwise
// false on every rank with *exit_code set, the error printed by the rank that had it and by rank 0.
bool Agreed(const char* cmd, Communicator& comm, const std::string& local, int* exit_code) {
  std::string error;
  bool own = false;
  if (AgreeAllOk(comm, local, &error, &own)) return true;
  *exit_code = own || comm.rank() == 0 ? DistFail(cmd, comm.rank(), error) : kExitError;
  return false;
}

// Gathers every rank's shards of `outputs` on rank 0 (each rank's outputs packed one after the
// other), which puts the rows in place and publishes the files; the verdict is agreed, so every
// rank returns the same exit code.
int GatherAndPublish(const char* cmd, Communicator& comm, const ShardPlan& plan,
                     const std::vector<ShardedOutput>& outputs,
                     const std::vector<FileArg>& input_files) {
  std::vector<uint8_t> mine;
  for (const ShardedOutput& out : outputs) {
    const uint8_t* p = out.shard.data.get();
    mine.insert(mine.end(), p, p + out.shard.nbytes());
  }
  std::vector<int64_t> bytes(plan.size, 0);
  for (int r = 0; r < plan.size; ++r) {
    for (const ShardedOutput& out : outputs) {
      bytes[r] += out.outer * plan.lengths[r] * out.row_bytes;
    }
  }
  std::vector<std::vector<uint8_t>> gathered;
  const Status st = GatherToRoot(comm, mine, bytes, &gathered);
  if (!st.ok()) {
    return DistFail(cmd, plan.rank, "gathering the outputs on rank 0: " + st.ToString());
  }
  std::string local;
  if (plan.rank == 0) {
    for (int r = 0; r < plan.size; ++r) {
      uint8_t* packed = gathered[r].data();
      for (const ShardedOutput& out : outputs) {
        CopyShardRows(plan.segments[r], out.outer, out.row_bytes, out.whole.data.get(), plan.total,
                      packed, plan.lengths[r], false);
        packed += out.outer * plan.lengths[r] * out.row_bytes;
      }
    }
    std::vector<NpyOutput> files;
    for (const ShardedOutput& out : outputs) files.push_back({out.flag, *out.path, &out.whole});
    PublishNpy(input_files, files, &local);
  }
  int exit_code = kExitOk;
  Agreed(cmd, comm, local, &exit_code);
  return exit_code;
}

std::string Milliseconds(double seconds) {
  std::ostringstream s;
  s << std::fixed << std::setprecision(3) << 1e3 * seconds << " ms";
  return s.str();
}

// The rank's timing of one driver call, for --verbose.
std::string Timed(const char* what, double seconds, const DistributedTiming& timing) {
  return std::string(what) + " " + Milliseconds(seconds) + " (compute " +
         Milliseconds(timing.compute_s) + ", waiting " + Milliseconds(timing.wait_s) + ")";
}

// The options `run --op linear --dist lasp2` takes; the linear ones LASP-2 cannot honour
// (--non-causal, --prefix, the state files) are not among them. --window 0 and --form chunked
// are (checked by value).
const std::vector<std::string>& DistLinearRunOptionNames() {
  static const std::vector<std::string> names = {
      "--dist",  "--layout",    "--op",    "--q",           "--k",      "--v",     "--out",
      "--dout",  "--dq",        "--dk",    "--dv",          "--dgates", "--gates", "--variant",
      "--decay", "--normalize", "--chunk", "--feature-map", "--causal", "--scale", "--window",
      "--form",  "--threads",   "--path",  "--target",      "--verbose"};
  return names;
}

}  // namespace

const std::vector<std::string>& DistRunOptionNames() {
  static const std::vector<std::string> names = {
      "--dist",  "--layout",  "--op",      "--q",    "--k",      "--v",      "--out",
      "--lse",   "--dout",    "--dq",      "--dk",   "--dv",     "--causal", "--window",
      "--scale", "--softcap", "--threads", "--path", "--target", "--verbose"};
  return names;
}

std::string DistRunOptionError(const CLI::App& command, const std::string& op,
                               const std::string& dist) {
  if (std::string error = OpDistError(op, dist, op == "exact"); !error.empty()) return error;
  if (op == "linear") {
    const std::string name = FirstOptionNotIn(command, DistLinearRunOptionNames());
    return name.empty() ? "" : Lasp2OptionError(name);
  }
  const std::string name = FirstOptionNotIn(command, DistRunOptionNames());
  if (name.empty()) return "";
  return name +
         ": not with --dist (sequence-parallel attention takes --causal, --window, --scale and "
         "--softcap)";
}

int RunDist(const DistRunOptions& o) {
  std::string error;
  DistAlgorithm algorithm = DistAlgorithm::kRing;
  ShardPlan plan;
  if (!ParseDistAlgorithm(o.dist, &algorithm, &error)) return Fail(kRun, error);
  if (algorithm == DistAlgorithm::kLasp2) {
    return Fail(kRun, OpDistError("exact", o.dist, true));
  }
  if (!ParseShardLayout(o.layout, &plan.layout, &error)) return Fail(kRun, error);
  int64_t window_left = -1, window_right = -1;
  if (!o.window.empty() && !ParseWindow(o.window, &window_left, &window_right, &error)) {
    return Fail(kRun, error);
  }
  for (const auto& [flag, path] :
       {std::pair<const char*, const std::string*>{"--q", &o.q}, {"--k", &o.k}, {"--v", &o.v}}) {
    if (path->empty()) return Fail(kRun, std::string(flag) + " is required with --dist");
  }
  bool backward = false;
  if (!GradientFiles(o.dout, o.dq, o.dk, o.dv, &backward, &error)) return Fail(kRun, error);
  if (!CheckThreads(o.threads, &error)) return Fail(kRun, error);
  Context ctx;
  ctx.num_threads = o.threads;
  if (!ParsePath(o.path, &ctx.path, &error)) return Fail(kRun, error);
  const std::vector<FileArg> input_files = {
      {"--q", o.q}, {"--k", o.k}, {"--v", o.v}, {"--dout", o.dout}};
  const std::vector<FileArg> output_files = {
      {"--out", o.out}, {"--lse", o.lse}, {"--dq", o.dq}, {"--dk", o.dk}, {"--dv", o.dv}};

  // Every check above is the same on every rank; from here on, a failure on one rank is agreed.
  std::unique_ptr<DistSession> session = DistSession::Start(&error);
  if (!session) return Fail(kRun, error);
  Communicator& comm = session->comm();
  plan.rank = session->rank();
  plan.size = session->size();

  // Local work before the agreement: rank 0 checks the destinations; every rank loads the inputs,
  // keeps its rows and allocates its outputs (rank 0 also the whole ones).
  std::string local;
  if (plan.rank == 0) CheckOutputs(input_files, output_files, &local);
  NpyArray q, k, v, dout;  // this rank's shards
  const struct {
    const char* flag;
    const std::string& path;
    NpyArray* shard;
  } inputs[] = {{"--q", o.q, &q}, {"--k", o.k, &k}, {"--v", o.v, &v}, {"--dout", o.dout, &dout}};
  for (const auto& in : inputs) {
    if (!local.empty()) break;
    if (in.path.empty()) continue;  // no backward
    local = LoadShard(in.flag, in.path, {4}, "[B, S, H, D]", {}, &plan, in.shard);
  }

  // The outputs: out and dq take q's shape and dtype, dk and dv those of k and v; the LSE is
  // [B, Hq, S] f32, computed even without --lse when the backward needs it.
  const bool want_lse = !o.lse.empty();
  std::vector<ShardedOutput> outputs;
  NpyArray lse_scratch;
  if (local.empty()) {
    const int64_t b = q.shape[0], hq = q.shape[2];
    // An output of the shape and dtype of an input, over the whole sequence.
    auto add = [&](const char* flag, const std::string& path, const NpyArray& like) {
      const std::vector<int64_t> shape = {like.shape[0], plan.total, like.shape[2], like.shape[3]};
      const std::string e = AddOutput(flag, path, like.dtype, shape, 1, plan, &outputs);
      if (local.empty()) local = e;
    };
    outputs.reserve(5);
    add("--out", o.out, q);
    if (want_lse) {
      const std::string e =
          AddOutput("--lse", o.lse, DType::kF32, {b, hq, plan.total}, 2, plan, &outputs);
      if (local.empty()) local = e;
    } else if (backward) {
      local = Allocate("the LSE shard", DType::kF32, {b, hq, plan.rows()}, &lse_scratch);
    }
    if (backward) {
      add("--dq", o.dq, q);
      add("--dk", o.dk, k);
      add("--dv", o.dv, v);
    }
  }
  int exit_code = kExitOk;
  if (!Agreed(kRun, comm, local, &exit_code)) return exit_code;

  SequenceParallelParams params;
  params.layout = plan.layout;
  AttentionParams& a = params.local;
  a.q = q.View();
  a.k = k.View();
  a.v = v.View();
  a.out = outputs[0].shard.View();
  if (want_lse) {
    a.lse = outputs[1].shard.View();
  } else if (backward) {
    a.lse = lse_scratch.View();
  }
  a.causal = o.causal;
  a.window_left = window_left;
  a.window_right = window_right;
  a.scale = o.scale;
  a.softcap = o.softcap;
  const bool ring = algorithm == DistAlgorithm::kRing;
  using Clock = std::chrono::steady_clock;
  auto start = Clock::now();
  DistributedTiming forward_timing, backward_timing;
  Status st = ring ? RingAttentionForward(params, comm, ctx, &forward_timing)
                   : UlyssesAttentionForward(params, comm, ctx, &forward_timing);
  if (!st.ok()) return DistFail(kRun, plan.rank, st.ToString());
  const double forward_s = std::chrono::duration<double>(Clock::now() - start).count();
  double backward_s = 0.0;
  if (backward) {
    SequenceParallelBackwardParams bparams;
    bparams.layout = plan.layout;
    bparams.local.forward = a;
    bparams.local.dout = dout.View();
    const size_t first_grad = want_lse ? 2 : 1;
    bparams.local.dq = outputs[first_grad].shard.View();
    bparams.local.dk = outputs[first_grad + 1].shard.View();
    bparams.local.dv = outputs[first_grad + 2].shard.View();
    start = Clock::now();
    st = ring ? RingAttentionBackward(bparams, comm, ctx, &backward_timing)
              : UlyssesAttentionBackward(bparams, comm, ctx, &backward_timing);
    if (!st.ok()) return DistFail(kRun, plan.rank, st.ToString());
    backward_s = std::chrono::duration<double>(Clock::now() - start).count();
  }

  exit_code = GatherAndPublish(kRun, comm, plan, outputs, input_files);
  if (exit_code != kExitOk) return exit_code;
  if (o.verbose && plan.rank == 0) {
    std::cerr << "tessera run: --dist " << DistAlgorithmName(algorithm) << " --layout "
              << ShardLayoutName(plan.layout) << ", " << plan.size << " rank(s), N " << plan.total
              << ", threads per rank " << ResolveThreads(ctx)
              << (session->overlaps() ? "" : ", MPI without threads (no overlap)")
              << "; rank 0: " << Timed("forward", forward_s, forward_timing);
    if (backward) std::cerr << ", " << Timed("backward", backward_s, backward_timing);
    std::cerr << "\n";
  }
  return kExitOk;
}

int RunDistLinear(const LinearRunOptions& o, const std::string& layout) {
  // Checks that are the same on every rank, before MPI starts.
  std::string error;
  ShardPlan plan;
  if (!ParseShardLayout(layout, &plan.layout, &error)) return Fail(kRun, error);
  if (plan.layout != ShardLayout::kContiguous) {
    return Fail(kRun, "--layout " + layout +
                          ": --dist lasp2 takes contiguous shards only (each rank continues the "
                          "state of the ranks before it)");
  }
  for (const auto& [flag, path] :
       {std::pair<const char*, const std::string*>{"--q", &o.q}, {"--k", &o.k}, {"--v", &o.v}}) {
    if (path->empty()) return Fail(kRun, std::string(flag) + " is required with --dist");
  }
  if (!CheckThreads(o.threads, &error)) return Fail(kRun, error);
  Context ctx;
  ctx.num_threads = o.threads;
  if (!ParsePath(o.path, &ctx.path, &error)) return Fail(kRun, error);
  LinearChoice choice;
  if (!ResolveLinearOptions(o.text, &choice, &error)) return Fail(kRun, error);
  if (!CheckNoWindowForLasp2(o.text, choice, &error)) return Fail(kRun, error);
  bool recurrent = false;
  if (!ParseLinearForm(o.form, &recurrent, &error)) return Fail(kRun, error);
  if (recurrent) return Fail(kRun, Lasp2OptionError("--form recurrent"));
  // What the command line already refuses by name, for callers that fill the options themselves.
  const struct {
    const char* flag;
    bool given;
  } refused[] = {{"--non-causal", o.non_causal},
                 {"--prefix", !o.prefix.empty()},
                 {"--state-in", !o.state_in.empty()},
                 {"--state-out", !o.state_out.empty()},
                 {"--normalizer-in", !o.normalizer_in.empty()},
                 {"--normalizer-out", !o.normalizer_out.empty()}};
  for (const auto& r : refused) {
    if (r.given) return Fail(kRun, Lasp2OptionError(r.flag));
  }
  int64_t chunk = 64;
  if (!o.chunk.empty() && !ParseNonNegative("--chunk", o.chunk, &chunk, &error)) {
    return Fail(kRun, error);
  }
  bool backward = false;
  if (!GradientFiles(o.dout, o.dq, o.dk, o.dv, &backward, &error)) return Fail(kRun, error);
  std::vector<float> lambdas;
  if (!CheckVariantInputs(o, choice.variant, backward, &lambdas, &error)) {
    return Fail(kRun, error);
  }
  const std::vector<FileArg> input_files = {
      {"--q", o.q}, {"--k", o.k}, {"--v", o.v}, {"--dout", o.dout}, {"--gates", o.gates}};
  const std::vector<FileArg> output_files = {
      {"--out", o.out}, {"--dq", o.dq}, {"--dk", o.dk}, {"--dv", o.dv}, {"--dgates", o.dgates}};

  std::unique_ptr<DistSession> session = DistSession::Start(&error);
  if (!session) return Fail(kRun, error);
  Communicator& comm = session->comm();
  plan.rank = session->rank();
  plan.size = session->size();

  // Local work before the agreement, as in RunDist; the gates are cut along their token axis.
  std::string local;
  if (plan.rank == 0) CheckOutputs(input_files, output_files, &local);
  const std::vector<DType> floats = {DType::kF32, DType::kF16};
  NpyArray q, k, v, dout, gates;  // this rank's shards
  std::vector<int64_t> q_shape, k_shape, v_shape, gates_shape;
  const struct {
    const char* flag;
    const std::string& path;
    NpyArray* shard;
    std::vector<int64_t>* whole_shape;
  } inputs[] = {{"--q", o.q, &q, &q_shape},
                {"--k", o.k, &k, &k_shape},
                {"--v", o.v, &v, &v_shape},
                {"--dout", o.dout, &dout, nullptr}};
  for (const auto& in : inputs) {
    if (!local.empty()) break;
    if (in.path.empty()) continue;  // no backward
    local =
        LoadShard(in.flag, in.path, {4}, "[B, S, H, D]", floats, &plan, in.shard, in.whole_shape);
  }
  if (local.empty() && !lambdas.empty()) ExpandDecay(o.decay, q_shape[2], &lambdas, &local);
  if (local.empty() && !o.gates.empty()) {
    local = LoadShard("--gates", o.gates, {4, 3}, "[B, S, Hq, Dk] or [B, S, Hq]", {DType::kF32},
                      &plan, &gates, &gates_shape);
    const std::vector<int64_t> want = {q_shape[0], q_shape[1], q_shape[2], q_shape[3]};
    if (local.empty() && gates_shape != want &&
        gates_shape != std::vector<int64_t>(want.begin(), want.begin() + 3)) {
      local = "--gates " + o.gates + ": expected shape " + ShapeToString(want) +
              " [B, S, Hq, Dk] or " + ShapeToString({want[0], want[1], want[2]}) +
              " [B, S, Hq] (from q), got " + ShapeToString(gates_shape);
    }
  }

  // The outputs: out [B, N, Hq, Dv] and dq in q's dtype, dk and dv those of k and v, dgates f32
  // in the shape of the gates.
  std::vector<ShardedOutput> outputs;
  if (local.empty()) {
    auto add = [&](const char* flag, const std::string& path, DType dtype,
                   const std::vector<int64_t>& shape) {
      const std::string e = AddOutput(flag, path, dtype, shape, 1, plan, &outputs);
      if (local.empty()) local = e;
    };
    outputs.reserve(5);
    add("--out", o.out, q.dtype, {q_shape[0], q_shape[1], q_shape[2], v_shape[3]});
    if (backward) {
      add("--dq", o.dq, q.dtype, q_shape);
      add("--dk", o.dk, k.dtype, k_shape);
      add("--dv", o.dv, v.dtype, v_shape);
      if (!o.dgates.empty()) add("--dgates", o.dgates, DType::kF32, gates_shape);
    }
  }
  int exit_code = kExitOk;
  if (!Agreed(kRun, comm, local, &exit_code)) return exit_code;

  Lasp2Params params;
  LinearAttentionParams& p = params.local;
  p.q = q.View();
  p.k = k.View();
  p.v = v.View();
  p.out = outputs[0].shard.View();
  p.feature_map = choice.feature_map;
  p.scale = o.scale;
  p.causal = true;
  p.normalize = choice.normalize;
  p.chunk_size = chunk;
  if (!lambdas.empty()) {
    p.decay = MakeView1(lambdas.data(), DType::kF32, static_cast<int64_t>(lambdas.size()));
  }
  if (gates.data) p.gates = gates.View();
  using Clock = std::chrono::steady_clock;
  auto start = Clock::now();
  DistributedTiming forward_timing, backward_timing;
  Status st = Lasp2Forward(params, comm, ctx, &forward_timing);
  if (!st.ok()) return DistFail(kRun, plan.rank, LinearStatusMessage(st));
  const double forward_s = std::chrono::duration<double>(Clock::now() - start).count();
  double backward_s = 0.0;
  if (backward) {
    Lasp2BackwardParams bparams;
    bparams.local.forward = p;
    bparams.local.dout = dout.View();
    bparams.local.dq = outputs[1].shard.View();
    bparams.local.dk = outputs[2].shard.View();
    bparams.local.dv = outputs[3].shard.View();
    if (!o.dgates.empty()) bparams.local.dgates = outputs[4].shard.View();
    start = Clock::now();
    st = Lasp2Backward(bparams, comm, ctx, &backward_timing);
    if (!st.ok()) return DistFail(kRun, plan.rank, LinearStatusMessage(st));
    backward_s = std::chrono::duration<double>(Clock::now() - start).count();
  }

  exit_code = GatherAndPublish(kRun, comm, plan, outputs, input_files);
  if (exit_code != kExitOk) return exit_code;
  if (o.verbose && plan.rank == 0) {
    std::cerr << "tessera run: --op linear --dist lasp2, " << LinearVariantName(choice.variant)
              << " (" << FeatureMapName(choice.feature_map) << " map"
              << (choice.normalize ? ", normalized" : "") << "), chunk " << chunk << ", "
              << plan.size << " rank(s), N " << plan.total << ", threads per rank "
              << ResolveThreads(ctx) << "; rank 0: " << Timed("forward", forward_s, forward_timing)
              << ", all-gathered " << forward_timing.bytes_sent << " bytes";
    if (backward) std::cerr << ", " << Timed("backward", backward_s, backward_timing);
    std::cerr << "\n";
  }
  return kExitOk;
}

}  // namespace cli
}  // namespace tessera
