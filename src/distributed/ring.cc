// SPDX-License-Identifier: Apache-2.0
// Ring attention. Every rank keeps its queries; the K/V shards travel around the ring (rank r
// sends to r + 1 and receives from r - 1), so at step s rank r holds the shard of rank r - s.
// Each step computes attention of the local queries on the visiting block with the tiled kernel
// (positions are global: a causal or sliding-window pair of segments becomes a top-left window on
// the block, and blocks outside the window are skipped) and
// merges the block's (O, LSE) into the running state with MergeStates' arithmetic. The exchange of
// the next block runs while the current one computes (two buffers).
//
// Backward: the same rotation of K/V, with the final O and LSE of the local queries: the block's
// gradients split exactly (dQ sums over blocks; dK/dV of a block sum over the ranks' queries), so
// each rank adds its block gradients to the block's travelling dK/dV accumulators, which follow
// the K/V one step behind and are home after P steps. The accumulators of step s travel while
// step s + 1 computes.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "core/attention_problem.h"
#include "core/check.h"
#include "core/element.h"
#include "decode/merge_row.h"
#include "distributed/dist_common.h"
#include "tessera/distributed.h"

namespace tessera {
namespace {

using dist::Slice;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The part of a (query segment, key segment) pair that attention needs: local query rows
// [row_begin, q.length) against keys [key_begin, k.length) of the segment, with a top-left
// window (window_left, window_right) in those local coordinates (-1: unbounded).
struct PairPlan {
  bool skip = true;
  int64_t row_begin = 0, key_begin = 0;
  int64_t window_left = -1, window_right = -1;
};

// The visible keys of global query position p are [p - left, p + right] (a side < 0:
// unbounded; causal is right = 0). With delta = (first row's position) - (first key's position),
// local row i sees local keys [i + delta - left, i + delta + right]: a top-left window with
// (left - delta, right + delta) once both are >= 0. Rows before the block's reach are cut (they
// see none of its keys), then keys before every row's reach; blocks wholly outside are skipped.
PairPlan PlanPair(const ShardSegment& q, const ShardSegment& k, int64_t left, int64_t right) {
  PairPlan plan;
  if (q.length == 0 || k.length == 0) return plan;
  int64_t delta = q.global_start - k.global_start;
  if (right >= 0 && delta + right < 0) {
    plan.row_begin = -(delta + right);
    delta += plan.row_begin;
  }
  if (left >= 0 && left - delta < 0) {
    plan.key_begin = delta - left;
    delta -= plan.key_begin;
  }
  if (plan.row_begin >= q.length || plan.key_begin >= k.length) return plan;
  // Later rows whose window has moved past the block's keys are left to the kernel: it skips
  // the tiles the window rules out, and such rows get LSE -inf, which the merge ignores.
  plan.skip = false;
  plan.window_left = left >= 0 ? left - delta : -1;
  plan.window_right = right >= 0 ? right + delta : -1;
  return plan;
}

// The global window of a call: (left, right), each -1 when unbounded; causal bounds the right.
void GlobalWindow(const AttentionParams& p, int64_t* left, int64_t* right) {
  *left = p.window_left;
  *right = p.window_right;
  if (p.causal) *right = *right < 0 ? 0 : std::min<int64_t>(*right, 0);
}

Status CheckSegments(const char* name, const std::vector<ShardSegment>& segs, int64_t rows) {
  for (size_t i = 0; i < segs.size(); ++i) {
    const ShardSegment& s = segs[i];
    if (s.length < 0 || s.local_start < 0 || s.global_start < 0 ||
        s.local_start + s.length > rows) {
      return Status::InvalidArgument(
          std::string(name) + "[" + std::to_string(i) + "]: expected a run inside the " +
          std::to_string(rows) + " local rows, got local_start " + std::to_string(s.local_start) +
          ", length " + std::to_string(s.length));
    }
  }
  return Status::Ok();
}

// The attention of one block pair: `p` carries the options; q rows and the key segment are
// sliced from `q_all`, `k_all`, `v_all`.
AttentionParams PairParams(const AttentionParams& options, const ShardSegment& qs,
                           const ShardSegment& ks, const PairPlan& plan) {
  AttentionParams p;
  p.scale = options.scale;
  p.softcap = options.softcap;
  p.causal = false;
  p.align = MaskAlign::kTopLeft;
  p.window_left = plan.window_left;
  p.window_right = plan.window_right;
  const int64_t row0 = qs.local_start + plan.row_begin;
  const int64_t rows = qs.length - plan.row_begin;
  const int64_t key0 = ks.local_start + plan.key_begin;
  const int64_t keys = ks.length - plan.key_begin;
  p.q = Slice(options.q, 1, row0, rows);
  p.k = Slice(options.k, 1, key0, keys);
  p.v = Slice(options.v, 1, key0, keys);
  return p;
}

// Rejects the forward options the ring does not carry (ALiBi would need the global positions
// inside the kernel; the others have no meaning across shards).
Status CheckRingOptions(const AttentionParams& p, const char* prefix) {
  const std::string pre = prefix;
  if (p.window_left < -1 || p.window_right < -1) {
    return Status::InvalidArgument(pre +
                                   "window_left / window_right: expected -1 (unbounded) "
                                   "or >= 0, got " +
                                   std::to_string(p.window_left) + ", " +
                                   std::to_string(p.window_right));
  }
  if (p.alibi_slopes.data != nullptr) {
    return Status::Unimplemented(pre +
                                 "alibi_slopes: expected none in sequence-parallel "
                                 "attention, got a tensor");
  }
  if (p.cu_seqlens_q.data != nullptr || p.cu_seqlens_k.data != nullptr) {
    return Status::Unimplemented(pre +
                                 "cu_seqlens_q / cu_seqlens_k: expected none (varlen) in "
                                 "sequence-parallel attention, got offsets");
  }
  if (p.stats.window != 0) {
    return Status::Unimplemented(pre +
                                 "stats.window: expected 0 in sequence-parallel "
                                 "attention, got " +
                                 std::to_string(p.stats.window));
  }
  return Status::Ok();
}

// Merges one block's (part_out [B, rows, Hq, D] dtype, part_lse [B, Hq, rows] f32) into the
// running state rows [row0, row0 + rows) of acc_out / acc_lse.
void MergeInto(const TensorView& part_out, const float* part_lse, const TensorView& acc_out,
               const TensorView& acc_lse, int64_t row0) {
  const int64_t b_n = part_out.shape[0], rows = part_out.shape[1], heads = part_out.shape[2],
                dim = part_out.shape[3];
  std::vector<float> incoming(dim), merged(dim);
  float* acc = static_cast<float*>(acc_out.data);
  float* lse = static_cast<float*>(acc_lse.data);
  for (int64_t b = 0; b < b_n; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t t = 0; t < rows; ++t) {
        const float part_l = part_lse[(b * heads + h) * rows + t];
        if (part_l == kNegInf) continue;  // no key of the block: the state stays bitwise
        float* lse_at =
            lse + b * acc_lse.strides[0] + h * acc_lse.strides[1] + (row0 + t) * acc_lse.strides[2];
        float* acc_row =
            acc + b * acc_out.strides[0] + (row0 + t) * acc_out.strides[1] + h * acc_out.strides[2];
        const int64_t part_base = ((b * rows + t) * heads + h) * dim;
        for (int64_t c = 0; c < dim; ++c) {
          incoming[c] = LoadElement(part_out.dtype, part_out.data, part_base + c);
        }
        const float both[2] = {*lse_at, part_l};
        const float new_lse = MergeStateRow<float>(
            2, both, static_cast<size_t>(dim),
            [&](int64_t r, float*) -> const float* { return r == 0 ? acc_row : incoming.data(); },
            nullptr, merged.data());
        std::memcpy(acc_row, merged.data(), dim * sizeof(float));
        *lse_at = new_lse;
      }
}

// Adds a contiguous [B, rows, H, D] block of dtype `dtype` into rows [row0, ...) of an f32 view.
void AddInto(const void* part, DType dtype, int64_t b_n, int64_t rows, int64_t heads, int64_t dim,
             const TensorView& acc, int64_t row0) {
  float* a = static_cast<float*>(acc.data);
  for (int64_t b = 0; b < b_n; ++b)
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        float* row = a + b * acc.strides[0] + (row0 + t) * acc.strides[1] + h * acc.strides[2];
        const int64_t base = ((b * rows + t) * heads + h) * dim;
        for (int64_t c = 0; c < dim; ++c) row[c] += LoadElement(dtype, part, base + c);
      }
}

int64_t Numel4(int64_t a, int64_t b, int64_t c, int64_t d) { return a * b * c * d; }

std::string Dims(const int64_t* s) {
  return "[" + std::to_string(s[0]) + ", " + std::to_string(s[1]) + ", " + std::to_string(s[2]) +
         "]";
}

}  // namespace

