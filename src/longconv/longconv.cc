// SPDX-License-Identifier: Apache-2.0
// Long causal convolutions (tessera/longconv.h): validation, the direct sum (one SIMD copy per
// Highway target), the FFT path and the streamed block form (FFTW, single precision).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "longconv/longconv.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <algorithm>
#include <cstdint>

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Rows per register block of the direct sum: kRows accumulators of one channel vector each.
constexpr int64_t kRows = 8;

// y[t, c] = sum_{s <= min(t, L - 1)} h[s, c] u[t - s, c] for t in [t0, t0 + rows), every channel;
// u and y have unit channel stride and row strides su, sy; h is [L, C] contiguous. Each output is
// summed over s in ascending order, whatever the blocking, so results do not depend on it.
void DirectRows(const float* u, int64_t su, const float* h, int64_t L, int64_t C, float* y,
                int64_t sy, int64_t t0, int64_t rows) {
  const hn::ScalableTag<float> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  const int64_t cv = C / lanes * lanes;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t nr = std::min(kRows, rows - r0);
    const int64_t ta = t0 + r0;  // first row of the register block
    for (int64_t c = 0; c < cv; c += lanes) {
      hn::Vec<decltype(d)> acc[kRows];
      for (int64_t i = 0; i < kRows; ++i) acc[i] = hn::Zero(d);
      // s <= ta: every row of the block has t - s >= 0.
      const int64_t s_full = std::min(ta, L - 1);
      if (nr == kRows) {
        for (int64_t s = 0; s <= s_full; ++s) {
          const auto hv = hn::LoadU(d, h + s * C + c);
          const float* us = u + (ta - s) * su + c;
          for (int64_t i = 0; i < kRows; ++i) {
            acc[i] = hn::MulAdd(hv, hn::LoadU(d, us + i * su), acc[i]);
          }
        }
      } else {
        for (int64_t s = 0; s <= s_full; ++s) {
          const auto hv = hn::LoadU(d, h + s * C + c);
          const float* us = u + (ta - s) * su + c;
          for (int64_t i = 0; i < nr; ++i) {
            acc[i] = hn::MulAdd(hv, hn::LoadU(d, us + i * su), acc[i]);
          }
        }
      }
      // s in (ta, ta + nr - 1]: only rows with t >= s.
      for (int64_t s = s_full + 1; s < L && s < ta + nr; ++s) {
        const auto hv = hn::LoadU(d, h + s * C + c);
        for (int64_t i = s - ta; i < nr; ++i) {
          acc[i] = hn::MulAdd(hv, hn::LoadU(d, u + (ta + i - s) * su + c), acc[i]);
        }
      }
      for (int64_t i = 0; i < nr; ++i) hn::StoreU(acc[i], d, y + (ta + i) * sy + c);
    }
    for (int64_t c = cv; c < C; ++c) {
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t t = ta + i;
        float acc = 0.0f;
        for (int64_t s = 0; s <= t && s < L; ++s) acc += h[s * C + c] * u[(t - s) * su + c];
        y[t * sy + c] = acc;
      }
    }
  }
}

