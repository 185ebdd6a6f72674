// SPDX-License-Identifier: Apache-2.0
// fp64 reference for linear attention: the parallel form, one query row at a time. For each row
// every visible key's weight W_ts is materialized from the feature vectors and the decay between
// the two positions, then out = sum_s W_ts v_s (over sum_s W_ts with normalize). Nothing is
// chunked or carried: the decay between t and s is summed from the gates of exactly the tokens
// in between, so the oracle shares no recurrence, cumulative sum or reference point with the
// chunked and recurrent kernels it checks. Cost O(S^2 F Dv) per head: small shapes only.
#include "ref/linear_ref.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/element.h"

namespace tessera {
namespace ref {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Element `offset` (in elements) of an f32 / bf16 / f16 view, upcast exactly to double.
double Load(const TensorView& t, int64_t offset) { return LoadElementF64(t.dtype, t.data, offset); }

// Element [i0, i1, i2, i3] of a view of rank <= 4 (indices past the rank are 0).
double At(const TensorView& t, int64_t i0, int64_t i1, int64_t i2 = 0, int64_t i3 = 0) {
  return Load(t, i0 * t.strides[0] + i1 * t.strides[1] + i2 * t.strides[2] + i3 * t.strides[3]);
}

size_t Idx(int64_t i) { return static_cast<size_t>(i); }

// The options of a call, resolved once from the public params (not from LinearProblem).
struct Options {
  int64_t batch = 0, seq = 0, heads_q = 0, heads_kv = 0, group = 1, dk = 0, dv = 0, feat = 0;
  LinearFeatureMap map = LinearFeatureMap::kIdentity;
  double scale = 1.0;
  bool causal = true;
  int64_t prefix = 0;
  bool normalize = false;
  double eps = 0.0;
  bool decay = false;
  bool gates = false;
  bool scalar_gates = false;  // gates of rank 3 [B, S, Hq]: one per token and head
  bool lrpe = false;          // feat = 2 * base: [phi cos(p theta), phi sin(p theta)]
  int64_t base = 0;           // the feature dim of phi before LRPE's doubling
  int64_t position_offset = 0;
};

Options Resolve(const LinearAttentionParams& p) {
  Options o;
  o.batch = p.q.shape[0];
  o.seq = p.q.shape[1];
  o.heads_q = p.q.shape[2];
  o.heads_kv = p.k.shape[2];
  o.group = o.heads_q / o.heads_kv;  // valid params: Hkv >= 1 divides Hq
  o.dk = p.q.shape[3];
  o.dv = p.v.shape[3];
  o.map = p.feature_map;
  o.lrpe = p.lrpe_theta.data != nullptr;
  o.base = LinearFeatureDimF64(o.map, o.dk);
  o.feat = o.lrpe ? 2 * o.base : o.base;
  o.position_offset = p.position_offset;
  // The scale parameter is a float, so the default is the float nearest 1/sqrt(Dk): the kernels
  // can use no other, and the oracle should measure their error, not this rounding.
  const double default_scale =
      o.map == LinearFeatureMap::kTaylor2
          ? 1.0
          : static_cast<double>(static_cast<float>(1.0 / std::sqrt(static_cast<double>(o.dk))));
  o.scale = p.scale.has_value() ? static_cast<double>(*p.scale) : default_scale;
  o.causal = p.causal;
  o.prefix = p.prefix_len;
  o.normalize = p.normalize;
  o.eps = p.eps;
  o.decay = p.decay.data != nullptr;
  o.gates = p.gates.data != nullptr;
  o.scalar_gates = o.gates && p.gates.rank == 3;
  return o;
}

bool Visible(const Options& o, int64_t t, int64_t s) { return !o.causal || s <= t || s < o.prefix; }

// One (sequence, query head) upcast: raw q and k rows, features, values and gates.
struct Head {
  std::vector<double> q, k;          // [S, Dk]
  std::vector<double> phi_q, phi_k;  // [S, F]
  std::vector<double> v;             // [S, Dv]
  std::vector<double> g;             // [S, Dk] (GLA only; scalar gates repeated per channel)
  double lambda = 1.0;
};

// theta_f of query head h ([Dk] shared by the heads, or [Hq, Dk]).
double LrpeTheta(const LinearAttentionParams& p, int64_t h, int64_t f) {
  const TensorView& t = p.lrpe_theta;
  return t.rank == 2 ? Load(t, h * t.strides[0] + f * t.strides[1]) : Load(t, f * t.strides[0]);
}

void LoadHead(const LinearAttentionParams& p, const Options& o, int64_t b, int64_t h, Head* hd) {
  const int64_t kv = h / o.group;
  hd->q.assign(Idx(o.seq * o.dk), 0.0);
  hd->k.assign(Idx(o.seq * o.dk), 0.0);
  hd->v.assign(Idx(o.seq * o.dv), 0.0);
  hd->phi_q.assign(Idx(o.seq * o.feat), 0.0);
  hd->phi_k.assign(Idx(o.seq * o.feat), 0.0);
  hd->g.assign(o.gates ? Idx(o.seq * o.dk) : 0, 0.0);
  for (int64_t t = 0; t < o.seq; ++t) {
    for (int64_t c = 0; c < o.dk; ++c) {
      hd->q[Idx(t * o.dk + c)] = At(p.q, b, t, h, c);
      hd->k[Idx(t * o.dk + c)] = At(p.k, b, t, kv, c);
      if (o.gates) hd->g[Idx(t * o.dk + c)] = At(p.gates, b, t, h, o.scalar_gates ? 0 : c);
    }
    for (int64_t d = 0; d < o.dv; ++d) hd->v[Idx(t * o.dv + d)] = At(p.v, b, t, kv, d);
    LinearFeatureF64(o.map, &hd->q[Idx(t * o.dk)], o.dk, &hd->phi_q[Idx(t * o.feat)]);
    LinearFeatureF64(o.map, &hd->k[Idx(t * o.dk)], o.dk, &hd->phi_k[Idx(t * o.feat)]);
    if (o.lrpe) {
      // LRPE: feature f becomes [phi_f cos(p theta_f), phi_f sin(p theta_f)], p the position.
      const double pos = static_cast<double>(o.position_offset + t);
      for (int64_t f = 0; f < o.base; ++f) {
        const double theta = LrpeTheta(p, h, f), c = std::cos(pos * theta),
                     sn = std::sin(pos * theta);
        for (auto* phi : {&hd->phi_q, &hd->phi_k}) {
          const double x = (*phi)[Idx(t * o.feat + f)];
          (*phi)[Idx(t * o.feat + f)] = x * c;
          (*phi)[Idx(t * o.feat + o.base + f)] = x * sn;
        }
      }
    }
  }
  hd->lambda = o.decay ? Load(p.decay, h * p.decay.strides[0]) : 1.0;
}

// decay_c(t, s) for every key s <= t of query t, and from_start_c(t) (the decay applied to the
// initial state). GLA keeps one value per channel; the other forms one per key. Keys s > t (seen
// only without decay or gates) get 1.
struct DecayRow {
  bool per_channel = false;
  int64_t feat = 0;
  std::vector<double> w;      // [S] or [S, F]
  std::vector<double> start;  // [F]