Status RingForwardStep(const AttentionParams& params, const std::vector<ShardSegment>& q_segments,
                       const std::vector<ShardSegment>& kv_segments, const TensorView& acc_out,
                       const TensorView& acc_lse, const Context& ctx) {
  Status st = CheckRingOptions(params, "");
  if (!st.ok()) return st;
  if (params.q.rank != 4 || params.k.rank != 4) {
    return Status::InvalidArgument(
        Expected("q / k", "rank 4 [B, S, H, D]",
                 std::to_string(params.q.rank) + " / " + std::to_string(params.k.rank)));
  }
  const int64_t b_n = params.q.shape[0], rows = params.q.shape[1], hq = params.q.shape[2],
                dim = params.v.shape[3];
  const int64_t out_shape[4] = {b_n, rows, hq, dim};
  const int64_t lse_shape[3] = {b_n, hq, rows};
  st = CheckShape("acc_out", acc_out, 4, out_shape, "f32 " + ShapeString(params.q), true);
  if (st.ok()) st = CheckShape("acc_lse", acc_lse, 3, lse_shape, "f32 [B, Hq, S]", true);
  if (!st.ok()) return st;
  if (acc_out.dtype != DType::kF32 || acc_lse.dtype != DType::kF32) {
    return Status::InvalidArgument(
        Expected("acc_out / acc_lse", "f32",
                 std::string(DTypeName(acc_out.dtype)) + " / " + DTypeName(acc_lse.dtype)));
  }
  st = CheckSegments("q_segments", q_segments, rows);
  if (st.ok()) st = CheckSegments("kv_segments", kv_segments, params.k.shape[1]);
  if (!st.ok()) return st;

  int64_t left, right;
  GlobalWindow(params, &left, &right);
  std::vector<char> part_out;
  std::vector<float> part_lse;
  for (const ShardSegment& qs : q_segments) {
    for (const ShardSegment& ks : kv_segments) {
      const PairPlan plan = PlanPair(qs, ks, left, right);
      if (plan.skip) continue;
      AttentionParams p = PairParams(params, qs, ks, plan);
      const int64_t n = p.q.shape[1];
      part_out.resize(Numel4(b_n, n, hq, dim) * DTypeSize(params.q.dtype));
      part_lse.resize(b_n * hq * n);
      p.out = MakeView4(part_out.data(), params.q.dtype, b_n, n, hq, dim);
      p.lse = MakeView3(part_lse.data(), DType::kF32, b_n, hq, n);
      st = AttentionForward(p, ctx);
      if (!st.ok()) return st;
      MergeInto(p.out, part_lse.data(), acc_out, acc_lse, qs.local_start + plan.row_begin);
    }
  }
  return Status::Ok();
}