// dh[s, c] += sum_{t = s..n-1} dy[t, c] x[t - s, c] for s in [s0, s0 + rows), every channel (the
// filter's gradient); dy and x have unit channel stride and row strides sdy, sx; dh is [L, C]
// contiguous. Each sum runs over t in ascending order, whatever the blocking.
void CorrelateRows(const float* dy, int64_t sdy, const float* x, int64_t sx, int64_t n, int64_t C,
                   float* dh, int64_t s0, int64_t rows) {
  const hn::ScalableTag<float> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  const int64_t cv = C / lanes * lanes;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t nr = std::min(kRows, rows - r0);
    const int64_t sa = s0 + r0;  // first tap of the register block
    for (int64_t c = 0; c < cv; c += lanes) {
      hn::Vec<decltype(d)> acc[kRows];
      for (int64_t i = 0; i < kRows; ++i) {
        acc[i] = i < nr ? hn::LoadU(d, dh + (sa + i) * C + c) : hn::Zero(d);
      }
      // Tap sa + i sees t >= sa + i: rows below the block's last tap first, one by one.
      for (int64_t t = sa; t < sa + nr - 1 && t < n; ++t) {
        const auto g = hn::LoadU(d, dy + t * sdy + c);
        for (int64_t i = 0; i <= t - sa; ++i) {
          acc[i] = hn::MulAdd(g, hn::LoadU(d, x + (t - sa - i) * sx + c), acc[i]);
        }
      }
      for (int64_t t = sa + nr - 1; t < n; ++t) {
        const auto g = hn::LoadU(d, dy + t * sdy + c);
        const float* xt = x + (t - sa) * sx + c;
        for (int64_t i = 0; i < nr; ++i) acc[i] = hn::MulAdd(g, hn::LoadU(d, xt - i * sx), acc[i]);
      }
      for (int64_t i = 0; i < nr; ++i) hn::StoreU(acc[i], d, dh + (sa + i) * C + c);
    }
    for (int64_t c = cv; c < C; ++c) {
      for (int64_t i = 0; i < nr; ++i) {
        const int64_t s = sa + i;
        float acc = dh[s * C + c];
        for (int64_t t = s; t < n; ++t) acc += dy[t * sdy + c] * x[(t - s) * sx + c];
        dh[s * C + c] = acc;
      }
    }
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "core/check.h"
#include "core/guard.h"
#include "core/parallel.h"
#include "longconv/longconv_internal.h"
#include "tessera/longconv.h"

namespace tessera {

HWY_EXPORT(DirectRows);
HWY_EXPORT(CorrelateRows);

namespace longconv_detail {

// kAuto: the direct sum when its multiply-adds, N L - L (L - 1) / 2 per channel, are at most
// kFftCostFactor * M log2(M) (M the FFT size). Measured: docs/longconv.md.
constexpr double kFftCostFactor = 20.0;
// Rows (or filter taps) per task of the direct paths.
constexpr int64_t kDirectTaskRows = 64;
// Floats of input gathered per task of the FFT paths (channel groups of up to 16 columns: a
// cache line of f32 channels read once per group).
constexpr int64_t kGatherFloats = int64_t{1} << 21;
constexpr int64_t kMaxGroup = 16;

// ---- FFTW ---------------------------------------------------------------------------------

FloatBuf::FloatBuf(int64_t n) {
  p = static_cast<float*>(
      fftwf_malloc(sizeof(float) * static_cast<size_t>(std::max<int64_t>(n, 1))));
  if (p == nullptr) throw std::bad_alloc();
}
FloatBuf::~FloatBuf() { fftwf_free(p); }
FloatBuf& FloatBuf::operator=(FloatBuf&& o) noexcept {
  std::swap(p, o.p);
  return *this;
}

// Planning is not thread-safe: one mutex guards the cache. Plans are made on fftwf_malloc'd
// arrays and executed on others of the same alignment.
std::mutex& PlanMutex() {
  static std::mutex* m = new std::mutex();
  return *m;
}

FftPlans GetPlans(int64_t m) {
  std::lock_guard<std::mutex> lock(PlanMutex());
  static auto* cache = new std::map<int64_t, FftPlans>();  // plans live as long as the process
  auto it = cache->find(m);
  if (it != cache->end()) return it->second;
  FloatBuf real(m), spec(2 * (m / 2 + 1));
  auto* cplx = reinterpret_cast<fftwf_complex*>(spec.p);
  FftPlans plans;
  const int n = static_cast<int>(m);
  plans.r2c = fftwf_plan_dft_r2c_1d(n, real.p, cplx, FFTW_ESTIMATE);
  plans.c2r = fftwf_plan_dft_c2r_1d(n, cplx, real.p, FFTW_ESTIMATE | FFTW_DESTROY_INPUT);
  if (plans.r2c == nullptr || plans.c2r == nullptr)
    throw std::runtime_error("FFTW planning failed");
  cache->emplace(m, plans);
  return plans;
}

int64_t FastSize(int64_t n) {
  int64_t best = int64_t{2};
  while (best < n) best *= 2;
  for (int64_t p3 = 1; p3 < best; p3 *= 3) {
    for (int64_t p35 = p3; p35 < best; p35 *= 5) {
      int64_t v = p35;
      while (v < n || v % 2 != 0) v *= 2;
      best = std::min(best, v);
    }
  }
  return best;
}

namespace {
template <bool kConjA>
void MulSpectraImpl(const float* a, const float* b, float* out, int64_t bins, bool accumulate) {
  for (int64_t k = 0; k < bins; ++k) {
    const float ar = a[2 * k], ai = kConjA ? -a[2 * k + 1] : a[2 * k + 1];
    const float br = b[2 * k], bi = b[2 * k + 1];
    const float re = ar * br - ai * bi, im = ar * bi + ai * br;
    if (accumulate) {
      out[2 * k] += re;
      out[2 * k + 1] += im;
    } else {
      out[2 * k] = re;
      out[2 * k + 1] = im;
    }
  }
}
}  // namespace

void MulSpectra(const float* a, const float* b, float* out, int64_t bins, bool accumulate) {
  MulSpectraImpl<false>(a, b, out, bins, accumulate);
}
void MulConjSpectra(const float* a, const float* b, float* out, int64_t bins, bool accumulate) {
  MulSpectraImpl<true>(a, b, out, bins, accumulate);
}

void FilterSpectrum(const TensorView& h, int64_t c, int64_t first, int64_t taps, int64_t m,
                    const FftPlans& plans, float* real, float* spec) {
  const float* hp = static_cast<const float*>(h.data);
  const float inv = 1.0f / static_cast<float>(m);
  for (int64_t s = 0; s < taps; ++s)
    real[s] = hp[(first + s) * h.strides[0] + c * h.strides[1]] * inv;
  std::fill(real + taps, real + m, 0.0f);
  fftwf_execute_dft_r2c(plans.r2c, real, reinterpret_cast<fftwf_complex*>(spec));
}

namespace {
int64_t GroupWidth(int64_t m, int64_t channels) {
  int64_t g = kMaxGroup;
  while (g > 1 && g * m > kGatherFloats) g /= 2;
  return std::min(g, std::max<int64_t>(channels, 1));
}

double DirectCost(int64_t n, int64_t l) {
  return static_cast<double>(n) * l - 0.5 * static_cast<double>(l) * (l - 1);
}
}  // namespace

bool UseDirect(int64_t n, int64_t l, LongConvPath path) {
  if (path != LongConvPath::kAuto) return path == LongConvPath::kDirect;
  if (n + l - 1 > kMaxFftSize) return true;
  const double m = static_cast<double>(FastSize(n + l - 1));
  return DirectCost(n, l) <= kFftCostFactor * m * std::log2(m);
}

void DirectColumn(const float* x, int64_t n, const float* h, int64_t l, float* y) {
  for (int64_t t = 0; t < n; ++t) {
    float acc = 0.0f;
    for (int64_t s = 0; s <= t && s < l; ++s) acc += h[s] * x[t - s];
    y[t] = acc;
  }
}

void DirectColumnTransposed(const float* dy, int64_t n, const float* h, int64_t l, float* dx) {
  for (int64_t t = 0; t < n; ++t) {
    float acc = 0.0f;
    for (int64_t s = 0; s < l && t + s < n; ++s) acc += h[s] * dy[t + s];
    dx[t] = acc;
  }
}

void DirectColumnFilterGrad(const float* dy, const float* x, int64_t n, int64_t l, float* dh) {
  for (int64_t s = 0; s < l; ++s) {
    float acc = dh[s];
    for (int64_t t = s; t < n; ++t) acc += dy[t] * x[t - s];
    dh[s] = acc;
  }
}

// ---- validation ---------------------------------------------------------------------------

Status CheckF32View(const char* name, const TensorView& t, int32_t rank, const int64_t* shape,
                    const std::string& what, bool writable) {
  Status s = CheckShape(name, t, rank, shape, what, writable);
  if (!s.ok()) return s;
  if (t.dtype != DType::kF32) {
    return Status::InvalidArgument(Expected(name, "dtype f32", DTypeName(t.dtype)));
  }
  return Status::Ok();
}

std::string Dims(std::initializer_list<int64_t> dims) {
  std::string s = "[";
  for (int64_t d : dims) s += (s.size() > 1 ? ", " : "") + std::to_string(d);
  return s + "]";
}

Status ValidateFilterAndBias(const char* filter_name, const TensorView& filter,
                             const char* bias_name, const TensorView& bias, int64_t C,
                             int64_t max_len) {
  const int64_t fshape[2] = {-1, C};
  Status s =
      CheckF32View(filter_name, filter, 2, fshape, "shape [L, " + std::to_string(C) + "]", false);
  if (!s.ok()) return s;
  const int64_t L = filter.shape[0];
  if (L < 1 || L > max_len) {
    return Status::InvalidArgument(Expected(
        filter_name, "a length L in [1, " + std::to_string(max_len) + "]", ShapeString(filter)));
  }
  if (bias.data != nullptr) {
    const int64_t bshape[1] = {C};
    s = CheckF32View(bias_name, bias, 1, bshape, "shape " + Dims({C}), false);
    if (!s.ok()) return s;
  }
  return Status::Ok();
}

Status ValidateThreads(const Context& ctx) {
  if (ctx.num_threads < 0) {
    return Status::InvalidArgument(
        Expected("ctx.num_threads", "a value >= 0", std::to_string(ctx.num_threads)));
  }
  return Status::Ok();
}

namespace {

// ---- shared pieces of the paths -----------------------------------------------------------

// A [B, N, C] f32 view, or a packed copy of it with unit channel stride when its channel stride
// is not 1: what the direct kernels read. Outputs: `Rows` to write into, then Flush() scatters a
// packed copy back.
class UnitChannelRows {
 public:
  UnitChannelRows(const TensorView& t, bool copy_in) : view_(t) {
    const int64_t B = t.shape[0], N = t.shape[1], C = t.shape[2];
    unit_ = t.strides[2] == 1 || C == 1;
    if (unit_) return;
    pack_.resize(static_cast<size_t>(B * N * C));
    if (!copy_in) return;
    const float* src = static_cast<const float*>(t.data);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = 0; c < C; ++c) {
          pack_[(b * N + n) * C + c] = src[b * t.strides[0] + n * t.strides[1] + c * t.strides[2]];
        }
      }
    }
  }
  float* base() { return unit_ ? static_cast<float*>(view_.data) : pack_.data(); }
  int64_t batch_stride() const {
    return unit_ ? view_.strides[0] : view_.shape[1] * view_.shape[2];
  }
  int64_t row_stride() const { return unit_ ? view_.strides[1] : view_.shape[2]; }
  // Copies rows [t0, t1) of batch b of a packed output back into the view.
  void Flush(int64_t b, int64_t t0, int64_t t1) const {
    if (unit_) return;
    const int64_t N = view_.shape[1], C = view_.shape[2];
    float* dst = static_cast<float*>(view_.data);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t c = 0; c < C; ++c) {
        dst[b * view_.strides[0] + t * view_.strides[1] + c * view_.strides[2]] =
            pack_[(b * N + t) * C + c];
      }
    }
  }

 private:
  TensorView view_;
  bool unit_ = true;
  std::vector<float> pack_;
};

