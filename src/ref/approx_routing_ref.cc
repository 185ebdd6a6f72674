// SPDX-License-Identifier: Apache-2.0
// fp64 references of gathered attention and Routing attention (approx_routing_ref.h).
#include "ref/approx_routing_ref.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace tessera {
namespace ref {
namespace {

double At(const TensorView& t, int64_t i0, int64_t i1, int64_t i2, int64_t i3) {
  return static_cast<const float*>(
      t.data)[i0 * t.strides[0] + i1 * t.strides[1] + i2 * t.strides[2] + i3 * t.strides[3]];
}

double At3(const TensorView& t, int64_t i0, int64_t i1, int64_t i2) {
  return static_cast<const float*>(
      t.data)[i0 * t.strides[0] + i1 * t.strides[1] + i2 * t.strides[2]];
}

}  // namespace

void GatheredAttentionF64(const approx::GatheredAttentionParams& p, double* out, double* lse) {
  const int64_t B = p.q.shape[0], Sq = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t group = Hq / p.k.shape[2];
  const approx::GatheredSegments& g = p.segments;
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t row = b * Hq + h;
      // Every state of every token of the row, in segment order.
      std::vector<std::vector<double>> outs(static_cast<size_t>(Sq));
      std::vector<std::vector<double>> lses(static_cast<size_t>(Sq));
      for (int64_t sg = g.row_begin[row]; sg < g.row_begin[row + 1]; ++sg) {
        for (int64_t o = g.q_begin[sg]; o < g.q_begin[sg + 1]; ++o) {
          const int64_t i = g.q_index[o];
          std::vector<double> s;
          std::vector<int64_t> keys;
          for (int64_t e = g.k_begin[sg]; e < g.k_begin[sg + 1]; ++e) {
            const int64_t j = g.k_index[e];
            if (p.causal && j > i) continue;
            double dot = 0.0;
            for (int64_t d = 0; d < D; ++d)
              dot += At(p.q, b, i, h, d) * At(p.k, b, j, h / group, d);
            s.push_back(static_cast<double>(p.scale) * dot);
            keys.push_back(j);
          }
          std::vector<double> o_row(static_cast<size_t>(D), 0.0);
          double l = -inf;
          if (!s.empty()) {
            const double mx = *std::max_element(s.begin(), s.end());
            double sum = 0.0;
            for (double x : s) sum += std::exp(x - mx);
            l = mx + std::log(sum);
            for (size_t e = 0; e < s.size(); ++e) {
              const double w = std::exp(s[e] - l);
              for (int64_t d = 0; d < D; ++d) o_row[d] += w * At(p.v, b, keys[e], h / group, d);
            }
          }
          outs[i].insert(outs[i].end(), o_row.begin(), o_row.end());
          lses[i].push_back(l);
        }
      }
      for (int64_t i = 0; i < Sq; ++i) {
        double* o = out + ((b * Sq + i) * Hq + h) * D;
        std::fill(o, o + D, 0.0);
        double l = -inf;
        const std::vector<double>& ls = lses[i];
        double mx = -inf;
        for (double x : ls) mx = std::max(mx, x);
        if (mx > -inf) {
          double sum = 0.0;
          for (double x : ls) sum += std::exp(x - mx);
          l = mx + std::log(sum);
          for (size_t r = 0; r < ls.size(); ++r) {
            const double w = std::exp(ls[r] - l);
            for (int64_t d = 0; d < D; ++d) o[d] += w * outs[i][r * D + d];
          }
        }
        if (lse != nullptr) lse[(b * Hq + h) * Sq + i] = l;
      }
    }
  }
}