Status RingFinishForward(const TensorView& acc_out, const TensorView& acc_lse,
                         const TensorView& out, const TensorView& lse) {
  if (acc_out.rank != 4 || acc_out.dtype != DType::kF32) {
    return Status::InvalidArgument(
        Expected("acc_out", "f32 [B, S, Hq, D]",
                 std::string(DTypeName(acc_out.dtype)) + " rank " + std::to_string(acc_out.rank)));
  }
  Status st = CheckRankAndStrides("acc_out", acc_out, false);
  if (st.ok()) {
    st = CheckShape("out", out, 4, acc_out.shape,
                    "shape " + ShapeString(acc_out) + " (that of acc_out)", true);
  }
  if (st.ok() && !IsSupportedDType(out.dtype)) {
    st = Status::InvalidArgument(Expected("out", "dtype f32, bf16 or f16", DTypeName(out.dtype)));
  }
  const int64_t lse_shape[3] = {acc_out.shape[0], acc_out.shape[2], acc_out.shape[1]};
  if (st.ok() && lse.data != nullptr) {
    for (const auto& [name, view, writable] :
         {std::tuple<const char*, const TensorView*, bool>{"acc_lse", &acc_lse, false},
          {"lse", &lse, true}}) {
      if (view->dtype != DType::kF32) {
        return Status::InvalidArgument(
            Expected(name, "f32 [B, Hq, S]", std::string(DTypeName(view->dtype))));
      }
      st = CheckShape(name, *view, 3, lse_shape, "f32 [B, Hq, S] " + Dims(lse_shape), writable);
      if (!st.ok()) return st;
    }
  }
  if (st.ok()) {
    st = CheckDisjoint({ViewRegion("out", out), ViewRegion("lse", lse)},
                       {ViewRegion("acc_out", acc_out), ViewRegion("acc_lse", acc_lse)});
  }
  if (!st.ok()) return st;
  const int64_t b_n = out.shape[0], rows = out.shape[1], heads = out.shape[2], dim = out.shape[3];
  for (int64_t b = 0; b < b_n; ++b)
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t h = 0; h < heads; ++h) {
        const float* a = static_cast<const float*>(acc_out.data) + b * acc_out.strides[0] +
                         t * acc_out.strides[1] + h * acc_out.strides[2];
        const int64_t o = b * out.strides[0] + t * out.strides[1] + h * out.strides[2];
        for (int64_t c = 0; c < dim; ++c) {
          StoreElement(out.dtype, out.data, o + c * out.strides[3], a[c * acc_out.strides[3]]);
        }
        if (lse.data != nullptr) {
          static_cast<float*>(
              lse.data)[b * lse.strides[0] + h * lse.strides[1] + t * lse.strides[2]] =
              static_cast<const float*>(
                  acc_lse.data)[b * acc_lse.strides[0] + h * acc_lse.strides[1] +
                                t * acc_lse.strides[2]];
        }
      }
  return Status::Ok();
}

