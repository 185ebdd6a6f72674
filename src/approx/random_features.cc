// SPDX-License-Identifier: Apache-2.0
// The shared pieces of the random-feature methods (random_features.h): seeded draws, the SIMD
// feature-map kernels and normalized linear attention over any number of features through the
// chunked linear engine.
//
// The feature map is a GEMM (rows of x times the projection, D x m) followed by an element-wise
// map, so its cost is 2 D m FLOPs per row: at D = 128, m = 256 about a third of what the linear
// engine then spends per token (~4 m D). The GEMM keeps a 4-row x 4-vector block of C in
// registers and streams B, which at m <= 1024 stays in L2. Each row's results depend only on the
// row (no reduction across tasks), so every output is independent of the thread count.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "approx/random_features.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
// Order matters: the SIMD headers below are included once per target by foreach_target.
#include <hwy/contrib/math/math-inl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "approx/random_features.h"

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace approx {
namespace HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

template <int R, int V>
HWY_INLINE void GemmBlock(size_t k, const float* HWY_RESTRICT a, size_t lda,
                          const float* HWY_RESTRICT b, size_t ldb, float* HWY_RESTRICT c,
                          size_t ldc) {
  const DF df;
  const size_t L = hn::Lanes(df);
  VF acc[R][V];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) acc[r][v] = hn::Zero(df);
  }
  for (size_t p = 0; p < k; ++p) {
    VF bv[V];
    for (int v = 0; v < V; ++v) bv[v] = hn::LoadU(df, b + p * ldb + v * L);
    for (int r = 0; r < R; ++r) {
      const VF ar = hn::Set(df, a[r * lda + p]);
      for (int v = 0; v < V; ++v) acc[r][v] = hn::MulAdd(ar, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) hn::StoreU(acc[r][v], df, c + r * ldc + v * L);
  }
}

template <int R>
HWY_INLINE void GemmRows(size_t p, size_t k, const float* a, size_t lda, const float* b, size_t ldb,
                         float* c, size_t ldc) {
  const size_t L = hn::Lanes(DF());
  size_t j = 0;
  for (; j + 4 * L <= p; j += 4 * L) GemmBlock<R, 4>(k, a, lda, b + j, ldb, c + j, ldc);
  switch ((p - j) / L) {
    case 3:
      GemmBlock<R, 3>(k, a, lda, b + j, ldb, c + j, ldc);
      break;
    case 2:
      GemmBlock<R, 2>(k, a, lda, b + j, ldb, c + j, ldc);
      break;
    case 1:
      GemmBlock<R, 1>(k, a, lda, b + j, ldb, c + j, ldc);
      break;
    default:
      break;
  }
}

void Gemm(int64_t n, int64_t p, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
          float* c, int64_t ldc) {
  const size_t P = static_cast<size_t>(p), K = static_cast<size_t>(k);
  const size_t A = static_cast<size_t>(lda), B = static_cast<size_t>(ldb);
  const size_t C = static_cast<size_t>(ldc);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) GemmRows<4>(P, K, a + i * lda, A, b, B, c + i * ldc, C);
  for (; i < n; ++i) GemmRows<1>(P, K, a + i * lda, A, b, B, c + i * ldc, C);
}

// Largest of y[0..m).
HWY_INLINE float RowMax(const float* y, size_t m) {
  const DF df;
  const size_t L = hn::Lanes(df);
  VF mx = hn::Set(df, -std::numeric_limits<float>::infinity());
  size_t j = 0;
  for (; j + L <= m; j += L) mx = hn::Max(mx, hn::LoadU(df, y + j));
  float r = hn::GetLane(hn::MaxOfLanes(df, mx));
  for (; j < m; ++j) r = std::max(r, y[j]);
  return r;
}

// y[0..m) = exp(y - shift) * mul.
HWY_INLINE void ExpRow(float* y, size_t m, float shift, float mul) {
  const DF df;
  const size_t L = hn::Lanes(df);
  const VF s = hn::Set(df, shift), mv = hn::Set(df, mul);
  size_t j = 0;
  for (; j + L <= m; j += L) {
    hn::StoreU(hn::Mul(hn::Exp(df, hn::Sub(hn::LoadU(df, y + j), s)), mv), df, y + j);
  }
  for (; j < m; ++j) y[j] = std::exp(y[j] - shift) * mul;
}