  double at(int64_t s, int64_t c) const { return per_channel ? w[Idx(s * feat + c)] : w[Idx(s)]; }
};

void FillDecayRow(const Options& o, const Head& hd, int64_t t, DecayRow* row) {
  row->per_channel = o.gates;
  row->feat = o.feat;
  row->w.assign(o.gates ? Idx(o.seq * o.feat) : Idx(o.seq), 1.0);
  row->start.assign(Idx(o.feat), 1.0);
  if (o.decay) {
    for (int64_t s = 0; s <= t; ++s) row->w[Idx(s)] = std::pow(hd.lambda, double(t - s));
    std::fill(row->start.begin(), row->start.end(), std::pow(hd.lambda, double(t + 1)));
  } else if (o.gates) {
    // Walk the keys from t down to 0, adding each gate once: log_decay holds
    // sum_{r = s+1..t} g_r when key s is reached, and sum_{r = 0..t} g_r after key 0. (Gated
    // maps have F == Dk: one gate per feature channel.)
    std::vector<double> log_decay(Idx(o.feat), 0.0);
    for (int64_t s = t; s >= 0; --s) {
      for (int64_t c = 0; c < o.feat; ++c) {
        row->w[Idx(s * o.feat + c)] = std::exp(log_decay[Idx(c)]);
        log_decay[Idx(c)] += hd.g[Idx(s * o.dk + c)];
      }
    }
    for (int64_t c = 0; c < o.feat; ++c) row->start[Idx(c)] = std::exp(log_decay[Idx(c)]);
  }
}

// W_ts = scale * sum_c phi(q_t)_c phi(k_s)_c decay_c(t, s).
double Weight(const Options& o, const Head& hd, const DecayRow& row, int64_t t, int64_t s) {
  const double* fq = &hd.phi_q[Idx(t * o.feat)];
  const double* fk = &hd.phi_k[Idx(s * o.feat)];
  double w = 0.0;
  for (int64_t c = 0; c < o.feat; ++c) w += fq[c] * fk[c] * row.at(s, c);
  return o.scale * w;
}

// Adds the exact causal softmax attention of query t over keys [t - window + 1, t] to out_row.
void AddWindow(const Options& o, const Head& hd, int64_t window, int64_t t, double* out_row) {
  const double scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(o.dk)));
  const int64_t first = std::max<int64_t>(0, t - window + 1);
  std::vector<double> logits(Idx(t - first + 1));
  double max = -std::numeric_limits<double>::infinity();
  for (int64_t j = first; j <= t; ++j) {
    double dot = 0.0;
    for (int64_t c = 0; c < o.dk; ++c) dot += hd.q[Idx(t * o.dk + c)] * hd.k[Idx(j * o.dk + c)];
    logits[Idx(j - first)] = scale * dot;
    max = std::max(max, scale * dot);
  }
  double sum = 0.0;
  for (double& l : logits) {
    l = std::exp(l - max);
    sum += l;
  }
  for (int64_t j = first; j <= t; ++j) {
    const double pj = logits[Idx(j - first)] / sum;
    for (int64_t d = 0; d < o.dv; ++d) out_row[d] += pj * hd.v[Idx(j * o.dv + d)];
  }
}

