// SPDX-License-Identifier: Apache-2.0
// HyperAttention (Han et al. 2023), forward.
//
// What it approximates: softmax attention, O_i = sum_j exp(s_ij) v_j / Z_i with Z_i = sum_j
// exp(s_ij), s_ij = scale q_i.k_j, where for long rows most of Z_i comes from a few large logits.
//
// How. sortLSH finds the large logits: r = hyper.lsh_bits Gaussian hyperplanes per query head
// (drawn from `seed`, hyper_draws.h) give every q and k row r sign bits; the bits, read as a
// Gray code, give a bucket rank in [0, 2^r) such that adjacent ranks differ in one hyperplane.
// Queries and keys are stably sorted by rank (counting sort), and query block i of the sorted
// order (hyper.block rows; the last one may be short) attends exactly to key block i (the last
// key block also takes any keys past the last query block). The remaining mass is estimated from
// m = hyper.samples keys drawn uniformly without replacement (Floyd's algorithm) from the keys
// outside that block: their exponentials, weighted by n_outside / m (ln(n_outside / m) added to
// their LSE), form an unbiased estimate of the rest of Z_i and of the numerator. The two states
// are merged by LSE (MergeStates' arithmetic, fused with the unpermute and, causal, with the
// state the rows already hold: one pass); lse (optional) is the merged estimate.
// Causal: the paper's recursive halving. causal([lo, hi)) is causal([lo, mid)) for the first
// half, and for the second half the merge of causal([mid, hi)) with the non-causal estimate of
// the queries [mid, hi) over the keys [lo, mid). A causal piece of at most max(min_seq_len,
// block) rows is computed exactly (the exact kernel); a non-causal piece with fewer than
// min_seq_len query rows too. Every draw is a function of (seed, batch, head, piece, block), so
// the result is bitwise the same for every thread count.
//
// Error. The block part is exact; the error is the variance of the sampled estimate of the mass
// outside the block, which falls like 1/sqrt(m) and vanishes when the block plus the samples
// cover every key (m >= n_outside: all the outside keys, weight 1) or when one block covers the
// whole sequence. It is small when each query's mass sits on fewer keys than a block and sortLSH
// puts them in its block; large when the mass is spread over many keys (random q, k: all of
// them; the bench's peaked inputs: clusters of N / 8 keys), where the samples carry most of it
// (measured in docs/approx.md). A small m with a large weight n_outside / m can be worse than no
// samples. More bits split the keys finer (fewer collisions of unrelated rows, but more near
// neighbours split off); a larger block catches more of them at a linear cost.
//
// Cost, per head and N rows: hashing N r D, two counting sorts O(N + 2^r), the gathers, and
// N (block + m) D for the two attentions: linear in N for a non-causal call. Causal: the halving
// gives log2(N / min_seq_len) levels of non-causal pieces (N / 2 query rows per level) plus
// N / min_seq_len exact causal pieces of min_seq_len rows: O(N log N) overall.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "approx/approx_internal.h"
#include "approx/hyper_draws.h"
#include "core/check.h"
#include "core/parallel.h"
#include "tessera/attention.h"

