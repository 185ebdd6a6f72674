// SPDX-License-Identifier: Apache-2.0
// `tessera bench --io`: the bytes the exact kernels' tiling moves between DRAM and the L2 (a
// model of src/attention's partition and tile sizes), FlashAttention's lower bound for an on-chip
// memory of the L2's size, and, where the CPU exposes them, the last-level-cache misses measured
// around a run (perf_event_open).
#pragma once

#include <cstdint>
#include <string>

namespace tessera {
namespace cli {

struct IoProblem {
  int64_t batch = 1, heads_q = 1, heads_kv = 1, seq_q = 0, seq_k = 0, dim = 0;
  int64_t elem_bytes = 4;  // of q, k, v, out and the gradients
  bool causal = false;     // bottom-right aligned, as the bench runs it
};

// Bytes by what they carry. The model counts every tile a task reads as coming from DRAM (no
// reuse across tasks through the shared L3) and every result written back once: the traffic the
// tiling itself implies.
struct IoTraffic {
  double q = 0;      // Q (backward: Q and dO, once per key block that sees them)
  double kv = 0;     // K and V (forward: once per query block; backward: once) and their packing
  double out = 0;    // O (backward: dK, dV, dQ and the dQ partials' traffic)
  double other = 0;  // LSE, Delta
  double total() const { return q + kv + out + other; }
};

// The forward: tasks of QueryBlock(G) query positions per (sequence, KV head) stream the visible
// K/V tiles (kKeyTile keys) once each; K and V go through the f32 packing when it applies.
IoTraffic ForwardTraffic(const IoProblem& p);
// The backward: Delta's pre-pass, then tasks of kKeyBlock keys per (sequence, KV head) stream the
// Q and dO rows (and LSE, Delta) of every query that sees them and read and write their dQ
// partial rows; the partials are summed at the end.
IoTraffic BackwardTraffic(const IoProblem& p);

// FlashAttention's lower bound (Dao et al. 2022, Theorem 2: Omega(N^2 d^2 / M) accesses for an
// on-chip memory of M elements, d <= M <= N d), with the constant 1: per (sequence, head)
// Sq Sk d^2 / M elements, M = l2_bytes / elem_bytes.
double LowerBoundBytes(const IoProblem& p, int64_t l2_bytes);

// Last-level-cache misses (read and write, all CPUs: every thread of the process is counted,
// and whatever else runs) over a span of time, via perf_event_open. Where the CPU or the kernel
// does not expose them (virtual machines often do not), available() is false and reason() says
// why.
class LlcMissCounter {
 public:
  LlcMissCounter();
  ~LlcMissCounter();
  LlcMissCounter(const LlcMissCounter&) = delete;
  LlcMissCounter& operator=(const LlcMissCounter&) = delete;

  bool available() const { return available_; }
  const std::string& reason() const { return reason_; }
  void Start();
  // Misses since Start(), summed over the counters (read and write misses, every CPU).
  int64_t Stop();

 private:
  static constexpr int kMaxFds = 1024;
  int fds_[kMaxFds];
  int count_ = 0;
  bool available_ = false;
  std::string reason_;
};

}  // namespace cli
}  // namespace tessera