// filter [L, C] as a contiguous array.
std::vector<float> PackFilter(const TensorView& h) {
  const int64_t L = h.shape[0], C = h.shape[1];
  std::vector<float> out(static_cast<size_t>(L * C));
  const float* hf = static_cast<const float*>(h.data);
  for (int64_t s = 0; s < L; ++s) {
    for (int64_t c = 0; c < C; ++c) out[s * C + c] = hf[s * h.strides[0] + c * h.strides[1]];
  }
  return out;
}

float At(const TensorView& t, int64_t b, int64_t n, int64_t c) {
  return static_cast<const float*>(t.data)[b * t.strides[0] + n * t.strides[1] + c * t.strides[2]];
}

// y[b, t, c] += bias[c] x[b, t, c] (both [B, N, C] views), rows [t0, t1), channels [c0, c1).
void AddSkip(const TensorView& bias, const TensorView& x, const TensorView& y, int64_t b,
             int64_t t0, int64_t t1, int64_t c0, int64_t c1) {
  if (bias.data == nullptr) return;
  const float* d = static_cast<const float*>(bias.data);
  float* yp = static_cast<float*>(y.data);
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t c = c0; c < c1; ++c) {
      yp[b * y.strides[0] + t * y.strides[1] + c * y.strides[2]] +=
          d[c * bias.strides[0]] * At(x, b, t, c);
    }
  }
}