namespace tessera {
namespace approx {
namespace {

std::string Str(int64_t x) { return std::to_string(x); }

Status Invalid(const char* name, const std::string& what, const std::string& got) {
  return Status::InvalidArgument(Expected(name, what, got));
}

// Rows (queries plus keys, or sampled keys) gathered per round of non-causal work, over as many
// heads as fit: bounds the scratch (at most about 40 * kChunkRows * D bytes) while giving the
// exact kernel enough blocks to share among the threads.
constexpr int64_t kChunkRows = 65536;
constexpr int64_t kMaxLshBits = 16;
constexpr float kInf = std::numeric_limits<float>::infinity();

size_t Sz(int64_t x) { return static_cast<size_t>(x); }

const float* RowPtr(const TensorView& t, int64_t i0, int64_t i1, int64_t i2) {
  return static_cast<const float*>(t.data) + i0 * t.strides[0] + i1 * t.strides[1] +
         i2 * t.strides[2];
}

// Row [i0, i1, i2, :] of a rank-4 f32 view to `dst` (d floats).
void LoadRow(const TensorView& t, int64_t i0, int64_t i1, int64_t i2, int64_t d, float* dst) {
  const float* src = RowPtr(t, i0, i1, i2);
  const int64_t s = t.strides[3];
  if (s == 1) {
    std::memcpy(dst, src, Sz(d) * sizeof(float));
    return;
  }
  for (int64_t x = 0; x < d; ++x) dst[x] = src[x * s];
}

void StoreRow(const TensorView& t, int64_t i0, int64_t i1, int64_t i2, int64_t d,
              const float* src) {
  float* dst = const_cast<float*>(RowPtr(t, i0, i1, i2));
  const int64_t s = t.strides[3];
  if (s == 1) {
    std::memcpy(dst, src, Sz(d) * sizeof(float));
    return;
  }
  for (int64_t x = 0; x < d; ++x) dst[x * s] = src[x];
}

float& LseAt(const TensorView& lse, int64_t b, int64_t h, int64_t t) {
  return static_cast<float*>(
      lse.data)[b * lse.strides[0] + h * lse.strides[1] + t * lse.strides[2]];
}

// The rank of a bucket in the Gray-code order: the inverse of g = x ^ (x >> 1).
uint32_t GrayRank(uint32_t bits) {
  uint32_t rank = bits;
  for (uint32_t s = bits >> 1; s != 0; s >>= 1) rank ^= s;
  return rank;
}

// Views along the sequence axis: rows [lo, lo + n) of a [B, S, H, D] view, and of [B, H, S].
TensorView SliceSeq(const TensorView& t, int64_t lo, int64_t n) {
  TensorView s = t;
  s.data = static_cast<float*>(t.data) + lo * t.strides[1];
  s.shape[1] = n;
  return s;
}
TensorView SliceLse(const TensorView& t, int64_t lo, int64_t n) {
  TensorView s = t;
  if (t.data == nullptr) return s;
  s.data = static_cast<float*>(t.data) + lo * t.strides[2];
  s.shape[2] = n;
  return s;
}

void Grow(std::vector<float>* v, int64_t n) {
  if (v->size() < Sz(n)) v->resize(Sz(n));
}

class Hyper {
 public:
  Hyper(const ApproxParams& p, const ApproxShape& sh, const Context& ctx)
      : p_(p), sh_(sh), ctx_(ctx), threads_(ResolveThreads(ctx)) {}

  Status Run() {
    const int64_t S = sh_.seq;
    const HyperOptions& o = p_.hyper;
    if (!p_.causal && S < o.min_seq_len) return Exact(0, S, p_.lse, false);
    if (p_.causal && S <= CausalExactLen()) return Exact(0, S, p_.lse, true);
    ComputeRanks();
    if (!p_.causal) return NonCausal(0, S, 0, S, /*has_state=*/false, p_.lse);
    // The halving merges into the LSE of the pieces already written: the caller's or ours.
    TensorView lse = p_.lse;
    if (lse.data == nullptr) {
      lse_store_.resize(Sz(sh_.batch * sh_.heads_q * S));
      lse = MakeView3(lse_store_.data(), DType::kF32, sh_.batch, sh_.heads_q, S);
    }
    return Causal(0, S, lse);
  }

 private:
  int64_t CausalExactLen() const { return std::max(p_.hyper.min_seq_len, p_.hyper.block); }

  // The exact kernel on query and key rows [lo, lo + n).
  Status Exact(int64_t lo, int64_t n, const TensorView& lse, bool causal) const {
    AttentionParams a;
    a.q = SliceSeq(p_.q, lo, n);
    a.k = SliceSeq(p_.k, lo, n);
    a.v = SliceSeq(p_.v, lo, n);
    a.out = SliceSeq(p_.out, lo, n);
    a.lse = SliceLse(lse, lo, n);
    a.scale = sh_.scale;
    a.causal = causal;
    return AttentionForward(a, ctx_);
  }

