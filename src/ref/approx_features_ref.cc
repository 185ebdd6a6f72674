// SPDX-License-Identifier: Apache-2.0
// fp64 references of Performer and WERSA (approx_features_ref.h): scalar, materialized.
#include "ref/approx_features_ref.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace tessera {
namespace ref {

namespace {

using Vec = std::vector<double>;

constexpr double kEps = static_cast<double>(std::numeric_limits<float>::min());

double Get(const TensorView& t, int64_t a, int64_t b, int64_t c, int64_t d) {
  return static_cast<double>(static_cast<const float*>(
      t.data)[a * t.strides[0] + b * t.strides[1] + c * t.strides[2] + d * t.strides[3]]);
}

// [B, S, H, D] of a view, contiguous fp64.
Vec Load(const TensorView& t) {
  Vec out;
  out.reserve(static_cast<size_t>(t.numel()));
  for (int64_t a = 0; a < t.shape[0]; ++a) {
    for (int64_t b = 0; b < t.shape[1]; ++b) {
      for (int64_t c = 0; c < t.shape[2]; ++c) {
        for (int64_t d = 0; d < t.shape[3]; ++d) out.push_back(Get(t, a, b, c, d));
      }
    }
  }
  return out;
}

struct Dims {
  int64_t B, S, Hq, Hkv, D;
  int64_t G() const { return Hq / Hkv; }
};

Dims DimsOf(const ApproxParams& p) {
  return {p.q.shape[0], p.q.shape[1], p.q.shape[2], p.k.shape[2], p.q.shape[3]};
}

// Normalized linear attention on features fq [B, S, Hq, m], fk [B, S, Hkv, m], v [B, S, Hkv, D].
Vec Attend(const Dims& n, int64_t m, const Vec& fq, const Vec& fk, const Vec& v, bool causal) {
  Vec out(static_cast<size_t>(n.B * n.S * n.Hq * n.D), 0.0);
  for (int64_t b = 0; b < n.B; ++b) {
    for (int64_t h = 0; h < n.Hq; ++h) {
      const int64_t hk = h / n.G();
      for (int64_t t = 0; t < n.S; ++t) {
        const double* pq = &fq[static_cast<size_t>(((b * n.S + t) * n.Hq + h) * m)];
        double den = 0.0;
        Vec num(static_cast<size_t>(n.D), 0.0);
        for (int64_t s = 0; s < (causal ? t + 1 : n.S); ++s) {
          const double* pk = &fk[static_cast<size_t>(((b * n.S + s) * n.Hkv + hk) * m)];
          double a = 0.0;
          for (int64_t i = 0; i < m; ++i) a += pq[i] * pk[i];
          den += a;
          for (int64_t d = 0; d < n.D; ++d) {
            num[static_cast<size_t>(d)] +=
                a * v[static_cast<size_t>(((b * n.S + s) * n.Hkv + hk) * n.D + d)];
          }
        }
        for (int64_t d = 0; d < n.D; ++d) {
          out[static_cast<size_t>(((b * n.S + t) * n.Hq + h) * n.D + d)] =
              num[static_cast<size_t>(d)] / (den + kEps);
        }
      }
    }
  }
  return out;
}

// Gradients of Attend for the loss sum dout . out: dfq, dfk (summed over groups), dv.
void AttendBackward(const Dims& n, int64_t m, const Vec& fq, const Vec& fk, const Vec& v,
                    const Vec& dout, bool causal, Vec* dfq, Vec* dfk, Vec* dv) {
  const Vec out = Attend(n, m, fq, fk, v, causal);
  dfq->assign(fq.size(), 0.0);
  dfk->assign(fk.size(), 0.0);
  dv->assign(v.size(), 0.0);
  auto at = [&](int64_t b, int64_t s, int64_t h, int64_t H, int64_t w) {
    return static_cast<size_t>(((b * n.S + s) * H + h) * w);
  };
  for (int64_t b = 0; b < n.B; ++b) {
    for (int64_t h = 0; h < n.Hq; ++h) {
      const int64_t hk = h / n.G();
      for (int64_t t = 0; t < n.S; ++t) {
        const int64_t end = causal ? t + 1 : n.S;
        const size_t qo = at(b, t, h, n.Hq, m), oo = at(b, t, h, n.Hq, n.D);
        double den = 0.0;
        for (int64_t s = 0; s < end; ++s) {
          const size_t ko = at(b, s, hk, n.Hkv, m);
          for (int64_t i = 0; i < m; ++i) den += fq[qo + i] * fk[ko + i];
        }
        const double inv = 1.0 / (den + kEps);
        double dot_out = 0.0;
        for (int64_t d = 0; d < n.D; ++d) dot_out += dout[oo + d] * out[oo + d];
        for (int64_t s = 0; s < end; ++s) {
          const size_t ko = at(b, s, hk, n.Hkv, m), vo = at(b, s, hk, n.Hkv, n.D);
          double a = 0.0, dot_v = 0.0;
          for (int64_t i = 0; i < m; ++i) a += fq[qo + i] * fk[ko + i];
          for (int64_t d = 0; d < n.D; ++d) {
            dot_v += dout[oo + d] * v[vo + d];
            (*dv)[vo + d] += a * inv * dout[oo + d];
          }
          const double da = (dot_v - dot_out) * inv;
          for (int64_t i = 0; i < m; ++i) {
            (*dfq)[qo + i] += da * fk[ko + i];
            (*dfk)[ko + i] += da * fq[qo + i];
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Performer.

// Features of every row of x [B, S, H, D] (stabilized as the header says), and x' = c x.
Vec PerformerFeatures(const TensorView& x, const float* w, int64_t m, double c, bool keys,
                      Vec* xs) {
  const int64_t B = x.shape[0], S = x.shape[1], H = x.shape[2], D = x.shape[3];
  *xs = Load(x);
  for (double& e : *xs) e *= c;
  Vec y(static_cast<size_t>(B * S * H * m));
  for (int64_t r = 0; r < B * S * H; ++r) {
    const double* xr = &(*xs)[static_cast<size_t>(r * D)];
    double sq = 0.0;
    for (int64_t d = 0; d < D; ++d) sq += xr[d] * xr[d];
    for (int64_t i = 0; i < m; ++i) {
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d) dot += static_cast<double>(w[i * D + d]) * xr[d];
      y[static_cast<size_t>(r * m + i)] = dot - (keys ? 0.5 * sq : 0.0);
    }
  }
  const double inv_sqrt_m = 1.0 / std::sqrt(static_cast<double>(m));
  if (!keys) {
    for (int64_t r = 0; r < B * S * H; ++r) {
      double* yr = &y[static_cast<size_t>(r * m)];
      const double mx = *std::max_element(yr, yr + m);
      for (int64_t i = 0; i < m; ++i) yr[i] = std::exp(yr[i] - mx) * inv_sqrt_m;
    }
    return y;
  }
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t i = 0; i < m; ++i)
          mx = std::max(mx, y[static_cast<size_t>(((b * S + s) * H + h) * m + i)]);
      }
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t i = 0; i < m; ++i) {
          double& e = y[static_cast<size_t>(((b * S + s) * H + h) * m + i)];
          e = std::exp(e - mx) * inv_sqrt_m;
        }
      }
    }
  }
  return y;
}

// dx = c sum_i dphi_i phi_i (w_i - x') per row.
Vec PerformerChain(const Vec& phi, const Vec& dphi, const Vec& xs, const float* w, int64_t m,
                   int64_t D, double c) {
  const int64_t rows = static_cast<int64_t>(xs.size()) / D;
  Vec dx(xs.size(), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < m; ++i) {
      const double g = dphi[static_cast<size_t>(r * m + i)] * phi[static_cast<size_t>(r * m + i)];
      for (int64_t d = 0; d < D; ++d) {
        dx[static_cast<size_t>(r * D + d)] +=
            c * g * (static_cast<double>(w[i * D + d]) - xs[static_cast<size_t>(r * D + d)]);
      }
    }
  }
  return dx;
}

