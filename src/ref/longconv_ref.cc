// SPDX-License-Identifier: Apache-2.0
#include "ref/longconv_ref.h"

#include <cstdint>

namespace tessera {
namespace ref {
namespace {

// Element [i0, i1, i2, i3] of an f32 view of rank <= 4 (indices past the rank are 0).
double At(const TensorView& t, int64_t i0, int64_t i1 = 0, int64_t i2 = 0, int64_t i3 = 0) {
  const float* p = static_cast<const float*>(t.data);
  return static_cast<double>(
      p[i0 * t.strides[0] + i1 * t.strides[1] + i2 * t.strides[2] + i3 * t.strides[3]]);
}

size_t Idx(int64_t i) { return static_cast<size_t>(i); }

// One (sequence, head) of H3, upcast to double: the rows of q, k, v (and dout) as [N, d], the
// head's shift taps and bias per channel, and its SSM taps and bias.
struct H3Head {
  int64_t n = 0, d = 0, ls = 0, l = 0;
  std::vector<double> q, k, v, dout;  // [N, d]
  std::vector<double> shift_filter;   // [Ls, d]
  std::vector<double> shift_bias;     // [d]; zeros without a bias
  std::vector<double> ssm_filter;     // [L]
  double ssm_bias = 0.0;              // 0 without a bias
  std::vector<double> shifted;        // K [N, d]
};

H3Head LoadHead(const H3Params& p, const TensorView* dout, int64_t b, int64_t h) {
  H3Head x;
  x.n = p.q.shape[1];
  x.d = p.q.shape[3];
  x.ls = p.shift_filter.shape[0];
  x.l = p.ssm_filter.shape[0];
  const int64_t n = x.n, d = x.d;
  x.q.resize(Idx(n * d));
  x.k.resize(Idx(n * d));
  x.v.resize(Idx(n * d));
  if (dout != nullptr) x.dout.resize(Idx(n * d));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < d; ++i) {
      x.q[Idx(t * d + i)] = At(p.q, b, t, h, i);
      x.k[Idx(t * d + i)] = At(p.k, b, t, h, i);
      x.v[Idx(t * d + i)] = At(p.v, b, t, h, i);
      if (dout != nullptr) x.dout[Idx(t * d + i)] = At(*dout, b, t, h, i);
    }
  }
  x.shift_filter.resize(Idx(x.ls * d));
  for (int64_t s = 0; s < x.ls; ++s) {
    for (int64_t i = 0; i < d; ++i)
      x.shift_filter[Idx(s * d + i)] = At(p.shift_filter, s, h * d + i);
  }
  x.shift_bias.assign(Idx(d), 0.0);
  if (p.shift_bias.data != nullptr) {
    for (int64_t i = 0; i < d; ++i) x.shift_bias[Idx(i)] = At(p.shift_bias, h * d + i);
  }
  x.ssm_filter.resize(Idx(x.l));
  for (int64_t s = 0; s < x.l; ++s) x.ssm_filter[Idx(s)] = At(p.ssm_filter, s, h);
  if (p.ssm_bias.data != nullptr) x.ssm_bias = At(p.ssm_bias, h);
  // K[t, i] = sum_{s <= t, s < Ls} shift_filter[s, i] k[t - s, i] + shift_bias[i] k[t, i].
  x.shifted.assign(Idx(n * d), 0.0);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < d; ++i) {
      double acc = x.shift_bias[Idx(i)] * x.k[Idx(t * d + i)];
      for (int64_t s = 0; s <= t && s < x.ls; ++s) {
        acc += x.shift_filter[Idx(s * d + i)] * x.k[Idx((t - s) * d + i)];
      }
      x.shifted[Idx(t * d + i)] = acc;
    }
  }
  return x;
}

// S[t, i, j] = sum_{s <= t, s < L} ssm_filter[s] K[t - s, i] v[t - s, j] + ssm_bias K[t, i] v[t, j]
// as [N, d, d].
std::vector<double> States(const H3Head& x) {
  const int64_t n = x.n, d = x.d;
  std::vector<double> state(Idx(n * d * d), 0.0);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < d; ++i) {
      for (int64_t j = 0; j < d; ++j) {
        double acc = x.ssm_bias * x.shifted[Idx(t * d + i)] * x.v[Idx(t * d + j)];
        for (int64_t s = 0; s <= t && s < x.l; ++s) {
          acc += x.ssm_filter[Idx(s)] * x.shifted[Idx((t - s) * d + i)] * x.v[Idx((t - s) * d + j)];
        }
        state[Idx((t * d + i) * d + j)] = acc;
      }
    }
  }
  return state;
}

}  // namespace

