// SPDX-License-Identifier: Apache-2.0
// tessera: sequence-parallel attention across processes (ring attention, Ulysses, LASP-2).
//
// A sequence of N tokens is split across P ranks; every rank holds its shard of q, k, v (the
// usual [B, S_r, H, D] views, S_r its token count) and gets its shard of the output.
//   - Ring attention (exact softmax attention): each rank keeps its queries while the K/V shards
//     travel around the ring; every step computes attention of the local queries on the visiting
//     block and merges it into the running (O, LSE) state (merge.h's arithmetic). The backward
//     sends dK/dV around the ring after K/V, so each shard's gradient comes home summed.
//   - Ulysses (exact): an all-to-all turns sequence shards into head shards (every rank gets all
//     N tokens of Hq / P query heads and Hkv / P KV heads), attention runs locally, and a second
//     all-to-all brings the output back to sequence shards.
//   - LASP-2 (linear attention with a state): every rank computes its chunk's state, one
//     all-gather of the states (and chunk decay products), then each rank runs its chunk from the
//     prefix of earlier states. The traffic is P * H * F * Dv floats, whatever N.
//
// The kernels stay communication-free: these drivers call AttentionForward / AttentionBackward /
// LinearAttentionForward / LinearAttentionBackward on blocks and exchange bytes through a
// Communicator. Implementations: MPI (tessera/distributed_mpi.h, built with TESSERA_MPI), an
// in-process group of threads (MakeLocalGroup, for tests and single-machine runs); the Python
// package drives the same steps (RingForwardStep, RingBackwardStep) over torch.distributed or
// mpi4py.
//
// Errors: every driver first validates its local arguments, then all-gathers a fingerprint of the
// options and shapes (one collective before any compute); a bad argument or a mismatch on any rank
// gives an error on every rank (InvalidArgument; the failing rank's message names the argument,
// the others name the failing rank), never a hang and never a partial write.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "tessera/attention.h"
#include "tessera/context.h"
#include "tessera/linear.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {

// Point-to-point exchanges and an all-gather among `size()` ranks. Exchanges are asynchronous:
// several may be in flight; they complete in the order they were started, and every rank starts
// them in the same order (the drivers do). Buffers must stay valid (send: unchanged, recv:
// unread) until WaitExchange returns for that exchange.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Sends send_bytes bytes to rank dst and receives recv_bytes bytes from rank src (either may be
  // 0 bytes; dst == src == rank() copies). Returns a handle for WaitExchange.
  virtual Status StartExchange(const void* send, int64_t send_bytes, int dst, void* recv,
                               int64_t recv_bytes, int src, int64_t* handle) = 0;
  // Waits for the exchange; `transfer_seconds` (optional) gets how long the transfer itself ran
  // (from when the communicator began it until it completed), for the overlap report.
  virtual Status WaitExchange(int64_t handle, double* transfer_seconds) = 0;
  // Blocking: every rank contributes `bytes` bytes; recv gets size() * bytes, in rank order.
  virtual Status AllGather(const void* send, int64_t bytes, void* recv) = 0;
};

// P communicators whose ranks are threads of this process (shared memory, copies). Each must be
// driven by its own thread.
std::vector<std::unique_ptr<Communicator>> MakeLocalGroup(int size);

// Which tokens each rank holds.
enum class ShardLayout : int32_t {
  // Rank r holds one run of consecutive tokens, after those of ranks 0..r-1 (any lengths, 0
  // included).
  kContiguous = 0,
  // The sequence is cut into 2P chunks as even as possible (the first N % 2P chunks one token
  // longer); rank r holds chunks r and 2P - 1 - r, in that order. With causal attention every
  // rank then has about the same work (no rank idles in the ring).
  kZigzag = 1,
};
const char* ShardLayoutName(ShardLayout layout);

// A run of a rank's tokens: local rows [local_start, local_start + length) are global positions
// [global_start, global_start + length).
struct ShardSegment {
  int64_t global_start = 0;
  int64_t local_start = 0;
  int64_t length = 0;
};

// The segments of every rank, from every rank's token count (kZigzag: the counts must be those
// of the 2P-chunk cut of their sum; InvalidArgument otherwise).
Status PlanShards(ShardLayout layout, const std::vector<int64_t>& local_lengths,
                  std::vector<std::vector<ShardSegment>>* segments);
// The token count of rank `rank` of P under kZigzag for a sequence of `total` tokens (to cut
// inputs; PlanShards gives the positions).
int64_t ZigzagShardLength(int64_t total, int size, int rank);

