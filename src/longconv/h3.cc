// SPDX-License-Identifier: Apache-2.0
// H3 (tessera/longconv.h): the shift SSM as a long convolution of k over the whole tensor, then
// per (sequence, head) the diagonal SSM on each of the d x d outer-product channels K_i v_j,
// read out by q, in columns of N floats (FFT of size M >= N + L - 1, or the direct sum for short
// filters: LongConv1D's rule). The backward runs the same loop with the transposed convolution
// and the correlations for the filter, then LongConv1DBackward's core for the shift.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/check.h"
#include "core/guard.h"
#include "core/parallel.h"
#include "longconv/longconv_internal.h"
#include "tessera/longconv.h"

namespace tessera {
namespace {

using namespace longconv_detail;  // NOLINT(google-build-using-namespace): the engine's pieces

// Validated sizes of an H3 call.
struct H3Shape {
  int64_t B = 0, N = 0, H = 0, d = 0, Ls = 0, L = 0;
  LongConvPath path = LongConvPath::kAuto;
  int64_t channels() const { return H * d; }
};

Status ValidateH3(const H3Params& p, bool with_out, H3Shape* shape) {
  const int64_t any4[4] = {-1, -1, -1, -1};
  Status s = CheckF32View("q", p.q, 4, any4, "rank 4 [B, N, H, d]", false);
  if (!s.ok()) return s;
  H3Shape& sh = *shape;
  sh.B = p.q.shape[0], sh.N = p.q.shape[1], sh.H = p.q.shape[2], sh.d = p.q.shape[3];
  if (sh.N < 1) {
    return Status::InvalidArgument(Expected("q", "a sequence length N >= 1", ShapeString(p.q)));
  }
  const int64_t qshape[4] = {sh.B, sh.N, sh.H, sh.d};
  const std::string like_q = "shape " + Dims({sh.B, sh.N, sh.H, sh.d}) + " (the shape of q)";
  s = CheckF32View("k", p.k, 4, qshape, like_q, false);
  if (!s.ok()) return s;
  s = CheckF32View("v", p.v, 4, qshape, like_q, false);
  if (!s.ok()) return s;
  if (with_out) {
    s = CheckF32View("out", p.out, 4, qshape, like_q, true);
    if (!s.ok()) return s;
  }
  s = ValidateFilterAndBias("shift_filter", p.shift_filter, "shift_bias", p.shift_bias,
                            sh.channels(), sh.N);
  if (!s.ok()) return s;
  s = ValidateFilterAndBias("ssm_filter", p.ssm_filter, "ssm_bias", p.ssm_bias, sh.H, sh.N);
  if (!s.ok()) return s;
  sh.Ls = p.shift_filter.shape[0];
  sh.L = p.ssm_filter.shape[0];
  if (p.path != LongConvPath::kAuto && p.path != LongConvPath::kDirect &&
      p.path != LongConvPath::kFft) {
    return Status::InvalidArgument(
        Expected("path", "kAuto, kDirect or kFft", std::to_string(static_cast<int>(p.path))));
  }
  if (p.path == LongConvPath::kFft && sh.N + std::max(sh.Ls, sh.L) - 1 > kMaxFftSize) {
    return Status::InvalidArgument(Expected("q", "N + L - 1 <= 2^30 for the FFT path",
                                            std::to_string(sh.N + std::max(sh.Ls, sh.L) - 1)));
  }
  sh.path = p.path;
  return Status::Ok();
}

std::vector<Region> InputRegions(const H3Params& p) {
  return {ViewRegion("q", p.q),
          ViewRegion("k", p.k),
          ViewRegion("v", p.v),
          ViewRegion("shift_filter", p.shift_filter),
          ViewRegion("shift_bias", p.shift_bias),
          ViewRegion("ssm_filter", p.ssm_filter),
          ViewRegion("ssm_bias", p.ssm_bias)};
}

// A [B, N, H, d] view as [B, N, H d] (channel h d + i), aliasing it when its strides allow,
// else a contiguous copy (copy_in: of its values).
class ModelChannels {
 public:
  ModelChannels(const TensorView& t, bool copy_in) {
    const int64_t B = t.shape[0], N = t.shape[1], H = t.shape[2], d = t.shape[3];
    const bool flat = H == 1 || d == 1 || t.strides[2] == d * t.strides[3];
    view_ = MakeView3(t.data, DType::kF32, B, N, H * d);
    view_.strides[0] = t.strides[0];
    view_.strides[1] = t.strides[1];
    view_.strides[2] = d == 1 ? t.strides[2] : t.strides[3];
    if (flat) return;
    source_ = t;
    pack_.resize(static_cast<size_t>(B * N * H * d));
    view_ = MakeView3(pack_.data(), DType::kF32, B, N, H * d);
    if (!copy_in) return;
    const float* src = static_cast<const float*>(t.data);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t i = 0; i < d; ++i) {
            pack_[((b * N + n) * H + h) * d + i] =
                src[b * t.strides[0] + n * t.strides[1] + h * t.strides[2] + i * t.strides[3]];
          }
        }
      }
    }
  }
  const TensorView& view() const { return view_; }
  // Writes a packed output back into its view.
  void Flush() const {
    if (pack_.empty()) return;
    const TensorView& t = source_;
    const int64_t B = t.shape[0], N = t.shape[1], H = t.shape[2], d = t.shape[3];
    float* dst = static_cast<float*>(t.data);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t i = 0; i < d; ++i) {
            dst[b * t.strides[0] + n * t.strides[1] + h * t.strides[2] + i * t.strides[3]] =
                pack_[((b * N + n) * H + h) * d + i];
          }
        }
      }
    }
  }

 private:
  TensorView view_, source_;
  std::vector<float> pack_;
};

