// SPDX-License-Identifier: Apache-2.0
// WERSA: Wavelet-Enhanced Random Spectral Attention.
//
// What it computes: normalized linear attention with random ReLU features of wavelet-filtered
// queries and keys. For q and k (each head alone, along the sequence) a multi-level Haar
// decomposition whose detail coefficients are scaled per token and level, then resynthesized:
// with A_l x the mean of x over token t's level-l window (A_0 x = x),
//   x~_t = A_L x_t + sum_{l = 1..L} level_weight_l gate_{b, t, l} (A_{l-1} x_t - A_l x_t).
// A_{l-1} x - A_l x is exactly the level-l detail of the orthogonal Haar transform synthesized
// back to the tokens, so with gates constant over each level-l block this is "scale the level-l
// detail coefficients, inverse transform"; with per-token gates (the paper's gates come from a
// small network per token) the gate multiplies the detail as it lands on token t. Unit gates and
// weights telescope to x~ = x. Windows:
//   non-causal: blocks [j 2^l, (j + 1) 2^l) cut at S (any S: the last, shorter block averages
//               the tokens it has; no padding value ever enters a mean);
//   causal:     the trailing window [max(0, t - 2^l + 1), t], past tokens only (at the start of
//               the sequence it holds the t + 1 tokens there are), so no output sees a later
//               token (tests: a changed future token changes no earlier output).
// Then phi(x) = relu((x~ / bandwidth) W) / sqrt(r), W [D, r] Gaussian (seeded, or
// wersa.projection), and out = sum_s (phi(q_t).phi(k_s)) v_s / sum_s (...) through the chunked
// linear engine (FeatureAttention), causal or not.
//
// Knobs and error: relu features are positively homogeneous, so bandwidth and the softmax scale
// cancel in the normalized output (params.scale is not read; bandwidth only sets the features'
// magnitude). The kernel phi(q).phi(k) estimates the first-order arc-cosine kernel, not exp(q.k):
// WERSA does not converge to softmax attention as r grows; its error against it is the gap
// between the two kernels plus a Monte Carlo part falling like 1/sqrt(r). The wavelet gates
// smooth q and k along the sequence (gate 0 on level l replaces the level-l detail by the coarser
// mean), which is what a trained model uses them for; with unit gates they do nothing.
//
// Cost: the transform L passes over a chunk of tokens in cache (O(L S D)), the features a GEMM
// (2 D r FLOPs per row), the engine ~4 r D per token and head; linear in S. Tasks are (sequence,
// head, chunk of max(128, 2^L) tokens); causal chunks recompute 2^L - 1 halo tokens before them.
//
// Backward: the engine's gradients of phi(q), phi(k), v; relu' and W^T back to x~; then the
// transpose of the (linear) transform, T^T y = sum_{j = 0..L} A_j^T u_j with u_0 = c_1 y,
// u_j = (c_{j+1} - c_j) y, u_L = (1 - c_L) y (c_l the per-token coefficients): non-causal A_j are
// nested symmetric block means (A_j A_{j+1} = A_{j+1}), summed Horner-style; causal A_j^T are
// forward-looking window sums of u_j / n_j(t), by doubling. Per (sequence, head) over the whole
// sequence. The gates get no gradient (they are an input here).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "approx/approx_internal.h"
#include "approx/random_features.h"
#include "core/check.h"
#include "core/parallel.h"
#include "ref/approx_features_ref.h"