  Status Causal(int64_t lo, int64_t hi, const TensorView& lse) {
    const int64_t n = hi - lo;
    if (n <= CausalExactLen()) return Exact(lo, n, lse, true);
    const int64_t mid = lo + (n + 1) / 2;
    Status s = Causal(lo, mid, lse);
    if (s.ok()) s = Causal(mid, hi, lse);
    if (s.ok()) s = NonCausal(mid, hi - mid, lo, mid - lo, /*has_state=*/true, lse);
    return s;
  }

  // rank_q_ / rank_k_ [B * Hq, S]: the bucket rank of every query row and (hashed with the
  // query head's hyperplanes) every key row. fp64 dot products, summed over d in order, as the
  // reference does: a sign can only differ where a dot product is within fp64 rounding of 0.
  void ComputeRanks() {
    const int64_t B = sh_.batch, S = sh_.seq, Hq = sh_.heads_q, D = sh_.dim;
    const int64_t r = p_.hyper.lsh_bits;
    // proj_[h][d][j], padded to kMaxLshBits hyperplanes (zero columns give bits we drop).
    proj_.assign(Sz(Hq * D * kMaxLshBits), 0.0);
    for (int64_t h = 0; h < Hq; ++h) {
      for (int64_t j = 0; j < r; ++j) {
        for (int64_t d = 0; d < D; ++d) {
          proj_[Sz((h * D + d) * kMaxLshBits + j)] = HyperProjection(p_.seed, h, j, d);
        }
      }
    }
    rank_q_.resize(Sz(B * Hq * S));
    rank_k_.resize(Sz(B * Hq * S));
    constexpr int64_t kRowsPerTask = 512;
    const int64_t tasks_per_head = (S + kRowsPerTask - 1) / kRowsPerTask;
    ParallelFor(threads_, B * Hq * tasks_per_head, [&](int64_t task, int32_t) {
      const int64_t bh = task / tasks_per_head, t0 = (task % tasks_per_head) * kRowsPerTask;
      const int64_t b = bh / Hq, h = bh % Hq, g = h / sh_.group();
      const int64_t t1 = std::min(S, t0 + kRowsPerTask);
      std::vector<float> row(Sz(D));
      for (int64_t t = t0; t < t1; ++t) {
        LoadRow(p_.q, b, t, h, D, row.data());
        rank_q_[Sz(bh * S + t)] = Rank(row.data(), h);
        LoadRow(p_.k, b, t, g, D, row.data());
        rank_k_[Sz(bh * S + t)] = Rank(row.data(), h);
      }
    });
  }