// The shifted keys K = shift_filter * k (+ shift_bias k), contiguous [B, N, H d].
std::vector<float> ShiftedKeys(const H3Params& p, const H3Shape& sh, int32_t threads) {
  std::vector<float> out(static_cast<size_t>(sh.B * sh.N * sh.channels()));
  const ModelChannels k(p.k, true);
  LongConvParams conv;
  conv.u = k.view();
  conv.filter = p.shift_filter;
  conv.bias = p.shift_bias;
  conv.path = p.path;
  conv.y = MakeView3(out.data(), DType::kF32, sh.B, sh.N, sh.channels());
  ConvolveValidated(conv, threads);
  return out;
}

// Heads per task: enough that a group's channels fill a cache line (16 floats) of a row, so the
// gathers read whole lines from rows far apart, within a budget for the `arrays` column sets (N
// floats each per channel) a worker holds.
constexpr int64_t kGroupFloats = 16;
constexpr int64_t kScratchFloats = int64_t{4} << 20;
int64_t HeadGroup(const H3Shape& sh, int64_t arrays) {
  int64_t g = std::clamp<int64_t>(kGroupFloats / sh.d, 1, sh.H);
  while (g > 1 && arrays * g * sh.d * sh.N > kScratchFloats) g /= 2;
  return g;
}

// Rows per tile of the gathers and scatters: a tile of rows is read (or written) whole while
// each column takes a run of kTileRows floats, so neither side strides through memory.
constexpr int64_t kTileRows = 32;

// Heads [h0, h0 + heads) of sequence b as columns of N floats:
// cols[(g d + i) N + s] = t[b, s, h0 + g, i].
void GatherHeads(const TensorView& t, int64_t b, int64_t h0, int64_t heads, int64_t n, int64_t d,
                 float* cols) {
  const float* p = static_cast<const float*>(t.data) + b * t.strides[0] + h0 * t.strides[2];
  for (int64_t s0 = 0; s0 < n; s0 += kTileRows) {
    const int64_t s1 = std::min(n, s0 + kTileRows);
    for (int64_t g = 0; g < heads; ++g) {
      for (int64_t i = 0; i < d; ++i) {
        const float* src = p + g * t.strides[2] + i * t.strides[3];
        float* col = cols + (g * d + i) * n;
        for (int64_t s = s0; s < s1; ++s) col[s] = src[s * t.strides[1]];
      }
    }
  }
}