// Gathers channels [c0, c0 + gw) of batch b of a [B, N, C] view into columns of `real` (column j
// at j * mpad), zero-padded to m: one pass over the rows.
void GatherColumns(const TensorView& t, int64_t b, int64_t c0, int64_t gw, int64_t m, int64_t mpad,
                   float* real) {
  const int64_t N = t.shape[1];
  const float* p = static_cast<const float*>(t.data);
  for (int64_t n = 0; n < N; ++n) {
    const float* row = p + b * t.strides[0] + n * t.strides[1] + c0 * t.strides[2];
    for (int64_t j = 0; j < gw; ++j) real[j * mpad + n] = row[j * t.strides[2]];
  }
  for (int64_t j = 0; j < gw; ++j) std::fill(real + j * mpad + N, real + j * mpad + m, 0.0f);
}

void ScatterColumns(const float* real, int64_t mpad, int64_t b, int64_t c0, int64_t gw,
                    const TensorView& t) {
  const int64_t N = t.shape[1];
  float* p = static_cast<float*>(t.data);
  for (int64_t n = 0; n < N; ++n) {
    float* row = p + b * t.strides[0] + n * t.strides[1] + c0 * t.strides[2];
    for (int64_t j = 0; j < gw; ++j) row[j * t.strides[2]] = real[j * mpad + n];
  }
}

// ---- the forward --------------------------------------------------------------------------

void RunDirect(const LongConvParams& p, int32_t threads) {
  const int64_t B = p.u.shape[0], N = p.u.shape[1], C = p.u.shape[2], L = p.filter.shape[0];
  const std::vector<float> hpack = PackFilter(p.filter);
  UnitChannelRows u(p.u, true), y(p.y, false);
  const int64_t row_tasks = (N + kDirectTaskRows - 1) / kDirectTaskRows;
  ParallelFor(threads, B * row_tasks, [&](int64_t task, int32_t) {
    const int64_t b = task / row_tasks, t0 = task % row_tasks * kDirectTaskRows;
    const int64_t rows = std::min(kDirectTaskRows, N - t0);
    HWY_DYNAMIC_DISPATCH(DirectRows)
    (u.base() + b * u.batch_stride(), u.row_stride(), hpack.data(), L, C,
     y.base() + b * y.batch_stride(), y.row_stride(), t0, rows);
    y.Flush(b, t0, t0 + rows);
    AddSkip(p.bias, p.u, p.y, b, t0, t0 + rows, 0, C);
  });
}

void RunFft(const LongConvParams& p, int32_t threads) {
  const int64_t B = p.u.shape[0], N = p.u.shape[1], C = p.u.shape[2], L = p.filter.shape[0];
  const int64_t m = FastSize(N + L - 1), bins = m / 2 + 1;
  const FftPlans plans = GetPlans(m);
  const int64_t g = GroupWidth(m, C), groups = (C + g - 1) / g;
  // Per worker: g real columns, g filter spectra and one input spectrum.
  struct Scratch {
    FloatBuf real, hspec, uspec;
  };
  std::vector<Scratch> scratch(static_cast<size_t>(threads));
  const int64_t mpad = PaddedReals(m), bpad = PaddedSpectrum(m);
  ParallelFor(threads, groups, [&](int64_t grp, int32_t worker) {
    Scratch& sc = scratch[static_cast<size_t>(worker)];
    if (sc.real.p == nullptr) {
      sc.real = FloatBuf(g * mpad);
      sc.hspec = FloatBuf(g * bpad);
      sc.uspec = FloatBuf(bpad);
    }
    const int64_t c0 = grp * g, gw = std::min(g, C - c0);
    for (int64_t j = 0; j < gw; ++j) {
      FilterSpectrum(p.filter, c0 + j, 0, L, m, plans, sc.real.p, sc.hspec.p + j * bpad);
    }
    auto* spec = reinterpret_cast<fftwf_complex*>(sc.uspec.p);
    for (int64_t b = 0; b < B; ++b) {
      GatherColumns(p.u, b, c0, gw, m, mpad, sc.real.p);
      for (int64_t j = 0; j < gw; ++j) {
        float* col = sc.real.p + j * mpad;
        fftwf_execute_dft_r2c(plans.r2c, col, spec);
        MulSpectra(sc.uspec.p, sc.hspec.p + j * bpad, sc.uspec.p, bins, false);
        fftwf_execute_dft_c2r(plans.c2r, spec, col);
      }
      ScatterColumns(sc.real.p, mpad, b, c0, gw, p.y);
      AddSkip(p.bias, p.u, p.y, b, 0, N, c0, c0 + gw);
    }
  });
}

// ---- the backward -------------------------------------------------------------------------