void RoutingForwardF64(const ApproxParams& params, double* out, double* lse,
                       double* updated_centroids) {
  const RoutingOptions& ro = params.routing;
  const int64_t B = params.q.shape[0], S = params.q.shape[1], Hq = params.q.shape[2],
                D = params.q.shape[3];
  const int64_t group = Hq / params.k.shape[2];
  const int64_t C = ro.clusters, w = ro.window > 0 ? ro.window : S / C;
  std::vector<int64_t> row_begin, q_begin, k_begin;
  std::vector<int32_t> q_index, k_index;
  std::vector<double> sums(static_cast<size_t>(Hq * C * D), 0.0);
  std::vector<int64_t> counts(static_cast<size_t>(Hq * C), 0);
  row_begin.push_back(0);
  q_begin.push_back(0);
  k_begin.push_back(0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      // Normalized rows and their scores, queries (kind 0) then keys (kind 1).
      std::vector<std::vector<int32_t>> chosen[2];
      for (int kind = 0; kind < 2; ++kind) {
        const TensorView& x = kind == 0 ? params.q : params.k;
        const int64_t xh = kind == 0 ? h : h / group;
        std::vector<double> xn(static_cast<size_t>(S * D));
        for (int64_t i = 0; i < S; ++i) {
          double n2 = 0.0;
          for (int64_t d = 0; d < D; ++d) n2 += At(x, b, i, xh, d) * At(x, b, i, xh, d);
          const double inv = n2 > 0.0 ? 1.0 / std::sqrt(n2) : 0.0;
          for (int64_t d = 0; d < D; ++d) xn[i * D + d] = At(x, b, i, xh, d) * inv;
        }
        std::vector<double> score(static_cast<size_t>(C * S));
        for (int64_t c = 0; c < C; ++c) {
          for (int64_t i = 0; i < S; ++i) {
            double dot = 0.0;
            for (int64_t d = 0; d < D; ++d) dot += xn[i * D + d] * At3(ro.centroids, h, c, d);
            score[c * S + i] = dot;
          }
        }
        chosen[kind].resize(static_cast<size_t>(C));
        for (int64_t c = 0; c < C; ++c) {
          std::vector<int32_t> idx(static_cast<size_t>(S));
          for (int64_t i = 0; i < S; ++i) idx[i] = static_cast<int32_t>(i);
          const double* sc = score.data() + c * S;
          std::sort(idx.begin(), idx.end(),
                    [sc](int32_t a, int32_t e) { return sc[a] != sc[e] ? sc[a] > sc[e] : a < e; });
          idx.resize(static_cast<size_t>(w));
          std::sort(idx.begin(), idx.end());
          chosen[kind][c] = idx;
        }
        for (int64_t i = 0; i < S; ++i) {
          int64_t best = 0;
          for (int64_t c = 1; c < C; ++c) {
            if (score[c * S + i] > score[best * S + i]) best = c;
          }
          ++counts[h * C + best];
          for (int64_t d = 0; d < D; ++d) sums[(h * C + best) * D + d] += xn[i * D + d];
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        q_index.insert(q_index.end(), chosen[0][c].begin(), chosen[0][c].end());
        k_index.insert(k_index.end(), chosen[1][c].begin(), chosen[1][c].end());
        q_begin.push_back(static_cast<int64_t>(q_index.size()));
        k_begin.push_back(static_cast<int64_t>(k_index.size()));
      }
      row_begin.push_back(static_cast<int64_t>(q_begin.size()) - 1);
    }
  }
  approx::GatheredAttentionParams gp;
  gp.q = params.q;
  gp.k = params.k;
  gp.v = params.v;
  gp.scale = params.scale.has_value() ? *params.scale : 1.0f / std::sqrt(static_cast<float>(D));
  gp.causal = params.causal;
  gp.segments = {row_begin.data(), q_begin.data(), q_index.data(), k_begin.data(), k_index.data()};
  GatheredAttentionF64(gp, out, lse);
  if (updated_centroids == nullptr) return;
  const double ema = ro.ema;
  for (int64_t h = 0; h < Hq; ++h) {
    for (int64_t c = 0; c < C; ++c) {
      const int64_t n = counts[h * C + c];
      for (int64_t d = 0; d < D; ++d) {
        const double mu = At3(ro.centroids, h, c, d);
        updated_centroids[(h * C + c) * D + d] =
            n > 0 ? ema * mu + (1.0 - ema) * sums[(h * C + c) * D + d] / static_cast<double>(n)
                  : mu;
      }
    }
  }
}

}  // namespace ref
}  // namespace tessera