std::vector<double> LongConvF64(const LongConvParams& p) {
  const int64_t B = p.u.shape[0], N = p.u.shape[1], C = p.u.shape[2], L = p.filter.shape[0];
  std::vector<double> y(Idx(B * N * C), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < N; ++t) {
      for (int64_t c = 0; c < C; ++c) {
        double acc = 0.0;
        for (int64_t s = 0; s <= t && s < L; ++s) {
          acc += At(p.filter, s, c) * At(p.u, b, t - s, c);
        }
        if (p.bias.data != nullptr) acc += At(p.bias, c) * At(p.u, b, t, c);
        y[Idx((b * N + t) * C + c)] = acc;
      }
    }
  }
  return y;
}

LongConvGradsF64 LongConvBackwardF64(const LongConvBackwardParams& p) {
  const LongConvParams& f = p.forward;
  const int64_t B = f.u.shape[0], N = f.u.shape[1], C = f.u.shape[2], L = f.filter.shape[0];
  const bool bias = f.bias.data != nullptr;
  LongConvGradsF64 g;
  g.du.assign(Idx(B * N * C), 0.0);
  g.dfilter.assign(Idx(L * C), 0.0);
  if (bias) g.dbias.assign(Idx(C), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t t = 0; t < N; ++t) {
        // du: the transposed (anti-causal) convolution of dy.
        double acc = 0.0;
        for (int64_t s = 0; s < L && t + s < N; ++s) {
          acc += At(f.filter, s, c) * At(p.dy, b, t + s, c);
        }
        if (bias) acc += At(f.bias, c) * At(p.dy, b, t, c);
        g.du[Idx((b * N + t) * C + c)] = acc;
      }
      for (int64_t s = 0; s < L; ++s) {
        double acc = 0.0;
        for (int64_t t = s; t < N; ++t) acc += At(p.dy, b, t, c) * At(f.u, b, t - s, c);
        g.dfilter[Idx(s * C + c)] += acc;
      }
      if (bias) {
        double acc = 0.0;
        for (int64_t t = 0; t < N; ++t) acc += At(p.dy, b, t, c) * At(f.u, b, t, c);
        g.dbias[Idx(c)] += acc;
      }
    }
  }
  return g;
}

std::vector<double> H3F64(const H3Params& p) {
  const int64_t B = p.q.shape[0], N = p.q.shape[1], H = p.q.shape[2], d = p.q.shape[3];
  std::vector<double> out(Idx(B * N * H * d), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const H3Head x = LoadHead(p, nullptr, b, h);
      const std::vector<double> state = States(x);
      // out[t, j] = sum_i q[t, i] S[t, i, j].
      for (int64_t t = 0; t < N; ++t) {
        for (int64_t j = 0; j < d; ++j) {
          double acc = 0.0;
          for (int64_t i = 0; i < d; ++i) {
            acc += x.q[Idx(t * d + i)] * state[Idx((t * d + i) * d + j)];
          }
          out[Idx(((b * N + t) * H + h) * d + j)] = acc;
        }
      }
    }
  }
  return out;
}