// dbias[c] = sum_b sum_t dy[b, t, c] u[b, t, c], accumulated in double in a fixed order.
void BiasGrad(const LongConvBackwardParams& p) {
  const int64_t B = p.dy.shape[0], N = p.dy.shape[1], C = p.dy.shape[2];
  std::vector<double> acc(static_cast<size_t>(C), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < N; ++t) {
      for (int64_t c = 0; c < C; ++c)
        acc[c] += static_cast<double>(At(p.dy, b, t, c)) * At(p.forward.u, b, t, c);
    }
  }
  float* db = static_cast<float*>(p.dbias.data);
  for (int64_t c = 0; c < C; ++c) db[c * p.dbias.strides[0]] = static_cast<float>(acc[c]);
}

void RunDirectBackward(const LongConvBackwardParams& p, int32_t threads) {
  const TensorView& u = p.forward.u;
  const int64_t B = u.shape[0], N = u.shape[1], C = u.shape[2], L = p.forward.filter.shape[0];
  UnitChannelRows dy(p.dy, true);
  if (p.du.data != nullptr) {
    // du is the causal convolution of the time-reversed dy, reversed: the forward kernel run
    // over rows read and written from the end (negative row strides).
    const std::vector<float> hpack = PackFilter(p.forward.filter);
    UnitChannelRows du(p.du, false);
    const int64_t row_tasks = (N + kDirectTaskRows - 1) / kDirectTaskRows;
    ParallelFor(threads, B * row_tasks, [&](int64_t task, int32_t) {
      const int64_t b = task / row_tasks, r0 = task % row_tasks * kDirectTaskRows;
      const int64_t rows = std::min(kDirectTaskRows, N - r0);
      HWY_DYNAMIC_DISPATCH(DirectRows)
      (dy.base() + b * dy.batch_stride() + (N - 1) * dy.row_stride(), -dy.row_stride(),
       hpack.data(), L, C, du.base() + b * du.batch_stride() + (N - 1) * du.row_stride(),
       -du.row_stride(), r0, rows);
      du.Flush(b, N - r0 - rows, N - r0);
      AddSkip(p.forward.bias, p.dy, p.du, b, N - r0 - rows, N - r0, 0, C);
    });
  }
  if (p.dfilter.data != nullptr) {
    UnitChannelRows x(u, true);
    std::vector<float> dh(static_cast<size_t>(L * C), 0.0f);
    const int64_t tap_tasks = (L + kDirectTaskRows - 1) / kDirectTaskRows;
    ParallelFor(threads, tap_tasks, [&](int64_t task, int32_t) {
      const int64_t s0 = task * kDirectTaskRows, rows = std::min(kDirectTaskRows, L - s0);
      for (int64_t b = 0; b < B; ++b) {
        HWY_DYNAMIC_DISPATCH(CorrelateRows)
        (dy.base() + b * dy.batch_stride(), dy.row_stride(), x.base() + b * x.batch_stride(),
         x.row_stride(), N, C, dh.data(), s0, rows);
      }
    });
    float* out = static_cast<float*>(p.dfilter.data);
    for (int64_t s = 0; s < L; ++s) {
      for (int64_t c = 0; c < C; ++c)
        out[s * p.dfilter.strides[0] + c * p.dfilter.strides[1]] = dh[s * C + c];
    }
  }
}

void RunFftBackward(const LongConvBackwardParams& p, int32_t threads) {
  const TensorView& u = p.forward.u;
  const int64_t B = u.shape[0], N = u.shape[1], C = u.shape[2], L = p.forward.filter.shape[0];
  const int64_t m = FastSize(N + L - 1), bins = m / 2 + 1;
  const FftPlans plans = GetPlans(m);
  const int64_t g = GroupWidth(m, C), groups = (C + g - 1) / g;
  const int64_t mpad = PaddedReals(m), bpad = PaddedSpectrum(m);
  const bool want_du = p.du.data != nullptr, want_dh = p.dfilter.data != nullptr;
  // Per worker: g columns of dy (du written over them), g of u, the filter spectra, the
  // accumulated spectra of the filter's gradient, and two spectra in flight.
  struct Scratch {
    FloatBuf dyreal, ureal, hspec, dhspec, dyspec, tmp;
  };
  std::vector<Scratch> scratch(static_cast<size_t>(threads));
  ParallelFor(threads, groups, [&](int64_t grp, int32_t worker) {
    Scratch& sc = scratch[static_cast<size_t>(worker)];
    if (sc.dyreal.p == nullptr) {
      sc.dyreal = FloatBuf(g * mpad);
      sc.ureal = FloatBuf(want_dh ? g * mpad : 1);
      sc.hspec = FloatBuf(want_du ? g * bpad : 1);
      sc.dhspec = FloatBuf(want_dh ? g * bpad : 1);
      sc.dyspec = FloatBuf(bpad);
      sc.tmp = FloatBuf(bpad);
    }
    const int64_t c0 = grp * g, gw = std::min(g, C - c0);
    for (int64_t j = 0; j < gw && want_du; ++j) {
      FilterSpectrum(p.forward.filter, c0 + j, 0, L, m, plans, sc.tmp.p, sc.hspec.p + j * bpad);
    }
    auto* dyspec = reinterpret_cast<fftwf_complex*>(sc.dyspec.p);
    auto* tmp = reinterpret_cast<fftwf_complex*>(sc.tmp.p);
    for (int64_t b = 0; b < B; ++b) {
      GatherColumns(p.dy, b, c0, gw, m, mpad, sc.dyreal.p);
      if (want_dh) GatherColumns(u, b, c0, gw, m, mpad, sc.ureal.p);
      for (int64_t j = 0; j < gw; ++j) {
        float* col = sc.dyreal.p + j * mpad;
        fftwf_execute_dft_r2c(plans.r2c, col, dyspec);
        if (want_dh) {
          // dh[s] = sum_t dy[t] u[t - s]: the correlation, conj(U) DY, summed over the batch.
          fftwf_execute_dft_r2c(plans.r2c, sc.ureal.p + j * mpad, tmp);
          MulConjSpectra(sc.tmp.p, sc.dyspec.p, sc.dhspec.p + j * bpad, bins, b > 0);
        }
        if (want_du) {
          // du[t] = sum_s h[s] dy[t + s]: conj(H) DY (M >= N + L - 1: no wrap-around).
          MulConjSpectra(sc.hspec.p + j * bpad, sc.dyspec.p, sc.tmp.p, bins, false);
          fftwf_execute_dft_c2r(plans.c2r, tmp, col);
        }
      }
      if (want_du) {
        ScatterColumns(sc.dyreal.p, mpad, b, c0, gw, p.du);
        AddSkip(p.forward.bias, p.dy, p.du, b, 0, N, c0, c0 + gw);
      }
    }
    if (want_dh) {
      const float inv = 1.0f / static_cast<float>(m);
      float* out = static_cast<float*>(p.dfilter.data);
      for (int64_t j = 0; j < gw; ++j) {
        fftwf_execute_dft_c2r(plans.c2r, reinterpret_cast<fftwf_complex*>(sc.dhspec.p + j * bpad),
                              sc.dyreal.p);
        for (int64_t s = 0; s < L; ++s)
          out[s * p.dfilter.strides[0] + (c0 + j) * p.dfilter.strides[1]] = sc.dyreal.p[s] * inv;
      }
    }
  });
}