void ScatterHeads(const float* cols, int64_t b, int64_t h0, int64_t heads, int64_t n, int64_t d,
                  const TensorView& t) {
  float* p = static_cast<float*>(t.data) + b * t.strides[0] + h0 * t.strides[2];
  for (int64_t s0 = 0; s0 < n; s0 += kTileRows) {
    const int64_t s1 = std::min(n, s0 + kTileRows);
    for (int64_t g = 0; g < heads; ++g) {
      for (int64_t i = 0; i < d; ++i) {
        float* dst = p + g * t.strides[2] + i * t.strides[3];
        const float* col = cols + (g * d + i) * n;
        for (int64_t s = s0; s < s1; ++s) dst[s * t.strides[1]] = col[s];
      }
    }
  }
}

// Heads [h0, h0 + heads) of a contiguous [B, N, H d] tensor (the shifted keys and their
// gradient) to and from the same column layout.
TensorView ModelView(const std::vector<float>& x, const H3Shape& sh) {
  return MakeView4(const_cast<float*>(x.data()), DType::kF32, sh.B, sh.N, sh.H, sh.d);
}
void GatherModel(const std::vector<float>& x, const H3Shape& sh, int64_t b, int64_t h0,
                 int64_t heads, float* cols) {
  GatherHeads(ModelView(x, sh), b, h0, heads, sh.N, sh.d, cols);
}
void ScatterModel(const float* cols, const H3Shape& sh, int64_t b, int64_t h0, int64_t heads,
                  std::vector<float>* x) {
  ScatterHeads(cols, b, h0, heads, sh.N, sh.d, ModelView(*x, sh));
}

// The SSM filters of heads [h0, h0 + heads) ([L, H], strided) as contiguous rows of L taps, one
// pass over the filter's rows.
void GatherFilters(const TensorView& filter, int64_t h0, int64_t heads, std::vector<float>* taps) {
  const int64_t L = filter.shape[0];
  taps->resize(static_cast<size_t>(heads * L));
  const float* f = static_cast<const float*>(filter.data) + h0 * filter.strides[1];
  for (int64_t s = 0; s < L; ++s) {
    for (int64_t g = 0; g < heads; ++g)
      (*taps)[g * L + s] = f[s * filter.strides[0] + g * filter.strides[1]];
  }
}

// The diagonal SSM's convolution of one head on columns of N floats: the FFT of size m with the
// head's filter spectrum (1 / m folded in), or the direct sum with its taps.
class HeadConv {
 public:
  explicit HeadConv(const H3Shape& sh)
      : n_(sh.N), l_(sh.L), direct_(UseDirect(sh.N, sh.L, sh.path)) {
    if (direct_) return;
    m_ = FastSize(sh.N + sh.L - 1);
    plans_ = GetPlans(m_);
  }
  bool direct() const { return direct_; }
  int64_t bins() const { return m_ / 2 + 1; }

