// SPDX-License-Identifier: Apache-2.0
// `tessera bench --dist` (cmd_dist.h): times a sequence-parallel driver on random shards, one per
// rank (seeded by --seed and the rank), under mpirun: ring attention or Ulysses (exact attention),
// LASP-2 (--op linear --dist lasp2, linear attention).
//
// Each timed run is one driver call (with --backward the backward; for the exact drivers the
// forward runs once first for out and the LSE), started together on every rank (an all-gather
// before it, untimed). Right after it, the same exchanges run without compute (comm_only: the
// ring's P - 1 K/V exchanges of the real sizes, and with --backward the travelling dK/dV;
// Ulysses' all-to-all rounds; LASP-2's all-gathers of the chunk states), so the exposed
// communication can be read against what the transfers cost alone on this machine and this link.
// Every rank's timings are all-gathered to rank 0 once at the end, which reports:
//   ms           median over runs of the slowest rank's call
//   compute_ms, wait_ms, transfer_ms   DistributedTiming per call (each rank's median), the
//                largest over the ranks
//   hidden_fraction  1 - wait / transfer of the slowest rank (the driver's own measure)
//   comm_only_ms     median over runs of the slowest rank's exchanges without compute
//   hidden_vs_comm_only  1 - wait_ms / comm_only_ms, clipped to [0, 1]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <iostream>
#include <numeric>
#include <string>
#include <vector>

#include "bench_harness.h"
#include "bench_linear.h"
#include "cli_common.h"
#include "cmd_dist.h"
#include "npy.h"
#include "tessera/attention.h"
#include "tessera/context.h"
#include "tessera/system.h"

namespace tessera {
namespace cli {
namespace {

using bench::Json;
using bench::Median;

const char* kBench = "bench";

// The timings of one run on one rank (seconds), in the order they travel to rank 0.
struct RunSample {
  double total = 0, compute = 0, wait = 0, transfer = 0, comm_only = 0;
};
constexpr int kSampleFields = 5;

// The problem as every rank sees it.
struct DistProblem {
  DistAlgorithm algorithm = DistAlgorithm::kRing;
  ShardLayout layout = ShardLayout::kContiguous;
  DType dtype = DType::kF32;
  int64_t batch = 1, heads = 1, kv_heads = 1, dim = 1;
  bool backward = false;
  std::vector<int64_t> lengths;  // every rank's tokens
};

// The exchanges of an exact driver's call without its compute, of the sizes that call moves (the
// schedule of ring.cc / ulysses.cc: the ring's K/V blocks one step at a time, in the backward
// alongside the travelling f32 dK/dV; Ulysses' pairwise rounds, there and back).
class ExactCommOnly {
 public:
  ExactCommOnly(Communicator& comm, const DistProblem& p) : comm_(comm), p_(p) {
    const int64_t max_len = *std::max_element(p.lengths.begin(), p.lengths.end());
    if (p.algorithm == DistAlgorithm::kRing) {
      for (auto& b : blocks_) b.resize(KvBytes(max_len));
      if (p.backward) {
        for (auto& g : grads_) g.resize(GradBytes(max_len));
      }
    } else {
      const int64_t total = std::accumulate(p.lengths.begin(), p.lengths.end(), int64_t{0});
      send_.resize(std::max(ForwardTokenBytes(), BackTokenBytes()) * total);
      recv_.resize(send_.size());
    }
  }

  Status Run() { return p_.algorithm == DistAlgorithm::kRing ? RunRing() : RunUlysses(); }

 private:
  int64_t KvBytes(int64_t len) const {
    return 2 * p_.batch * len * p_.kv_heads * p_.dim * int64_t(DTypeSize(p_.dtype));
  }
  int64_t GradBytes(int64_t len) const { return 2 * p_.batch * len * p_.kv_heads * p_.dim * 4; }

  // Bytes per token of this rank's head slice that the first all-to-all moves (forward: q, k, v;
  // backward: q, k, v, out, dout and the LSE) and the second brings back (forward: out and the
  // LSE; backward: dq, dk, dv).
  int64_t ForwardTokenBytes() const {
    const int size = static_cast<int>(p_.lengths.size());
    const int64_t es = int64_t(DTypeSize(p_.dtype));
    const int64_t hq = p_.heads / size, hkv = p_.kv_heads / size;
    const int64_t qkv = (hq + 2 * hkv) * p_.dim * es;
    return p_.batch * (p_.backward ? qkv + 2 * hq * p_.dim * es + hq * 4 : qkv);
  }
  int64_t BackTokenBytes() const {
    const int size = static_cast<int>(p_.lengths.size());
    const int64_t es = int64_t(DTypeSize(p_.dtype));
    const int64_t hq = p_.heads / size, hkv = p_.kv_heads / size;
    return p_.batch * (p_.backward ? (hq + 2 * hkv) * p_.dim * es : hq * p_.dim * es + hq * 4);
  }

