// SPDX-License-Identifier: Apache-2.0
#include "naive_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "test_tensor.h"

namespace tessera {
namespace test {
namespace {

float LoadView(const TensorView& t, int64_t offset) {
  return LoadAs(
      t.dtype, static_cast<const char*>(t.data) + static_cast<size_t>(offset) * DTypeSize(t.dtype));
}

// [B, S, H, D] or varlen [T, H, D] strides, batch first (0 for rank 3).
struct Strides4 {
  int64_t s[4];
  int64_t tokens, heads, dim;
};

Strides4 StridesOf(const TensorView& t) {
  Strides4 r;
  const int first = t.rank == 4 ? 1 : 0;
  r.s[0] = t.rank == 4 ? t.strides[0] : 0;
  for (int i = 0; i < 3; ++i) r.s[i + 1] = t.strides[first + i];
  r.tokens = t.shape[first];
  r.heads = t.shape[first + 1];
  r.dim = t.shape[first + 2];
  return r;
}

}  // namespace

void AttentionForwardNaive(const AttentionParams& p, double* out, double* lse) {
  const DType dt = p.q.dtype;
  auto round = [dt](float x) { return RoundTo(dt, x); };
  const Strides4 qs = StridesOf(p.q), ks = StridesOf(p.k), vs = StridesOf(p.v);
  const int32_t* cu_q = static_cast<const int32_t*>(p.cu_seqlens_q.data);
  const int32_t* cu_k = static_cast<const int32_t*>(p.cu_seqlens_k.data);
  const bool varlen = cu_q != nullptr;
  const int64_t num_seqs = varlen ? p.num_seqs : p.q.shape[0];
  const int64_t hq = qs.heads, hkv = ks.heads, dim = qs.dim, dim_v = vs.dim;
  const int64_t total_q = qs.tokens;
  const float scale = p.scale.has_value()
                          ? *p.scale
                          : static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim)));
  const float cap = p.softcap;
  int64_t wl = p.window_left, wr = p.window_right;
  if (p.causal) wr = 0;
  const float inf = std::numeric_limits<float>::infinity();

  std::vector<float> kscaled, vals, s, prob, qrow(static_cast<size_t>(dim));
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q0 = varlen ? cu_q[b] : 0;
    const int64_t lq = varlen ? cu_q[b + 1] - q0 : qs.tokens;
    const int64_t k0 = varlen ? cu_k[b] : 0;
    const int64_t lk = varlen ? cu_k[b + 1] - k0 : ks.tokens;
    const int64_t bb = varlen ? 0 : b;
    const int64_t delta = p.align == MaskAlign::kTopLeft ? 0 : lk - lq;
    for (int64_t g = 0; g < hkv; ++g) {
      // Scale K rather than Q (reordered relative to the kernels), rounded to the dtype.
      kscaled.assign(static_cast<size_t>(lk * dim), 0.0f);
      vals.assign(static_cast<size_t>(lk * dim_v), 0.0f);
      for (int64_t j = 0; j < lk; ++j) {
        for (int64_t d = 0; d < dim; ++d) {
          const float x =
              LoadView(p.k, bb * ks.s[0] + (k0 + j) * ks.s[1] + g * ks.s[2] + d * ks.s[3]);
          kscaled[static_cast<size_t>(j * dim + d)] = round(x * scale);
        }
        for (int64_t d = 0; d < dim_v; ++d) {
          vals[static_cast<size_t>(j * dim_v + d)] =
              LoadView(p.v, bb * vs.s[0] + (k0 + j) * vs.s[1] + g * vs.s[2] + d * vs.s[3]);
        }
      }
      for (int64_t h = g * (hq / hkv); h < (g + 1) * (hq / hkv); ++h) {
        float slope = 0.0f;
        if (p.alibi_slopes.data != nullptr) {
          const TensorView& a = p.alibi_slopes;
          slope = a.rank == 1 ? LoadView(a, h * a.strides[0])
                              : LoadView(a, b * a.strides[0] + h * a.strides[1]);
        }
        for (int64_t i = 0; i < lq; ++i) {
          const int64_t pos = i + delta;
          for (int64_t d = 0; d < dim; ++d) {
            qrow[static_cast<size_t>(d)] =
                LoadView(p.q, bb * qs.s[0] + (q0 + i) * qs.s[1] + h * qs.s[2] + d * qs.s[3]);
          }
          s.assign(static_cast<size_t>(lk), -inf);
          float m = -inf;
          bool any = false, nan = false;
          for (int64_t j = 0; j < lk; ++j) {
            if ((wl >= 0 && j < pos - wl) || (wr >= 0 && j > pos + wr)) continue;
            any = true;
            float acc = 0.0f;
            for (int64_t d = 0; d < dim; ++d) {
              acc += qrow[static_cast<size_t>(d)] * kscaled[static_cast<size_t>(j * dim + d)];
            }
            float v = round(acc);
            if (cap > 0.0f) v = round(cap * round(std::tanh(round(v / cap))));
            if (p.alibi_slopes.data != nullptr) {
              v = round(v - round(slope * static_cast<float>(std::llabs(pos - j))));
            }
            s[static_cast<size_t>(j)] = v;
            nan = nan || std::isnan(v);
            m = std::max(m, v);
          }
          double* orow = varlen ? out + ((q0 + i) * hq + h) * dim_v
                                : out + ((b * total_q + i) * hq + h) * dim_v;
          double* lrow = nullptr;
          if (lse != nullptr) {
            lrow = varlen ? lse + h * total_q + q0 + i : lse + (b * hq + h) * total_q + i;
          }
          if (!any) {
            std::fill(orow, orow + dim_v, 0.0);
            if (lrow != nullptr) *lrow = -std::numeric_limits<double>::infinity();
            continue;
          }
          if (nan) m = std::numeric_limits<float>::quiet_NaN();
          float l = 0.0f;
          prob.assign(static_cast<size_t>(lk), 0.0f);
          for (int64_t j = 0; j < lk; ++j) {
            if (s[static_cast<size_t>(j)] == -inf) continue;
            prob[static_cast<size_t>(j)] = std::exp(s[static_cast<size_t>(j)] - m);
            l += prob[static_cast<size_t>(j)];
          }
          for (float& x : prob) x = round(x / l);  // P normalized, in the dtype
          for (int64_t d = 0; d < dim_v; ++d) {
            float acc = 0.0f;
            for (int64_t j = 0; j < lk; ++j) {
              if (prob[static_cast<size_t>(j)] == 0.0f) continue;
              acc += prob[static_cast<size_t>(j)] * vals[static_cast<size_t>(j * dim_v + d)];
            }
            orow[d] = round(acc);
          }
          if (lrow != nullptr) *lrow = static_cast<double>(m + std::log(l));
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Naive same-precision backward and the gradient magnitudes.

namespace {

// Problem geometry read from the public params, the way the references read it.
struct BackwardGeometry {
  explicit BackwardGeometry(const AttentionBackwardParams& bp)
      : p(bp.forward),
        q(StridesOf(bp.forward.q)),
        k(StridesOf(bp.forward.k)),
        v(StridesOf(bp.forward.v)),
        dout(StridesOf(bp.dout)) {
    cu_q = static_cast<const int32_t*>(p.cu_seqlens_q.data);
    cu_k = static_cast<const int32_t*>(p.cu_seqlens_k.data);
    varlen = cu_q != nullptr;
    num_seqs = varlen ? p.num_seqs : p.q.shape[0];
    group = q.heads / k.heads;
    scale = p.scale.has_value() ? *p.scale
                                : static_cast<float>(1.0 / std::sqrt(static_cast<double>(q.dim)));
    window_right = p.causal ? 0 : p.window_right;
  }

  int64_t QBegin(int64_t b) const { return varlen ? cu_q[b] : 0; }
  int64_t QLen(int64_t b) const { return varlen ? cu_q[b + 1] - cu_q[b] : q.tokens; }
  int64_t KBegin(int64_t b) const { return varlen ? cu_k[b] : 0; }
  int64_t KLen(int64_t b) const { return varlen ? cu_k[b + 1] - cu_k[b] : k.tokens; }
  // Position shift of sequence b's queries (bottom-right alignment).
  int64_t Shift(int64_t b) const { return p.align == MaskAlign::kTopLeft ? 0 : KLen(b) - QLen(b); }
  bool Visible(int64_t pos, int64_t j) const {
    return (p.window_left < 0 || j >= pos - p.window_left) &&
           (window_right < 0 || j <= pos + window_right);
  }
  float Slope(int64_t b, int64_t h) const {
    const TensorView& a = p.alibi_slopes;
    if (a.data == nullptr) return 0.0f;
    return a.rank == 1 ? LoadView(a, h * a.strides[0])
                       : LoadView(a, b * a.strides[0] + h * a.strides[1]);
  }
  // Element offset of (b, token t of the token axis, head h, d) in a view.
  int64_t Offset(const Strides4& st, int64_t b, int64_t t, int64_t h, int64_t d) const {
    return (varlen ? 0 : b * st.s[0]) + t * st.s[1] + h * st.s[2] + d * st.s[3];
  }
  // Row index of (b, t) in the contiguous result layouts ([B, S, ..] or [T, ..]).
  int64_t QRow(int64_t b, int64_t t) const { return varlen ? t : b * q.tokens + t; }
  int64_t KRow(int64_t b, int64_t t) const { return varlen ? t : b * k.tokens + t; }

  const AttentionParams& p;
  Strides4 q, k, v, dout;
  bool varlen = false;
  const int32_t* cu_q = nullptr;  // the forward's cu_seqlens when varlen
  const int32_t* cu_k = nullptr;
  int64_t num_seqs = 0;
  int64_t group = 1;
  float scale = 1.0f;
  int64_t window_right = -1;
};

size_t At(int64_t i) { return static_cast<size_t>(i); }

}  // namespace

void AttentionBackwardNaive(const AttentionBackwardParams& bp, double* dq, double* dk, double* dv) {
  const BackwardGeometry g(bp);
  const AttentionParams& p = bp.forward;
  const DType dt = p.q.dtype;
  auto round = [dt](float x) { return RoundTo(dt, x); };
  const int64_t hq = g.q.heads, hkv = g.k.heads, dim = g.q.dim, dim_v = g.v.dim;
  const float cap = p.softcap;
  const float inf = std::numeric_limits<float>::infinity();

  std::vector<float> kscaled, vals, qrow(At(dim)), dorow(At(dim_v)), s, prob, dcap, dp, ds;
  std::vector<float> head_dk, head_dv, group_dk, group_dv;
  for (int64_t b = 0; b < g.num_seqs; ++b) {
    const int64_t q0 = g.QBegin(b), lq = g.QLen(b), k0 = g.KBegin(b), lk = g.KLen(b);
    const int64_t shift = g.Shift(b);
    for (int64_t kvh = 0; kvh < hkv; ++kvh) {
      kscaled.assign(At(lk * dim), 0.0f);
      vals.assign(At(lk * dim_v), 0.0f);
      for (int64_t j = 0; j < lk; ++j) {
        for (int64_t d = 0; d < dim; ++d) {
          kscaled[At(j * dim + d)] =
              round(LoadView(p.k, g.Offset(g.k, b, k0 + j, kvh, d)) * g.scale);
        }
        for (int64_t d = 0; d < dim_v; ++d) {
          vals[At(j * dim_v + d)] = LoadView(p.v, g.Offset(g.v, b, k0 + j, kvh, d));
        }
      }
      group_dk.assign(kscaled.size(), 0.0f);
      group_dv.assign(vals.size(), 0.0f);
      for (int64_t h = kvh * g.group; h < (kvh + 1) * g.group; ++h) {
        head_dk.assign(kscaled.size(), 0.0f);  // dL/d(scaled K) of this head, f32 accumulation
        head_dv.assign(vals.size(), 0.0f);
        const float slope = g.Slope(b, h);
        for (int64_t i = 0; i < lq; ++i) {
          const int64_t pos = i + shift;
          for (int64_t d = 0; d < dim; ++d) {
            qrow[At(d)] = LoadView(p.q, g.Offset(g.q, b, q0 + i, h, d));
          }
          for (int64_t d = 0; d < dim_v; ++d) {
            dorow[At(d)] = LoadView(bp.dout, g.Offset(g.dout, b, q0 + i, h, d));
          }
          s.assign(At(lk), -inf);
          dcap.assign(At(lk), 1.0f);
          float m = -inf;
          bool any = false, nan = false;
          for (int64_t j = 0; j < lk; ++j) {
            if (!g.Visible(pos, j)) continue;
            any = true;
            float acc = 0.0f;
            for (int64_t d = 0; d < dim; ++d) acc += qrow[At(d)] * kscaled[At(j * dim + d)];
            float x = round(acc);
            if (cap > 0.0f) {
              const float t = round(std::tanh(round(x / cap)));
              x = round(cap * t);
              dcap[At(j)] = round(1.0f - t * t);
            }
            if (p.alibi_slopes.data != nullptr) {
              x = round(x - round(slope * static_cast<float>(std::llabs(pos - j))));
            }
            s[At(j)] = x;
            nan = nan || std::isnan(x);
            m = std::max(m, x);
          }
          double* dq_row = dq + (g.QRow(b, q0 + i) * hq + h) * dim;
          if (!any) {
            std::fill(dq_row, dq_row + dim, 0.0);
            continue;
          }
          if (nan) m = std::numeric_limits<float>::quiet_NaN();
          float l = 0.0f;
          prob.assign(At(lk), 0.0f);
          for (int64_t j = 0; j < lk; ++j) {
            if (s[At(j)] == -inf) continue;
            prob[At(j)] = std::exp(s[At(j)] - m);
            l += prob[At(j)];
          }
          for (float& x : prob) x = round(x / l);
          // dP = dO V^T, then the softmax backward dS = P (dP - sum_j P dP).
          dp.assign(At(lk), 0.0f);
          float delta = 0.0f;
          for (int64_t j = 0; j < lk; ++j) {
            if (prob[At(j)] == 0.0f) continue;
            float acc = 0.0f;
            for (int64_t d = 0; d < dim_v; ++d) acc += dorow[At(d)] * vals[At(j * dim_v + d)];
            dp[At(j)] = round(acc);
            delta += prob[At(j)] * dp[At(j)];
          }
          ds.assign(At(lk), 0.0f);
          for (int64_t j = 0; j < lk; ++j) {
            if (prob[At(j)] == 0.0f) continue;
            float x = round(prob[At(j)] * (dp[At(j)] - delta));
            if (cap > 0.0f) x = round(x * dcap[At(j)]);
            ds[At(j)] = x;
          }
          for (int64_t d = 0; d < dim; ++d) {
            float acc = 0.0f;
            for (int64_t j = 0; j < lk; ++j) acc += ds[At(j)] * kscaled[At(j * dim + d)];
            dq_row[d] = round(acc);
          }
          for (int64_t j = 0; j < lk; ++j) {
            if (prob[At(j)] == 0.0f) continue;
            for (int64_t d = 0; d < dim; ++d) head_dk[At(j * dim + d)] += ds[At(j)] * qrow[At(d)];
            for (int64_t d = 0; d < dim_v; ++d) {
              head_dv[At(j * dim_v + d)] += prob[At(j)] * dorow[At(d)];
            }
          }
        }
        // Per-head gradients rounded, through K's scaling, then summed over the group.
        for (size_t e = 0; e < head_dk.size(); ++e) {
          group_dk[e] += round(round(head_dk[e]) * g.scale);
        }
        for (size_t e = 0; e < head_dv.size(); ++e) group_dv[e] += round(head_dv[e]);
      }
      for (int64_t j = 0; j < lk; ++j) {
        const int64_t row = g.KRow(b, k0 + j);
        for (int64_t d = 0; d < dim; ++d) {
          dk[(row * hkv + kvh) * dim + d] = round(group_dk[At(j * dim + d)]);
        }
        for (int64_t d = 0; d < dim_v; ++d) {
          dv[(row * hkv + kvh) * dim_v + d] = round(group_dv[At(j * dim_v + d)]);
        }
      }
    }
  }
}

void AttentionBackwardMagnitude(const AttentionBackwardParams& bp, double* dq, double* dk,
                                double* dv) {
  const BackwardGeometry g(bp);
  const AttentionParams& p = bp.forward;
  const int64_t hq = g.q.heads, hkv = g.k.heads, dim = g.q.dim, dim_v = g.v.dim;
  const double scale = g.scale, abs_scale = std::fabs(scale);
  const double cap = p.softcap;
  const double inf = std::numeric_limits<double>::infinity();

  std::vector<double> keys, vals, qrow(At(dim)), dorow(At(dim_v)), s, dcap, a;
  std::vector<double> mag_k, mag_v;
  for (int64_t b = 0; b < g.num_seqs; ++b) {
    const int64_t q0 = g.QBegin(b), lq = g.QLen(b), k0 = g.KBegin(b), lk = g.KLen(b);
    const int64_t shift = g.Shift(b);
    for (int64_t kvh = 0; kvh < hkv; ++kvh) {
      keys.assign(At(lk * dim), 0.0);
      vals.assign(At(lk * dim_v), 0.0);
      for (int64_t j = 0; j < lk; ++j) {
        for (int64_t d = 0; d < dim; ++d) {
          keys[At(j * dim + d)] = LoadView(p.k, g.Offset(g.k, b, k0 + j, kvh, d));
        }
        for (int64_t d = 0; d < dim_v; ++d) {
          vals[At(j * dim_v + d)] = LoadView(p.v, g.Offset(g.v, b, k0 + j, kvh, d));
        }
      }
      mag_k.assign(keys.size(), 0.0);
      mag_v.assign(vals.size(), 0.0);
      for (int64_t h = kvh * g.group; h < (kvh + 1) * g.group; ++h) {
        const double slope = g.Slope(b, h);
        for (int64_t i = 0; i < lq; ++i) {
          const int64_t pos = i + shift;
          for (int64_t d = 0; d < dim; ++d) {
            qrow[At(d)] = LoadView(p.q, g.Offset(g.q, b, q0 + i, h, d));
          }
          for (int64_t d = 0; d < dim_v; ++d) {
            dorow[At(d)] = LoadView(bp.dout, g.Offset(g.dout, b, q0 + i, h, d));
          }
          s.assign(At(lk), -inf);
          dcap.assign(At(lk), 1.0);
          double m = -inf;
          for (int64_t j = 0; j < lk; ++j) {
            if (!g.Visible(pos, j)) continue;
            double dot = 0.0;
            for (int64_t d = 0; d < dim; ++d) dot += qrow[At(d)] * keys[At(j * dim + d)];
            double x = scale * dot;
            if (cap > 0.0) {
              const double t = std::tanh(x / cap);
              x = cap * t;
              dcap[At(j)] = 1.0 - t * t;
            }
            x -= slope * static_cast<double>(std::llabs(pos - j));
            s[At(j)] = x;
            m = std::max(m, x);
          }
          double* dq_row = dq + (g.QRow(b, q0 + i) * hq + h) * dim;
          std::fill(dq_row, dq_row + dim, 0.0);
          if (m == -inf) continue;
          double l = 0.0;
          for (int64_t j = 0; j < lk; ++j) {
            s[At(j)] = s[At(j)] == -inf ? 0.0 : std::exp(s[At(j)] - m);
            l += s[At(j)];
          }
          a.assign(At(lk), 0.0);
          double total = 0.0;
          for (int64_t j = 0; j < lk; ++j) {
            s[At(j)] /= l;
            for (int64_t d = 0; d < dim_v; ++d) {
              a[At(j)] += std::fabs(dorow[At(d)]) * std::fabs(vals[At(j * dim_v + d)]);
            }
            total += s[At(j)] * a[At(j)];
          }
          for (int64_t j = 0; j < lk; ++j) {
            const double pj = s[At(j)];
            if (pj == 0.0) continue;
            const double mj = pj * (a[At(j)] + total) * dcap[At(j)];
            for (int64_t d = 0; d < dim; ++d) {
              dq_row[d] += abs_scale * mj * std::fabs(keys[At(j * dim + d)]);
              mag_k[At(j * dim + d)] += abs_scale * mj * std::fabs(qrow[At(d)]);
            }
            for (int64_t d = 0; d < dim_v; ++d) {
              mag_v[At(j * dim_v + d)] += pj * std::fabs(dorow[At(d)]);
            }
          }
        }
      }
      for (int64_t j = 0; j < lk; ++j) {
        const int64_t row = g.KRow(b, k0 + j);
        for (int64_t d = 0; d < dim; ++d) dk[(row * hkv + kvh) * dim + d] = mag_k[At(j * dim + d)];
        for (int64_t d = 0; d < dim_v; ++d) {
          dv[(row * hkv + kvh) * dim_v + d] = mag_v[At(j * dim_v + d)];
        }
      }
    }
  }
}

}  // namespace test
}  // namespace tessera