// Per-call timing of a driver, summed over its steps (seconds).
struct DistributedTiming {
  int steps = 0;
  double total_s = 0;     // the whole call on this rank
  double compute_s = 0;   // kernels (block attention, merges, state passes)
  double wait_s = 0;      // blocked waiting for communication (exposed communication)
  double transfer_s = 0;  // communication time as the communicator measured it
  int64_t bytes_sent = 0;
  // 1 - wait / transfer, clipped to [0, 1]: the fraction of communication hidden behind compute.
  double hidden_fraction() const;
};

// --- Exact attention: ring and Ulysses ------------------------------------------------------
// local: this rank's shard, q/out [B, S_r, Hq, D], k/v [B, S_r, Hkv, D], lse [B, Hq, S_r]
// (optional). Options: scale, causal (positions are global: the layout's), softcap; GQA. Windows,
// ALiBi, varlen, masks and statistics are Unimplemented here. Every rank passes the same options.
struct SequenceParallelParams {
  AttentionParams local;
  ShardLayout layout = ShardLayout::kContiguous;
};
struct SequenceParallelBackwardParams {
  // local.forward: as in the forward call, with its out and lse (lse required).
  AttentionBackwardParams local;
  ShardLayout layout = ShardLayout::kContiguous;
};

// Ring attention. The next K/V block's exchange runs while the current block computes (double
// buffered); the backward also overlaps the travelling dK/dV accumulators with the next block.
Status RingAttentionForward(const SequenceParallelParams& params, Communicator& comm,
                            const Context& ctx, DistributedTiming* timing = nullptr);
Status RingAttentionBackward(const SequenceParallelBackwardParams& params, Communicator& comm,
                             const Context& ctx, DistributedTiming* timing = nullptr);

// Ulysses head parallelism: needs Hq % P == 0 and Hkv % P == 0.
Status UlyssesAttentionForward(const SequenceParallelParams& params, Communicator& comm,
                               const Context& ctx, DistributedTiming* timing = nullptr);
Status UlyssesAttentionBackward(const SequenceParallelBackwardParams& params, Communicator& comm,
                                const Context& ctx, DistributedTiming* timing = nullptr);

// Joins the first collective of a driver call (its agreement) with a local error that kept this
// rank from calling the driver (a wrapper's own checks failed): the other ranks' driver call
// then fails with an error naming this rank instead of waiting for it. Returns `error`.
Status JoinWithError(Communicator& comm, const Status& error);

// --- Steps of the ring, for drivers over other communication libraries -------------------------
// One ring step: attention of the local queries (params.q, their segments q_segments) on a
// visiting K/V block (params.k / params.v, segments kv_segments), merged into the running state
// acc_out f32 [B, S_r, Hq, D], acc_lse f32 [B, Hq, S_r] (start from 0 / -inf). params.out and
// params.lse are not used. Rows that see no key of the block keep their state bitwise.
Status RingForwardStep(const AttentionParams& params, const std::vector<ShardSegment>& q_segments,
                       const std::vector<ShardSegment>& kv_segments, const TensorView& acc_out,
                       const TensorView& acc_lse, const Context& ctx);
// Writes the final output (dtype of q) and LSE (optional; acc_lse is read only for it) from the
// running state, after checking every view (InvalidArgument naming it; nothing written then).
Status RingFinishForward(const TensorView& acc_out, const TensorView& acc_lse,
                         const TensorView& out, const TensorView& lse);
// One backward step: gradients of the local queries' attention on the visiting block, given the
// final out and lse of the local queries (params.forward), added to dq_acc f32 [B, S_r, Hq, D]
// and to the block's travelling accumulators dk_acc, dv_acc f32 [B, S_blk, Hkv, D].
// params.dq/dk/dv are not used.
Status RingBackwardStep(const AttentionBackwardParams& params,
                        const std::vector<ShardSegment>& q_segments,
                        const std::vector<ShardSegment>& kv_segments, const TensorView& dq_acc,
                        const TensorView& dk_acc, const TensorView& dv_acc, const Context& ctx);

// --- Linear attention: LASP-2 ------------------------------------------------------------------
// local: this rank's chunk of a causal linear attention (contiguous shards, rank order), any
// feature map, plain / decay / GLA gates (vector or scalar), normalize. Not supported here: the
// BASED window, prefix_len, and state inputs / outputs (the drivers own the state).
struct Lasp2Params {
  LinearAttentionParams local;
};
struct Lasp2BackwardParams {
  LinearAttentionBackwardParams local;
};
Status Lasp2Forward(const Lasp2Params& params, Communicator& comm, const Context& ctx,
                    DistributedTiming* timing = nullptr);
Status Lasp2Backward(const Lasp2BackwardParams& params, Communicator& comm, const Context& ctx,
                     DistributedTiming* timing = nullptr);

}  // namespace tessera