namespace tessera {
namespace approx {

namespace {

constexpr int64_t kMaxLevels = 30;
constexpr int64_t kMinChunk = 128;

struct Setup {
  int64_t r = 0, rp = 0, d = 0, dp = 0, levels = 0;
  bool identity = false;  // no gates, unit weights: x~ = x exactly
  float mul = 1.0f;       // 1 / (bandwidth sqrt(r))
  std::vector<float> w;   // [D, r]
  std::vector<float> wt;  // [D, rp] zero padded (features = x~ wt)
  std::vector<float> wb;  // [r, dp]: W^T zero padded (backward)
  std::vector<float> lw;  // [levels]
  TensorView gates;
};

Setup MakeSetup(const ApproxParams& p, int64_t d, bool backward) {
  const WersaOptions& o = p.wersa;
  Setup st;
  st.r = o.features;
  st.rp = PadFeatures(st.r);
  st.d = d;
  st.dp = PadFeatures(d);
  st.levels = o.levels;
  st.gates = o.gates;
  st.mul = 1.0f / (o.bandwidth * std::sqrt(static_cast<float>(st.r)));
  st.w.resize(static_cast<size_t>(d * st.r));
  if (o.projection.data != nullptr) {
    CopyMatrix(o.projection, st.w.data());
  } else {
    DrawGaussian(p.seed, d, st.r, st.w.data());
  }
  st.wt.assign(static_cast<size_t>(d * st.rp), 0.0f);
  for (int64_t c = 0; c < d; ++c) {
    for (int64_t i = 0; i < st.r; ++i)
      st.wt[static_cast<size_t>(c * st.rp + i)] = st.w[c * st.r + i];
  }
  if (backward) {
    st.wb.assign(static_cast<size_t>(st.r * st.dp), 0.0f);
    for (int64_t c = 0; c < d; ++c) {
      for (int64_t i = 0; i < st.r; ++i)
        st.wb[static_cast<size_t>(i * st.dp + c)] = st.w[c * st.r + i];
    }
  }
  st.lw.assign(static_cast<size_t>(st.levels), 1.0f);
  if (o.level_weights.data != nullptr) {
    for (int64_t l = 0; l < st.levels; ++l) {
      st.lw[static_cast<size_t>(l)] =
          static_cast<const float*>(o.level_weights.data)[l * o.level_weights.strides[0]];
    }
  }
  st.identity = st.gates.data == nullptr &&
                std::all_of(st.lw.begin(), st.lw.end(), [](float x) { return x == 1.0f; });
  return st;
}

Status Validate(const ApproxParams& p, const ApproxShape& shape) {
  const WersaOptions& o = p.wersa;
  if (o.levels < 1 || o.levels > kMaxLevels) {
    return Status::InvalidArgument(Expected("wersa.levels",
                                            "a count in [1, " + std::to_string(kMaxLevels) + "]",
                                            std::to_string(o.levels)));
  }
  Status s = CheckFeatureCount("wersa.features", o.features, shape.dim);
  if (!s.ok()) return s;
  if (!(o.bandwidth > 0.0f) || !std::isfinite(o.bandwidth)) {
    return Status::InvalidArgument(
        Expected("wersa.bandwidth", "a finite value > 0", std::to_string(o.bandwidth)));
  }
  if (o.gates.data != nullptr || o.gates.rank != 0) {
    if (o.gates.data == nullptr) {
      return Status::InvalidArgument(Expected("wersa.gates", "a non-null pointer", "nullptr"));
    }
    if (o.gates.dtype != DType::kF32) {
      return Status::InvalidArgument(
          Expected("wersa.gates", "dtype f32", DTypeName(o.gates.dtype)));
    }
    const int64_t gs[3] = {shape.batch, shape.seq, o.levels};
    s = CheckShape("wersa.gates", o.gates, 3, gs, "[B, S, levels]", false);
    if (!s.ok()) return s;
  }
  if (o.level_weights.data != nullptr || o.level_weights.rank != 0) {
    if (o.level_weights.data == nullptr) {
      return Status::InvalidArgument(
          Expected("wersa.level_weights", "a non-null pointer", "nullptr"));
    }
    if (o.level_weights.dtype != DType::kF32) {
      return Status::InvalidArgument(
          Expected("wersa.level_weights", "dtype f32", DTypeName(o.level_weights.dtype)));
    }
    const int64_t ls[1] = {o.levels};
    s = CheckShape("wersa.level_weights", o.level_weights, 1, ls, "[levels]", false);
    if (!s.ok()) return s;
  }
  if (o.projection.data != nullptr || o.projection.rank != 0) {
    s = CheckMatrixOption("wersa.projection", o.projection, shape.dim, o.features);
    if (!s.ok()) return s;
  }
  if (p.lse.data != nullptr) {
    return Status::InvalidArgument(
        Expected("lse", "unset (wersa's weights are not a softmax: it has no LSE)", "a view"));
  }
  return Status::Ok();
}

std::vector<Region> OptionRegions(const WersaOptions& o) {
  return {ViewRegion("wersa.gates", o.gates), ViewRegion("wersa.level_weights", o.level_weights),
          ViewRegion("wersa.projection", o.projection)};
}

// Coefficient of level l (1-based) at token t of sequence b.
inline float Coef(const Setup& st, int64_t b, int64_t t, int64_t l) {
  float c = st.lw[static_cast<size_t>(l - 1)];
  if (st.gates.data != nullptr) {
    c *=
        static_cast<const float*>(st.gates.data)[b * st.gates.strides[0] + t * st.gates.strides[1] +
                                                 (l - 1) * st.gates.strides[2]];
  }
  return c;
}

int64_t ChunkTokens(const Setup& st, int64_t S) {
  const int64_t span = int64_t{1} << st.levels;
  return std::min(std::max(kMinChunk, span), std::max<int64_t>(S, 1));
}

struct Scratch {
  std::vector<float> cur;  // [ext rows, D]
  std::vector<float> out;  // [chunk, D]
  std::vector<float> tmp;  // [D]
};

// x~ of tokens [t0, t1) of head h of sequence b into sc->out (rows of D).
void Transform(const TensorView& x, const Setup& st, bool causal, int64_t b, int64_t h, int64_t t0,
               int64_t t1, Scratch* sc) {
  const int64_t D = st.d, n = t1 - t0;
  const int64_t span = int64_t{1} << st.levels;
  const int64_t ext = causal ? t0 - std::min(span - 1, t0) : t0;
  const int64_t ne = t1 - ext;
  float* cur = sc->cur.data();
  float* out = sc->out.data();
  auto load = [&](int64_t t, float* dst) {
    const float* src =
        static_cast<const float*>(x.data) + b * x.strides[0] + t * x.strides[1] + h * x.strides[2];
    if (x.strides[3] == 1) {
      std::copy(src, src + D, dst);
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d * x.strides[3]];
    }
  };
  if (st.identity) {
    for (int64_t t = t0; t < t1; ++t) load(t, out + (t - t0) * D);
    return;
  }
  for (int64_t i = 0; i < ne; ++i) load(ext + i, cur + i * D);
  std::fill(out, out + n * D, 0.0f);
  float* mean = sc->tmp.data();
  // Level by level in place: each row of cur becomes its level-l mean and the level-l detail
  // goes into out with its coefficient.
  for (int64_t l = 1; l <= st.levels; ++l) {
    const int64_t w = int64_t{1} << l, half = w >> 1;
    auto emit = [&](int64_t t, const float* m) {
      float* ct = cur + (t - ext) * D;
      if (t >= t0) {
        const float c = Coef(st, b, t, l);
        float* o = out + (t - t0) * D;
        for (int64_t d = 0; d < D; ++d) o[d] += c * (ct[d] - m[d]);
      }
      for (int64_t d = 0; d < D; ++d) ct[d] = m[d];
    };
    if (causal) {
      // A_l[t] = (n1 A_{l-1}[t] + n2 A_{l-1}[t - half]) / (n1 + n2), descending so that row
      // t - half still holds level l-1; rows whose window reaches before ext are not needed.
      const int64_t lo = ext == 0 ? 0 : std::min(t1, ext + w - 1);
      for (int64_t t = t1 - 1; t >= lo; --t) {
        const int64_t n1 = std::min(half, t + 1);
        const int64_t n2 = t - half >= 0 ? std::min(half, t - half + 1) : 0;
        const float* a = cur + (t - ext) * D;
        if (n2 == 0) {
          std::copy(a, a + D, mean);
        } else {
          const float* bb = cur + (t - half - ext) * D;
          const float f1 = static_cast<float>(n1) / static_cast<float>(n1 + n2);
          const float f2 = static_cast<float>(n2) / static_cast<float>(n1 + n2);
          for (int64_t d = 0; d < D; ++d) mean[d] = f1 * a[d] + f2 * bb[d];
        }
        emit(t, mean);
      }
    } else {
      // Blocks of w tokens (t0 is a multiple of 2^L); rows are constant on level-(l-1) blocks.
      for (int64_t a0 = t0; a0 < t1; a0 += w) {
        const int64_t e = std::min(a0 + w, t1);
        const int64_t n1 = std::min(half, e - a0), n2 = e - a0 - n1;
        const float* a = cur + (a0 - ext) * D;
        if (n2 == 0) {
          std::copy(a, a + D, mean);
        } else {
          const float* bb = cur + (a0 + half - ext) * D;
          const float f1 = static_cast<float>(n1) / static_cast<float>(n1 + n2);
          const float f2 = static_cast<float>(n2) / static_cast<float>(n1 + n2);
          for (int64_t d = 0; d < D; ++d) mean[d] = f1 * a[d] + f2 * bb[d];
        }
        for (int64_t t = a0; t < e; ++t) emit(t, mean);
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    const float* ct = cur + (t0 + i - ext) * D;
    float* o = out + i * D;
    for (int64_t d = 0; d < D; ++d) o[d] += ct[d];
  }
}

// phi of heads [h0, h0 + nh) of x into buf [B, S, nh, rp].
void Features(const TensorView& x, int64_t h0, int64_t nh, const Setup& st, bool causal, float* buf,
              int32_t threads) {
  const int64_t B = x.shape[0], S = x.shape[1], D = st.d;
  const int64_t chunk = ChunkTokens(st, S);
  const int64_t chunks = (S + chunk - 1) / chunk;
  const int64_t tasks = B * nh * chunks;
  const int64_t ld = nh * st.rp;
  const int64_t halo = causal ? std::min((int64_t{1} << st.levels) - 1, S) : 0;
  std::vector<Scratch> scratch(static_cast<size_t>(std::max(threads, 1)));
  for (Scratch& sc : scratch) {
    sc.cur.resize(static_cast<size_t>((chunk + halo) * D));
    sc.out.resize(static_cast<size_t>(chunk * D));
    sc.tmp.resize(static_cast<size_t>(D));
  }
  ParallelFor(threads, tasks, [&](int64_t task, int32_t worker) {
    const int64_t ci = task % chunks, bh = task / chunks;
    const int64_t b = bh / nh, h = bh % nh;
    const int64_t t0 = ci * chunk, t1 = std::min(S, t0 + chunk);
    Scratch& sc = scratch[static_cast<size_t>(worker)];
    Transform(x, st, causal, b, h0 + h, t0, t1, &sc);
    float* y = buf + (b * S + t0) * ld + h * st.rp;
    for (int64_t r0 = 0; r0 < t1 - t0; r0 += kMinChunk) {
      const int64_t n = std::min(kMinChunk, t1 - t0 - r0);
      FeatureGemm(n, st.rp, D, sc.out.data() + r0 * D, D, st.wt.data(), st.rp, y + r0 * ld, ld);
      ReluRows(n, st.r, y + r0 * ld, ld, st.mul);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward.

// dst = T^T y over the whole sequence b for D channels (rows of D floats, S rows).
void TransformTranspose(const Setup& st, bool causal, int64_t b, int64_t S, const float* y,
                        float* dst, std::vector<float>* buf_u, std::vector<float>* buf_z) {
  const int64_t D = st.d, L = st.levels;
  if (st.identity) {
    std::copy(y, y + S * D, dst);
    return;
  }
  float* u = buf_u->data();
  float* z = buf_z->data();
  // u_j's coefficient at token t.
  auto ucoef = [&](int64_t j, int64_t t) -> float {
    if (j == 0) return Coef(st, b, t, 1);
    if (j == L) return 1.0f - Coef(st, b, t, L);
    return Coef(st, b, t, j + 1) - Coef(st, b, t, j);
  };
  if (!causal) {
    // z = A_L u_L; z = A_j (u_j + z) for j = L-1..1; result u_0 + z.
    for (int64_t j = L; j >= 1; --j) {
      for (int64_t t = 0; t < S; ++t) {
        const float c = ucoef(j, t);
        for (int64_t d = 0; d < D; ++d) {
          z[t * D + d] = (j == L ? 0.0f : z[t * D + d]) + c * y[t * D + d];
        }
      }
      const int64_t w = int64_t{1} << j;
      for (int64_t a0 = 0; a0 < S; a0 += w) {
        const int64_t e = std::min(a0 + w, S);
        float* m = u;  // the block mean, D floats
        std::fill(m, m + D, 0.0f);
        for (int64_t t = a0; t < e; ++t) {
          for (int64_t d = 0; d < D; ++d) m[d] += z[t * D + d];
        }
        const float inv = 1.0f / static_cast<float>(e - a0);
        for (int64_t t = a0; t < e; ++t) {
          for (int64_t d = 0; d < D; ++d) z[t * D + d] = m[d] * inv;
        }
      }
    }
    for (int64_t t = 0; t < S; ++t) {
      const float c = ucoef(0, t);
      for (int64_t d = 0; d < D; ++d) dst[t * D + d] = c * y[t * D + d] + z[t * D + d];
    }
    return;
  }
  // Causal: (A_j^T u)[s] = sum_{t = s..s + 2^j - 1} u[t] / min(2^j, t + 1).
  for (int64_t t = 0; t < S; ++t) {
    const float c = ucoef(0, t);
    for (int64_t d = 0; d < D; ++d) dst[t * D + d] = c * y[t * D + d];
  }
  for (int64_t j = 1; j <= L; ++j) {
    const int64_t w = int64_t{1} << j;
    float* src = u;
    float* nxt = z;
    for (int64_t t = 0; t < S; ++t) {
      const float c = ucoef(j, t) / static_cast<float>(std::min(w, t + 1));
      for (int64_t d = 0; d < D; ++d) src[t * D + d] = c * y[t * D + d];
    }
    // Doubling: after step i, src[s] = the sum of the level's terms over [s, s + 2^i).
    for (int64_t i = 1; i <= j; ++i) {
      const int64_t off = int64_t{1} << (i - 1);
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t d = 0; d < D; ++d) {
          nxt[s * D + d] = src[s * D + d] + (s + off < S ? src[(s + off) * D + d] : 0.0f);
        }
      }
      std::swap(src, nxt);
    }
    for (int64_t s = 0; s < S * D; ++s) dst[s] += src[s];
  }
}

// dx for heads [h0, h0 + nh) of x from dphi (overwritten): g = dphi relu' mul, dx~ = g W^T,
// dx = T^T dx~.
void ChainRule(const TensorView& x, int64_t h0, int64_t nh, const Setup& st, bool causal,
               const float* phi, float* dphi, const TensorView& dx, int32_t threads) {
  const int64_t B = x.shape[0], S = x.shape[1], D = st.d;
  const int64_t ld = nh * st.rp;
  struct Work {
    std::vector<float> y, t, u, z;
  };
  std::vector<Work> work(static_cast<size_t>(std::max(threads, 1)));
  ParallelFor(threads, B * nh, [&](int64_t task, int32_t worker) {
    const int64_t b = task / nh, h = task % nh;
    Work& wk = work[static_cast<size_t>(worker)];
    wk.y.resize(static_cast<size_t>(S * st.dp));
    wk.t.resize(static_cast<size_t>(S * D));
    wk.u.resize(static_cast<size_t>(S * D));
    wk.z.resize(static_cast<size_t>(S * D));
    float* g = dphi + b * S * ld + h * st.rp;
    const float* f = phi + b * S * ld + h * st.rp;
    for (int64_t t = 0; t < S; ++t) {
      for (int64_t i = 0; i < st.r; ++i) {
        g[t * ld + i] = f[t * ld + i] > 0.0f ? g[t * ld + i] * st.mul : 0.0f;
      }
    }
    FeatureGemm(S, st.dp, st.r, g, ld, st.wb.data(), st.dp, wk.y.data(), st.dp);
    for (int64_t t = 0; t < S; ++t) {
      std::copy(wk.y.data() + t * st.dp, wk.y.data() + t * st.dp + D, wk.t.data() + t * D);
    }
    TransformTranspose(st, causal, b, S, wk.t.data(), wk.y.data(), &wk.u, &wk.z);
    for (int64_t t = 0; t < S; ++t) {
      float* dst = AtMut(dx, b, t, h0 + h, 0);
      for (int64_t d = 0; d < D; ++d) dst[d * dx.strides[3]] = wk.y[static_cast<size_t>(t * D + d)];
    }
  });
}

}  // namespace

Status WersaForward(const ApproxParams& params, const ApproxShape& shape, const Context& ctx) {
  Status s = Validate(params, shape);
  if (!s.ok()) return s;
  s = CheckDisjoint({ViewRegion("out", params.out)}, OptionRegions(params.wersa));
  if (!s.ok()) return s;
  if (params.out.numel() == 0) return Status::Ok();
  const int64_t B = shape.batch, S = shape.seq, Hkv = shape.heads_kv, D = shape.dim;
  const int64_t G = shape.group();
  const Setup st = MakeSetup(params, D, /*backward=*/false);
  if (ctx.path == Path::kReference) {
    std::vector<double> out(static_cast<size_t>(B * S * shape.heads_q * D));
    ref::WersaForwardF64(params, st.w.data(), out.data());
    WriteF64(out, params.out);
    return Status::Ok();
  }
  const int32_t threads = ResolveThreads(ctx);
  const int64_t slab = KvHeadsPerSlab(Hkv, G, B, B * S * st.rp * (G + 1), threads);
  auto fq = Floats(B * S * slab * G * st.rp), fk = Floats(B * S * slab * st.rp);
  for (int64_t hk0 = 0; hk0 < Hkv; hk0 += slab) {
    const int64_t nk = std::min(slab, Hkv - hk0), nq = nk * G;
    Features(params.q, hk0 * G, nq, st, params.causal, fq.get(), threads);
    Features(params.k, hk0, nk, st, params.causal, fk.get(), threads);
    s = FeatureAttention(FeatureView(fq.get(), B, S, nq, st.r, st.rp),
                         FeatureView(fk.get(), B, S, nk, st.r, st.rp), HeadSlice(params.v, hk0, nk),
                         HeadSlice(params.out, hk0 * G, nq), params.causal, ctx);
    if (!s.ok()) return s;
  }
  return Status::Ok();
}

Status WersaBackward(const ApproxBackwardParams& params, const ApproxShape& shape,
                     const Context& ctx) {
  const ApproxParams& f = params.forward;
  Status s = Validate(f, shape);
  if (!s.ok()) return s;
  s = CheckDisjoint(
      {ViewRegion("dq", params.dq), ViewRegion("dk", params.dk), ViewRegion("dv", params.dv)},
      OptionRegions(f.wersa));
  if (!s.ok()) return s;
  if (params.dq.numel() == 0 && params.dk.numel() == 0) return Status::Ok();
  const int64_t B = shape.batch, S = shape.seq, Hkv = shape.heads_kv, D = shape.dim;
  const int64_t G = shape.group();
  const Setup st = MakeSetup(f, D, /*backward=*/true);
  if (ctx.path == Path::kReference) {
    std::vector<double> dq(static_cast<size_t>(B * S * shape.heads_q * D));
    std::vector<double> dk(static_cast<size_t>(B * S * Hkv * D)), dv(dk.size());
    ref::WersaBackwardF64(params, st.w.data(), dq.data(), dk.data(), dv.data());
    WriteF64(dq, params.dq);
    WriteF64(dk, params.dk);
    WriteF64(dv, params.dv);
    return Status::Ok();
  }
  const int32_t threads = ResolveThreads(ctx);
  const int64_t slab = KvHeadsPerSlab(Hkv, G, B, 2 * B * S * st.rp * (G + 1), threads);
  auto fq = Floats(B * S * slab * G * st.rp), fk = Floats(B * S * slab * st.rp);
  auto gq = Floats(B * S * slab * G * st.rp), gk = Floats(B * S * slab * st.rp);
  for (int64_t hk0 = 0; hk0 < Hkv; hk0 += slab) {
    const int64_t nk = std::min(slab, Hkv - hk0), nq = nk * G;
    Features(f.q, hk0 * G, nq, st, f.causal, fq.get(), threads);
    Features(f.k, hk0, nk, st, f.causal, fk.get(), threads);
    s = FeatureAttentionBackward(
        FeatureView(fq.get(), B, S, nq, st.r, st.rp), FeatureView(fk.get(), B, S, nk, st.r, st.rp),
        HeadSlice(f.v, hk0, nk), HeadSlice(params.dout, hk0 * G, nq),
        FeatureView(gq.get(), B, S, nq, st.r, st.rp), FeatureView(gk.get(), B, S, nk, st.r, st.rp),
        HeadSlice(params.dv, hk0, nk), f.causal, ctx);
    if (!s.ok()) return s;
    ChainRule(f.q, hk0 * G, nq, st, f.causal, fq.get(), gq.get(), params.dq, threads);
    ChainRule(f.k, hk0, nk, st, f.causal, fk.get(), gk.get(), params.dk, threads);
  }
  return Status::Ok();
}

}  // namespace approx
}  // namespace tessera