// dx = J_phi(x)^T dphi for x [dk], dphi [F]; dx is overwritten.
void FeatureBackward(LinearFeatureMap map, const double* x, int64_t dk, const double* dphi,
                     double* dx) {
  switch (map) {
    case LinearFeatureMap::kIdentity:
      for (int64_t i = 0; i < dk; ++i) dx[i] = dphi[i];
      return;
    case LinearFeatureMap::kElu1:
      for (int64_t i = 0; i < dk; ++i) dx[i] = dphi[i] * (x[i] > 0.0 ? 1.0 : std::exp(x[i]));
      return;
    case LinearFeatureMap::kRelu:
      for (int64_t i = 0; i < dk; ++i) dx[i] = x[i] > 0.0 ? dphi[i] : 0.0;
      return;
    case LinearFeatureMap::kTaylor2: {
      const double lin = 1.0 / std::pow(static_cast<double>(dk), 0.25);
      const double quad = 1.0 / (std::sqrt(2.0) * std::sqrt(static_cast<double>(dk)));
      const double* dpair = dphi + 1 + dk;  // d phi_(i, j) at [i * dk + j]
      for (int64_t m = 0; m < dk; ++m) {
        // phi_(i, j) = x_i x_j quad: d/dx_m collects the pairs (m, j) and (i, m).
        double acc = 0.0;
        for (int64_t j = 0; j < dk; ++j) acc += dpair[m * dk + j] * x[j] + dpair[j * dk + m] * x[j];
        dx[m] = dphi[1 + m] * lin + acc * quad;
      }
      return;
    }
  }
  for (int64_t i = 0; i < dk; ++i) dx[i] = kNaN;
}

}  // namespace

