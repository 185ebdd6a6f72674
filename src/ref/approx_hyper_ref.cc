// SPDX-License-Identifier: Apache-2.0
// fp64 reference of HyperAttention: see approx_hyper_ref.h.
#include "ref/approx_hyper_ref.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <set>
#include <vector>

#include "approx/hyper_draws.h"

namespace tessera {
namespace ref {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

size_t Idx(int64_t i) { return static_cast<size_t>(i); }

double At(const TensorView& t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
  return static_cast<double>(static_cast<const float*>(
      t.data)[i0 * t.strides[0] + i1 * t.strides[1] + i2 * t.strides[2] + i3 * t.strides[3]]);
}

// One (batch, query head): rows in double, the running state of every query row.
struct Head {
  int64_t S = 0, D = 0, block = 0, samples = 0, min_len = 0, b = 0, h = 0;
  uint64_t seed = 0;
  double scale = 1.0;
  std::vector<std::vector<double>> q, k, v;
  std::vector<int64_t> rank_q, rank_k;
  std::vector<std::vector<double>> o;  // state: output of each query row
  std::vector<double> l;               // state: LSE of each query row (-inf: empty)

  double Logit(int64_t i, int64_t j) const {
    double s = 0.0;
    for (int64_t d = 0; d < D; ++d) s += q[Idx(i)][Idx(d)] * k[Idx(j)][Idx(d)];
    return scale * s;
  }

  // Row i's state over the keys `keys` with weights `w`, merged into (o[i], l[i]).
  void Accumulate(int64_t i, const std::vector<int64_t>& keys, const std::vector<double>& w) {
    if (keys.empty()) return;
    std::vector<double> s(keys.size());
    double mx = -kInf;
    for (size_t x = 0; x < keys.size(); ++x) {
      s[x] = Logit(i, keys[x]);
      mx = std::max(mx, s[x]);
    }
    double z = 0.0;
    std::vector<double> num(Idx(D), 0.0);
    for (size_t x = 0; x < keys.size(); ++x) {
      const double e = w[x] * std::exp(s[x] - mx);
      z += e;
      for (int64_t d = 0; d < D; ++d) num[Idx(d)] += e * v[Idx(keys[x])][Idx(d)];
    }
    const double li = mx + std::log(z);
    const double lo = l[Idx(i)];
    const double top = std::max(lo, li);
    const double a = lo == -kInf ? 0.0 : std::exp(lo - top), c = std::exp(li - top);
    for (int64_t d = 0; d < D; ++d) {
      o[Idx(i)][Idx(d)] = (a * o[Idx(i)][Idx(d)] + c * num[Idx(d)] / z) / (a + c);
    }
    l[Idx(i)] = top + std::log(a + c);
  }

  // Query rows [q_lo, q_lo + nq) over the keys [k_lo, k_lo + nk).
  void NonCausal(int64_t q_lo, int64_t nq, int64_t k_lo, int64_t nk) {
    if (nq < min_len) {
      std::vector<int64_t> keys(Idx(nk));
      std::iota(keys.begin(), keys.end(), k_lo);
      const std::vector<double> w(keys.size(), 1.0);
      for (int64_t i = q_lo; i < q_lo + nq; ++i) Accumulate(i, keys, w);
      return;
    }
    std::vector<int64_t> sq(Idx(nq)), sk(Idx(nk));
    std::iota(sq.begin(), sq.end(), q_lo);
    std::iota(sk.begin(), sk.end(), k_lo);
    std::stable_sort(sq.begin(), sq.end(),
                     [&](int64_t x, int64_t y) { return rank_q[Idx(x)] < rank_q[Idx(y)]; });
    std::stable_sort(sk.begin(), sk.end(),
                     [&](int64_t x, int64_t y) { return rank_k[Idx(x)] < rank_k[Idx(y)]; });
    const int64_t nb = (nq + block - 1) / block;
    for (int64_t i = 0; i < nb; ++i) {
      // Key block i: sorted keys [i * block, (i + 1) * block), the last one up to nk.
      const int64_t klo = std::min(i * block, nk);
      const int64_t khi = i == nb - 1 ? nk : std::min((i + 1) * block, nk);
      std::vector<int64_t> keys(sk.begin() + klo, sk.begin() + khi);
      std::vector<double> w(keys.size(), 1.0);
      const int64_t n_out = nk - (khi - klo);
      const int64_t ms = std::min(samples, n_out);
      std::set<int64_t> chosen;
      for (int64_t step = n_out - ms; step < n_out; ++step) {
        if (ms == n_out) {
          chosen.insert(step);
          continue;
        }
        const int64_t x = approx::HyperSampleDraw(seed, b, h, q_lo, i, step);
        chosen.insert(chosen.count(x) != 0 ? step : x);
      }
      const double weight = ms > 0 ? static_cast<double>(n_out) / static_cast<double>(ms) : 1.0;
      for (int64_t x : chosen) {
        keys.push_back(sk[Idx(x < klo ? x : x + (khi - klo))]);
        w.push_back(weight);
      }
      const int64_t qend = std::min((i + 1) * block, nq);
      for (int64_t j = i * block; j < qend; ++j) Accumulate(sq[Idx(j)], keys, w);
    }
  }