  uint16_t Rank(const float* x, int64_t h) const {
    const int64_t D = sh_.dim;
    const double* w = proj_.data() + h * D * kMaxLshBits;
    double acc[kMaxLshBits] = {};
    if (p_.hyper.lsh_bits <= 8) {
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t j = 0; j < 8; ++j)
          acc[j] += static_cast<double>(x[d]) * w[d * kMaxLshBits + j];
      }
    } else {
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t j = 0; j < kMaxLshBits; ++j) {
          acc[j] += static_cast<double>(x[d]) * w[d * kMaxLshBits + j];
        }
      }
    }
    uint32_t bits = 0;
    for (int64_t j = 0; j < p_.hyper.lsh_bits; ++j) bits |= (acc[j] > 0.0 ? 1u : 0u) << j;
    return static_cast<uint16_t>(GrayRank(bits));
  }

  // Stable counting sort of rows [lo, lo + n) of one head by rank: perm[j] = row - lo.
  void SortRows(const std::vector<uint16_t>& ranks, int64_t bh, int64_t lo, int64_t n,
                std::vector<int64_t>* count, int32_t* perm) const {
    const uint16_t* rk = ranks.data() + bh * sh_.seq + lo;
    count->assign(Sz((int64_t{1} << p_.hyper.lsh_bits) + 1), 0);
    for (int64_t t = 0; t < n; ++t) ++(*count)[rk[t] + 1u];
    for (size_t i = 1; i < count->size(); ++i) (*count)[i] += (*count)[i - 1];
    for (int64_t t = 0; t < n; ++t) perm[(*count)[rk[t]]++] = static_cast<int32_t>(t);
  }

  // The estimate of the queries [q_lo, q_lo + nq) over the keys [k_lo, k_lo + nk), for every
  // (batch, head). Without state it is written to out (and lse when set); with state it is
  // merged into the state (out, lse) those rows already hold. Fewer than min_seq_len query rows:
  // exact (one block of every key, no samples, rows in their own order).
  Status NonCausal(int64_t q_lo, int64_t nq, int64_t k_lo, int64_t nk, bool has_state,
                   const TensorView& lse) {
    const int64_t BH = sh_.batch * sh_.heads_q, Hq = sh_.heads_q, D = sh_.dim;
    const bool exact = nq < p_.hyper.min_seq_len;
    const int64_t blk = exact ? nq : p_.hyper.block;
    const int64_t nb = (nq + blk - 1) / blk;
    const int64_t m = exact ? 0 : p_.hyper.samples;
    const int64_t head_rows = std::max(nq + nk, nb * std::min(m, nk));
    const int64_t chunk = std::min(BH, std::max<int64_t>(1, kChunkRows / head_rows));
    for (int64_t bh0 = 0; bh0 < BH; bh0 += chunk) {
      const int64_t C = std::min(chunk, BH - bh0), T = C * nq, nseq = C * nb;
      std::vector<int32_t> perm_q(Sz(T)), perm_k(Sz(C * nk));
      ParallelFor(threads_, C, [&](int64_t c, int32_t) {
        int32_t* pq = perm_q.data() + c * nq;
        int32_t* pk = perm_k.data() + c * nk;
        if (exact) {
          for (int64_t t = 0; t < nq; ++t) pq[t] = static_cast<int32_t>(t);
          for (int64_t t = 0; t < nk; ++t) pk[t] = static_cast<int32_t>(t);
          return;
        }
        std::vector<int64_t> count;
        SortRows(rank_q_, bh0 + c, q_lo, nq, &count, pq);
        SortRows(rank_k_, bh0 + c, k_lo, nk, &count, pk);
      });
      // Sequences of the two varlen calls, one per (head c, block i): query rows, key block
      // rows, sampled keys.
      std::vector<int32_t> cu_q(Sz(nseq + 1)), cu_k(Sz(nseq + 1)), cu_s(Sz(nseq + 1));
      std::vector<int64_t> outside(Sz(nseq));
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t e = c * nb + i;
          const int64_t klo = std::min(i * blk, nk),
                        khi = i + 1 == nb ? nk : std::min(klo + blk, nk);
          cu_q[Sz(e)] = static_cast<int32_t>(c * nq + i * blk);
          cu_k[Sz(e)] = static_cast<int32_t>(c * nk + klo);
          outside[Sz(e)] = nk - (khi - klo);
          cu_s[Sz(e + 1)] = cu_s[Sz(e)] + static_cast<int32_t>(std::min(m, outside[Sz(e)]));
        }
      }
      cu_q[Sz(nseq)] = static_cast<int32_t>(T);
      cu_k[Sz(nseq)] = static_cast<int32_t>(C * nk);
      const int64_t total_s = cu_s[Sz(nseq)];
      const int64_t R = total_s > 0 ? 2 : 1;  // the block part, the sampled part

      // Scratch kept across rounds and pieces: grown, never shrunk or cleared (every element a
      // round reads, it wrote first).
      Grow(&qs_, T * D);
      Grow(&ks_, C * nk * D);
      Grow(&vs_, C * nk * D);
      Grow(&ks2_, total_s * D);
      Grow(&vs2_, total_s * D);
      Grow(&parts_, R * T * D);
      Grow(&lse_parts_, R * T);
      float *qs = qs_.data(), *ks = ks_.data(), *vs = vs_.data(), *ks2 = ks2_.data(),
            *vs2 = vs2_.data(), *parts = parts_.data(), *lse_parts = lse_parts_.data();
      std::vector<std::vector<uint64_t>> bitmaps(Sz(threads_));
      ParallelFor(threads_, nseq, [&](int64_t e, int32_t worker) {
        const int64_t c = e / nb, i = e % nb, bh = bh0 + c, b = bh / Hq, h = bh % Hq;
        const int64_t g = h / sh_.group();
        const int32_t* pq = perm_q.data() + c * nq;
        const int32_t* pk = perm_k.data() + c * nk;
        for (int64_t j = cu_q[Sz(e)]; j < cu_q[Sz(e + 1)]; ++j) {
          const int64_t t = q_lo + pq[j - c * nq];
          LoadRow(p_.q, b, t, h, D, qs + j * D);
        }
        const int64_t klo = cu_k[Sz(e)] - c * nk, khi = cu_k[Sz(e + 1)] - c * nk;
        for (int64_t j = klo; j < khi; ++j) {
          LoadRow(p_.k, b, k_lo + pk[j], g, D, ks + (c * nk + j) * D);
          LoadRow(p_.v, b, k_lo + pk[j], g, D, vs + (c * nk + j) * D);
        }
        // Floyd's algorithm: m distinct indices of [0, n_outside), in ascending order from the
        // bitmap; index x is sorted key x, or x + block length past the block.
        const int64_t n_out = outside[Sz(e)], ms = cu_s[Sz(e + 1)] - cu_s[Sz(e)];
        if (ms == 0) return;
        std::vector<uint64_t>& bits = bitmaps[Sz(worker)];
        bits.assign(Sz((n_out + 63) / 64), 0);
        if (ms == n_out) {
          for (int64_t x = 0; x < n_out; ++x) bits[Sz(x >> 6)] |= uint64_t{1} << (x & 63);
        } else {
          for (int64_t step = n_out - ms; step < n_out; ++step) {
            int64_t x = HyperSampleDraw(p_.seed, b, h, q_lo, i, step);
            if ((bits[Sz(x >> 6)] >> (x & 63)) & 1u) x = step;
            bits[Sz(x >> 6)] |= uint64_t{1} << (x & 63);
          }
        }
        int64_t dst = cu_s[Sz(e)];
        for (size_t w = 0; w < bits.size(); ++w) {
          for (uint64_t word = bits[w]; word != 0; word &= word - 1) {
            const int64_t x = static_cast<int64_t>(w) * 64 + __builtin_ctzll(word);
            const int64_t key = k_lo + pk[x < klo ? x : x + (khi - klo)];
            LoadRow(p_.k, b, key, g, D, ks2 + dst * D);
            LoadRow(p_.v, b, key, g, D, vs2 + dst * D);
            ++dst;
          }
        }
      });

      Status s = Attend(qs, ks, vs, cu_q, cu_k, nseq, T, parts, lse_parts);
      if (!s.ok()) return s;
      if (total_s > 0) {
        s = Attend(qs, ks2, vs2, cu_q, cu_s, nseq, T, parts + T * D, lse_parts + T);
        if (!s.ok()) return s;
      }
      // Merge by LSE (MergeStates' arithmetic) fused with the unpermute: the block part, the
      // sampled part with ln(n_outside / m) added to its LSE (the sampling weight on every
      // sampled exponential), and the state the row already holds, in one pass over the rows.
      ParallelFor(threads_, nseq, [&](int64_t e, int32_t) {
        const int64_t c = e / nb, bh = bh0 + c, b = bh / Hq, h = bh % Hq;
        const int32_t* pq = perm_q.data() + c * nq;
        const int64_t ms = cu_s[Sz(e + 1)] - cu_s[Sz(e)];
        const float corr = ms == 0 || ms == outside[Sz(e)]
                               ? 0.0f
                               : static_cast<float>(std::log(static_cast<double>(outside[Sz(e)]) /
                                                             static_cast<double>(ms)));
        std::vector<float> row(Sz(D), 0.0f);
        for (int64_t j = cu_q[Sz(e)]; j < cu_q[Sz(e + 1)]; ++j) {
          const int64_t t = q_lo + pq[j - c * nq];
          const float* ob = parts + j * D;
          const float* os = ms > 0 ? parts + (T + j) * D : ob;
          const float lb = lse_parts[Sz(j)];
          const float ls = ms > 0 ? lse_parts[Sz(T + j)] + corr : -kInf;
          float lo = -kInf;
          if (has_state) {
            LoadRow(p_.out, b, t, h, D, row.data());
            lo = LseAt(lse, b, h, t);
          }
          const float top = std::max(lb, std::max(ls, lo));
          float merged_lse = -kInf;
          if (top == -kInf) {  // no key at all: (0, -inf)
            std::fill(row.begin(), row.end(), 0.0f);
          } else {
            const float wb = std::exp(lb - top), ws = std::exp(ls - top), wo = std::exp(lo - top);
            const float sum = wb + ws + wo;
            const float fb = wb / sum, fs = ws / sum, fo = wo / sum;
            for (int64_t d = 0; d < D; ++d) {
              row[Sz(d)] = fb * ob[d] + (ms > 0 ? fs * os[d] : 0.0f) + fo * row[Sz(d)];
            }
            merged_lse = top + std::log(sum);
          }
          StoreRow(p_.out, b, t, h, D, row.data());
          if (lse.data != nullptr) LseAt(lse, b, h, t) = merged_lse;
        }
      });
    }
    return Status::Ok();
  }

  // Varlen exact attention of the gathered rows: out [T, 1, D] and lse [1, T] (f32, contiguous).
  Status Attend(float* q, float* k, float* v, std::vector<int32_t>& cu_q,
                std::vector<int32_t>& cu_k, int64_t nseq, int64_t T, float* out, float* lse) const {
    const int64_t D = sh_.dim, tk = cu_k[Sz(nseq)];
    AttentionParams a;
    a.q = MakeView3(q, DType::kF32, T, 1, D);
    a.k = MakeView3(k, DType::kF32, tk, 1, D);
    a.v = MakeView3(v, DType::kF32, tk, 1, D);
    a.out = MakeView3(out, DType::kF32, T, 1, D);
    const int64_t lse_shape[2] = {1, T};
    a.lse = MakeContiguousView(lse, DType::kF32, 2, lse_shape);
    a.scale = sh_.scale;
    a.cu_seqlens_q = MakeView1(cu_q.data(), DType::kI32, nseq + 1);
    a.cu_seqlens_k = MakeView1(cu_k.data(), DType::kI32, nseq + 1);
    a.num_seqs = static_cast<int32_t>(nseq);
    return AttentionForward(a, ctx_);
  }

  const ApproxParams& p_;
  const ApproxShape sh_;
  const Context& ctx_;
  const int32_t threads_;
  std::vector<double> proj_;
  std::vector<uint16_t> rank_q_, rank_k_;
  std::vector<float> lse_store_;
  std::vector<float> qs_, ks_, vs_, ks2_, vs2_, parts_, lse_parts_;
};

}  // namespace

