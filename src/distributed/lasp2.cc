// SPDX-License-Identifier: Apache-2.0
// LASP-2: sequence-parallel linear attention with one all-gather of chunk states. Rank r holds
// the r-th contiguous chunk of a causal linear attention. The state after a chunk is
//   S_end = D ⊙ S_start + M
// with M the chunk's own state (its keys and values from a zero state) and D the chunk's total
// decay per feature row (1 plain, lambda^len decay, exp(sum of gates) GLA). So every rank
// computes its (M, D) with a state-only pass of the chunked engine (O(S F Dv)), the (M, D) of all
// ranks are all-gathered (P * B * Hq * F * (Dv + 2) floats, whatever N), each rank folds the
// earlier ones into its prefix state and runs its chunk from it.
//
// Backward: the gradient w.r.t. the state at the end of chunk r is
//   dS_end_r = G_{r+1} + D_{r+1} ⊙ dS_end_{r+1},  dS_end_{P-1} = 0,
// where G_j is the gradient w.r.t. chunk j's initial state from its own outputs (a d_initial_state
// only backward, O(S F Dv)). One more all-gather of the G's, and each rank runs its backward from
// its prefix state with d_final_state = dS_end_r. With normalize, G_j depends on chunk j's prefix
// (the denominators), so the prefix all-gather comes first; otherwise both go in one.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "distributed/dist_common.h"
#include "linear/linear_problem.h"
#include "tessera/distributed.h"

namespace tessera {
namespace {

// FNV-1a over a float view's values, so ranks can agree on per-head decay rates.
int64_t HashDecay(const LinearProblem& p) {
  uint64_t h = 1469598103934665603ull;
  if (p.decay == nullptr) return 0;
  for (int64_t i = 0; i < p.heads_q; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &p.decay[i * p.decay_stride], 4);
    for (int b = 0; b < 4; ++b) {
      h ^= (bits >> (8 * b)) & 0xff;
      h *= 1099511628211ull;
    }
  }
  return static_cast<int64_t>(h & 0x7fffffffffffffffull);
}

Status CheckLasp2Options(const LinearAttentionParams& p, const char* prefix) {
  const std::string pre = prefix;
  if (!p.causal) {
    return Status::InvalidArgument(pre +
                                   "causal: expected true for LASP-2 (each rank continues "
                                   "the state of the ranks before it), got false");
  }
  if (p.prefix_len != 0) {
    return Status::Unimplemented(pre + "prefix_len: expected 0 with LASP-2, got " +
                                 std::to_string(p.prefix_len));
  }
  if (p.window != 0) {
    return Status::Unimplemented(pre +
                                 "window: expected 0 with LASP-2 (the BASED window "
                                 "reaches across shards), got " +
                                 std::to_string(p.window));
  }
  if (p.lrpe_theta.data != nullptr) {
    return Status::Unimplemented(pre +
                                 "lrpe_theta: expected none with LASP-2 (each shard's positions "
                                 "would need its global offset), got LRPE");
  }
  if (p.initial_state.data != nullptr || p.initial_normalizer.data != nullptr ||
      p.final_state.data != nullptr || p.final_normalizer.data != nullptr) {
    return Status::Unimplemented(pre +
                                 "initial_state / final_state: expected none with LASP-2 "
                                 "(the driver hands the states between ranks), got one");
  }
  if (p.q.rank != 4) {
    return Status::InvalidArgument(pre + "q: expected rank 4 [B, S_r, Hq, Dk], got rank " +
                                   std::to_string(p.q.rank));
  }
  return Status::Ok();
}

// Gates as an agreed option: 0 none, 3 scalar, 4 per channel. A rank with no tokens may pass a
// shaped view without storage (data == nullptr); its rank still says which gates it meant.
int64_t GatesKind(const LinearProblem& p, const TensorView& gates) {
  if (p.gates != nullptr) return p.scalar_gates ? 3 : 4;
  if (p.seq == 0 && gates.data == nullptr && gates.numel() == 0) {
    return gates.rank == 3 || gates.rank == 4 ? gates.rank : 0;
  }
  return 0;
}

std::vector<dist::AgreedOption> Lasp2Options(dist::Operation op, const LinearProblem& p,
                                             const TensorView& gates_view) {
  const int64_t gates = GatesKind(p, gates_view);
  return {{"operation", static_cast<int64_t>(op)},
          {"batch", p.batch},
          {"heads_q", p.heads_q},
          {"heads_kv", p.heads_kv},
          {"dim_k", p.dk},
          {"dim_v", p.dv},
          {"dtype", static_cast<int64_t>(p.dtype)},
          {"feature_map", static_cast<int64_t>(p.map)},
          {"scale", dist::FloatBits(p.scale)},
          {"normalize", p.normalize ? 1 : 0},
          {"eps", dist::FloatBits(p.eps)},
          {"decay", HashDecay(p)},
          {"gates", gates}};
}

// The chunk's total decay per (b, h, feature row): [B, Hq, F].
std::vector<float> ChunkDecay(const LinearProblem& p) {
  std::vector<float> d(p.batch * p.heads_q * p.feat, 1.0f);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.heads_q; ++h) {
      float* row = &d[(b * p.heads_q + h) * p.feat];
      if (p.decay != nullptr) {
        const double lambda = p.decay[h * p.decay_stride];
        std::fill(row, row + p.feat, static_cast<float>(std::pow(lambda, double(p.seq))));
      } else if (p.gates != nullptr) {
        const int64_t channels = p.scalar_gates ? 1 : p.feat;
        for (int64_t c = 0; c < channels; ++c) {
          double sum = 0;
          for (int64_t t = 0; t < p.seq; ++t) {
            sum += p.gates[b * p.gates_stride[0] + t * p.gates_stride[1] + h * p.gates_stride[2] +
                           c * p.gates_stride[3]];
          }
          if (p.scalar_gates) {
            std::fill(row, row + p.feat, static_cast<float>(std::exp(sum)));
          } else {
            row[c] = static_cast<float>(std::exp(sum));
          }
        }
      }
    }
  return d;
}