// ---------------------------------------------------------------------------------------------
// WERSA.

// The transform as a matrix T [S, S] for sequence b: x~_t = sum_s T[t][s] x_s.
Vec WersaMatrix(const ApproxParams& p, int64_t b, int64_t S) {
  const WersaOptions& o = p.wersa;
  const int64_t L = o.levels;
  auto window = [&](int64_t t, int64_t l, int64_t* lo, int64_t* hi) {  // [lo, hi)
    const int64_t w = int64_t{1} << std::min<int64_t>(l, 62);
    if (p.causal) {
      *lo = std::max<int64_t>(0, t - w + 1);
      *hi = t + 1;
    } else {
      *lo = t / w * w;
      *hi = std::min(S, *lo + w);
    }
  };
  // A_l as a dense matrix row by row, accumulated with coefficient `coef` into T row t.
  Vec T(static_cast<size_t>(S * S), 0.0);
  auto add_mean = [&](int64_t t, int64_t l, double coef) {
    int64_t lo, hi;
    window(t, l, &lo, &hi);
    for (int64_t s = lo; s < hi; ++s)
      T[static_cast<size_t>(t * S + s)] += coef / static_cast<double>(hi - lo);
  };
  for (int64_t t = 0; t < S; ++t) {
    add_mean(t, L, 1.0);
    for (int64_t l = 1; l <= L; ++l) {
      double c = 1.0;
      if (o.level_weights.data != nullptr) {
        const TensorView& lw = o.level_weights;
        c *= static_cast<double>(static_cast<const float*>(lw.data)[(l - 1) * lw.strides[0]]);
      }
      if (o.gates.data != nullptr) {
        const TensorView& g = o.gates;
        c *= static_cast<double>(static_cast<const float*>(
            g.data)[b * g.strides[0] + t * g.strides[1] + (l - 1) * g.strides[2]]);
      }
      add_mean(t, l - 1, c);
      add_mean(t, l, -c);
    }
  }
  return T;
}