  Status Exchange(const void* send, int64_t send_bytes, int dst, void* recv, int64_t recv_bytes,
                  int src, int64_t* handle) {
    return comm_.StartExchange(send, send_bytes, dst, recv, recv_bytes, src, handle);
  }

  Status RunRing() {
    const int size = comm_.size(), rank = comm_.rank();
    const int next = (rank + 1) % size, prev = (rank - 1 + size) % size;
    int64_t grad_handle = -1;
    Status result;
    for (int s = 0; s < size && result.ok(); ++s) {
      const int owner = (rank - s + size) % size, next_owner = (owner - 1 + size) % size;
      int64_t kv_handle = -1;
      if (s + 1 < size) {
        result =
            Exchange(blocks_[s % 2].data(), KvBytes(p_.lengths[owner]), next,
                     blocks_[1 - s % 2].data(), KvBytes(p_.lengths[next_owner]), prev, &kv_handle);
      }
      if (p_.backward && size > 1 && result.ok()) {
        if (grad_handle >= 0) result = comm_.WaitExchange(grad_handle, nullptr);
        grad_handle = -1;
        if (result.ok()) {
          result = Exchange(grads_[s % 2].data(), GradBytes(p_.lengths[owner]), next,
                            grads_[1 - s % 2].data(), GradBytes(p_.lengths[next_owner]), prev,
                            &grad_handle);
        }
      }
      if (kv_handle >= 0) {
        const Status waited = comm_.WaitExchange(kv_handle, nullptr);
        if (result.ok()) result = waited;
      }
    }
    if (grad_handle >= 0) {
      const Status waited = comm_.WaitExchange(grad_handle, nullptr);
      if (result.ok()) result = waited;
    }
    return result;
  }

  Status RunUlysses() {
    for (bool back : {false, true}) {
      Status st = AllToAll(back ? BackTokenBytes() : ForwardTokenBytes(), back);
      if (!st.ok()) return st;
    }
    return Status::Ok();
  }

  // Round t sends to rank + t and receives from rank - t: forward, this rank's tokens of the
  // peer's heads; back, the peer's tokens of this rank's heads.
  Status AllToAll(int64_t token_bytes, bool back) {
    const int size = comm_.size(), rank = comm_.rank();
    for (int t = 1; t < size; ++t) {
      const int dst = (rank + t) % size, src = (rank - t + size) % size;
      const int64_t send = token_bytes * (back ? p_.lengths[dst] : p_.lengths[rank]);
      const int64_t recv = token_bytes * (back ? p_.lengths[rank] : p_.lengths[src]);
      int64_t handle = -1;
      Status st = Exchange(send_.data(), send, dst, recv_.data(), recv, src, &handle);
      if (st.ok()) st = comm_.WaitExchange(handle, nullptr);
      if (!st.ok()) return st;
    }
    return Status::Ok();
  }

  Communicator& comm_;
  const DistProblem& p_;
  std::vector<char> blocks_[2], grads_[2];
  std::vector<char> send_, recv_;
};

// LASP-2's all-gathers without their compute: one record per rank of the sizes lasp2.cc's Record
// lays out, in floats with rows = B * Hq * F: the forward gathers the chunk state, its normalizer
// (with normalize) and the chunk decay, rows * (Dv + 1 (+ 1)); the backward without normalize the
// chunk state, the decay and the state gradient in one, rows * (2 Dv + 1); with normalize two
// of rows * (Dv + 2) (the states first, then the gradients that depend on the prefix).
class Lasp2CommOnly {
 public:
  Lasp2CommOnly(Communicator& comm, int64_t rows, int64_t dim_v, bool normalize, bool backward)
      : comm_(comm) {
    const int64_t norm = normalize ? 1 : 0;
    if (!backward) {
      record_floats_ = {rows * (dim_v + 1 + norm)};
    } else if (!normalize) {
      record_floats_ = {rows * (2 * dim_v + 1)};
    } else {
      record_floats_ = {rows * (dim_v + 2), rows * (dim_v + 2)};
    }
    const int64_t largest = *std::max_element(record_floats_.begin(), record_floats_.end());
    send_.assign(largest, 0.0f);
    recv_.assign(largest * comm.size(), 0.0f);
  }

  // Bytes each rank contributes per call, over its all-gathers.
  int64_t bytes() const {
    return 4 * std::accumulate(record_floats_.begin(), record_floats_.end(), int64_t{0});
  }
  int allgathers() const { return static_cast<int>(record_floats_.size()); }

  Status Run() {
    for (int64_t floats : record_floats_) {
      Status st = comm_.AllGather(send_.data(), 4 * floats, recv_.data());
      if (!st.ok()) return st;
    }
    return Status::Ok();
  }