void ExpOwnMax(int64_t n, int64_t m, float* y, int64_t ldy, float mul) {
  for (int64_t r = 0; r < n; ++r) {
    float* row = y + r * ldy;
    ExpRow(row, static_cast<size_t>(m), RowMax(row, static_cast<size_t>(m)), mul);
  }
}

float SubMax(int64_t n, int64_t m, float* y, int64_t ldy, const float* sub) {
  const DF df;
  const size_t L = hn::Lanes(df), M = static_cast<size_t>(m);
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t r = 0; r < n; ++r) {
    float* row = y + r * ldy;
    const VF s = hn::Set(df, sub[r]);
    size_t j = 0;
    for (; j + L <= M; j += L) hn::StoreU(hn::Sub(hn::LoadU(df, row + j), s), df, row + j);
    for (; j < M; ++j) row[j] -= sub[r];
    best = std::max(best, RowMax(row, M));
  }
  return best;
}

void ExpShift(int64_t n, int64_t m, float* y, int64_t ldy, float shift, float mul) {
  for (int64_t r = 0; r < n; ++r) ExpRow(y + r * ldy, static_cast<size_t>(m), shift, mul);
}

void Relu(int64_t n, int64_t m, float* y, int64_t ldy, float mul) {
  const DF df;
  const size_t L = hn::Lanes(df), M = static_cast<size_t>(m);
  const VF mv = hn::Set(df, mul), zero = hn::Zero(df);
  for (int64_t r = 0; r < n; ++r) {
    float* row = y + r * ldy;
    size_t j = 0;
    for (; j + L <= M; j += L) {
      hn::StoreU(hn::Mul(hn::Max(hn::LoadU(df, row + j), zero), mv), df, row + j);
    }
    for (; j < M; ++j) row[j] = std::max(row[j], 0.0f) * mul;
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace approx
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <memory>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/dispatch.h"
#include "tessera/linear.h"

namespace tessera {
namespace approx {

HWY_EXPORT(Gemm);
HWY_EXPORT(ExpOwnMax);
HWY_EXPORT(SubMax);
HWY_EXPORT(ExpShift);
HWY_EXPORT(Relu);

void FeatureGemm(int64_t n, int64_t p, int64_t k, const float* a, int64_t lda, const float* b,
                 int64_t ldb, float* c, int64_t ldc) {
  HWY_DYNAMIC_DISPATCH(Gemm)(n, p, k, a, lda, b, ldb, c, ldc);
}
void ExpRowsOwnMax(int64_t n, int64_t m, float* y, int64_t ldy, float mul) {
  HWY_DYNAMIC_DISPATCH(ExpOwnMax)(n, m, y, ldy, mul);
}
float SubtractRowsMax(int64_t n, int64_t m, float* y, int64_t ldy, const float* sub) {
  return HWY_DYNAMIC_DISPATCH(SubMax)(n, m, y, ldy, sub);
}
void ExpRowsShift(int64_t n, int64_t m, float* y, int64_t ldy, float shift, float mul) {
  HWY_DYNAMIC_DISPATCH(ExpShift)(n, m, y, ldy, shift, mul);
}
void ReluRows(int64_t n, int64_t m, float* y, int64_t ldy, float mul) {
  HWY_DYNAMIC_DISPATCH(Relu)(n, m, y, ldy, mul);
}

// ---------------------------------------------------------------------------------------------
// Draws.

namespace {

uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// One SplitMix64 stream per (seed, stream id); standard normals by Box-Muller, both of each pair.
class Gaussians {
 public:
  Gaussians(uint64_t seed, uint64_t stream) : state_(Mix(seed ^ Mix(stream + 1))) {}
  double Next() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = Uniform(), u2 = Uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    const double t = 6.283185307179586476925286766559 * u2;
    spare_ = r * std::sin(t);
    has_spare_ = true;
    return r * std::cos(t);
  }

 private:
  double Uniform() {  // in (0, 1): never 0, so the log is finite
    state_ += 0x9E3779B97F4A7C15ull;
    return (static_cast<double>(Mix(state_) >> 11) + 0.5) * 0x1p-53;
  }
  uint64_t state_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

constexpr uint64_t kNormStream = 1ull << 32;

}  // namespace

void DrawGaussian(uint64_t seed, int64_t rows, int64_t cols, float* out) {
  Gaussians g(seed, 0);
  for (int64_t i = 0; i < rows * cols; ++i) out[i] = static_cast<float>(g.Next());
}

void DrawOrthogonalGaussian(uint64_t seed, int64_t m, int64_t d, float* out) {
  const size_t D = static_cast<size_t>(d);
  std::vector<double> block(D * D);
  for (int64_t b0 = 0; b0 < m; b0 += d) {
    Gaussians g(seed, static_cast<uint64_t>(b0 / d));
    for (double& x : block) x = g.Next();
    const int64_t rows = std::min(d, m - b0);
    // Modified Gram-Schmidt, twice ("twice is enough" for orthogonality to rounding).
    for (size_t i = 0; i < static_cast<size_t>(rows); ++i) {
      double* ri = block.data() + i * D;
      for (int pass = 0; pass < 2; ++pass) {
        for (size_t j = 0; j < i; ++j) {
          const double* rj = block.data() + j * D;
          double dot = 0.0;
          for (size_t c = 0; c < D; ++c) dot += ri[c] * rj[c];
          for (size_t c = 0; c < D; ++c) ri[c] -= dot * rj[c];
        }
      }
      double norm = 0.0;
      for (size_t c = 0; c < D; ++c) norm += ri[c] * ri[c];
      norm = std::sqrt(norm);
      for (size_t c = 0; c < D; ++c) ri[c] /= norm;
    }
    for (int64_t i = 0; i < rows; ++i) {
      Gaussians gn(seed, kNormStream + static_cast<uint64_t>(b0 + i));
      double chi = 0.0;
      for (int64_t c = 0; c < d; ++c) {
        const double x = gn.Next();
        chi += x * x;
      }
      chi = std::sqrt(chi);
      for (int64_t c = 0; c < d; ++c) {
        out[(b0 + i) * d + c] = static_cast<float>(block[static_cast<size_t>(i * d + c)] * chi);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Views and options.

TensorView HeadSlice(const TensorView& t, int64_t h0, int64_t n) {
  TensorView s = t;
  s.data = static_cast<float*>(t.data) + h0 * t.strides[2];
  s.shape[2] = n;
  return s;
}

TensorView FeatureView(float* data, int64_t b, int64_t s, int64_t h, int64_t m, int64_t ld) {
  TensorView t = MakeView4(data, DType::kF32, b, s, h, m);
  t.strides[3] = 1;
  t.strides[2] = ld;
  t.strides[1] = h * ld;
  t.strides[0] = s * h * ld;
  return t;
}

namespace {

// Features [f0, f0 + n) of a rank-4 feature view.
TensorView FeatureSlice(const TensorView& t, int64_t f0, int64_t n) {
  TensorView s = t;
  s.data = static_cast<float*>(t.data) + f0 * t.strides[3];
  s.shape[3] = n;
  return s;
}

// Feature groups the engine can take (<= kMaxHeadDim each, multiples of kFeaturePad but the last).
std::vector<std::pair<int64_t, int64_t>> FeatureGroups(int64_t m) {
  const int64_t groups = (m + kMaxHeadDim - 1) / kMaxHeadDim;
  const int64_t per = PadFeatures((m + groups - 1) / groups);
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t f0 = 0; f0 < m; f0 += per) out.push_back({f0, std::min(per, m - f0)});
  return out;
}

LinearAttentionParams EngineParams(bool causal, bool normalize) {
  LinearAttentionParams lp;
  lp.feature_map = LinearFeatureMap::kIdentity;
  lp.scale = 1.0f;
  lp.causal = causal;
  lp.normalize = normalize;
  lp.eps = kFeatureEps;
  return lp;
}

Context EngineContext(const Context& ctx) {
  Context c = ctx;
  if (c.path == Path::kReference) c.path = Path::kAuto;  // the caller ran its own reference
  return c;
}

// v with a column of ones appended, contiguous [B, S, Hkv, D + 1]: the engine's unnormalized
// output on it carries the numerator in columns [0, D) and the normalizer in column D.
std::vector<float> OnesExtended(const TensorView& v) {
  const int64_t B = v.shape[0], S = v.shape[1], H = v.shape[2], D = v.shape[3];
  std::vector<float> v1(static_cast<size_t>(B * S * H * (D + 1)));
  float* p = v1.data();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s < S; ++s) {
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t d = 0; d < D; ++d) *p++ = At(v, b, s, h, d);
        *p++ = 1.0f;
      }
    }
  }
  return v1;
}

// acc [B, S, Hq, D + 1] = sum over feature groups of the unnormalized engine output on v1.
Status UnnormalizedSum(const TensorView& phi_q, const TensorView& phi_k, const TensorView& v1,
                       float* acc, bool causal, const Context& ctx) {
  const int64_t B = phi_q.shape[0], S = phi_q.shape[1], Hq = phi_q.shape[2];
  const int64_t Dv = v1.shape[3];
  const size_t n = static_cast<size_t>(B * S * Hq * Dv);
  std::vector<float> tmp;
  const auto groups = FeatureGroups(phi_q.shape[3]);
  for (size_t g = 0; g < groups.size(); ++g) {
    LinearAttentionParams lp = EngineParams(causal, /*normalize=*/false);
    lp.q = FeatureSlice(phi_q, groups[g].first, groups[g].second);
    lp.k = FeatureSlice(phi_k, groups[g].first, groups[g].second);
    lp.v = v1;
    if (g > 0 && tmp.empty()) tmp.resize(n);
    float* dst = g == 0 ? acc : tmp.data();
    lp.out = MakeView4(dst, DType::kF32, B, S, Hq, Dv);
    Status s = LinearAttentionForward(lp, EngineContext(ctx));
    if (!s.ok()) return s;
    if (g > 0) {
      for (size_t i = 0; i < n; ++i) acc[i] += tmp[i];
    }
  }
  return Status::Ok();
}

}  // namespace

Status CheckFeatureCount(const char* name, int64_t m, int64_t dim) {
  if (m < 1 || m > kMaxLinearFeatureDim) {
    return Status::InvalidArgument(Expected(
        name, "a count in [1, " + std::to_string(kMaxLinearFeatureDim) + "]", std::to_string(m)));
  }
  if (m > kMaxHeadDim && dim + 1 > kMaxHeadDim) {
    return Status::InvalidArgument(Expected(name,
                                            "at most " + std::to_string(kMaxHeadDim) +
                                                " features with head dim " + std::to_string(dim) +
                                                " (more are summed in groups, which needs D < " +
                                                std::to_string(kMaxHeadDim) + ")",
                                            std::to_string(m)));
  }
  return Status::Ok();
}

Status FeatureAttention(const TensorView& phi_q, const TensorView& phi_k, const TensorView& v,
                        const TensorView& out, bool causal, const Context& ctx) {
  if (phi_q.shape[3] <= kMaxHeadDim) {
    LinearAttentionParams lp = EngineParams(causal, /*normalize=*/true);
    lp.q = phi_q;
    lp.k = phi_k;
    lp.v = v;
    lp.out = out;
    return LinearAttentionForward(lp, EngineContext(ctx));
  }
  const int64_t B = out.shape[0], S = out.shape[1], Hq = out.shape[2], D = out.shape[3];
  std::vector<float> v1 = OnesExtended(v);
  const TensorView v1v =
      MakeView4(v1.data(), DType::kF32, v.shape[0], v.shape[1], v.shape[2], D + 1);
  std::vector<float> acc(static_cast<size_t>(B * S * Hq * (D + 1)));
  Status s = UnnormalizedSum(phi_q, phi_k, v1v, acc.data(), causal, ctx);
  if (!s.ok()) return s;
  const float* a = acc.data();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < S; ++t) {
      for (int64_t h = 0; h < Hq; ++h, a += D + 1) {
        const float inv = 1.0f / (a[D] + kFeatureEps);
        float* o = AtMut(out, b, t, h, 0);
        for (int64_t d = 0; d < D; ++d) o[d * out.strides[3]] = a[d] * inv;
      }
    }
  }
  return Status::Ok();
}

Status FeatureAttentionBackward(const TensorView& phi_q, const TensorView& phi_k,
                                const TensorView& v, const TensorView& dout,
                                const TensorView& dphi_q, const TensorView& dphi_k,
                                const TensorView& dv, bool causal, const Context& ctx) {
  // out = num / (den + eps) with [num, den] the unnormalized output on [v, 1]: its backward is
  // the unnormalized engine's with dout1 = [dout / (den + eps), -(dout . out) / (den + eps)].
  const int64_t B = phi_q.shape[0], S = phi_q.shape[1], Hq = phi_q.shape[2];
  const int64_t Hkv = v.shape[2], D = v.shape[3];
  std::vector<float> v1 = OnesExtended(v);
  const TensorView v1v = MakeView4(v1.data(), DType::kF32, B, S, Hkv, D + 1);
  std::vector<float> acc(static_cast<size_t>(B * S * Hq * (D + 1)));
  Status s = UnnormalizedSum(phi_q, phi_k, v1v, acc.data(), causal, ctx);
  if (!s.ok()) return s;
  float* a = acc.data();  // becomes dout1 in place
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < S; ++t) {
      for (int64_t h = 0; h < Hq; ++h, a += D + 1) {
        const float inv = 1.0f / (a[D] + kFeatureEps);
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) {
          const float g = At(dout, b, t, h, d);
          dot += g * (a[d] * inv);
          a[d] = g * inv;
        }
        a[D] = -dot * inv;
      }
    }
  }
  const TensorView dout1 = MakeView4(acc.data(), DType::kF32, B, S, Hq, D + 1);
  std::vector<float> dv1(v1.size()), dv1_tmp;
  const auto groups = FeatureGroups(phi_q.shape[3]);
  for (size_t g = 0; g < groups.size(); ++g) {
    LinearAttentionBackwardParams bp;
    bp.forward = EngineParams(causal, /*normalize=*/false);
    bp.forward.q = FeatureSlice(phi_q, groups[g].first, groups[g].second);
    bp.forward.k = FeatureSlice(phi_k, groups[g].first, groups[g].second);
    bp.forward.v = v1v;
    bp.dout = dout1;
    bp.dq = FeatureSlice(dphi_q, groups[g].first, groups[g].second);
    bp.dk = FeatureSlice(dphi_k, groups[g].first, groups[g].second);
    if (g > 0 && dv1_tmp.empty()) dv1_tmp.resize(v1.size());
    bp.dv = MakeView4(g == 0 ? dv1.data() : dv1_tmp.data(), DType::kF32, B, S, Hkv, D + 1);
    s = LinearAttentionBackward(bp, EngineContext(ctx));
    if (!s.ok()) return s;
    if (g > 0) {
      for (size_t i = 0; i < dv1.size(); ++i) dv1[i] += dv1_tmp[i];
    }
  }
  const float* p = dv1.data();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < S; ++t) {
      for (int64_t h = 0; h < Hkv; ++h, p += D + 1) {
        for (int64_t d = 0; d < D; ++d) *AtMut(dv, b, t, h, d) = p[d];
      }
    }
  }
  return Status::Ok();
}