// The checks LongConv1D and its backward share: u [B, N, C] with N >= 1, filter, bias, path.
Status ValidateForwardInputs(const LongConvParams& p) {
  const int64_t any3[3] = {-1, -1, -1};
  Status s = CheckF32View("u", p.u, 3, any3, "rank 3 [B, N, C]", false);
  if (!s.ok()) return s;
  const int64_t N = p.u.shape[1], C = p.u.shape[2];
  if (N < 1) {
    return Status::InvalidArgument(Expected("u", "a sequence length N >= 1", ShapeString(p.u)));
  }
  s = ValidateFilterAndBias("filter", p.filter, "bias", p.bias, C, N);
  if (!s.ok()) return s;
  if (p.path != LongConvPath::kAuto && p.path != LongConvPath::kDirect &&
      p.path != LongConvPath::kFft) {
    return Status::InvalidArgument(
        Expected("path", "kAuto, kDirect or kFft", std::to_string(static_cast<int>(p.path))));
  }
  if (p.path == LongConvPath::kFft && N + p.filter.shape[0] - 1 > kMaxFftSize) {
    return Status::InvalidArgument(Expected("u", "N + L - 1 <= 2^30 for the FFT path",
                                            std::to_string(N + p.filter.shape[0] - 1)));
  }
  return Status::Ok();
}

}  // namespace

void ConvolveValidated(const LongConvParams& p, int32_t threads) {
  if (UseDirect(p.u.shape[1], p.filter.shape[0], p.path)) {
    RunDirect(p, threads);
  } else {
    RunFft(p, threads);
  }
}

void ConvolveBackwardValidated(const LongConvBackwardParams& p, int32_t threads) {
  if (p.du.data != nullptr || p.dfilter.data != nullptr) {
    if (UseDirect(p.dy.shape[1], p.forward.filter.shape[0], p.forward.path)) {
      RunDirectBackward(p, threads);
    } else {
      RunFftBackward(p, threads);
    }
  }
  if (p.dbias.data != nullptr) BiasGrad(p);
}

}  // namespace longconv_detail

using namespace longconv_detail;  // NOLINT(google-build-using-namespace): this file's own helpers

Status LongConv1D(const LongConvParams& p, const Context& ctx) try {
  Status s = ValidateForwardInputs(p);
  if (!s.ok()) return s;
  const int64_t B = p.u.shape[0], N = p.u.shape[1], C = p.u.shape[2];
  const int64_t yshape[3] = {B, N, C};
  s = CheckF32View("y", p.y, 3, yshape, "shape " + Dims({B, N, C}) + " (the shape of u)", true);
  if (!s.ok()) return s;
  s = ValidateThreads(ctx);
  if (!s.ok()) return s;
  s = CheckDisjoint({ViewRegion("y", p.y)}, {ViewRegion("u", p.u), ViewRegion("filter", p.filter),
                                             ViewRegion("bias", p.bias)});
  if (!s.ok()) return s;
  if (p.y.numel() == 0) return Status::Ok();
  ConvolveValidated(p, ResolveThreads(ctx));
  return Status::Ok();
}
TESSERA_CATCH_ALL("LongConv1D")