// Folds rows of per-rank records: x <- D_j ⊙ x + M_j for j in `order`, where record j holds M at
// `m_at` (floats [B, Hq, F, cols]) and D at `d_at` ([B, Hq, F]).
void Fold(const std::vector<float>& records, int64_t record_floats, const std::vector<int>& order,
          int64_t m_at, int64_t d_at, int64_t rows, int64_t cols, std::vector<float>* x) {
  x->assign(rows * cols, 0.0f);
  for (int j : order) {
    const float* rec = &records[j * record_floats];
    for (int64_t r = 0; r < rows; ++r) {
      const float decay = rec[d_at + r];
      for (int64_t c = 0; c < cols; ++c) {
        (*x)[r * cols + c] = decay * (*x)[r * cols + c] + rec[m_at + r * cols + c];
      }
    }
  }
}

// The layout of one rank's all-gathered record: [M state | M normalizer | D | G state |
// G normalizer], the G parts only in the backward.
struct Record {
  int64_t state = 0, norm = 0, decay = 0, g_state = 0, g_norm = 0, floats = 0;
  Record(const LinearProblem& p, bool with_m, bool with_g) {
    const int64_t rows = p.batch * p.heads_q * p.feat;
    int64_t at = 0;
    if (with_m) {
      state = at;
      at += rows * p.dv;
      norm = at;
      at += p.normalize ? rows : 0;
    }
    decay = at;
    at += rows;
    if (with_g) {
      g_state = at;
      at += rows * p.dv;
      g_norm = at;
      at += p.normalize ? rows : 0;
    }
    floats = at;
  }
};

TensorView StateView(float* data, const LinearProblem& p) {
  return MakeView4(data, DType::kF32, p.batch, p.heads_q, p.feat, p.dv);
}
TensorView NormView(float* data, const LinearProblem& p) {
  return MakeView3(data, DType::kF32, p.batch, p.heads_q, p.feat);
}

// All-gathers `mine` (record_floats floats), timing it as exposed communication.
Status TimedAllGather(Communicator& comm, const std::vector<float>& mine, std::vector<float>* all,
                      DistributedTiming* timing) {
  all->resize(mine.size() * comm.size());
  dist::Stopwatch t;
  Status st = comm.AllGather(mine.data(), static_cast<int64_t>(mine.size() * 4), all->data());
  if (timing != nullptr) {
    timing->wait_s += t.seconds();
    timing->transfer_s += t.seconds();
    timing->bytes_sent += static_cast<int64_t>(mine.size() * 4);
  }
  return st;
}