int64_t KvHeadsPerSlab(int64_t heads_kv, int64_t group, int64_t batch, int64_t floats_per_kv_head,
                       int32_t threads) {
  constexpr int64_t kBudgetFloats = int64_t{128} << 20;  // 512 MiB of f32
  int64_t n = std::max<int64_t>(1, kBudgetFloats / std::max<int64_t>(1, floats_per_kv_head));
  const int64_t per_head_tasks = std::max<int64_t>(1, group * batch);
  n = std::max(n, (threads + per_head_tasks - 1) / per_head_tasks);
  return std::min(n, heads_kv);
}

Status CheckMatrixOption(const char* name, const TensorView& t, int64_t rows, int64_t cols) {
  if (t.data == nullptr) {
    return Status::InvalidArgument(Expected(name, "a non-null pointer", "nullptr"));
  }
  if (t.dtype != DType::kF32) {
    return Status::InvalidArgument(Expected(name, "dtype f32", DTypeName(t.dtype)));
  }
  const int64_t shape[2] = {rows, cols};
  return CheckShape(name, t, 2, shape,
                    "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]", false);
}

void CopyMatrix(const TensorView& t, float* out) {
  const float* p = static_cast<const float*>(t.data);
  for (int64_t i = 0; i < t.shape[0]; ++i) {
    for (int64_t j = 0; j < t.shape[1]; ++j) *out++ = p[i * t.strides[0] + j * t.strides[1]];
  }
}

std::unique_ptr<float[]> Floats(int64_t n) {
  return std::unique_ptr<float[]>(new float[static_cast<size_t>(std::max<int64_t>(n, 1))]);
}

void WriteF64(const std::vector<double>& src, const TensorView& dst) {
  size_t i = 0;
  for (int64_t a = 0; a < dst.shape[0]; ++a) {
    for (int64_t b = 0; b < dst.shape[1]; ++b) {
      for (int64_t c = 0; c < dst.shape[2]; ++c) {
        for (int64_t d = 0; d < dst.shape[3]; ++d) {
          *AtMut(dst, a, b, c, d) = static_cast<float>(src[i++]);
        }
      }
    }
  }
}

}  // namespace approx
}  // namespace tessera
#endif  // HWY_ONCE