  void Causal(int64_t lo, int64_t hi) {
    const int64_t n = hi - lo;
    if (n <= std::max(min_len, block)) {
      for (int64_t i = lo; i < hi; ++i) {
        std::vector<int64_t> keys(Idx(i - lo + 1));
        std::iota(keys.begin(), keys.end(), lo);
        Accumulate(i, keys, std::vector<double>(keys.size(), 1.0));
      }
      return;
    }
    const int64_t mid = lo + (n + 1) / 2;
    Causal(lo, mid);
    Causal(mid, hi);
    NonCausal(mid, hi - mid, lo, mid - lo);
  }
};

// The bucket rank of sign bits `bits` (bit j: hyperplane j) in the Gray-code order: rank bit i is
// the parity of bits i..r-1.
int64_t GrayRankF64(uint32_t bits, int64_t r) {
  int64_t rank = 0;
  for (int64_t i = 0; i < r; ++i) {
    uint32_t parity = 0;
    for (int64_t j = i; j < r; ++j) parity ^= (bits >> j) & 1u;
    rank |= static_cast<int64_t>(parity) << i;
  }
  return rank;
}

}  // namespace

void HyperForwardF64(const ApproxParams& params, double* out, double* lse) {
  const int64_t B = params.q.shape[0], S = params.q.shape[1], Hq = params.q.shape[2],
                D = params.q.shape[3], Hkv = params.k.shape[2];
  const HyperOptions& o = params.hyper;
  const float scale_f =
      params.scale.has_value() ? *params.scale : 1.0f / std::sqrt(static_cast<float>(D));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t g = h / (Hq / Hkv);
      Head hd;
      hd.S = S;
      hd.D = D;
      hd.block = o.block;
      hd.samples = o.samples;
      hd.min_len = o.min_seq_len;
      hd.b = b;
      hd.h = h;
      hd.seed = params.seed;
      hd.scale = static_cast<double>(scale_f);
      hd.q.assign(Idx(S), std::vector<double>(Idx(D)));
      hd.k = hd.q;
      hd.v = hd.q;
      for (int64_t t = 0; t < S; ++t) {
        for (int64_t d = 0; d < D; ++d) {
          hd.q[Idx(t)][Idx(d)] = At(params.q, b, t, h, d);
          hd.k[Idx(t)][Idx(d)] = At(params.k, b, t, g, d);
          hd.v[Idx(t)][Idx(d)] = At(params.v, b, t, g, d);
        }
      }
      // Sign bits of the r hyperplanes of head h, dot products summed over d in order.
      std::vector<std::vector<double>> w(Idx(o.lsh_bits), std::vector<double>(Idx(D)));
      for (int64_t j = 0; j < o.lsh_bits; ++j) {
        for (int64_t d = 0; d < D; ++d)
          w[Idx(j)][Idx(d)] = approx::HyperProjection(params.seed, h, j, d);
      }
      auto rank_of = [&](const std::vector<double>& x) {
        uint32_t bits = 0;
        for (int64_t j = 0; j < o.lsh_bits; ++j) {
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += x[Idx(d)] * w[Idx(j)][Idx(d)];
          if (dot > 0.0) bits |= 1u << j;
        }
        return GrayRankF64(bits, o.lsh_bits);
      };
      hd.rank_q.resize(Idx(S));
      hd.rank_k.resize(Idx(S));
      for (int64_t t = 0; t < S; ++t) {
        hd.rank_q[Idx(t)] = rank_of(hd.q[Idx(t)]);
        hd.rank_k[Idx(t)] = rank_of(hd.k[Idx(t)]);
      }
      hd.o.assign(Idx(S), std::vector<double>(Idx(D), 0.0));
      hd.l.assign(Idx(S), -kInf);
      if (params.causal) {
        hd.Causal(0, S);
      } else {
        hd.NonCausal(0, S, 0, S);
      }
      for (int64_t t = 0; t < S; ++t) {
        for (int64_t d = 0; d < D; ++d) out[((b * S + t) * Hq + h) * D + d] = hd.o[Idx(t)][Idx(d)];
        if (lse != nullptr) lse[(b * Hq + h) * S + t] = hd.l[Idx(t)];
      }
    }
  }
}

}  // namespace ref
}  // namespace tessera