H3GradsF64 H3BackwardF64(const H3BackwardParams& p) {
  const H3Params& f = p.forward;
  const int64_t B = f.q.shape[0], N = f.q.shape[1], H = f.q.shape[2], d = f.q.shape[3];
  const int64_t Ls = f.shift_filter.shape[0], L = f.ssm_filter.shape[0];
  const bool shift_bias = f.shift_bias.data != nullptr, ssm_bias = f.ssm_bias.data != nullptr;
  H3GradsF64 g;
  g.dq.assign(Idx(B * N * H * d), 0.0);
  g.dk.assign(Idx(B * N * H * d), 0.0);
  g.dv.assign(Idx(B * N * H * d), 0.0);
  g.dshift_filter.assign(Idx(Ls * H * d), 0.0);
  if (shift_bias) g.dshift_bias.assign(Idx(H * d), 0.0);
  g.dssm_filter.assign(Idx(L * H), 0.0);
  if (ssm_bias) g.dssm_bias.assign(Idx(H), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const H3Head x = LoadHead(f, &p.dout, b, h);
      const std::vector<double> state = States(x);
      const auto row = [&](int64_t t, int64_t i) { return Idx(t * d + i); };
      const auto cell = [&](int64_t t, int64_t i, int64_t j) { return Idx((t * d + i) * d + j); };
      const auto out_index = [&](int64_t t, int64_t i) {
        return Idx(((b * N + t) * H + h) * d + i);
      };
      // out = sum_i q_i S_ij: dq_i = sum_j dout_j S_ij and dS_ij = q_i dout_j.
      std::vector<double> dstate(Idx(N * d * d));
      for (int64_t t = 0; t < N; ++t) {
        for (int64_t i = 0; i < d; ++i) {
          double acc = 0.0;
          for (int64_t j = 0; j < d; ++j) {
            acc += x.dout[row(t, j)] * state[cell(t, i, j)];
            dstate[cell(t, i, j)] = x.q[row(t, i)] * x.dout[row(t, j)];
          }
          g.dq[out_index(t, i)] = acc;
        }
      }
      // S = ssm_filter * P (+ ssm_bias P) with P_ij = K_i v_j: dP is the anti-causal correlation
      // of dS with the taps; the taps' gradient correlates dS with P.
      std::vector<double> douter(Idx(N * d * d));
      for (int64_t t = 0; t < N; ++t) {
        for (int64_t i = 0; i < d; ++i) {
          for (int64_t j = 0; j < d; ++j) {
            double acc = x.ssm_bias * dstate[cell(t, i, j)];
            for (int64_t s = 0; s < L && t + s < N; ++s) {
              acc += x.ssm_filter[Idx(s)] * dstate[cell(t + s, i, j)];
            }
            douter[cell(t, i, j)] = acc;
          }
        }
      }
      for (int64_t s = 0; s < L; ++s) {
        double acc = 0.0;
        for (int64_t t = s; t < N; ++t) {
          for (int64_t i = 0; i < d; ++i) {
            for (int64_t j = 0; j < d; ++j) {
              acc += dstate[cell(t, i, j)] * x.shifted[row(t - s, i)] * x.v[row(t - s, j)];
            }
          }
        }
        g.dssm_filter[Idx(s * H + h)] += acc;
      }
      if (ssm_bias) {
        double acc = 0.0;
        for (int64_t t = 0; t < N; ++t) {
          for (int64_t i = 0; i < d; ++i) {
            for (int64_t j = 0; j < d; ++j) {
              acc += dstate[cell(t, i, j)] * x.shifted[row(t, i)] * x.v[row(t, j)];
            }
          }
        }
        g.dssm_bias[Idx(h)] += acc;
      }
      // P_ij = K_i v_j: dK_i = sum_j dP_ij v_j and dv_j = sum_i dP_ij K_i.
      std::vector<double> dshifted(Idx(N * d), 0.0);
      for (int64_t t = 0; t < N; ++t) {
        for (int64_t i = 0; i < d; ++i) {
          double acc = 0.0;
          for (int64_t j = 0; j < d; ++j) acc += douter[cell(t, i, j)] * x.v[row(t, j)];
          dshifted[row(t, i)] = acc;
        }
        for (int64_t j = 0; j < d; ++j) {
          double acc = 0.0;
          for (int64_t i = 0; i < d; ++i) acc += douter[cell(t, i, j)] * x.shifted[row(t, i)];
          g.dv[out_index(t, j)] = acc;
        }
      }
      // K = shift_filter * k (+ shift_bias k), per channel: the same transpose and correlation.
      for (int64_t i = 0; i < d; ++i) {
        const int64_t c = h * d + i;
        for (int64_t t = 0; t < N; ++t) {
          double acc = x.shift_bias[Idx(i)] * dshifted[row(t, i)];
          for (int64_t s = 0; s < Ls && t + s < N; ++s) {
            acc += x.shift_filter[row(s, i)] * dshifted[row(t + s, i)];
          }
          g.dk[out_index(t, i)] = acc;
        }
        for (int64_t s = 0; s < Ls; ++s) {
          double acc = 0.0;
          for (int64_t t = s; t < N; ++t) acc += dshifted[row(t, i)] * x.k[row(t - s, i)];
          g.dshift_filter[Idx(s * H * d + c)] += acc;
        }
        if (shift_bias) {
          double acc = 0.0;
          for (int64_t t = 0; t < N; ++t) acc += dshifted[row(t, i)] * x.k[row(t, i)];
          g.dshift_bias[Idx(c)] += acc;
        }
      }
    }
  }
  return g;
}

}  // namespace ref
}  // namespace tessera