Status RingBackwardStep(const AttentionBackwardParams& params,
                        const std::vector<ShardSegment>& q_segments,
                        const std::vector<ShardSegment>& kv_segments, const TensorView& dq_acc,
                        const TensorView& dk_acc, const TensorView& dv_acc, const Context& ctx) {
  const AttentionParams& f = params.forward;
  Status st = CheckRingOptions(f, "forward.");
  if (!st.ok()) return st;
  if (f.q.rank != 4 || f.k.rank != 4 || f.lse.rank != 3) {
    return Status::InvalidArgument(Expected("forward.q / k / lse", "ranks 4 / 4 / 3",
                                            std::to_string(f.q.rank) + " / " +
                                                std::to_string(f.k.rank) + " / " +
                                                std::to_string(f.lse.rank)));
  }
  const int64_t b_n = f.q.shape[0], rows = f.q.shape[1], hq = f.q.shape[2], dim = f.q.shape[3];
  const int64_t blk = f.k.shape[1], hkv = f.k.shape[2];
  const int64_t q_shape[4] = {b_n, rows, hq, dim};
  const int64_t k_shape[4] = {b_n, blk, hkv, dim};
  st = CheckShape("dq_acc", dq_acc, 4, q_shape, "f32, the shape of q", true);
  if (st.ok()) st = CheckShape("dk_acc", dk_acc, 4, k_shape, "f32, the shape of k", true);
  if (st.ok()) st = CheckShape("dv_acc", dv_acc, 4, k_shape, "f32, the shape of k", true);
  if (!st.ok()) return st;
  if (dq_acc.dtype != DType::kF32 || dk_acc.dtype != DType::kF32 || dv_acc.dtype != DType::kF32) {
    return Status::InvalidArgument("dq_acc / dk_acc / dv_acc: expected f32, got another dtype");
  }
  st = CheckSegments("q_segments", q_segments, rows);
  if (st.ok()) st = CheckSegments("kv_segments", kv_segments, blk);
  if (!st.ok()) return st;

  const DType dt = f.q.dtype;
  const size_t es = DTypeSize(dt);
  int64_t left, right;
  GlobalWindow(f, &left, &right);
  std::vector<char> dq_part, dk_part, dv_part;
  for (const ShardSegment& qs : q_segments) {
    for (const ShardSegment& ks : kv_segments) {
      const PairPlan plan = PlanPair(qs, ks, left, right);
      if (plan.skip) continue;
      AttentionBackwardParams bp;
      bp.forward = PairParams(f, qs, ks, plan);
      const int64_t row0 = qs.local_start + plan.row_begin;
      const int64_t n = bp.forward.q.shape[1];
      bp.forward.out = Slice(f.out, 1, row0, n);
      bp.forward.lse = Slice(f.lse, 2, row0, n);
      bp.dout = Slice(params.dout, 1, row0, n);
      dq_part.resize(Numel4(b_n, n, hq, dim) * es);
      const int64_t keys = bp.forward.k.shape[1];
      const int64_t key0 = ks.local_start + plan.key_begin;
      dk_part.resize(Numel4(b_n, keys, hkv, dim) * es);
      dv_part.resize(Numel4(b_n, keys, hkv, dim) * es);
      bp.dq = MakeView4(dq_part.data(), dt, b_n, n, hq, dim);
      bp.dk = MakeView4(dk_part.data(), dt, b_n, keys, hkv, dim);
      bp.dv = MakeView4(dv_part.data(), dt, b_n, keys, hkv, dim);
      st = AttentionBackward(bp, ctx);
      if (!st.ok()) return st;
      AddInto(dq_part.data(), dt, b_n, n, hq, dim, dq_acc, row0);
      AddInto(dk_part.data(), dt, b_n, keys, hkv, dim, dk_acc, key0);
      AddInto(dv_part.data(), dt, b_n, keys, hkv, dim, dv_acc, key0);
    }
  }
  return Status::Ok();
}