// This rank's chunk state M (and normalizer) from a zero state, into `record`.
Status ChunkState(const LinearAttentionParams& local, const LinearProblem& p, const Record& rec,
                  std::vector<float>* record, const Context& ctx) {
  LinearAttentionParams s = local;
  s.out = TensorView();
  s.final_state = StateView(record->data() + rec.state, p);
  if (p.normalize) s.final_normalizer = NormView(record->data() + rec.norm, p);
  if (p.seq == 0) return Status::Ok();  // an empty chunk: M = 0 (the record is zeroed)
  return LinearAttentionForward(s, ctx);
}

std::vector<int> Range(int from, int to, int step) {
  std::vector<int> r;
  for (int i = from; step > 0 ? i < to : i > to; i += step) r.push_back(i);
  return r;
}

}  // namespace

Status Lasp2Forward(const Lasp2Params& params, Communicator& comm, const Context& ctx,
                    DistributedTiming* timing) {
  dist::Stopwatch total;
  const LinearAttentionParams& local = params.local;
  LinearProblem p;
  Status ok = CheckLasp2Options(local, "");
  if (ok.ok()) ok = ValidateLinearAttention(local, &p);
  std::vector<int64_t> lengths;
  Status st = dist::Agree(comm, ok, ok.ok() ? p.seq : 0,
                          ok.ok() ? Lasp2Options(dist::Operation::kLasp2Forward, p, local.gates)
                                  : std::vector<dist::AgreedOption>{},
                          &lengths);
  if (!st.ok()) return st;
  const int rank = comm.rank();
  const Record rec(p, true, false);
  std::vector<float> mine(rec.floats, 0.0f), all;
  dist::Stopwatch compute;
  st = ChunkState(local, p, rec, &mine, ctx);
  if (!st.ok()) return st;
  const std::vector<float> decay = ChunkDecay(p);
  std::copy(decay.begin(), decay.end(), mine.begin() + rec.decay);
  if (timing != nullptr) timing->compute_s += compute.seconds();
  st = TimedAllGather(comm, mine, &all, timing);
  if (!st.ok()) return st;

  dist::Stopwatch compute2;
  const int64_t rows = p.batch * p.heads_q * p.feat;
  std::vector<float> prefix, prefix_norm;
  LinearAttentionParams run = local;
  if (rank > 0) {
    Fold(all, rec.floats, Range(0, rank, 1), rec.state, rec.decay, rows, p.dv, &prefix);
    run.initial_state = StateView(prefix.data(), p);
    if (p.normalize) {
      Fold(all, rec.floats, Range(0, rank, 1), rec.norm, rec.decay, rows, 1, &prefix_norm);
      run.initial_normalizer = NormView(prefix_norm.data(), p);
    }
  }
  if (p.seq > 0) st = LinearAttentionForward(run, ctx);
  if (timing != nullptr) {
    timing->compute_s += compute2.seconds();
    timing->steps += 1;
    timing->total_s += total.seconds();
  }
  return st;
}

