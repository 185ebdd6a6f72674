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

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <fftw3.h>

#include <cmath>
#include <complex>
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
#include "tessera/longconv.h"

namespace tessera {

HWY_EXPORT(DirectRows);

namespace {

// kAuto: the direct sum when its multiply-adds, N L - L (L - 1) / 2 per channel, are at most
// kFftCostFactor * M log2(M) (M the FFT size). Measured on this project's Xeon: docs/longconv.md.
constexpr double kFftCostFactor = 20.0;
// Rows per task of the direct path.
constexpr int64_t kDirectTaskRows = 64;
// Floats of input gathered per task of the FFT paths (channel groups of up to 16 columns: a
// cache line of f32 channels read once per group).
constexpr int64_t kGatherFloats = int64_t{1} << 21;
constexpr int64_t kMaxGroup = 16;

// ---- FFTW ---------------------------------------------------------------------------------

struct FloatBuf {
  float* p = nullptr;
  FloatBuf() = default;
  explicit FloatBuf(int64_t n) {
    p = static_cast<float*>(
        fftwf_malloc(sizeof(float) * static_cast<size_t>(std::max<int64_t>(n, 1))));
    if (p == nullptr) throw std::bad_alloc();
  }
  ~FloatBuf() { fftwf_free(p); }
  FloatBuf(const FloatBuf&) = delete;
  FloatBuf& operator=(const FloatBuf&) = delete;
  FloatBuf(FloatBuf&& o) noexcept : p(o.p) { o.p = nullptr; }
  FloatBuf& operator=(FloatBuf&& o) noexcept {
    std::swap(p, o.p);
    return *this;
  }
};

// A pair of real transforms of size m, out of place, planned on fftwf_malloc'd arrays; executed
// with the new-array functions on other fftwf_malloc'd arrays (the same alignment), which FFTW
// allows from any thread at once. Planning is not thread-safe: one mutex guards the cache.
struct FftPlans {
  fftwf_plan r2c = nullptr;
  fftwf_plan c2r = nullptr;
};

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

// Smallest 2^a 3^b 5^c >= n, even (FFTW's fastest real sizes).
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

// acc (+)= a * b over `bins` complex values, as interleaved float pairs.
void MulSpectra(const float* a, const float* b, float* out, int64_t bins, bool accumulate) {
  for (int64_t k = 0; k < bins; ++k) {
    const float ar = a[2 * k], ai = a[2 * k + 1], br = b[2 * k], bi = b[2 * k + 1];
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

// Spectrum of h[0..taps) of channel c (strided view [L, C]) from tap `first`, zero-padded to m,
// times 1 / m (the inverse transform's normalization folded in).
void FilterSpectrum(const TensorView& h, int64_t c, int64_t first, int64_t taps, int64_t m,
                    const FftPlans& plans, float* real, float* spec) {
  const float* hp = static_cast<const float*>(h.data);
  const float inv = 1.0f / static_cast<float>(m);
  for (int64_t s = 0; s < taps; ++s)
    real[s] = hp[(first + s) * h.strides[0] + c * h.strides[1]] * inv;
  std::fill(real + taps, real + m, 0.0f);
  fftwf_execute_dft_r2c(plans.r2c, real, reinterpret_cast<fftwf_complex*>(spec));
}

int64_t GroupWidth(int64_t m, int64_t channels) {
  int64_t g = kMaxGroup;
  while (g > 1 && g * m > kGatherFloats) g /= 2;
  return std::min(g, std::max<int64_t>(channels, 1));
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

Status ValidateFilterAndBias(const TensorView& filter, const TensorView& bias, int64_t C,
                             int64_t max_len) {
  const int64_t fshape[2] = {-1, C};
  Status s =
      CheckF32View("filter", filter, 2, fshape, "shape [L, " + std::to_string(C) + "]", false);
  if (!s.ok()) return s;
  const int64_t L = filter.shape[0];
  if (L < 1 || L > max_len) {
    return Status::InvalidArgument(Expected(
        "filter", "a length L in [1, " + std::to_string(max_len) + "]", ShapeString(filter)));
  }
  if (bias.data != nullptr) {
    const int64_t bshape[1] = {C};
    s = CheckF32View("bias", bias, 1, bshape, "shape " + Dims({C}), false);
    if (!s.ok()) return s;
  }
  return Status::Ok();
}

// ---- the one-shot paths -------------------------------------------------------------------

double DirectCost(int64_t n, int64_t l) {
  return static_cast<double>(n) * l - 0.5 * static_cast<double>(l) * (l - 1);
}

// Adds bias[c] u[b, t, c] to y (both already offset to batch b), rows [t0, t1).
void AddBias(const LongConvParams& p, int64_t b, int64_t t0, int64_t t1, int64_t c0, int64_t c1) {
  if (p.bias.data == nullptr) return;
  const float* u = static_cast<const float*>(p.u.data);
  const float* d = static_cast<const float*>(p.bias.data);
  float* y = static_cast<float*>(p.y.data);
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t c = c0; c < c1; ++c) {
      y[b * p.y.strides[0] + t * p.y.strides[1] + c * p.y.strides[2]] +=
          d[c * p.bias.strides[0]] *
          u[b * p.u.strides[0] + t * p.u.strides[1] + c * p.u.strides[2]];
    }
  }
}

void RunDirect(const LongConvParams& p, int32_t threads) {
  const int64_t B = p.u.shape[0], N = p.u.shape[1], C = p.u.shape[2], L = p.filter.shape[0];
  // The kernel wants unit channel strides and a contiguous filter: pack what is not.
  std::vector<float> hpack(static_cast<size_t>(L * C));
  const float* hf = static_cast<const float*>(p.filter.data);
  for (int64_t s = 0; s < L; ++s) {
    for (int64_t c = 0; c < C; ++c)
      hpack[s * C + c] = hf[s * p.filter.strides[0] + c * p.filter.strides[1]];
  }
  const bool u_unit = p.u.strides[2] == 1 || C == 1;
  const bool y_unit = p.y.strides[2] == 1 || C == 1;
  std::vector<float> upack, ypack;
  if (!u_unit) {
    upack.resize(static_cast<size_t>(B * N * C));
    const float* uf = static_cast<const float*>(p.u.data);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = 0; t < N; ++t) {
        for (int64_t c = 0; c < C; ++c) {
          upack[(b * N + t) * C + c] =
              uf[b * p.u.strides[0] + t * p.u.strides[1] + c * p.u.strides[2]];
        }
      }
    }
  }
  if (!y_unit) ypack.resize(static_cast<size_t>(B * N * C));
  const float* ub = u_unit ? static_cast<const float*>(p.u.data) : upack.data();
  const int64_t su_b = u_unit ? p.u.strides[0] : N * C, su = u_unit ? p.u.strides[1] : C;
  float* yb = y_unit ? static_cast<float*>(p.y.data) : ypack.data();
  const int64_t sy_b = y_unit ? p.y.strides[0] : N * C, sy = y_unit ? p.y.strides[1] : C;
  const int64_t row_tasks = (N + kDirectTaskRows - 1) / kDirectTaskRows;
  ParallelFor(threads, B * row_tasks, [&](int64_t task, int32_t) {
    const int64_t b = task / row_tasks, t0 = task % row_tasks * kDirectTaskRows;
    const int64_t rows = std::min(kDirectTaskRows, N - t0);
    HWY_DYNAMIC_DISPATCH(DirectRows)
    (ub + b * su_b, su, hpack.data(), L, C, yb + b * sy_b, sy, t0, rows);
    if (!y_unit) {
      float* y = static_cast<float*>(p.y.data);
      for (int64_t t = t0; t < t0 + rows; ++t) {
        for (int64_t c = 0; c < C; ++c) {
          y[b * p.y.strides[0] + t * p.y.strides[1] + c * p.y.strides[2]] =
              ypack[(b * N + t) * C + c];
        }
      }
    }
    AddBias(p, b, t0, t0 + rows, 0, C);
  });
}

void RunFft(const LongConvParams& p, int32_t threads) {
  const int64_t B = p.u.shape[0], N = p.u.shape[1], C = p.u.shape[2], L = p.filter.shape[0];
  const int64_t m = FastSize(N + L - 1), bins = m / 2 + 1;
  const FftPlans plans = GetPlans(m);
  const int64_t g = GroupWidth(m, C), groups = (C + g - 1) / g;
  const float* u = static_cast<const float*>(p.u.data);
  float* y = static_cast<float*>(p.y.data);
  // Per worker: g real columns, g filter spectra and one input spectrum.
  struct Scratch {
    FloatBuf real, hspec, uspec;
  };
  std::vector<Scratch> scratch(static_cast<size_t>(threads));
  const int64_t mpad = (m + 15) / 16 * 16, bpad = (2 * bins + 15) / 16 * 16;
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
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = 0; t < N; ++t) {
        const float* row = u + b * p.u.strides[0] + t * p.u.strides[1] + c0 * p.u.strides[2];
        for (int64_t j = 0; j < gw; ++j) sc.real.p[j * mpad + t] = row[j * p.u.strides[2]];
      }
      for (int64_t j = 0; j < gw; ++j) {
        float* col = sc.real.p + j * mpad;
        std::fill(col + N, col + m, 0.0f);
        auto* spec = reinterpret_cast<fftwf_complex*>(sc.uspec.p);
        fftwf_execute_dft_r2c(plans.r2c, col, spec);
        MulSpectra(sc.uspec.p, sc.hspec.p + j * bpad, sc.uspec.p, bins, false);
        fftwf_execute_dft_c2r(plans.c2r, spec, col);
      }
      for (int64_t t = 0; t < N; ++t) {
        float* row = y + b * p.y.strides[0] + t * p.y.strides[1] + c0 * p.y.strides[2];
        for (int64_t j = 0; j < gw; ++j) row[j * p.y.strides[2]] = sc.real.p[j * mpad + t];
      }
      AddBias(p, b, 0, N, c0, c0 + gw);
    }
  });
}

}  // namespace