  // Per-worker buffers, made on first use.
  struct Scratch {
    FloatBuf real, spec, spec2, hspec, dhspec;
    std::vector<float> taps, dtaps;
  };
  // Makes the head's taps (contiguous, L floats) current: their spectrum (1 / m folded in) for
  // the FFT path, a copy for the direct one.
  void Prepare(Scratch& sc, const float* taps) const {
    if (direct_) {
      sc.taps.assign(taps, taps + l_);
      return;
    }
    if (sc.real.p == nullptr) {
      sc.real = FloatBuf(PaddedReals(m_));
      sc.spec = FloatBuf(PaddedSpectrum(m_));
      sc.spec2 = FloatBuf(PaddedSpectrum(m_));
      sc.hspec = FloatBuf(PaddedSpectrum(m_));
      sc.dhspec = FloatBuf(PaddedSpectrum(m_));
    }
    const float inv = 1.0f / static_cast<float>(m_);
    for (int64_t s = 0; s < l_; ++s) sc.real.p[s] = taps[s] * inv;
    std::fill(sc.real.p + l_, sc.real.p + m_, 0.0f);
    fftwf_execute_dft_r2c(plans_.r2c, sc.real.p, Complex(sc.hspec.p));
  }
  // y = filter * x (causal), N floats each; the FFT path keeps x's spectrum in sc.spec.
  void Forward(Scratch& sc, const float* x, float* y) const {
    if (direct_) {
      DirectColumn(x, n_, sc.taps.data(), l_, y);
      return;
    }
    std::copy(x, x + n_, sc.real.p);
    std::fill(sc.real.p + n_, sc.real.p + m_, 0.0f);
    fftwf_execute_dft_r2c(plans_.r2c, sc.real.p, Complex(sc.spec.p));
    MulSpectra(sc.hspec.p, sc.spec.p, sc.spec2.p, bins(), false);
    fftwf_execute_dft_c2r(plans_.c2r, Complex(sc.spec2.p), sc.real.p);
    std::copy(sc.real.p, sc.real.p + n_, y);
  }
  // dx = the transposed convolution of g; with accumulate_filter_grad, the filter's gradient
  // (the correlation of g with x, x the column last passed to Forward) is added to the
  // scratch's accumulator (first: it starts it).
  void Backward(Scratch& sc, const float* x, const float* g, float* dx, bool filter_grad,
                bool first) const {
    if (direct_) {
      DirectColumnTransposed(g, n_, sc.taps.data(), l_, dx);
      if (filter_grad) {
        if (first) sc.dtaps.assign(static_cast<size_t>(l_), 0.0f);
        DirectColumnFilterGrad(g, x, n_, l_, sc.dtaps.data());
      }
      return;
    }
    std::copy(g, g + n_, sc.real.p);
    std::fill(sc.real.p + n_, sc.real.p + m_, 0.0f);
    fftwf_execute_dft_r2c(plans_.r2c, sc.real.p, Complex(sc.spec2.p));
    if (filter_grad) MulConjSpectra(sc.spec.p, sc.spec2.p, sc.dhspec.p, bins(), !first);
    MulConjSpectra(sc.hspec.p, sc.spec2.p, sc.spec2.p, bins(), false);
    fftwf_execute_dft_c2r(plans_.c2r, Complex(sc.spec2.p), sc.real.p);
    std::copy(sc.real.p, sc.real.p + n_, dx);
  }
  // The accumulated filter gradient, L taps.
  void FilterGrad(Scratch& sc, float* dh) const {
    if (direct_) {
      std::copy(sc.dtaps.begin(), sc.dtaps.end(), dh);
      return;
    }
    fftwf_execute_dft_c2r(plans_.c2r, Complex(sc.dhspec.p), sc.real.p);
    const float inv = 1.0f / static_cast<float>(m_);
    for (int64_t s = 0; s < l_; ++s) dh[s] = sc.real.p[s] * inv;
  }

 private:
  static fftwf_complex* Complex(float* p) { return reinterpret_cast<fftwf_complex*>(p); }
  int64_t n_, l_, m_ = 0;
  bool direct_;
  FftPlans plans_;
};

float BiasOf(const TensorView& bias, int64_t c) {
  return bias.data != nullptr ? static_cast<const float*>(bias.data)[c * bias.strides[0]] : 0.0f;
}

}  // namespace