// y = T x (transpose: T^T x) per sequence, head and channel; x, y [B, S, H, D].
Vec ApplyWersa(const ApproxParams& p, const Vec& x, int64_t B, int64_t S, int64_t H, int64_t D,
               bool transpose) {
  Vec y(x.size(), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    const Vec T = WersaMatrix(p, b, S);
    for (int64_t t = 0; t < S; ++t) {
      for (int64_t s = 0; s < S; ++s) {
        const double c =
            transpose ? T[static_cast<size_t>(s * S + t)] : T[static_cast<size_t>(t * S + s)];
        if (c == 0.0) continue;
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t d = 0; d < D; ++d) {
            y[static_cast<size_t>(((b * S + t) * H + h) * D + d)] +=
                c * x[static_cast<size_t>(((b * S + s) * H + h) * D + d)];
          }
        }
      }
    }
  }
  return y;
}

// phi = relu(x~ W / bw) / sqrt(r) per row; pre-activations into *pre.
Vec WersaFeatures(const Vec& xt, int64_t D, const float* w, int64_t r, double bw, Vec* pre) {
  const int64_t rows = static_cast<int64_t>(xt.size()) / D;
  Vec phi(static_cast<size_t>(rows * r));
  pre->resize(phi.size());
  const double inv = 1.0 / std::sqrt(static_cast<double>(r));
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t i = 0; i < r; ++i) {
      double y = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        y += xt[static_cast<size_t>(row * D + d)] / bw * static_cast<double>(w[d * r + i]);
      }
      (*pre)[static_cast<size_t>(row * r + i)] = y;
      phi[static_cast<size_t>(row * r + i)] = std::max(y, 0.0) * inv;
    }
  }
  return phi;
}

Vec WersaChain(const Vec& pre, const Vec& dphi, const float* w, int64_t r, int64_t D, double bw) {
  const int64_t rows = static_cast<int64_t>(pre.size()) / r;
  const double inv = 1.0 / (std::sqrt(static_cast<double>(r)) * bw);
  Vec dx(static_cast<size_t>(rows * D), 0.0);
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t i = 0; i < r; ++i) {
      if (!(pre[static_cast<size_t>(row * r + i)] > 0.0)) continue;
      const double g = dphi[static_cast<size_t>(row * r + i)] * inv;
      for (int64_t d = 0; d < D; ++d) {
        dx[static_cast<size_t>(row * D + d)] += g * static_cast<double>(w[d * r + i]);
      }
    }
  }
  return dx;
}

void Store(const Vec& src, double* dst) { std::copy(src.begin(), src.end(), dst); }

}  // namespace