namespace {

// The options every rank must share, and the local checks of a ring / Ulysses call.
std::vector<dist::AgreedOption> SharedOptions(dist::Operation op, ShardLayout layout,
                                              const AttentionProblem& p, const AttentionParams& a) {
  return {{"operation", static_cast<int64_t>(op)},
          {"layout", static_cast<int64_t>(layout)},
          {"batch", p.batch},
          {"heads_q", p.heads_q},
          {"heads_kv", p.heads_kv},
          {"head_dim", p.dim},
          {"dtype", static_cast<int64_t>(p.dtype)},
          {"causal", a.causal ? 1 : 0},
          {"window_left", a.window_left},
          {"window_right", a.window_right},
          {"scale", dist::FloatBits(p.scale)},
          {"softcap", dist::FloatBits(a.softcap)}};
}

}  // namespace

namespace dist {

Status CheckLocalForward(const AttentionParams& local, AttentionProblem* problem) {
  Status st = CheckRingOptions(local, "");
  if (!st.ok()) return st;
  if (local.q.rank != 4 || local.k.rank != 4) {
    return Status::InvalidArgument(
        Expected("q / k", "rank 4 [B, S_r, H, D] (this rank's shard)",
                 std::to_string(local.q.rank) + " / " + std::to_string(local.k.rank)));
  }
  st = ValidateAttention(local, problem);
  if (!st.ok()) return st;
  if (problem->mask.any) {
    return Status::Unimplemented("mask: expected no mask in sequence-parallel attention, got one");
  }
  if (problem->seq_q != problem->seq_k) {
    return Status::InvalidArgument(
        Expected("k", "the shard's " + std::to_string(problem->seq_q) + " tokens (those of q)",
                 std::to_string(problem->seq_k)));
  }
  return Status::Ok();
}

Status CheckLocalBackward(const AttentionBackwardParams& params, AttentionBackwardProblem* bprob) {
  // An empty shard may come with null pointers (no storage), the required LSE included.
  static float empty_lse = 0.0f;
  AttentionBackwardParams g = params;
  if (g.forward.q.rank == 4 && g.forward.q.shape[1] == 0 && g.forward.lse.data == nullptr) {
    g.forward.lse.data = &empty_lse;
  }
  const AttentionParams& a = g.forward;
  Status local = CheckRingOptions(a, "forward.");
  if (local.ok() && (a.q.rank != 4 || a.k.rank != 4)) {
    local = Status::InvalidArgument(
        Expected("forward.q / k", "rank 4 [B, S_r, H, D]",
                 std::to_string(a.q.rank) + " / " + std::to_string(a.k.rank)));
  }
  if (local.ok()) local = ValidateAttentionBackward(g, bprob);
  if (!local.ok()) return local;
  const AttentionProblem& prob = bprob->fwd;
  if (prob.mask.any) {
    return Status::Unimplemented("forward.mask: expected none in sequence-parallel attention");
  }
  if (prob.seq_q != prob.seq_k) {
    return Status::InvalidArgument(
        Expected("forward.k", "the shard's " + std::to_string(prob.seq_q) + " tokens (those of q)",
                 std::to_string(prob.seq_k)));
  }
  return Status::Ok();
}

Status AgreeOnShards(Communicator& comm, const Status& local, const AttentionProblem& prob,
                     const AttentionParams& a, Operation op, ShardLayout layout,
                     std::vector<int64_t>* lengths,
                     std::vector<std::vector<ShardSegment>>* segments) {
  Status st = Agree(
      comm, local, local.ok() ? prob.seq_q : 0,
      local.ok() ? AttentionOptions(op, layout, prob, a) : std::vector<AgreedOption>{}, lengths);
  if (!st.ok()) return st;
  return PlanShards(layout, *lengths, segments);
}

std::vector<AgreedOption> AttentionOptions(Operation op, ShardLayout layout,
                                           const AttentionProblem& p, const AttentionParams& a) {
  return SharedOptions(op, layout, p, a);
}

}  // namespace dist