int64_t LinearFeatureDimF64(LinearFeatureMap map, int64_t dk) {
  return map == LinearFeatureMap::kTaylor2 ? 1 + dk + dk * dk : dk;
}

void LinearFeatureF64(LinearFeatureMap map, const double* x, int64_t dk, double* phi) {
  switch (map) {
    case LinearFeatureMap::kIdentity:
      for (int64_t i = 0; i < dk; ++i) phi[i] = x[i];
      return;
    case LinearFeatureMap::kElu1:
      for (int64_t i = 0; i < dk; ++i) phi[i] = x[i] > 0.0 ? x[i] + 1.0 : std::exp(x[i]);
      return;
    case LinearFeatureMap::kRelu:
      for (int64_t i = 0; i < dk; ++i) phi[i] = x[i] > 0.0 ? x[i] : 0.0;
      return;
    case LinearFeatureMap::kTaylor2: {
      const double lin = 1.0 / std::pow(static_cast<double>(dk), 0.25);
      const double quad = 1.0 / (std::sqrt(2.0) * std::sqrt(static_cast<double>(dk)));
      phi[0] = 1.0;
      for (int64_t i = 0; i < dk; ++i) phi[1 + i] = x[i] * lin;
      for (int64_t i = 0; i < dk; ++i) {
        for (int64_t j = 0; j < dk; ++j) phi[1 + dk + i * dk + j] = x[i] * x[j] * quad;
      }
      return;
    }
  }
  for (int64_t i = 0; i < LinearFeatureDimF64(map, dk); ++i) phi[i] = kNaN;
}

void LinearForwardF64(const LinearAttentionParams& p, double* out, double* final_state,
                      double* final_normalizer) {
  const Options o = Resolve(p);
  const bool has_s0 = p.initial_state.data != nullptr;
  const bool has_z0 = p.initial_normalizer.data != nullptr;
  Head hd;
  DecayRow row;
  std::vector<double> num(Idx(o.dv)), s0(Idx(o.feat * o.dv)), z0(Idx(o.feat));

  for (int64_t b = 0; b < o.batch; ++b) {
    for (int64_t h = 0; h < o.heads_q; ++h) {
      LoadHead(p, o, b, h, &hd);
      for (int64_t c = 0; c < o.feat; ++c) {
        for (int64_t d = 0; d < o.dv; ++d) {
          s0[Idx(c * o.dv + d)] = has_s0 ? At(p.initial_state, b, h, c, d) : 0.0;
        }
        z0[Idx(c)] = has_z0 ? At(p.initial_normalizer, b, h, c) : 0.0;
      }

      for (int64_t t = 0; t < o.seq; ++t) {
        FillDecayRow(o, hd, t, &row);
        std::fill(num.begin(), num.end(), 0.0);
        double den = 0.0;
        for (int64_t s = 0; s < o.seq; ++s) {
          if (!Visible(o, t, s)) continue;
          const double w = Weight(o, hd, row, t, s);
          den += w;
          for (int64_t d = 0; d < o.dv; ++d) num[Idx(d)] += w * hd.v[Idx(s * o.dv + d)];
        }
        // The initial state as one more key before token 0, decayed by every token up to t.
        for (int64_t c = 0; c < o.feat; ++c) {
          const double a = o.scale * hd.phi_q[Idx(t * o.feat + c)] * row.start[Idx(c)];
          den += a * z0[Idx(c)];
          for (int64_t d = 0; d < o.dv; ++d) num[Idx(d)] += a * s0[Idx(c * o.dv + d)];
        }
        double* out_row = out + ((b * o.seq + t) * o.heads_q + h) * o.dv;
        for (int64_t d = 0; d < o.dv; ++d) {
          out_row[d] = o.normalize ? num[Idx(d)] / (den + o.eps) : num[Idx(d)];
        }
        if (p.window > 0) AddWindow(o, hd, p.window, t, out_row);
      }

      if (final_state == nullptr && final_normalizer == nullptr) continue;
      // The state after the last token: every key decayed from its position to S - 1.
      if (o.seq > 0) {
        FillDecayRow(o, hd, o.seq - 1, &row);
      } else {
        row.per_channel = false;
        row.w.clear();
        row.start.assign(Idx(o.feat), 1.0);
      }
      for (int64_t c = 0; c < o.feat; ++c) {
        double z = row.start[Idx(c)] * z0[Idx(c)];
        for (int64_t s = 0; s < o.seq; ++s) z += row.at(s, c) * hd.phi_k[Idx(s * o.feat + c)];
        if (final_normalizer != nullptr) final_normalizer[(b * o.heads_q + h) * o.feat + c] = z;
        if (final_state == nullptr) continue;
        for (int64_t d = 0; d < o.dv; ++d) {
          double x = row.start[Idx(c)] * s0[Idx(c * o.dv + d)];
          for (int64_t s = 0; s < o.seq; ++s) {
            x += row.at(s, c) * hd.phi_k[Idx(s * o.feat + c)] * hd.v[Idx(s * o.dv + d)];
          }
          final_state[((b * o.heads_q + h) * o.feat + c) * o.dv + d] = x;
        }
      }
    }
  }
}