Status LongConv1DBackward(const LongConvBackwardParams& p, const Context& ctx) try {
  const LongConvParams& f = p.forward;
  Status s = ValidateForwardInputs(f);
  if (!s.ok()) return s;
  const int64_t B = f.u.shape[0], N = f.u.shape[1], C = f.u.shape[2], L = f.filter.shape[0];
  const int64_t ushape[3] = {B, N, C};
  const std::string like_u = "shape " + Dims({B, N, C}) + " (the shape of u)";
  s = CheckF32View("dy", p.dy, 3, ushape, like_u, false);
  if (!s.ok()) return s;
  if (p.du.data != nullptr) {
    s = CheckF32View("du", p.du, 3, ushape, like_u, true);
    if (!s.ok()) return s;
  }
  if (p.dfilter.data != nullptr) {
    const int64_t fshape[2] = {L, C};
    s = CheckF32View("dfilter", p.dfilter, 2, fshape,
                     "shape " + Dims({L, C}) + " (the shape of filter)", true);
    if (!s.ok()) return s;
  }
  if (p.dbias.data != nullptr) {
    if (f.bias.data == nullptr) {
      return Status::InvalidArgument(
          Expected("dbias", "unset when the forward has no bias", "a dbias view"));
    }
    const int64_t bshape[1] = {C};
    s = CheckF32View("dbias", p.dbias, 1, bshape, "shape " + Dims({C}), true);
    if (!s.ok()) return s;
  }
  s = ValidateThreads(ctx);
  if (!s.ok()) return s;
  s = CheckDisjoint(
      {ViewRegion("du", p.du), ViewRegion("dfilter", p.dfilter), ViewRegion("dbias", p.dbias)},
      {ViewRegion("u", f.u), ViewRegion("filter", f.filter), ViewRegion("bias", f.bias),
       ViewRegion("dy", p.dy)});
  if (!s.ok()) return s;
  if (B == 0 || C == 0) {
    // Sums over an empty batch or no channels: the filter's and the bias's gradients are zero.
    if (p.dfilter.data != nullptr) FillView(p.dfilter, 0.0f);
    if (p.dbias.data != nullptr) FillView(p.dbias, 0.0f);
    return Status::Ok();
  }
  ConvolveBackwardValidated(p, ResolveThreads(ctx));
  return Status::Ok();
}
TESSERA_CATCH_ALL("LongConv1DBackward")

// ---- the streamed block form --------------------------------------------------------------

struct LongConvStream::Impl {
  int64_t block = 0, batch = 0, channels = 0, taps = 0, segments = 0;
  int64_t m = 0, bins = 0, bpad = 0;
  FftPlans plans;
  bool has_bias = false;
  std::vector<float> bias;
  FloatBuf hspec;            // [C][K][bpad]: segment k's spectrum, times 1 / m
  FloatBuf delay;            // [B][C][K][bpad]: spectra of the last K input blocks, a ring
  std::vector<float> carry;  // [B][C][block]: the previous block's output past its end
  int64_t ring = 0;          // slot of the newest block in the ring
  int64_t tokens = 0;
  bool ended = false;
};

LongConvStream::LongConvStream(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
LongConvStream::~LongConvStream() = default;

Status LongConvStream::Create(const TensorView& filter, const TensorView& bias, int64_t block,
                              int64_t batch, std::unique_ptr<LongConvStream>* out) try {
  if (out == nullptr) return Status::InvalidArgument(Expected("out", "non-null", "nullptr"));
  if (block < 1 || block > (int64_t{1} << 28)) {
    return Status::InvalidArgument(
        Expected("block", "a block length in [1, 2^28]", std::to_string(block)));
  }
  if (batch < 1) {
    return Status::InvalidArgument(Expected("batch", "a value >= 1", std::to_string(batch)));
  }
  if (filter.rank != 2) {
    return Status::InvalidArgument(
        Expected("filter", "rank 2 [L, C]", "rank " + std::to_string(filter.rank)));
  }
  const int64_t C = filter.shape[1];
  Status s =
      ValidateFilterAndBias("filter", filter, "bias", bias, C, std::numeric_limits<int64_t>::max());
  if (!s.ok()) return s;
  if (C < 1)
    return Status::InvalidArgument(Expected("filter", "C >= 1 channels", ShapeString(filter)));
  auto impl = std::make_unique<Impl>();
  Impl& st = *impl;
  st.block = block;
  st.batch = batch;
  st.channels = C;
  st.taps = filter.shape[0];
  st.segments = (st.taps + block - 1) / block;
  st.m = FastSize(2 * block);
  st.bins = st.m / 2 + 1;
  st.bpad = PaddedSpectrum(st.m);
  st.plans = GetPlans(st.m);
  st.has_bias = bias.data != nullptr;
  if (st.has_bias) {
    st.bias.resize(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c)
      st.bias[c] = static_cast<const float*>(bias.data)[c * bias.strides[0]];
  }
  const int64_t K = st.segments;
  st.hspec = FloatBuf(C * K * st.bpad);
  FloatBuf real(st.m);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < K; ++k) {
      FilterSpectrum(filter, c, k * block, std::min(block, st.taps - k * block), st.m, st.plans,
                     real.p, st.hspec.p + (c * K + k) * st.bpad);
    }
  }
  st.delay = FloatBuf(batch * C * K * st.bpad);
  st.carry.resize(static_cast<size_t>(batch * C * block));
  *out = std::unique_ptr<LongConvStream>(new LongConvStream(std::move(impl)));
  (*out)->Reset();
  return Status::Ok();
}
TESSERA_CATCH_ALL("LongConvStream::Create")