Status Lasp2Backward(const Lasp2BackwardParams& params, Communicator& comm, const Context& ctx,
                     DistributedTiming* timing) {
  dist::Stopwatch total;
  const LinearAttentionBackwardParams& g = params.local;
  LinearBackwardProblem bp;
  Status ok = CheckLasp2Options(g.forward, "forward.");
  if (ok.ok() && (g.d_final_state.data != nullptr || g.d_initial_state.data != nullptr ||
                  g.d_final_normalizer.data != nullptr || g.d_initial_normalizer.data != nullptr)) {
    ok = Status::Unimplemented(
        "d_final_state / d_initial_state: expected none with LASP-2 (the driver hands the "
        "state gradients between ranks), got one");
  }
  if (ok.ok()) ok = ValidateLinearAttentionBackward(g, &bp);
  const LinearProblem& p = bp.fwd;
  std::vector<int64_t> lengths;
  Status st =
      dist::Agree(comm, ok, ok.ok() ? p.seq : 0,
                  ok.ok() ? Lasp2Options(dist::Operation::kLasp2Backward, p, g.forward.gates)
                          : std::vector<dist::AgreedOption>{},
                  &lengths);
  if (!st.ok()) return st;
  const int rank = comm.rank(), size = comm.size();
  const int64_t rows = p.batch * p.heads_q * p.feat;

  // The chunk's own gradient w.r.t. its initial state (no d_final_state), from `prefix`.
  auto own_state_grad = [&](const Record& rec, std::vector<float>* record, float* prefix,
                            float* prefix_norm) -> Status {
    if (p.seq == 0) return Status::Ok();
    LinearAttentionBackwardParams only = g;
    only.dq = TensorView();
    only.dk = TensorView();
    only.dv = TensorView();
    only.dgates = TensorView();
    if (prefix != nullptr) only.forward.initial_state = StateView(prefix, p);
    if (prefix_norm != nullptr) only.forward.initial_normalizer = NormView(prefix_norm, p);
    only.d_initial_state = StateView(record->data() + rec.g_state, p);
    if (p.normalize) only.d_initial_normalizer = NormView(record->data() + rec.g_norm, p);
    return LinearAttentionBackward(only, ctx);
  };

  // Round 1: the chunk states (and, without normalize, the state gradients too).
  const Record rec1(p, true, !p.normalize);
  std::vector<float> mine(rec1.floats, 0.0f), all;
  dist::Stopwatch compute;
  st = ChunkState(g.forward, p, rec1, &mine, ctx);
  const std::vector<float> decay = ChunkDecay(p);
  std::copy(decay.begin(), decay.end(), mine.begin() + rec1.decay);
  if (st.ok() && !p.normalize) st = own_state_grad(rec1, &mine, nullptr, nullptr);
  if (timing != nullptr) timing->compute_s += compute.seconds();
  if (!st.ok()) return st;
  st = TimedAllGather(comm, mine, &all, timing);
  if (!st.ok()) return st;
  std::vector<float> prefix, prefix_norm;
  if (rank > 0) {
    Fold(all, rec1.floats, Range(0, rank, 1), rec1.state, rec1.decay, rows, p.dv, &prefix);
    if (p.normalize) {
      Fold(all, rec1.floats, Range(0, rank, 1), rec1.norm, rec1.decay, rows, 1, &prefix_norm);
    }
  }
  // Round 2 (normalize): the state gradients, which depend on the prefix.
  Record rec2 = rec1;
  if (p.normalize) {
    rec2 = Record(p, false, true);
    std::vector<float> mine2(rec2.floats, 0.0f);
    std::copy(decay.begin(), decay.end(), mine2.begin() + rec2.decay);
    dist::Stopwatch compute2;
    st = own_state_grad(rec2, &mine2, rank > 0 ? prefix.data() : nullptr,
                        rank > 0 ? prefix_norm.data() : nullptr);
    if (timing != nullptr) timing->compute_s += compute2.seconds();
    if (!st.ok()) return st;
    st = TimedAllGather(comm, mine2, &all, timing);
    if (!st.ok()) return st;
  }
  // dS_end of this chunk: fold the later chunks' gradients from the last one back.
  std::vector<float> d_end, d_end_norm;
  const std::vector<int> later = Range(size - 1, rank, -1);
  dist::Stopwatch compute3;
  LinearAttentionBackwardParams run = g;
  if (rank > 0) {
    run.forward.initial_state = StateView(prefix.data(), p);
    if (p.normalize) run.forward.initial_normalizer = NormView(prefix_norm.data(), p);
  }
  if (!later.empty()) {
    Fold(all, rec2.floats, later, rec2.g_state, rec2.decay, rows, p.dv, &d_end);
    run.d_final_state = StateView(d_end.data(), p);
    if (p.normalize) {
      Fold(all, rec2.floats, later, rec2.g_norm, rec2.decay, rows, 1, &d_end_norm);
      run.d_final_normalizer = NormView(d_end_norm.data(), p);
    }
  }
  if (p.seq > 0) st = LinearAttentionBackward(run, ctx);
  if (timing != nullptr) {
    timing->compute_s += compute3.seconds();
    timing->steps += 1;
    timing->total_s += total.seconds();
  }
  return st;
}

}  // namespace tessera
