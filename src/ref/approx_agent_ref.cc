// SPDX-License-Identifier: Apache-2.0
// fp64 references for Agent Attention and HiLo: the pooled tokens are formed first, then every
// attention row is materialized (all its logits, their max, the exponentials, the normalized
// sum), one row at a time.
#include "ref/approx_agent_ref.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/element.h"

namespace tessera {
namespace ref {
namespace {

using Rows = std::vector<std::vector<double>>;

size_t Idx(int64_t i) { return static_cast<size_t>(i); }

// Element [i0, i1, i2, i3] of a view (indices past its rank are 0), exactly as double.
double At(const TensorView& t, int64_t i0, int64_t i1, int64_t i2 = 0, int64_t i3 = 0) {
  return LoadElementF64(
      t.dtype, t.data,
      i0 * t.strides[0] + i1 * t.strides[1] + i2 * t.strides[2] + i3 * t.strides[3]);
}

// Row [b, t, h, :] of a [B, S, H, D] view.
std::vector<double> Row(const TensorView& t, int64_t b, int64_t s, int64_t h) {
  std::vector<double> r(Idx(t.shape[3]));
  for (int64_t d = 0; d < t.shape[3]; ++d) r[Idx(d)] = At(t, b, s, h, d);
  return r;
}

double Dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// softmax(logits) . values; writes the row to `out` and returns the log-sum-exp.
double Attend(const std::vector<double>& logits, const Rows& values, double* out) {
  const double m = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  std::vector<double> p(logits.size());
  for (size_t j = 0; j < logits.size(); ++j) sum += p[j] = std::exp(logits[j] - m);
  const size_t dim = values[0].size();
  std::fill(out, out + dim, 0.0);
  for (size_t j = 0; j < logits.size(); ++j) {
    for (size_t d = 0; d < dim; ++d) out[d] += p[j] / sum * values[j][d];
  }
  return m + std::log(sum);
}

double Scale(const ApproxParams& p) {
  if (p.scale.has_value()) return *p.scale;
  return static_cast<double>(1.0f / std::sqrt(static_cast<float>(p.q.shape[3])));
}

// Element [h, i, j] of an optional [1 or Hq, rows, cols] bias (0 when unset).
double Bias(const TensorView& t, int64_t h, int64_t i, int64_t j) {
  if (t.data == nullptr) return 0.0;
  return At(t, t.shape[0] == 1 ? 0 : h, i, j);
}

}  // namespace

void AgentForwardF64(const ApproxParams& params, double* out) {
  const TensorView &q = params.q, &k = params.k, &v = params.v;
  const AgentOptions& o = params.agent;
  const int64_t B = q.shape[0], S = q.shape[1], Hq = q.shape[2], D = q.shape[3];
  const int64_t group = Hq / k.shape[2], n = o.agents;
  const double scale = Scale(params);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      Rows keys, values, queries, agents(Idx(n), std::vector<double>(Idx(D), 0.0)), agent_out;
      for (int64_t j = 0; j < S; ++j) {
        keys.push_back(Row(k, b, j, h / group));
        values.push_back(Row(v, b, j, h / group));
        queries.push_back(Row(q, b, j, h));
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t lo = i * S / n, hi = (i + 1) * S / n;
        for (int64_t t = lo; t < hi; ++t) {
          for (int64_t d = 0; d < D; ++d) agents[Idx(i)][Idx(d)] += queries[Idx(t)][Idx(d)];
        }
        for (double& x : agents[Idx(i)]) x /= static_cast<double>(hi - lo);
      }
      for (int64_t i = 0; i < n; ++i) {
        std::vector<double> logits(Idx(S));
        for (int64_t j = 0; j < S; ++j) {
          logits[Idx(j)] = scale * Dot(agents[Idx(i)], keys[Idx(j)]) + Bias(o.agent_bias, h, i, j);
        }
        agent_out.emplace_back(Idx(D));
        Attend(logits, values, agent_out.back().data());
      }
      for (int64_t t = 0; t < S; ++t) {
        std::vector<double> logits(Idx(n));
        for (int64_t i = 0; i < n; ++i) {
          logits[Idx(i)] =
              scale * Dot(queries[Idx(t)], agents[Idx(i)]) + Bias(o.query_bias, h, t, i);
        }
        double* row = out + ((b * S + t) * Hq + h) * D;
        Attend(logits, agent_out, row);
        if (o.dwc.data != nullptr) {
          for (int64_t d = 0; d < D; ++d) row[d] += At(o.dwc, b, t, h, d);
        }
      }
    }
  }
}

void HiLoForwardF64(const ApproxParams& params, double* out, double* lse) {
  const TensorView &q = params.q, &k = params.k, &v = params.v;
  const HiLoOptions& o = params.hilo;
  const int64_t B = q.shape[0], S = q.shape[1], Hq = q.shape[2], D = q.shape[3];
  const int64_t group = Hq / k.shape[2], gw = o.grid_w, s = o.window;
  const int64_t nwx = (gw + s - 1) / s, windows = ((o.grid_h + s - 1) / s) * nwx;
  const double scale = Scale(params);
  auto window_of = [&](int64_t tok) { return (tok / gw) / s * nwx + (tok % gw) / s; };
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t kvh = h / group;
      const bool lofi = h >= Hq - o.lofi_heads;
      Rows pooled_k(Idx(windows), std::vector<double>(Idx(D), 0.0)), pooled_v = pooled_k;
      std::vector<int64_t> count(Idx(windows), 0);
      for (int64_t j = 0; j < S; ++j) {
        const size_t w = Idx(window_of(j));
        ++count[w];
        for (int64_t d = 0; d < D; ++d) {
          pooled_k[w][Idx(d)] += At(k, b, j, kvh, d);
          pooled_v[w][Idx(d)] += At(v, b, j, kvh, d);
        }
      }
      for (size_t w = 0; w < pooled_k.size(); ++w) {
        for (int64_t d = 0; d < D; ++d) {
          pooled_k[w][Idx(d)] /= static_cast<double>(count[w]);
          pooled_v[w][Idx(d)] /= static_cast<double>(count[w]);
        }
      }
      for (int64_t t = 0; t < S; ++t) {
        const std::vector<double> qt = Row(q, b, t, h);
        Rows values;
        std::vector<double> logits;
        if (lofi) {
          for (int64_t w = 0; w < windows; ++w) logits.push_back(scale * Dot(qt, pooled_k[Idx(w)]));
          values = pooled_v;
        } else {
          for (int64_t j = 0; j < S; ++j) {
            if (window_of(j) != window_of(t)) continue;
            logits.push_back(scale * Dot(qt, Row(k, b, j, kvh)));
            values.push_back(Row(v, b, j, kvh));
          }
        }
        const double l = Attend(logits, values, out + ((b * S + t) * Hq + h) * D);
        if (lse != nullptr) lse[(b * Hq + h) * S + t] = l;
      }
    }
  }
}

}  // namespace ref
}  // namespace tessera