Status H3Layer(const H3Params& p, const Context& ctx) try {
  H3Shape sh;
  Status s = ValidateH3(p, true, &sh);
  if (!s.ok()) return s;
  s = ValidateThreads(ctx);
  if (!s.ok()) return s;
  s = CheckDisjoint({ViewRegion("out", p.out)}, InputRegions(p));
  if (!s.ok()) return s;
  if (p.out.numel() == 0) return Status::Ok();
  const int32_t threads = ResolveThreads(ctx);
  const std::vector<float> shifted = ShiftedKeys(p, sh, threads);
  const HeadConv conv(sh);
  const int64_t N = sh.N, d = sh.d;
  // Per worker: q, v, K and out of a group of heads (d columns each), the product and its
  // convolution.
  const int64_t group = HeadGroup(sh, 4), groups = (sh.H + group - 1) / group;
  struct Scratch {
    HeadConv::Scratch conv;
    std::vector<float> q, v, k, out, x, y, filters;
  };
  std::vector<Scratch> scratch(static_cast<size_t>(threads));
  ParallelFor(threads, sh.B * groups, [&](int64_t task, int32_t worker) {
    Scratch& sc = scratch[static_cast<size_t>(worker)];
    if (sc.q.empty()) {
      for (auto* col : {&sc.q, &sc.v, &sc.k, &sc.out})
        col->resize(static_cast<size_t>(group * d * N));
      sc.x.resize(static_cast<size_t>(N));
      sc.y.resize(static_cast<size_t>(N));
    }
    const int64_t b = task / groups, h0 = task % groups * group;
    const int64_t heads = std::min(group, sh.H - h0);
    GatherHeads(p.q, b, h0, heads, N, d, sc.q.data());
    GatherHeads(p.v, b, h0, heads, N, d, sc.v.data());
    GatherModel(shifted, sh, b, h0, heads, sc.k.data());
    GatherFilters(p.ssm_filter, h0, heads, &sc.filters);
    std::fill(sc.out.begin(), sc.out.end(), 0.0f);
    for (int64_t g = 0; g < heads; ++g) {
      conv.Prepare(sc.conv, sc.filters.data() + g * sh.L);
      const float skip = BiasOf(p.ssm_bias, h0 + g);
      const int64_t head_cols = g * d * N;
      for (int64_t j = 0; j < d; ++j) {
        const float* vj = sc.v.data() + head_cols + j * N;
        float* oj = sc.out.data() + head_cols + j * N;
        for (int64_t i = 0; i < d; ++i) {
          const float* ki = sc.k.data() + head_cols + i * N;
          const float* qi = sc.q.data() + head_cols + i * N;
          for (int64_t t = 0; t < N; ++t) sc.x[t] = ki[t] * vj[t];
          conv.Forward(sc.conv, sc.x.data(), sc.y.data());
          for (int64_t t = 0; t < N; ++t) oj[t] += qi[t] * (sc.y[t] + skip * sc.x[t]);
        }
      }
    }
    ScatterHeads(sc.out.data(), b, h0, heads, N, d, p.out);
  });
  return Status::Ok();
}
TESSERA_CATCH_ALL("H3Layer")