Status RingAttentionForward(const SequenceParallelParams& params, Communicator& comm,
                            const Context& ctx, DistributedTiming* timing) {
  dist::Stopwatch total;
  const AttentionParams& a = params.local;
  AttentionProblem prob;
  Status local = dist::CheckLocalForward(a, &prob);
  std::vector<int64_t> lengths;
  std::vector<std::vector<ShardSegment>> segs;
  Status st = dist::AgreeOnShards(comm, local, prob, a, dist::Operation::kRingForward,
                                  params.layout, &lengths, &segs);
  if (!st.ok()) return st;

  const int size = comm.size(), rank = comm.rank();
  const int64_t b_n = prob.batch, rows = prob.seq_q, hq = prob.heads_q, hkv = prob.heads_kv,
                dim = prob.dim;
  const size_t es = DTypeSize(prob.dtype);
  const int64_t max_len = *std::max_element(lengths.begin(), lengths.end());
  // K then V of a shard, contiguous [B, L, Hkv, D] each.
  auto block_bytes = [&](int owner) { return 2 * Numel4(b_n, lengths[owner], hkv, dim) * es; };
  std::vector<char> block[2];
  block[0].resize(2 * Numel4(b_n, max_len, hkv, dim) * es);
  block[1].resize(block[0].size());
  const int64_t my_kv = Numel4(b_n, rows, hkv, dim) * es;
  dist::PackView(a.k, block[0].data());
  dist::PackView(a.v, block[0].data() + my_kv);

  std::vector<float> acc_out(Numel4(b_n, rows, hq, dim), 0.0f);
  std::vector<float> acc_lse(b_n * hq * rows, kNegInf);
  const TensorView acc_out_view = MakeView4(acc_out.data(), DType::kF32, b_n, rows, hq, dim);
  const TensorView acc_lse_view = MakeView3(acc_lse.data(), DType::kF32, b_n, hq, rows);

  int cur = 0;
  for (int s = 0; s < size; ++s) {
    const int owner = (rank - s + size) % size;
    int64_t handle = -1;
    if (s + 1 < size) {
      const int next_owner = (owner - 1 + size) % size;
      st = comm.StartExchange(block[cur].data(), block_bytes(owner), (rank + 1) % size,
                              block[1 - cur].data(), block_bytes(next_owner),
                              (rank - 1 + size) % size, &handle);
      if (!st.ok()) return st;
      if (timing != nullptr) timing->bytes_sent += block_bytes(owner);
    }
    dist::Stopwatch compute;
    const int64_t len = lengths[owner];
    AttentionParams step = a;
    step.k = MakeView4(block[cur].data(), prob.dtype, b_n, len, hkv, dim);
    step.v = MakeView4(block[cur].data() + Numel4(b_n, len, hkv, dim) * es, prob.dtype, b_n, len,
                       hkv, dim);
    st = RingForwardStep(step, segs[rank], segs[owner], acc_out_view, acc_lse_view, ctx);
    if (timing != nullptr) timing->compute_s += compute.seconds();
    if (!st.ok()) {
      if (handle >= 0) (void)comm.WaitExchange(handle, nullptr);
      return st;
    }
    if (handle >= 0) {
      st = dist::TimedWait(comm, handle, timing);
      if (!st.ok()) return st;
      cur = 1 - cur;
    }
  }
  st = RingFinishForward(acc_out_view, acc_lse_view, a.out, a.lse);
  if (timing != nullptr) {
    timing->steps += size;
    timing->total_s += total.seconds();
  }
  return st;
}