// The gradients of the parallel form, one query row at a time. With W_ts as in the forward,
// num_t = sum_s W_ts v_s, den_t = sum_s W_ts and out_t = num_t / (den_t + eps) (normalize) or
// num_t:
//   dnum_t = dout_t / (den_t + eps)       (dout_t without normalize)
//   dden_t = -(dout_t . out_t) / (den_t + eps)   (0 without normalize)
//   dW_ts  = dnum_t . v_s + dden_t,   dv_s += W_ts dnum_t
// and through W_ts = scale sum_c phi(q_t)_c phi(k_s)_c D_tsc, with X_tsc = scale dW_ts D_tsc:
//   dphi(q_t)_c += X_tsc phi(k_s)_c,   dphi(k_s)_c += X_tsc phi(q_t)_c,
//   GLA: log D_tsc = sum_{r = s+1..t} g_rc, so every g_rc with s < r <= t gains
//        X_tsc phi(q_t)_c phi(k_s)_c (accumulated with a difference array over r).
// The initial state S0 (z0) enters as in the forward, num_t += scale sum_c phi(q_t)_c
// from_start_c(t) S0[c, :], so with A_tc = scale phi(q_t)_c from_start_c(t):
//   dS0[c, :] += A_tc dnum_t,  dz0[c] += A_tc dden_t,
//   dphi(q_t)_c += scale from_start_c(t) (dnum_t . S0[c, :] + dden_t z0[c]),
//   GLA: every g_rc with r <= t gains the same times phi(q_t)_c.
// The final state's terms, with dF = d_final_state, dFz = d_final_normalizer and
// decay_c(S - 1, s) as in the forward:
//   dv_s += sum_c decay_c phi(k_s)_c dF[c, :],  dphi(k_s)_c += decay_c (dF[c, :] . v_s + dFz[c]),
//   dS0 += from_start(S - 1) dF,  dz0 += from_start(S - 1) dFz,
//   GLA: g_rc with s < r <= S - 1 gains decay_c phi(k_s)_c (dF[c, :] . v_s + dFz[c]), and every
//   g_rc gains from_start_c(S - 1) (dF[c, :] . S0[c, :] + dFz[c] z0[c]).
// Finally dq, dk = J_phi^T dphi; dk, dv of a KV head sum its query heads.
void LinearBackwardF64(const LinearAttentionBackwardParams& bp, double* dq, double* dk, double* dv,
                       double* dgates, double* d_initial_state, double* d_initial_normalizer) {
  const LinearAttentionParams& p = bp.forward;
  const Options o = Resolve(p);
  Head hd;
  DecayRow row;
  const size_t n = Idx(o.seq);
  std::vector<double> w(n), num(Idx(o.dv)), dnum(Idx(o.dv)), dout(Idx(o.dv));
  std::vector<double> dphi_q(Idx(o.seq * o.feat)), dphi_k(Idx(o.seq * o.feat));
  std::vector<double> gate_diff, dx(Idx(o.dk));
  std::vector<double> grad_k, grad_v;  // one KV head: [S, Dk], [S, Dv]
  // One query head's states: S0, z0, dF, dFz (zero when not given) and dS0, dz0.
  std::vector<double> s0(Idx(o.feat * o.dv)), z0(Idx(o.feat)), dfs(Idx(o.feat * o.dv)),
      dfz(Idx(o.feat)), ds0(Idx(o.feat * o.dv)), dz0(Idx(o.feat));
  const auto state_or_zero = [](const TensorView& t, int64_t b, int64_t h, int64_t c, int64_t d) {
    return t.data != nullptr ? At(t, b, h, c, d) : 0.0;
  };

  for (int64_t b = 0; b < o.batch; ++b) {
    for (int64_t kv = 0; kv < o.heads_kv; ++kv) {
      grad_k.assign(Idx(o.seq * o.dk), 0.0);
      grad_v.assign(Idx(o.seq * o.dv), 0.0);
      for (int64_t h = kv * o.group; h < (kv + 1) * o.group; ++h) {
        LoadHead(p, o, b, h, &hd);
        std::fill(dphi_q.begin(), dphi_q.end(), 0.0);
        std::fill(dphi_k.begin(), dphi_k.end(), 0.0);
        gate_diff.assign(o.gates ? Idx((o.seq + 1) * o.feat) : 0, 0.0);
        for (int64_t c = 0; c < o.feat; ++c) {
          for (int64_t d = 0; d < o.dv; ++d) {
            s0[Idx(c * o.dv + d)] = state_or_zero(p.initial_state, b, h, c, d);
            dfs[Idx(c * o.dv + d)] = state_or_zero(bp.d_final_state, b, h, c, d);
          }
          z0[Idx(c)] = state_or_zero(p.initial_normalizer, b, h, c, 0);
          dfz[Idx(c)] = state_or_zero(bp.d_final_normalizer, b, h, c, 0);
        }
        std::fill(ds0.begin(), ds0.end(), 0.0);
        std::fill(dz0.begin(), dz0.end(), 0.0);

        for (int64_t t = 0; t < o.seq; ++t) {
          FillDecayRow(o, hd, t, &row);
          for (int64_t d = 0; d < o.dv; ++d) {
            dout[Idx(d)] = At(bp.dout, b, t, h, d);
          }
          std::fill(num.begin(), num.end(), 0.0);
          double den = 0.0;
          for (int64_t s = 0; s < o.seq; ++s) {
            w[Idx(s)] = Visible(o, t, s) ? Weight(o, hd, row, t, s) : 0.0;
            den += w[Idx(s)];
            for (int64_t d = 0; d < o.dv; ++d) num[Idx(d)] += w[Idx(s)] * hd.v[Idx(s * o.dv + d)];
          }
          for (int64_t c = 0; c < o.feat; ++c) {
            const double a = o.scale * hd.phi_q[Idx(t * o.feat + c)] * row.start[Idx(c)];
            den += a * z0[Idx(c)];
            for (int64_t d = 0; d < o.dv; ++d) num[Idx(d)] += a * s0[Idx(c * o.dv + d)];
          }
          const double inv = o.normalize ? 1.0 / (den + o.eps) : 1.0;
          double dden = 0.0;
          for (int64_t d = 0; d < o.dv; ++d) {
            dnum[Idx(d)] = dout[Idx(d)] * inv;
            dden -= dout[Idx(d)] * num[Idx(d)] * inv * inv;  // -(dout . out) / (den + eps)
          }
          if (!o.normalize) dden = 0.0;

          // The initial state, read by every query.
          for (int64_t c = 0; c < o.feat; ++c) {
            const double fq = hd.phi_q[Idx(t * o.feat + c)];
            const double a = o.scale * row.start[Idx(c)];
            double dot = dden * z0[Idx(c)];
            for (int64_t d = 0; d < o.dv; ++d) {
              dot += dnum[Idx(d)] * s0[Idx(c * o.dv + d)];
              ds0[Idx(c * o.dv + d)] += a * fq * dnum[Idx(d)];
            }
            dz0[Idx(c)] += a * fq * dden;
            dphi_q[Idx(t * o.feat + c)] += a * dot;
            if (o.gates) {  // from_start_c(t) holds the gates r in [0, t]
              gate_diff[Idx(c)] += a * dot * fq;
              gate_diff[Idx((t + 1) * o.feat + c)] -= a * dot * fq;
            }
          }

          for (int64_t s = 0; s < o.seq; ++s) {
            if (!Visible(o, t, s)) continue;
            double dw = dden;
            for (int64_t d = 0; d < o.dv; ++d) {
              dw += dnum[Idx(d)] * hd.v[Idx(s * o.dv + d)];
              grad_v[Idx(s * o.dv + d)] += w[Idx(s)] * dnum[Idx(d)];
            }
            for (int64_t c = 0; c < o.feat; ++c) {
              const double x = o.scale * dw * row.at(s, c);
              const double fq = hd.phi_q[Idx(t * o.feat + c)];
              const double fk = hd.phi_k[Idx(s * o.feat + c)];
              dphi_q[Idx(t * o.feat + c)] += x * fk;
              dphi_k[Idx(s * o.feat + c)] += x * fq;
              if (o.gates) {
                // Gates r in (s, t]: +X at r = s + 1, -X at r = t + 1 (empty when s == t).
                gate_diff[Idx((s + 1) * o.feat + c)] += x * fq * fk;
                gate_diff[Idx((t + 1) * o.feat + c)] -= x * fq * fk;
              }
            }
          }
        }

        // The final state's terms (every key decayed to S - 1, and S0 by from_start(S - 1)).
        if (o.seq > 0) {
          FillDecayRow(o, hd, o.seq - 1, &row);
        } else {
          row.start.assign(Idx(o.feat), 1.0);
        }
        for (int64_t s = 0; s < o.seq; ++s) {
          for (int64_t c = 0; c < o.feat; ++c) {
            const double dec = row.at(s, c), fk = hd.phi_k[Idx(s * o.feat + c)];
            double dot = dfz[Idx(c)];
            for (int64_t d = 0; d < o.dv; ++d) {
              dot += dfs[Idx(c * o.dv + d)] * hd.v[Idx(s * o.dv + d)];
              grad_v[Idx(s * o.dv + d)] += dec * fk * dfs[Idx(c * o.dv + d)];
            }
            dphi_k[Idx(s * o.feat + c)] += dec * dot;
            if (o.gates) {  // decay_c(S - 1, s) holds the gates r in (s, S - 1]
              gate_diff[Idx((s + 1) * o.feat + c)] += dec * fk * dot;
              gate_diff[Idx(o.seq * o.feat + c)] -= dec * fk * dot;
            }
          }
        }
        for (int64_t c = 0; c < o.feat; ++c) {
          const double st = row.start[Idx(c)];
          double dot = dfz[Idx(c)] * z0[Idx(c)];
          for (int64_t d = 0; d < o.dv; ++d) {
            dot += dfs[Idx(c * o.dv + d)] * s0[Idx(c * o.dv + d)];
            ds0[Idx(c * o.dv + d)] += st * dfs[Idx(c * o.dv + d)];
          }
          dz0[Idx(c)] += st * dfz[Idx(c)];
          if (o.gates) {  // from_start_c(S - 1) holds every gate
            gate_diff[Idx(c)] += st * dot;
            gate_diff[Idx(o.seq * o.feat + c)] -= st * dot;
          }
        }
        for (int64_t c = 0; c < o.feat; ++c) {
          for (int64_t d = 0; d < o.dv && d_initial_state != nullptr; ++d) {
            d_initial_state[((b * o.heads_q + h) * o.feat + c) * o.dv + d] = ds0[Idx(c * o.dv + d)];
          }
          if (d_initial_normalizer != nullptr) {
            d_initial_normalizer[(b * o.heads_q + h) * o.feat + c] = dz0[Idx(c)];
          }
        }

        for (int64_t t = 0; t < o.seq; ++t) {
          if (o.lrpe) {
            // Back through LRPE's doubling: dphi_f = dcos_f cos(p theta_f) + dsin_f sin(...).
            const double pos = static_cast<double>(o.position_offset + t);
            for (int64_t f = 0; f < o.base; ++f) {
              const double theta = LrpeTheta(p, h, f);
              const double c = std::cos(pos * theta), sn = std::sin(pos * theta);
              for (auto* d : {&dphi_q, &dphi_k}) {
                (*d)[Idx(t * o.feat + f)] =
                    (*d)[Idx(t * o.feat + f)] * c + (*d)[Idx(t * o.feat + o.base + f)] * sn;
              }
            }
          }
          FeatureBackward(o.map, &hd.q[Idx(t * o.dk)], o.dk, &dphi_q[Idx(t * o.feat)], dx.data());
          double* dq_row = dq + ((b * o.seq + t) * o.heads_q + h) * o.dk;
          for (int64_t c = 0; c < o.dk; ++c) dq_row[c] = dx[Idx(c)];
          FeatureBackward(o.map, &hd.k[Idx(t * o.dk)], o.dk, &dphi_k[Idx(t * o.feat)], dx.data());
          for (int64_t c = 0; c < o.dk; ++c) grad_k[Idx(t * o.dk + c)] += dx[Idx(c)];
        }
        if (o.gates && dgates != nullptr) {
          // Scalar gates [B, S, Hq]: g_r enters every channel, so its gradient is the sum of the
          // per-channel ones.
          if (o.scalar_gates) {
            for (int64_t r = 0; r < o.seq; ++r) dgates[(b * o.seq + r) * o.heads_q + h] = 0.0;
          }
          for (int64_t c = 0; c < o.feat; ++c) {
            double acc = 0.0;
            for (int64_t r = 0; r < o.seq; ++r) {
              acc += gate_diff[Idx(r * o.feat + c)];
              if (o.scalar_gates) {
                dgates[(b * o.seq + r) * o.heads_q + h] += acc;
              } else {
                dgates[((b * o.seq + r) * o.heads_q + h) * o.dk + c] = acc;
              }
            }
          }
        }
      }
      for (int64_t s = 0; s < o.seq; ++s) {
        for (int64_t c = 0; c < o.dk; ++c) {
          dk[((b * o.seq + s) * o.heads_kv + kv) * o.dk + c] = grad_k[Idx(s * o.dk + c)];
        }
        for (int64_t d = 0; d < o.dv; ++d) {
          dv[((b * o.seq + s) * o.heads_kv + kv) * o.dv + d] = grad_v[Idx(s * o.dv + d)];
        }
      }
    }
  }
}

}  // namespace ref
}  // namespace tessera