Status H3LayerBackward(const H3BackwardParams& bp, const Context& ctx) try {
  const H3Params& p = bp.forward;
  H3Shape sh;
  Status s = ValidateH3(p, false, &sh);
  if (!s.ok()) return s;
  const int64_t qshape[4] = {sh.B, sh.N, sh.H, sh.d};
  const std::string like_q = "shape " + Dims({sh.B, sh.N, sh.H, sh.d}) + " (the shape of q)";
  s = CheckF32View("dout", bp.dout, 4, qshape, like_q, false);
  if (!s.ok()) return s;
  const std::pair<const char*, const TensorView*> like_inputs[] = {
      {"dq", &bp.dq}, {"dk", &bp.dk}, {"dv", &bp.dv}};
  for (const auto& [name, view] : like_inputs) {
    if (view->data == nullptr) continue;
    s = CheckF32View(name, *view, 4, qshape, like_q, true);
    if (!s.ok()) return s;
  }
  const struct {
    const char *name, *bias_name;
    const TensorView &grad, &bias_grad, &filter, &bias;
  } filters[] = {
      {"dshift_filter", "dshift_bias", bp.dshift_filter, bp.dshift_bias, p.shift_filter,
       p.shift_bias},
      {"dssm_filter", "dssm_bias", bp.dssm_filter, bp.dssm_bias, p.ssm_filter, p.ssm_bias}};
  for (const auto& f : filters) {
    if (f.grad.data != nullptr) {
      const int64_t fshape[2] = {f.filter.shape[0], f.filter.shape[1]};
      s = CheckF32View(f.name, f.grad, 2, fshape,
                       "shape " + ShapeString(f.filter) + " (the shape of its filter)", true);
      if (!s.ok()) return s;
    }
    if (f.bias_grad.data != nullptr) {
      if (f.bias.data == nullptr) {
        return Status::InvalidArgument(
            Expected(f.bias_name, "unset when the forward has no such bias", "a view"));
      }
      const int64_t bshape[1] = {f.filter.shape[1]};
      s = CheckF32View(f.bias_name, f.bias_grad, 1, bshape, "shape " + Dims({f.filter.shape[1]}),
                       true);
      if (!s.ok()) return s;
    }
  }
  s = ValidateThreads(ctx);
  if (!s.ok()) return s;
  std::vector<Region> inputs = InputRegions(p);
  inputs.push_back(ViewRegion("dout", bp.dout));
  s = CheckDisjoint(
      {ViewRegion("dq", bp.dq), ViewRegion("dk", bp.dk), ViewRegion("dv", bp.dv),
       ViewRegion("dshift_filter", bp.dshift_filter), ViewRegion("dshift_bias", bp.dshift_bias),
       ViewRegion("dssm_filter", bp.dssm_filter), ViewRegion("dssm_bias", bp.dssm_bias)},
      inputs);
  if (!s.ok()) return s;
  const bool want_dq = bp.dq.data != nullptr, want_dv = bp.dv.data != nullptr;
  const bool want_dshift =
      bp.dk.data != nullptr || bp.dshift_filter.data != nullptr || bp.dshift_bias.data != nullptr;
  const bool want_dh = bp.dssm_filter.data != nullptr, want_dd = bp.dssm_bias.data != nullptr;
  const int64_t B = sh.B, N = sh.N, H = sh.H, d = sh.d, L = sh.L;
  if (B * H * d == 0) {
    // No sequences or no channels: the filter and bias gradients are empty sums.
    for (const TensorView* g :
         {&bp.dshift_filter, &bp.dshift_bias, &bp.dssm_filter, &bp.dssm_bias}) {
      if (g->data != nullptr) FillView(*g, 0.0f);
    }
    return Status::Ok();
  }
  const int32_t threads = ResolveThreads(ctx);
  const std::vector<float> shifted = ShiftedKeys(p, sh, threads);
  const HeadConv conv(sh);
  // dL/dK, contiguous [B, N, H d]: the input of the shift's backward.
  std::vector<float> dshifted(want_dshift ? static_cast<size_t>(B * N * H * d) : 0);
  // Per (b, h): the diagonal SSM filter's gradient (L taps) and its skip term's, summed over the
  // batch afterwards in a fixed order (results do not depend on the thread count).
  std::vector<float> task_dh(want_dh ? static_cast<size_t>(B * H * L) : 0);
  std::vector<double> task_dd(want_dd ? static_cast<size_t>(B * H) : 0);
  const int64_t group = HeadGroup(sh, 7), groups = (H + group - 1) / group;
  struct Scratch {
    HeadConv::Scratch conv;
    std::vector<float> q, v, k, g, dq, dv, dk, x, y, gx, dx, filters;
  };
  std::vector<Scratch> scratch(static_cast<size_t>(threads));
  ParallelFor(threads, B * groups, [&](int64_t task, int32_t worker) {
    Scratch& sc = scratch[static_cast<size_t>(worker)];
    if (sc.q.empty()) {
      for (auto* col : {&sc.q, &sc.v, &sc.k, &sc.g, &sc.dq, &sc.dv, &sc.dk})
        col->resize(static_cast<size_t>(group * d * N));
      for (auto* col : {&sc.x, &sc.y, &sc.gx, &sc.dx}) col->resize(static_cast<size_t>(N));
    }
    const int64_t b = task / groups, h0 = task % groups * group;
    const int64_t heads = std::min(group, H - h0);
    GatherHeads(p.q, b, h0, heads, N, d, sc.q.data());
    GatherHeads(p.v, b, h0, heads, N, d, sc.v.data());
    GatherHeads(bp.dout, b, h0, heads, N, d, sc.g.data());
    GatherModel(shifted, sh, b, h0, heads, sc.k.data());
    GatherFilters(p.ssm_filter, h0, heads, &sc.filters);
    for (auto* col : {&sc.dq, &sc.dv, &sc.dk}) std::fill(col->begin(), col->end(), 0.0f);
    for (int64_t hg = 0; hg < heads; ++hg) {
      const int64_t h = h0 + hg, head_cols = hg * d * N;
      conv.Prepare(sc.conv, sc.filters.data() + hg * L);
      const float skip = BiasOf(p.ssm_bias, h);
      double dd = 0.0;
      bool first = true;
      for (int64_t i = 0; i < d; ++i) {
        const float* ki = sc.k.data() + head_cols + i * N;
        const float* qi = sc.q.data() + head_cols + i * N;
        for (int64_t j = 0; j < d; ++j) {
          const float* vj = sc.v.data() + head_cols + j * N;
          const float* gj = sc.g.data() + head_cols + j * N;
          // x = K_i v_j; S = filter * x + skip x; out_j += q_i S.
          for (int64_t t = 0; t < N; ++t) sc.x[t] = ki[t] * vj[t];
          conv.Forward(sc.conv, sc.x.data(), sc.y.data());
          if (want_dq) {
            float* dqi = sc.dq.data() + head_cols + i * N;
            for (int64_t t = 0; t < N; ++t) dqi[t] += gj[t] * (sc.y[t] + skip * sc.x[t]);
          }
          // dS = dout_j q_i; dx = filter^T dS + skip dS.
          for (int64_t t = 0; t < N; ++t) sc.gx[t] = gj[t] * qi[t];
          conv.Backward(sc.conv, sc.x.data(), sc.gx.data(), sc.dx.data(), want_dh, first);
          first = false;
          if (want_dd) {
            for (int64_t t = 0; t < N; ++t) dd += static_cast<double>(sc.gx[t]) * sc.x[t];
          }
          float* dki = sc.dk.data() + head_cols + i * N;
          float* dvj = sc.dv.data() + head_cols + j * N;
          for (int64_t t = 0; t < N; ++t) {
            const float dx = sc.dx[t] + skip * sc.gx[t];
            dki[t] += dx * vj[t];
            dvj[t] += dx * ki[t];
          }
        }
      }
      if (want_dh) conv.FilterGrad(sc.conv, task_dh.data() + (b * H + h) * L);
      if (want_dd) task_dd[static_cast<size_t>(b * H + h)] = dd;
    }
    if (want_dq) ScatterHeads(sc.dq.data(), b, h0, heads, N, d, bp.dq);
    if (want_dv) ScatterHeads(sc.dv.data(), b, h0, heads, N, d, bp.dv);
    if (want_dshift) ScatterModel(sc.dk.data(), sh, b, h0, heads, &dshifted);
  });
  if (want_dh) {
    float* out = static_cast<float*>(bp.dssm_filter.data);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t tap = 0; tap < L; ++tap) {
        float acc = 0.0f;
        for (int64_t b = 0; b < B; ++b) acc += task_dh[(b * H + h) * L + tap];
        out[tap * bp.dssm_filter.strides[0] + h * bp.dssm_filter.strides[1]] = acc;
      }
    }
  }
  if (want_dd) {
    float* out = static_cast<float*>(bp.dssm_bias.data);
    for (int64_t h = 0; h < H; ++h) {
      double acc = 0.0;
      for (int64_t b = 0; b < B; ++b) acc += task_dd[b * H + h];
      out[h * bp.dssm_bias.strides[0]] = static_cast<float>(acc);
    }
  }
  if (want_dshift) {
    // Through the shift: K = shift_filter * k + shift_bias k.
    const ModelChannels k(p.k, true);
    std::optional<ModelChannels> dk;
    if (bp.dk.data != nullptr) dk.emplace(bp.dk, false);
    LongConvBackwardParams shift;
    shift.forward.u = k.view();
    shift.forward.filter = p.shift_filter;
    shift.forward.bias = p.shift_bias;
    shift.forward.path = p.path;
    shift.dy = MakeView3(dshifted.data(), DType::kF32, B, N, H * d);
    if (dk) shift.du = dk->view();
    shift.dfilter = bp.dshift_filter;
    shift.dbias = bp.dshift_bias;
    ConvolveBackwardValidated(shift, threads);
    if (dk) dk->Flush();
  }
  return Status::Ok();
}
TESSERA_CATCH_ALL("H3LayerBackward")

}  // namespace tessera