Status HyperForward(const ApproxParams& params, const ApproxShape& shape, const Context& ctx) {
  const HyperOptions& o = params.hyper;
  if (o.block < 16 || o.block % 16 != 0) {
    return Invalid("hyper.block", "a positive multiple of 16", Str(o.block));
  }
  if (o.samples < 0) return Invalid("hyper.samples", ">= 0", Str(o.samples));
  if (o.lsh_bits < 1 || o.lsh_bits > kMaxLshBits) {
    return Invalid("hyper.lsh_bits", "1.." + Str(kMaxLshBits), Str(o.lsh_bits));
  }
  if (o.min_seq_len < 0) return Invalid("hyper.min_seq_len", ">= 0", Str(o.min_seq_len));
  // The gathered rows (queries, and sampled keys of every block of one head) are addressed by
  // the exact kernel's i32 cu_seqlens.
  constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();
  if (shape.seq > kMaxRows / 2) {
    return Invalid("q", "at most 2^30 tokens for hyper", Str(shape.seq));
  }
  const int64_t blocks = (shape.seq + o.block - 1) / o.block;
  if (std::min(o.samples, shape.seq) > kMaxRows / blocks) {
    return Invalid("hyper.samples",
                   "at most " + Str(kMaxRows / blocks) + " (" + Str(blocks) +
                       " blocks of sampled keys per head address at most 2^31 - 1 rows)",
                   Str(o.samples));
  }
  if (shape.batch == 0 || shape.heads_q == 0) return Status::Ok();  // no output element
  Hyper hyper(params, shape, ctx);
  return hyper.Run();
}

}  // namespace approx
}  // namespace tessera