void PerformerFeatureF64(const double* x, int64_t d, const float* w, int64_t m, double scale,
                         double* phi) {
  const double c = std::sqrt(scale);
  double sq = 0.0;
  for (int64_t j = 0; j < d; ++j) sq += c * x[j] * c * x[j];
  for (int64_t i = 0; i < m; ++i) {
    double dot = 0.0;
    for (int64_t j = 0; j < d; ++j) dot += static_cast<double>(w[i * d + j]) * c * x[j];
    phi[i] = std::exp(dot - 0.5 * sq) / std::sqrt(static_cast<double>(m));
  }
}

void PerformerForwardF64(const ApproxParams& p, const float* w, double* out) {
  const Dims n = DimsOf(p);
  const int64_t m = p.performer.features;
  const double c = std::sqrt(p.scale.has_value() ? static_cast<double>(*p.scale)
                                                 : 1.0 / std::sqrt(static_cast<double>(n.D)));
  Vec qs, ks;
  const Vec fq = PerformerFeatures(p.q, w, m, c, false, &qs);
  const Vec fk = PerformerFeatures(p.k, w, m, c, true, &ks);
  Store(Attend(n, m, fq, fk, Load(p.v), p.causal), out);
}

void PerformerBackwardF64(const ApproxBackwardParams& bp, const float* w, double* dq, double* dk,
                          double* dv) {
  const ApproxParams& p = bp.forward;
  const Dims n = DimsOf(p);
  const int64_t m = p.performer.features;
  const double c = std::sqrt(p.scale.has_value() ? static_cast<double>(*p.scale)
                                                 : 1.0 / std::sqrt(static_cast<double>(n.D)));
  Vec qs, ks, dfq, dfk, dvv;
  const Vec fq = PerformerFeatures(p.q, w, m, c, false, &qs);
  const Vec fk = PerformerFeatures(p.k, w, m, c, true, &ks);
  AttendBackward(n, m, fq, fk, Load(p.v), Load(bp.dout), p.causal, &dfq, &dfk, &dvv);
  Store(PerformerChain(fq, dfq, qs, w, m, n.D, c), dq);
  Store(PerformerChain(fk, dfk, ks, w, m, n.D, c), dk);
  Store(dvv, dv);
}

void WersaTransformF64(const ApproxParams& p, const TensorView& x, double* out) {
  Store(ApplyWersa(p, Load(x), x.shape[0], x.shape[1], x.shape[2], x.shape[3], false), out);
}

void WersaForwardF64(const ApproxParams& p, const float* w, double* out) {
  const Dims n = DimsOf(p);
  const int64_t r = p.wersa.features;
  const double bw = static_cast<double>(p.wersa.bandwidth);
  Vec pq, pk;
  const Vec fq =
      WersaFeatures(ApplyWersa(p, Load(p.q), n.B, n.S, n.Hq, n.D, false), n.D, w, r, bw, &pq);
  const Vec fk =
      WersaFeatures(ApplyWersa(p, Load(p.k), n.B, n.S, n.Hkv, n.D, false), n.D, w, r, bw, &pk);
  Store(Attend(n, r, fq, fk, Load(p.v), p.causal), out);
}

void WersaBackwardF64(const ApproxBackwardParams& bp, const float* w, double* dq, double* dk,
                      double* dv) {
  const ApproxParams& p = bp.forward;
  const Dims n = DimsOf(p);
  const int64_t r = p.wersa.features;
  const double bw = static_cast<double>(p.wersa.bandwidth);
  Vec pq, pk, dfq, dfk, dvv;
  const Vec fq =
      WersaFeatures(ApplyWersa(p, Load(p.q), n.B, n.S, n.Hq, n.D, false), n.D, w, r, bw, &pq);
  const Vec fk =
      WersaFeatures(ApplyWersa(p, Load(p.k), n.B, n.S, n.Hkv, n.D, false), n.D, w, r, bw, &pk);
  AttendBackward(n, r, fq, fk, Load(p.v), Load(bp.dout), p.causal, &dfq, &dfk, &dvv);
  Store(ApplyWersa(p, WersaChain(pq, dfq, w, r, n.D, bw), n.B, n.S, n.Hq, n.D, true), dq);
  Store(ApplyWersa(p, WersaChain(pk, dfk, w, r, n.D, bw), n.B, n.S, n.Hkv, n.D, true), dk);
  Store(dvv, dv);
}

}  // namespace ref
}  // namespace tessera