 private:
  Communicator& comm_;
  std::vector<int64_t> record_floats_;
  std::vector<float> send_, recv_;
};

// An untimed collective, so that every rank starts a timed run together.
Status Align(Communicator& comm) {
  const char mine = 0;
  std::vector<char> all(comm.size());
  return comm.AllGather(&mine, 1, all.data());
}

// A driver under test, as the timing loop and the report need it.
struct TimedDriver {
  std::function<Status(DistributedTiming*)> call;  // one driver call
  std::function<Status()> comm_only;               // its exchanges without compute
  double flops = 0;                                // of the whole sequence, per call
  Json problem;                                    // the report's first keys: what was timed
  Json extra;         // keys of this driver only, after the common ones
  std::string title;  // the text report's first line, without the threads
};

// Times `driver` on every rank (as described at the top) and prints the report on rank 0.
int TimeAndReport(const bench::BenchOptions& o, DistSession& session, const Context& ctx,
                  const std::vector<int64_t>& lengths, TimedDriver& driver) {
  Communicator& comm = session.comm();
  const int rank = session.rank(), size = session.size();
  DistributedTiming last;
  // One run: the driver, then its exchanges alone; both started together on every rank.
  auto run = [&](RunSample* sample) -> Status {
    Status s = Align(comm);
    if (!s.ok()) return s;
    last = DistributedTiming();
    s = driver.call(&last);
    if (!s.ok()) return s;
    s = Align(comm);
    if (!s.ok()) return s;
    const auto start = std::chrono::steady_clock::now();
    s = driver.comm_only();
    sample->total = last.total_s;
    sample->compute = last.compute_s;
    sample->wait = last.wait_s;
    sample->transfer = last.transfer_s;
    sample->comm_only =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return s;
  };

  std::vector<RunSample> samples;
  RunSample sample;
  Status st;
  for (int w = 0; w < o.warmup; ++w) {
    st = run(&sample);
    if (!st.ok()) return DistFail(kBench, rank, st.ToString());
  }
  int reps = o.reps;
  if (reps <= 0) {
    // Automatic: about kAutoRepSeconds of runs, from the slowest rank's last run, so that every
    // rank runs as many.
    if (o.warmup == 0) {
      st = run(&sample);
      if (!st.ok()) return DistFail(kBench, rank, st.ToString());
      samples.push_back(sample);
    }
    std::vector<double> totals(size);
    st = comm.AllGather(&sample.total, sizeof(double), totals.data());
    if (!st.ok()) return DistFail(kBench, rank, st.ToString());
    const double per_run = std::max(*std::max_element(totals.begin(), totals.end()), 1e-6);
    reps = static_cast<int>(std::clamp<long>(std::lround(bench::kAutoRepSeconds / per_run),
                                             bench::kMinReps, bench::kMaxAutoReps));
  }
  while (static_cast<int>(samples.size()) < reps) {
    st = run(&sample);
    if (!st.ok()) return DistFail(kBench, rank, st.ToString());
    samples.push_back(sample);
  }

  // Every rank's samples, then its bytes and steps per call, to every rank (rank 0 reports).
  const int64_t words = int64_t{kSampleFields} * reps + 2;
  std::vector<double> mine;
  for (const RunSample& s : samples) {
    mine.insert(mine.end(), {s.total, s.compute, s.wait, s.transfer, s.comm_only});
  }
  mine.push_back(static_cast<double>(last.bytes_sent));
  mine.push_back(static_cast<double>(last.steps));
  std::vector<double> all(words * size);
  st = comm.AllGather(mine.data(), words * int64_t{sizeof(double)}, all.data());
  if (!st.ok()) return DistFail(kBench, rank, st.ToString());
  if (rank != 0) return kExitOk;

  auto at = [&](int r, int rep, int field) { return all[r * words + rep * kSampleFields + field]; };
  auto slowest_median = [&](int field) {
    std::vector<double> per_rep(reps);
    for (int i = 0; i < reps; ++i) {
      per_rep[i] = 0;
      for (int r = 0; r < size; ++r) per_rep[i] = std::max(per_rep[i], at(r, i, field));
    }
    return Median(per_rep);
  };
  auto rank_median = [&](int r, int field) {
    std::vector<double> runs(reps);
    for (int i = 0; i < reps; ++i) runs[i] = at(r, i, field);
    return Median(runs);
  };
  Json per_rank = Json::array();
  double compute = 0, wait = 0, transfer = 0, bytes = 0, slowest_total = -1;
  double hidden = 1.0;
  for (int r = 0; r < size; ++r) {
    const double r_total = rank_median(r, 0), r_compute = rank_median(r, 1),
                 r_wait = rank_median(r, 2), r_transfer = rank_median(r, 3);
    const double r_bytes = all[r * words + words - 2];
    compute = std::max(compute, r_compute);
    wait = std::max(wait, r_wait);
    transfer = std::max(transfer, r_transfer);
    bytes = std::max(bytes, r_bytes);
    if (r_total > slowest_total) {
      slowest_total = r_total;
      hidden = r_transfer > 0 ? std::clamp(1.0 - r_wait / r_transfer, 0.0, 1.0) : 1.0;
    }
    per_rank.push_back({{"rank", r},
                        {"tokens", lengths[r]},
                        {"total_ms", 1e3 * r_total},
                        {"compute_ms", 1e3 * r_compute},
                        {"wait_ms", 1e3 * r_wait},
                        {"transfer_ms", 1e3 * r_transfer},
                        {"bytes_sent", static_cast<int64_t>(r_bytes)}});
  }
  const double ms = 1e3 * slowest_median(0);
  const double comm_only_ms = 1e3 * slowest_median(4);
  const double hidden_vs_comm_only =
      comm_only_ms > 0 ? std::clamp(1.0 - 1e3 * wait / comm_only_ms, 0.0, 1.0) : 1.0;

  Json result = driver.problem;
  result["threads"] = ResolveThreads(ctx);
  result["reps"] = reps;
  result["ms"] = ms;
  result["compute_ms"] = 1e3 * compute;
  result["wait_ms"] = 1e3 * wait;
  result["transfer_ms"] = 1e3 * transfer;
  result["hidden_fraction"] = hidden;
  result["comm_only_ms"] = comm_only_ms;
  result["hidden_vs_comm_only"] = hidden_vs_comm_only;
  result["bytes_sent"] = static_cast<int64_t>(bytes);
  result["steps"] = static_cast<int64_t>(all[words - 1]);
  result["gflops"] = ms > 0 ? driver.flops / (ms * 1e6) : 0.0;
  for (const auto& [key, value] : driver.extra.items()) result[key] = value;
  result["mpi_threads"] = session.overlaps();
  result["simd_target"] = SimdTargetName();
  result["per_rank"] = per_rank;
  if (o.json) {
    std::cout << result.dump() << std::endl;
    return kExitOk;
  }
  std::cout << driver.title << " threads/rank=" << ResolveThreads(ctx) << "\n"
            << "median " << bench::Fixed(ms, 3) << " ms (" << reps << " runs), "
            << bench::Fixed(result["gflops"].get<double>(), 1) << " GFLOP/s; per call: compute "
            << bench::Fixed(1e3 * compute, 3) << " ms, waiting " << bench::Fixed(1e3 * wait, 3)
            << " ms, transfers " << bench::Fixed(1e3 * transfer, 3) << " ms, "
            << static_cast<int64_t>(bytes) << " bytes sent\n"
            << "hidden " << bench::Fixed(100.0 * hidden, 1)
            << "% of the transfers; exchanges alone " << bench::Fixed(comm_only_ms, 3)
            << " ms, of which " << bench::Fixed(100.0 * hidden_vs_comm_only, 1)
            << "% hidden behind compute\n";
  for (int r = 0; r < size; ++r) {
    const Json& e = per_rank[r];
    std::cout << "  rank " << r << ": " << e["tokens"].get<int64_t>() << " tokens, total "
              << bench::Fixed(e["total_ms"].get<double>(), 3) << " ms, compute "
              << bench::Fixed(e["compute_ms"].get<double>(), 3) << " ms, waiting "
              << bench::Fixed(e["wait_ms"].get<double>(), 3) << " ms\n";
  }
  return kExitOk;
}

// Shape checks that are the same on every rank; "" or the error.
std::string CheckShape(const bench::BenchOptions& o, int64_t kv_heads) {
  if (o.batch < 1 || o.heads < 1 || kv_heads < 1 || o.dim < 1 || o.seq < 1 || o.kv_heads < 0) {
    return "expected --batch, --heads, --kv-heads, --dim and --seq >= 1";
  }
  if (o.heads % kv_heads != 0) {
    return "--kv-heads: expected a divisor of --heads " + std::to_string(o.heads) + ", got " +
           std::to_string(kv_heads);
  }
  std::string error;
  if (!CheckThreads(o.threads, &error)) return error;
  if (o.warmup < 0 || o.reps < 0) return "expected --warmup and --reps >= 0";
  return "";
}

// Ring attention or Ulysses.
int BenchExact(const bench::BenchOptions& o, const DistBenchOptions& d, DistAlgorithm algorithm) {
  // Checks that are the same on every rank, before MPI starts.
  std::string error;
  DistProblem p;
  p.algorithm = algorithm;
  if (!ParseShardLayout(d.layout, &p.layout, &error)) return Fail(kBench, error);
  if (!ParseDType(o.dtype, &p.dtype, &error)) return Fail(kBench, error);
  Context ctx;
  ctx.num_threads = o.threads;
  if (!ParsePath(o.path, &ctx.path, &error)) return Fail(kBench, error);
  p.batch = o.batch;
  p.heads = o.heads;
  p.kv_heads = o.kv_heads == 0 ? o.heads : o.kv_heads;
  p.dim = o.dim;
  p.backward = d.backward;
  error = CheckShape(o, p.kv_heads);
  if (!error.empty()) return Fail(kBench, error);
  int64_t elements = 0;
  if (!bench::TensorElements("the queries [B, N, Hq, D]", {o.batch, o.seq, o.heads, o.dim},
                             &elements, &error)) {
    return Fail(kBench, error);
  }

  std::unique_ptr<DistSession> session = DistSession::Start(&error);
  if (!session) return Fail(kBench, error);
  Communicator& comm = session->comm();
  const int rank = session->rank(), size = session->size();
  p.lengths = ShardLengths(p.layout, o.seq, size);
  const int64_t rows = p.lengths[rank];
  const int64_t q_elems = o.batch * rows * o.heads * o.dim;
  const int64_t kv_elems = o.batch * rows * p.kv_heads * o.dim;
  const size_t es = DTypeSize(p.dtype);

  // This rank's shard: its own seeds, so the ranks hold different tokens.
  const uint64_t seed = o.seed + 16 * static_cast<uint64_t>(rank);
  AlignedBytes q = bench::RandomBuffer(p.dtype, q_elems, seed, false);
  AlignedBytes k = bench::RandomBuffer(p.dtype, kv_elems, seed + 1, false);
  AlignedBytes v = bench::RandomBuffer(p.dtype, kv_elems, seed + 2, false);
  AlignedBytes dout, dq, dk, dv;
  AlignedBytes out = AllocateAligned(static_cast<size_t>(q_elems) * es);
  AlignedBytes lse = AllocateAligned(static_cast<size_t>(o.batch * o.heads * rows) * 4);
  bool allocated = q && k && v && out && lse;
  if (p.backward) {
    dout = bench::RandomBuffer(p.dtype, q_elems, seed + 3, false);
    dq = AllocateAligned(static_cast<size_t>(q_elems) * es);
    dk = AllocateAligned(static_cast<size_t>(kv_elems) * es);
    dv = AllocateAligned(static_cast<size_t>(kv_elems) * es);
    allocated = allocated && dout && dq && dk && dv;
  }
  bool own = false;
  if (!AgreeAllOk(comm, allocated ? "" : "cannot allocate this rank's shard", &error, &own)) {
    return own || rank == 0 ? DistFail(kBench, rank, error) : kExitError;
  }

  SequenceParallelParams fwd;
  fwd.layout = p.layout;
  AttentionParams& a = fwd.local;
  a.q = MakeView4(q.get(), p.dtype, o.batch, rows, o.heads, o.dim);
  a.k = MakeView4(k.get(), p.dtype, o.batch, rows, p.kv_heads, o.dim);
  a.v = MakeView4(v.get(), p.dtype, o.batch, rows, p.kv_heads, o.dim);
  a.out = MakeView4(out.get(), p.dtype, o.batch, rows, o.heads, o.dim);
  a.lse = MakeView3(lse.get(), DType::kF32, o.batch, o.heads, rows);
  a.causal = o.causal;
  SequenceParallelBackwardParams bwd;
  bwd.layout = p.layout;
  const bool ring = p.algorithm == DistAlgorithm::kRing;
  if (p.backward) {
    // The forward once, untimed, for out and the LSE.
    const Status st =
        ring ? RingAttentionForward(fwd, comm, ctx) : UlyssesAttentionForward(fwd, comm, ctx);
    if (!st.ok()) return DistFail(kBench, rank, st.ToString());
    bwd.local.forward = a;
    bwd.local.dout = MakeView4(dout.get(), p.dtype, o.batch, rows, o.heads, o.dim);
    bwd.local.dq = MakeView4(dq.get(), p.dtype, o.batch, rows, o.heads, o.dim);
    bwd.local.dk = MakeView4(dk.get(), p.dtype, o.batch, rows, p.kv_heads, o.dim);
    bwd.local.dv = MakeView4(dv.get(), p.dtype, o.batch, rows, p.kv_heads, o.dim);
  }
  ExactCommOnly comm_only(comm, p);
  TimedDriver driver;
  driver.call = [&](DistributedTiming* timing) {
    if (p.backward) {
      return ring ? RingAttentionBackward(bwd, comm, ctx, timing)
                  : UlyssesAttentionBackward(bwd, comm, ctx, timing);
    }
    return ring ? RingAttentionForward(fwd, comm, ctx, timing)
                : UlyssesAttentionForward(fwd, comm, ctx, timing);
  };
  driver.comm_only = [&] { return comm_only.Run(); };
  const double n = static_cast<double>(o.seq);
  driver.flops = 4.0 * static_cast<double>(o.batch * o.heads * o.dim) * n * n;
  if (o.causal) driver.flops *= 0.5;
  if (p.backward) driver.flops *= 2.5;
  driver.problem = {{"dist", DistAlgorithmName(p.algorithm)},
                    {"ranks", size},
                    {"layout", ShardLayoutName(p.layout)},
                    {"dtype", DTypeName(p.dtype)},
                    {"batch", o.batch},
                    {"seq", o.seq},
                    {"heads", o.heads},
                    {"kv_heads", p.kv_heads},
                    {"dim", o.dim},
                    {"causal", o.causal},
                    {"backward", p.backward}};
  driver.title = std::string("tessera bench: --dist ") + DistAlgorithmName(p.algorithm) + " " +
                 (p.backward ? "backward" : "forward") + " ranks=" + std::to_string(size) +
                 " layout=" + ShardLayoutName(p.layout) + " dtype=" + DTypeName(p.dtype) +
                 " B=" + std::to_string(o.batch) + " N=" + std::to_string(o.seq) +
                 " H=" + std::to_string(o.heads) + " Hkv=" + std::to_string(p.kv_heads) +
                 " D=" + std::to_string(o.dim) + " causal=" + (o.causal ? "yes" : "no");
  return TimeAndReport(o, *session, ctx, p.lengths, driver);
}

// LASP-2: causal chunked linear attention of the linear op's variants.
int BenchLasp2(const bench::BenchOptions& o, const DistBenchOptions& d) {
  // Checks that are the same on every rank, before MPI starts.
  std::string error;
  ShardLayout layout = ShardLayout::kContiguous;
  if (!ParseShardLayout(d.layout, &layout, &error)) return Fail(kBench, error);
  if (layout != ShardLayout::kContiguous) {
    return Fail(kBench, "--layout " + d.layout +
                            ": --dist lasp2 takes contiguous shards only (each rank continues "
                            "the state of the ranks before it)");
  }
  DType dtype = DType::kF32;
  if (!ParseDType(o.dtype, &dtype, &error)) return Fail(kBench, error);
  Context ctx;
  ctx.num_threads = o.threads;
  if (!ParsePath(o.path, &ctx.path, &error)) return Fail(kBench, error);
  LinearOptionText text;
  text.variant = o.variant;
  text.feature_map = o.feature_map;
  text.normalize = o.normalize;
  text.window = o.window;
  LinearChoice choice;
  if (!ResolveLinearOptions(text, &choice, &error)) return Fail(kBench, error);
  if (!CheckNoWindowForLasp2(text, choice, &error)) return Fail(kBench, error);
  bool recurrent = false;
  if (!ParseLinearForm(o.form, &recurrent, &error)) return Fail(kBench, error);
  if (recurrent) return Fail(kBench, Lasp2OptionError("--form recurrent"));
  const bool based = choice.variant == LinearVariant::kBased;
  if (o.feature_dim != 0 && !based) {
    return Fail(kBench,
                "--feature-dim: only with --variant based (its q/k head dim); the other "
                "variants take theirs from --dim");
  }
  const int64_t kv_heads = o.kv_heads == 0 ? o.heads : o.kv_heads;
  error = CheckShape(o, kv_heads);
  if (error.empty() && (o.dim_v < 0 || o.feature_dim < 0)) {
    error = "expected --dim-v and --feature-dim >= 1 when given";
  }
  if (!error.empty()) return Fail(kBench, error);
  const int64_t B = o.batch, N = o.seq, H = o.heads;
  const int64_t Dk = based ? (o.feature_dim > 0 ? o.feature_dim : bench::kBasedFeatureDim) : o.dim;
  const int64_t Dv = o.dim_v > 0 ? o.dim_v : o.dim;
  const int64_t F = LinearFeatureDim(choice.feature_map, Dk);
  int64_t unused = 0;
  if (!bench::TensorElements("the queries [B, N, Hq, Dk]", {B, N, H, Dk}, &unused, &error) ||
      !bench::TensorElements("the output [B, N, Hq, Dv]", {B, N, H, Dv}, &unused, &error) ||
      !bench::TensorElements("the state [B, Hq, F, Dv]", {B, H, F, Dv}, &unused, &error)) {
    return Fail(kBench, error);
  }

  std::unique_ptr<DistSession> session = DistSession::Start(&error);
  if (!session) return Fail(kBench, error);
  Communicator& comm = session->comm();
  const int rank = session->rank(), size = session->size();
  const std::vector<int64_t> lengths = ShardLengths(layout, N, size);
  const int64_t rows = lengths[rank];
  const bool gla = choice.variant == LinearVariant::kGla;
  const int64_t q_elems = B * rows * H * Dk, k_elems = B * rows * kv_heads * Dk;
  const int64_t v_elems = B * rows * kv_heads * Dv, out_elems = B * rows * H * Dv;
  const size_t es = DTypeSize(dtype);

  // This rank's shard, from its own seeds: the inputs of bench --op linear (bench_linear.h).
  const uint64_t seed = o.seed + 16 * static_cast<uint64_t>(rank);
  AlignedBytes q = bench::NormalBuffer(dtype, q_elems, seed);
  AlignedBytes k = bench::NormalBuffer(dtype, k_elems, seed + 1);
  AlignedBytes v = bench::NormalBuffer(dtype, v_elems, seed + 2);
  AlignedBytes out = AllocateAligned(static_cast<size_t>(out_elems) * es);
  AlignedBytes gates, dout, dq, dk, dv, dgates;
  bool allocated = q && k && v && out;
  if (gla) {
    gates = bench::GateBuffer(q_elems, seed + 3);
    allocated = allocated && gates;
  }
  if (d.backward) {
    dout = bench::NormalBuffer(dtype, out_elems, seed + 4);
    dq = AllocateAligned(static_cast<size_t>(q_elems) * es);
    dk = AllocateAligned(static_cast<size_t>(k_elems) * es);
    dv = AllocateAligned(static_cast<size_t>(v_elems) * es);
    allocated = allocated && dout && dq && dk && dv;
    if (gla) {
      dgates = AllocateAligned(static_cast<size_t>(q_elems) * sizeof(float));
      allocated = allocated && dgates;
    }
  }
  bool own = false;
  if (!AgreeAllOk(comm, allocated ? "" : "cannot allocate this rank's shard", &error, &own)) {
    return own || rank == 0 ? DistFail(kBench, rank, error) : kExitError;
  }

  std::vector<float> lambdas;
  if (choice.variant == LinearVariant::kDecay) lambdas = bench::RetNetDecayRates(H);
  Lasp2Params fwd;
  LinearAttentionParams& p = fwd.local;
  p.q = MakeView4(q.get(), dtype, B, rows, H, Dk);
  p.k = MakeView4(k.get(), dtype, B, rows, kv_heads, Dk);
  p.v = MakeView4(v.get(), dtype, B, rows, kv_heads, Dv);
  p.out = MakeView4(out.get(), dtype, B, rows, H, Dv);
  p.feature_map = choice.feature_map;
  p.causal = true;
  p.normalize = choice.normalize;
  p.chunk_size = o.chunk;
  if (!lambdas.empty()) p.decay = MakeView1(lambdas.data(), DType::kF32, H);
  if (gla) p.gates = MakeView4(gates.get(), DType::kF32, B, rows, H, Dk);
  Lasp2BackwardParams bwd;
  if (d.backward) {
    // LinearAttentionBackward does not read forward.out: no forward first.
    bwd.local.forward = p;
    bwd.local.dout = MakeView4(dout.get(), dtype, B, rows, H, Dv);
    bwd.local.dq = MakeView4(dq.get(), dtype, B, rows, H, Dk);
    bwd.local.dk = MakeView4(dk.get(), dtype, B, rows, kv_heads, Dk);
    bwd.local.dv = MakeView4(dv.get(), dtype, B, rows, kv_heads, Dv);
    if (gla) bwd.local.dgates = MakeView4(dgates.get(), DType::kF32, B, rows, H, Dk);
  }
  Lasp2CommOnly comm_only(comm, B * H * F, Dv, choice.normalize, d.backward);
  TimedDriver driver;
  driver.call = [&](DistributedTiming* timing) {
    return d.backward ? Lasp2Backward(bwd, comm, ctx, timing)
                      : Lasp2Forward(fwd, comm, ctx, timing);
  };
  driver.comm_only = [&] { return comm_only.Run(); };
  // As bench --op linear counts the forward; the backward's four products per token (dq, the
  // state gradient, dk, dv) against the forward's two: twice that.
  driver.flops = bench::LinearFlops(static_cast<double>(B * H), static_cast<double>(N), F, Dv,
                                    choice.normalize, 0.0, Dk) *
                 (d.backward ? 2.0 : 1.0);
  driver.problem = {{"dist", "lasp2"},
                    {"ranks", size},
                    {"layout", ShardLayoutName(layout)},
                    {"dtype", DTypeName(dtype)},
                    {"batch", B},
                    {"seq", N},
                    {"heads", H},
                    {"kv_heads", kv_heads},
                    {"dim", o.dim},
                    {"dim_qk", Dk},
                    {"dim_v", Dv},
                    {"variant", LinearVariantName(choice.variant)},
                    {"feature_map", FeatureMapName(choice.feature_map)},
                    {"feature_dim", F},
                    {"normalize", choice.normalize},
                    {"chunk", o.chunk},
                    {"causal", true},
                    {"backward", d.backward}};
  driver.extra = {{"allgathers", comm_only.allgathers()}, {"allgather_bytes", comm_only.bytes()}};
  driver.title = std::string("tessera bench: --op linear --dist lasp2 ") +
                 (d.backward ? "backward" : "forward") + " ranks=" + std::to_string(size) +
                 " variant=" + LinearVariantName(choice.variant) +
                 " phi=" + FeatureMapName(choice.feature_map) + " F=" + std::to_string(F) +
                 " normalize=" + (choice.normalize ? "yes" : "no") + " dtype=" + DTypeName(dtype) +
                 " B=" + std::to_string(B) + " N=" + std::to_string(N) + " H=" + std::to_string(H) +
                 " Hkv=" + std::to_string(kv_heads) + " Dk=" + std::to_string(Dk) +
                 " Dv=" + std::to_string(Dv) + " chunk=" + std::to_string(o.chunk);
  return TimeAndReport(o, *session, ctx, lengths, driver);
}

// The options `bench --dist ring|ulysses` takes, and those of `bench --op linear --dist lasp2`.
const std::vector<std::string>& ExactBenchOptionNames() {
  static const std::vector<std::string> names = {
      "--dist",   "--layout", "--backward", "--batch", "--heads",   "--kv-heads",
      "--seq",    "--dim",    "--causal",   "--dtype", "--threads", "--reps",
      "--warmup", "--json",   "--seed",     "--path",  "--target"};
  return names;
}
const std::vector<std::string>& Lasp2BenchOptionNames() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n = ExactBenchOptionNames();
    for (const char* linear : {"--op", "--variant", "--feature-map", "--dim-v", "--feature-dim",
                               "--normalize", "--chunk", "--window", "--form"}) {
      n.push_back(linear);
    }
    return n;
  }();
  return names;
}

}  // namespace