Status LongConv1D(const LongConvParams& p, const Context& ctx) try {
  const int64_t any3[3] = {-1, -1, -1};
  Status s = CheckF32View("u", p.u, 3, any3, "rank 3 [B, N, C]", false);
  if (!s.ok()) return s;
  const int64_t B = p.u.shape[0], N = p.u.shape[1], C = p.u.shape[2];
  if (N < 1) {
    return Status::InvalidArgument(Expected("u", "a sequence length N >= 1", ShapeString(p.u)));
  }
  s = ValidateFilterAndBias(p.filter, p.bias, C, N);
  if (!s.ok()) return s;
  const int64_t yshape[3] = {B, N, C};
  s = CheckF32View("y", p.y, 3, yshape, "shape " + Dims({B, N, C}) + " (the shape of u)", true);
  if (!s.ok()) return s;
  if (p.path != LongConvPath::kAuto && p.path != LongConvPath::kDirect &&
      p.path != LongConvPath::kFft) {
    return Status::InvalidArgument(
        Expected("path", "kAuto, kDirect or kFft", std::to_string(static_cast<int>(p.path))));
  }
  if (ctx.num_threads < 0) {
    return Status::InvalidArgument(
        Expected("ctx.num_threads", "a value >= 0", std::to_string(ctx.num_threads)));
  }
  s = CheckDisjoint({ViewRegion("y", p.y)}, {ViewRegion("u", p.u), ViewRegion("filter", p.filter),
                                             ViewRegion("bias", p.bias)});
  if (!s.ok()) return s;
  if (p.y.numel() == 0) return Status::Ok();
  const int64_t L = p.filter.shape[0];
  if (p.path == LongConvPath::kFft && N + L - 1 > (int64_t{1} << 30)) {
    return Status::InvalidArgument(
        Expected("u", "N + L - 1 <= 2^30 for the FFT path", std::to_string(N + L - 1)));
  }
  bool direct = p.path == LongConvPath::kDirect;
  if (p.path == LongConvPath::kAuto) {
    const double m = static_cast<double>(FastSize(N + L - 1));
    direct =
        DirectCost(N, L) <= kFftCostFactor * m * std::log2(m) || N + L - 1 > (int64_t{1} << 30);
  }
  const int32_t threads = ResolveThreads(ctx);
  if (direct) {
    RunDirect(p, threads);
  } else {
    RunFft(p, threads);
  }
  return Status::Ok();
}
TESSERA_CATCH_ALL("LongConv1D")

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
  Status s = ValidateFilterAndBias(filter, bias, C, std::numeric_limits<int64_t>::max());
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
  st.bpad = (2 * st.bins + 15) / 16 * 16;
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
  if (ctx.num_threads < 0) {
    return Status::InvalidArgument(
        Expected("ctx.num_threads", "a value >= 0", std::to_string(ctx.num_threads)));
  }
  s = CheckDisjoint({ViewRegion("y", y)}, {ViewRegion("u", u)});
  if (!s.ok()) return s;
  const int64_t C = st.channels, K = st.segments, m = st.m, bpad = st.bpad, Bt = st.block;
  const int64_t slot = st.tokens == 0 ? 0 : (st.ring + 1) % K;
  const int64_t g = GroupWidth(m, C), groups = (C + g - 1) / g;
  const int32_t threads = ResolveThreads(ctx);
  const int64_t mpad = (m + 15) / 16 * 16;
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
