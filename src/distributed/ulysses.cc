// SPDX-License-Identifier: Apache-2.0
// Ulysses head parallelism. An all-to-all (P - 1 pairwise exchange rounds: round t sends to
// rank + t and receives from rank - t) turns sequence shards into head shards: rank r gets every
// token of query heads [r Hq/P, (r+1) Hq/P) and KV heads [r Hkv/P, (r+1) Hkv/P), placed at their
// global positions (any layout). The attention kernel then runs on the whole sequence of those
// heads, and a second all-to-all brings the output (and LSE; in the backward dq, dk, dv) back to
// the shards. Each rank sends (P - 1) / P of its q, k, v, out shards: the traffic per rank falls
// with P, unlike the ring's, but every rank needs all N tokens of its heads in memory.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "core/attention_problem.h"
#include "core/check.h"
#include "distributed/dist_common.h"
#include "tessera/distributed.h"

namespace tessera {
namespace {

using dist::Slice;

// A tensor of this rank's shard or of its head slice over the whole sequence, as a list of
// [B, rows, heads, D] pieces that one exchange round moves.
struct Layout {
  int size = 1, rank = 0;
  std::vector<int64_t> lengths;
  std::vector<std::vector<ShardSegment>> segs;
  int64_t total = 0;
  // Fills size, rank and total once lengths and segs are known.
  void Set(const Communicator& comm) {
    size = comm.size();
    rank = comm.rank();
    total = 0;
    for (int64_t n : lengths) total += n;
  }
};

// Bytes of `heads` heads of `rows` tokens.
int64_t PieceBytes(int64_t b_n, int64_t rows, int64_t heads, int64_t dim, DType dt) {
  return b_n * rows * heads * dim * int64_t(DTypeSize(dt));
}

// All-to-all from sequence shards to head shards for a list of tensors: for each tensor i,
// `shards[i]` is this rank's [B, S_r, H_i, D_i] view and `full[i]` a [B, N, H_i / P, D_i] view
// (written). `reverse` moves the other way (full -> shards).
struct Moved {
  TensorView shard;
  TensorView full;
};

Status AllToAll(Communicator& comm, const Layout& lay, const std::vector<Moved>& tensors,
                bool reverse, DistributedTiming* timing) {
  const int size = lay.size, rank = lay.rank;
  auto heads_of = [&](const Moved& m) { return m.shard.shape[2] / size; };
  // The bytes that rank `from` sends rank `to`: the tokens of `from` x the heads of `to`
  // (forward), or the tokens of `to` x the heads of `from` (reverse).
  auto pack = [&](int peer, std::vector<char>* buf) {
    buf->clear();
    for (const Moved& m : tensors) {
      const int64_t h = heads_of(m);
      // On the wire: one [B, length, h, D] piece per segment of the token owner, in order.
      const int owner = reverse ? peer : rank;
      for (const ShardSegment& seg : lay.segs[owner]) {
        const TensorView src =
            reverse ? Slice(Slice(m.full, 1, seg.global_start, seg.length), 2, 0, h)
                    : Slice(Slice(m.shard, 1, seg.local_start, seg.length), 2, peer * h, h);
        const size_t at = buf->size();
        buf->resize(at + PieceBytes(src.shape[0], seg.length, h, src.shape[3], src.dtype));
        dist::PackView(src, buf->data() + at);
      }
    }
  };
  auto bytes_from = [&](int peer) {
    int64_t n = 0;
    for (const Moved& m : tensors) {
      n += PieceBytes(m.shard.shape[0], lay.lengths[peer], heads_of(m), m.shard.shape[3],
                      m.shard.dtype);
    }
    return n;
  };
  auto unpack = [&](int peer, const char* buf) {
    for (const Moved& m : tensors) {
      const int64_t h = heads_of(m);
      const int owner = reverse ? rank : peer;
      for (const ShardSegment& seg : lay.segs[owner]) {
        const TensorView dst =
            reverse ? Slice(Slice(m.shard, 1, seg.local_start, seg.length), 2, peer * h, h)
                    : Slice(m.full, 1, seg.global_start, seg.length);
        dist::UnpackView(buf, dst);
        buf += PieceBytes(dst.shape[0], seg.length, h, dst.shape[3], dst.dtype);
      }
    }
  };
  std::vector<char> send, recv;
  for (int t = 0; t < size; ++t) {
    const int dst = (rank + t) % size, src = (rank - t + size) % size;
    pack(dst, &send);
    // Forward: this rank receives src's tokens of its heads (src's length); reverse: its own
    // tokens of src's heads (its own length), the same byte count as src's forward piece.
    const int64_t incoming = reverse ? bytes_from(rank) : bytes_from(src);
    recv.resize(incoming);
    if (t == 0) {
      if (incoming > 0) std::memcpy(recv.data(), send.data(), incoming);
    } else {
      int64_t handle = -1;
      Status st = comm.StartExchange(send.data(), static_cast<int64_t>(send.size()), dst,
                                     recv.data(), incoming, src, &handle);
      if (!st.ok()) return st;
      if (timing != nullptr) timing->bytes_sent += static_cast<int64_t>(send.size());
      st = dist::TimedWait(comm, handle, timing);
      if (!st.ok()) return st;
    }
    unpack(src, recv.data());
  }
  return Status::Ok();
}

// An LSE [B, H, S] as a [B, S, H, 1] view of the same memory, so it moves like the other tensors
// (tokens on axis 1, heads on axis 2).
TensorView LseAsRows(const TensorView& t) {
  TensorView r = t;
  r.rank = 4;
  r.shape[1] = t.shape[2];
  r.shape[2] = t.shape[1];
  r.shape[3] = 1;
  r.strides[1] = t.strides[2];
  r.strides[2] = t.strides[1];
  r.strides[3] = 1;
  return r;
}

Status HeadsDivisible(const AttentionProblem& p, int size) {
  if (p.heads_q % size != 0 || p.heads_kv % size != 0) {
    return Status::InvalidArgument(
        "heads: expected Hq and Hkv divisible by the " + std::to_string(size) +
        " ranks for Ulysses (heads are split across ranks), got Hq = " + std::to_string(p.heads_q) +
        ", Hkv = " + std::to_string(p.heads_kv));
  }
  return Status::Ok();
}

}  // namespace

Status UlyssesAttentionForward(const SequenceParallelParams& params, Communicator& comm,
                               const Context& ctx, DistributedTiming* timing) {
  dist::Stopwatch total;
  const AttentionParams& a = params.local;
  AttentionProblem prob;
  Status local = dist::CheckLocalForward(a, &prob);
  if (local.ok()) local = HeadsDivisible(prob, comm.size());
  Layout lay;
  Status st = dist::AgreeOnShards(comm, local, prob, a, dist::Operation::kUlyssesForward,
                                  params.layout, &lay.lengths, &lay.segs);
  if (!st.ok()) return st;
  lay.Set(comm);
  const int size = lay.size;
  const int64_t b_n = prob.batch, n = lay.total, hq = prob.heads_q / size,
                hkv = prob.heads_kv / size, dim = prob.dim;
  const DType dt = prob.dtype;
  const size_t es = DTypeSize(dt);
  std::vector<char> q(b_n * n * hq * dim * es), k(b_n * n * hkv * dim * es),
      v(b_n * n * hkv * dim * es), o(b_n * n * hq * dim * es);
  // The LSE always travels back (a rank cannot know whether its peers want theirs); a rank that
  // did not ask for it receives it into scratch.
  std::vector<float> lse(b_n * hq * n),
      unwanted_lse(a.lse.data != nullptr ? 0 : b_n * prob.heads_q * prob.seq_q);
  AttentionParams full = a;
  full.q = MakeView4(q.data(), dt, b_n, n, hq, dim);
  full.k = MakeView4(k.data(), dt, b_n, n, hkv, dim);
  full.v = MakeView4(v.data(), dt, b_n, n, hkv, dim);
  full.out = MakeView4(o.data(), dt, b_n, n, hq, dim);
  full.lse = MakeView3(lse.data(), DType::kF32, b_n, hq, n);
  const TensorView local_lse = a.lse.data != nullptr ? a.lse
                                                     : MakeView3(unwanted_lse.data(), DType::kF32,
                                                                 b_n, prob.heads_q, prob.seq_q);
  st = AllToAll(comm, lay, {{a.q, full.q}, {a.k, full.k}, {a.v, full.v}}, false, timing);
  if (!st.ok()) return st;
  dist::Stopwatch compute;
  st = AttentionForward(full, ctx);
  if (timing != nullptr) timing->compute_s += compute.seconds();
  if (!st.ok()) return st;
  const std::vector<Moved> back = {{a.out, full.out}, {LseAsRows(local_lse), LseAsRows(full.lse)}};
  st = AllToAll(comm, lay, back, true, timing);
  if (timing != nullptr) {
    timing->steps += 1;
    timing->total_s += total.seconds();
  }
  return st;
}

Status UlyssesAttentionBackward(const SequenceParallelBackwardParams& params, Communicator& comm,
                                const Context& ctx, DistributedTiming* timing) {
  dist::Stopwatch total;
  const AttentionBackwardParams& g = params.local;
  const AttentionParams& a = g.forward;
  AttentionBackwardProblem bprob;
  Status local = dist::CheckLocalBackward(g, &bprob);
  const AttentionProblem& prob = bprob.fwd;
  if (local.ok()) local = HeadsDivisible(prob, comm.size());
  Layout lay;
  Status st = dist::AgreeOnShards(comm, local, prob, a, dist::Operation::kUlyssesBackward,
                                  params.layout, &lay.lengths, &lay.segs);
  if (!st.ok()) return st;
  lay.Set(comm);
  const int size = lay.size;
  const int64_t b_n = prob.batch, n = lay.total, hq = prob.heads_q / size,
                hkv = prob.heads_kv / size, dim = prob.dim;
  const DType dt = prob.dtype;
  const size_t es = DTypeSize(dt);
  auto q_sized = [&] { return std::vector<char>(b_n * n * hq * dim * es); };
  auto kv_sized = [&] { return std::vector<char>(b_n * n * hkv * dim * es); };
  std::vector<char> q = q_sized(), o = q_sized(), d_o = q_sized(), dq = q_sized();
  std::vector<char> k = kv_sized(), v = kv_sized(), dk = kv_sized(), dv = kv_sized();
  std::vector<float> lse(b_n * hq * n);
  AttentionBackwardParams full = g;
  full.forward.q = MakeView4(q.data(), dt, b_n, n, hq, dim);
  full.forward.k = MakeView4(k.data(), dt, b_n, n, hkv, dim);
  full.forward.v = MakeView4(v.data(), dt, b_n, n, hkv, dim);
  full.forward.out = MakeView4(o.data(), dt, b_n, n, hq, dim);
  full.forward.lse = MakeView3(lse.data(), DType::kF32, b_n, hq, n);
  full.dout = MakeView4(d_o.data(), dt, b_n, n, hq, dim);
  full.dq = MakeView4(dq.data(), dt, b_n, n, hq, dim);
  full.dk = MakeView4(dk.data(), dt, b_n, n, hkv, dim);
  full.dv = MakeView4(dv.data(), dt, b_n, n, hkv, dim);
  st = AllToAll(comm, lay,
                {{a.q, full.forward.q},
                 {a.k, full.forward.k},
                 {a.v, full.forward.v},
                 {a.out, full.forward.out},
                 {g.dout, full.dout},
                 {LseAsRows(a.lse), LseAsRows(full.forward.lse)}},
                false, timing);
  if (!st.ok()) return st;
  dist::Stopwatch compute;
  st = AttentionBackward(full, ctx);
  if (timing != nullptr) timing->compute_s += compute.seconds();
  if (!st.ok()) return st;
  st = AllToAll(comm, lay, {{g.dq, full.dq}, {g.dk, full.dk}, {g.dv, full.dv}}, true, timing);
  if (timing != nullptr) {
    timing->steps += 1;
    timing->total_s += total.seconds();
  }
  return st;
}

}  // namespace tessera