void LongConvStream::Reset() {
  Impl& st = *impl_;
  std::memset(st.delay.p, 0,
              sizeof(float) * static_cast<size_t>(st.batch * st.channels * st.segments * st.bpad));
  std::fill(st.carry.begin(), st.carry.end(), 0.0f);
  st.ring = 0;
  st.tokens = 0;
  st.ended = false;
}

int64_t LongConvStream::block() const { return impl_->block; }
int64_t LongConvStream::channels() const { return impl_->channels; }
int64_t LongConvStream::tokens_seen() const { return impl_->tokens; }
int64_t LongConvStream::state_bytes() const {
  const Impl& st = *impl_;
  return static_cast<int64_t>(sizeof(float)) *
         ((st.batch + 1) * st.channels * st.segments * st.bpad + st.batch * st.channels * st.block);
}

Status LongConvStream::Push(const TensorView& u, const TensorView& y, const Context& ctx) try {
  Impl& st = *impl_;
  const int64_t ushape[3] = {st.batch, -1, st.channels};
  Status s = CheckF32View(
      "u", u, 3, ushape,
      "shape [" + std::to_string(st.batch) + ", T, " + std::to_string(st.channels) + "]", false);
  if (!s.ok()) return s;
  const int64_t T = u.shape[1];
  if (T < 1 || T > st.block) {
    return Status::InvalidArgument(
        Expected("u", "T in [1, " + std::to_string(st.block) + "] tokens", ShapeString(u)));
  }
  const int64_t yshape[3] = {st.batch, T, st.channels};
  s = CheckF32View("y", y, 3, yshape, "shape " + Dims({st.batch, T, st.channels}) + " (of u)",
                   true);
  if (!s.ok()) return s;
  if (st.ended) {
    return Status::InvalidArgument(
        Expected("u", "no block after a short one (Reset first)",
                 "a block after " + std::to_string(st.tokens) + " tokens"));
  }
  s = ValidateThreads(ctx);
  if (!s.ok()) return s;
  s = CheckDisjoint({ViewRegion("y", y)}, {ViewRegion("u", u)});
  if (!s.ok()) return s;
  const int64_t C = st.channels, K = st.segments, m = st.m, bpad = st.bpad, Bt = st.block;
  const int64_t slot = st.tokens == 0 ? 0 : (st.ring + 1) % K;
  const int64_t g = GroupWidth(m, C), groups = (C + g - 1) / g;
  const int32_t threads = ResolveThreads(ctx);
  const int64_t mpad = PaddedReals(m);
  struct Scratch {
    FloatBuf real, acc;
  };
  std::vector<Scratch> scratch(static_cast<size_t>(threads));
  const float* up = static_cast<const float*>(u.data);
  float* yp = static_cast<float*>(y.data);
  ParallelFor(threads, st.batch * groups, [&](int64_t task, int32_t worker) {
    Scratch& sc = scratch[static_cast<size_t>(worker)];
    if (sc.real.p == nullptr) {
      sc.real = FloatBuf(g * mpad);
      sc.acc = FloatBuf(bpad);
    }
    const int64_t b = task / groups, c0 = task % groups * g, gw = std::min(g, C - c0);
    for (int64_t t = 0; t < T; ++t) {
      const float* row = up + b * u.strides[0] + t * u.strides[1] + c0 * u.strides[2];
      for (int64_t j = 0; j < gw; ++j) sc.real.p[j * mpad + t] = row[j * u.strides[2]];
    }
    for (int64_t j = 0; j < gw; ++j) {
      const int64_t c = c0 + j;
      float* col = sc.real.p + j * mpad;
      std::fill(col + T, col + m, 0.0f);
      float* ring = st.delay.p + (b * C + c) * K * bpad;
      fftwf_execute_dft_r2c(st.plans.r2c, col,
                            reinterpret_cast<fftwf_complex*>(ring + slot * bpad));
      // Output spectrum: sum over segments k of H_k times the input block k blocks back.
      const float* hs = st.hspec.p + c * K * bpad;
      for (int64_t k = 0; k < K; ++k) {
        MulSpectra(hs + k * bpad, ring + (slot - k + K) % K * bpad, sc.acc.p, st.bins, k > 0);
      }
      fftwf_execute_dft_c2r(st.plans.c2r, reinterpret_cast<fftwf_complex*>(sc.acc.p), col);
      float* carry = st.carry.data() + (b * C + c) * Bt;
      for (int64_t t = 0; t < T; ++t) col[t] += carry[t];
      for (int64_t t = 0; t < Bt; ++t) carry[t] = col[Bt + t];
    }
    for (int64_t t = 0; t < T; ++t) {
      float* row = yp + b * y.strides[0] + t * y.strides[1] + c0 * y.strides[2];
      const float* urow = up + b * u.strides[0] + t * u.strides[1] + c0 * u.strides[2];
      for (int64_t j = 0; j < gw; ++j) {
        float v = sc.real.p[j * mpad + t];
        if (st.has_bias) v += st.bias[c0 + j] * urow[j * u.strides[2]];
        row[j * y.strides[2]] = v;
      }
    }
  });
  st.ring = slot;
  st.tokens += T;
  if (T < Bt) st.ended = true;
  return Status::Ok();
}
TESSERA_CATCH_ALL("LongConvStream::Push")

}  // namespace tessera
#endif  // HWY_ONCE