Status RingAttentionBackward(const SequenceParallelBackwardParams& params, Communicator& comm,
                             const Context& ctx, DistributedTiming* timing) {
  dist::Stopwatch total;
  const AttentionBackwardParams& g = params.local;
  const AttentionParams& a = g.forward;
  AttentionBackwardProblem bprob;
  Status local = dist::CheckLocalBackward(g, &bprob);
  const AttentionProblem& prob = bprob.fwd;
  std::vector<int64_t> lengths;
  std::vector<std::vector<ShardSegment>> segs;
  Status st = dist::AgreeOnShards(comm, local, prob, a, dist::Operation::kRingBackward,
                                  params.layout, &lengths, &segs);
  if (!st.ok()) return st;

  const int size = comm.size(), rank = comm.rank();
  const int64_t b_n = prob.batch, rows = prob.seq_q, hq = prob.heads_q, hkv = prob.heads_kv,
                dim = prob.dim;
  const size_t es = DTypeSize(prob.dtype);
  const int64_t max_len = *std::max_element(lengths.begin(), lengths.end());
  auto kv_bytes = [&](int owner) { return 2 * Numel4(b_n, lengths[owner], hkv, dim) * es; };
  auto grad_floats = [&](int owner) { return Numel4(b_n, lengths[owner], hkv, dim); };
  std::vector<char> block[2];
  block[0].resize(2 * Numel4(b_n, max_len, hkv, dim) * es);
  block[1].resize(block[0].size());
  dist::PackView(a.k, block[0].data());
  dist::PackView(a.v, block[0].data() + Numel4(b_n, rows, hkv, dim) * es);
  // dK then dV of the block a rank works on, f32; two so one can travel while the next fills.
  std::vector<float> grads[2];
  grads[0].resize(2 * Numel4(b_n, max_len, hkv, dim));
  grads[1].resize(grads[0].size());
  std::vector<float> step_grads(grads[0].size());
  std::vector<float> dq_acc(Numel4(b_n, rows, hq, dim), 0.0f);
  const TensorView dq_view = MakeView4(dq_acc.data(), DType::kF32, b_n, rows, hq, dim);

  int cur = 0, gcur = 0;
  int64_t grad_handle = -1;
  auto fail = [&](Status s) {
    if (grad_handle >= 0) (void)comm.WaitExchange(grad_handle, nullptr);
    return s;
  };
  for (int s = 0; s < size; ++s) {
    const int owner = (rank - s + size) % size;
    const int next_owner = (owner - 1 + size) % size;
    int64_t kv_handle = -1;
    if (s + 1 < size) {
      st = comm.StartExchange(block[cur].data(), kv_bytes(owner), (rank + 1) % size,
                              block[1 - cur].data(), kv_bytes(next_owner), (rank - 1 + size) % size,
                              &kv_handle);
      if (!st.ok()) return fail(st);
      if (timing != nullptr) timing->bytes_sent += kv_bytes(owner);
    }
    dist::Stopwatch compute;
    const int64_t len = lengths[owner];
    const int64_t n = grad_floats(owner);
    AttentionBackwardParams step = g;
    step.forward.k = MakeView4(block[cur].data(), prob.dtype, b_n, len, hkv, dim);
    step.forward.v = MakeView4(block[cur].data() + n * es, prob.dtype, b_n, len, hkv, dim);
    std::fill(step_grads.begin(), step_grads.begin() + 2 * n, 0.0f);
    st = RingBackwardStep(step, segs[rank], segs[owner], dq_view,
                          MakeView4(step_grads.data(), DType::kF32, b_n, len, hkv, dim),
                          MakeView4(step_grads.data() + n, DType::kF32, b_n, len, hkv, dim), ctx);
    if (timing != nullptr) timing->compute_s += compute.seconds();
    if (!st.ok()) {
      if (kv_handle >= 0) (void)comm.WaitExchange(kv_handle, nullptr);
      return fail(st);
    }
    // The block's accumulators: its own start at zero; the others arrive from rank - 1.
    if (grad_handle >= 0) {
      st = dist::TimedWait(comm, grad_handle, timing);
      grad_handle = -1;
      if (!st.ok()) return st;
      gcur = 1 - gcur;
      for (int64_t i = 0; i < 2 * n; ++i) grads[gcur][i] += step_grads[i];
    } else {
      std::copy(step_grads.begin(), step_grads.begin() + 2 * n, grads[gcur].begin());
    }
    if (size > 1) {
      // Pass them on; the last step's send brings every rank its own shard's gradients.
      st = comm.StartExchange(grads[gcur].data(), 2 * n * 4, (rank + 1) % size,
                              grads[1 - gcur].data(), 2 * grad_floats(next_owner) * 4,
                              (rank - 1 + size) % size, &grad_handle);
      if (!st.ok()) {
        if (kv_handle >= 0) (void)comm.WaitExchange(kv_handle, nullptr);
        return st;
      }
      if (timing != nullptr) timing->bytes_sent += 2 * n * 4;
    }
    if (kv_handle >= 0) {
      st = dist::TimedWait(comm, kv_handle, timing);
      if (!st.ok()) return fail(st);
      cur = 1 - cur;
    }
  }
  if (grad_handle >= 0) {
    st = dist::TimedWait(comm, grad_handle, timing);
    if (!st.ok()) return st;
    gcur = 1 - gcur;
  }
  // Write the results: dq from its accumulator, dk / dv from the home-coming accumulators.
  const int64_t n = grad_floats(rank);
  const TensorView dk_home = MakeView4(grads[gcur].data(), DType::kF32, b_n, rows, hkv, dim);
  const TensorView dv_home = MakeView4(grads[gcur].data() + n, DType::kF32, b_n, rows, hkv, dim);
  (void)RingFinishForward(dq_view, TensorView(), g.dq, TensorView());
  (void)RingFinishForward(dk_home, TensorView(), g.dk, TensorView());
  (void)RingFinishForward(dv_home, TensorView(), g.dv, TensorView());
  if (timing != nullptr) {
    timing->steps += size;
    timing->total_s += total.seconds();
  }
  return Status::Ok();
}

}  // namespace tessera