std::string DistBenchOptionError(const CLI::App& command, const bench::BenchOptions& o,
                                 const DistBenchOptions& d) {
  if (std::string error = OpDistError(o.op, d.dist, o.op == "forward"); !error.empty()) {
    return error;
  }
  if (o.op == "linear") {
    const std::string name = FirstOptionNotIn(command, Lasp2BenchOptionNames());
    return name.empty() ? "" : Lasp2OptionError(name);
  }
  const std::string name = FirstOptionNotIn(command, ExactBenchOptionNames());
  return name.empty() ? "" : name + ": not with --dist";
}

std::string DistBenchHelp() {
  return R"(Sequence parallel (--dist ring|ulysses, or --op linear --dist lasp2, under mpirun -np P):
random shards of a [B, N, H, D] problem (--batch, --seq N, --heads, --kv-heads, --dim, --dtype,
--causal, --layout; lasp2: the linear op's --variant, --feature-map, --normalize, --dim-v,
--chunk, causal and contiguous), one per rank, seeded by --seed and the rank; times the driver
(--backward: its backward, after one untimed forward for ring and ulysses) and prints one result
on rank 0. --threads is per rank. JSON keys: dist, ranks, layout, dtype, batch, seq (N, the
whole sequence), heads, kv_heads, dim, causal, backward, threads, reps, ms (median over runs of
the slowest rank's call), compute_ms, wait_ms (blocked on communication), transfer_ms (the
communicator's transfer time; each the median per call of a rank, the largest over the ranks),
hidden_fraction (1 - wait / transfer of the slowest rank), comm_only_ms (the same exchanges
without compute, timed in the same runs: the ring's P - 1 K/V exchanges, with --backward also the
dK/dV ones; Ulysses' all-to-alls; LASP-2's all-gathers), hidden_vs_comm_only (1 - wait_ms /
comm_only_ms, clipped to [0, 1]), bytes_sent (per call, the largest over the ranks), steps,
gflops (FLOPs of the whole sequence / ms: forward 4*B*H*N*N*D, causal half, backward 2.5x;
lasp2 as --op linear counts it, backward 2x), mpi_threads (whether MPI granted the thread level
the overlap needs), simd_target, per_rank (each rank's tokens, total_ms, compute_ms, wait_ms,
transfer_ms, bytes_sent). lasp2 also: dim_qk, dim_v, variant, feature_map, feature_dim,
normalize, chunk, allgathers and allgather_bytes (per rank per call, 4 bytes a float: the
forward's record B*Hq*F*(Dv+1) floats, +B*Hq*F with --normalize; the backward's one of
B*Hq*F*(2*Dv+1), or with --normalize two of B*Hq*F*(Dv+2)).

)";
}

int BenchDist(const bench::BenchOptions& o, const DistBenchOptions& d) {
  std::string error;
  DistAlgorithm algorithm = DistAlgorithm::kRing;
  if (!ParseDistAlgorithm(d.dist, &algorithm, &error)) return Fail(kBench, error);
  if (algorithm == DistAlgorithm::kLasp2) {
    if (o.op != "linear") return Fail(kBench, OpDistError(o.op, d.dist, o.op == "forward"));
    return BenchLasp2(o, d);
  }
  return BenchExact(o, d, algorithm);
}

}  // namespace cli
}  // namespace tessera
