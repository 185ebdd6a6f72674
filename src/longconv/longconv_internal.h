// SPDX-License-Identifier: Apache-2.0
// Internal: what the long convolution (longconv.cc) shares with the layers built on it (h3.cc):
// FFTW plans and buffers, spectra, the path rule, validation helpers, and the validated
// convolution and its gradients on whole tensors.
#pragma once

#include <fftw3.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "tessera/longconv.h"

namespace tessera {
namespace longconv_detail {

// An fftwf_malloc'd float array (FFTW's alignment, as the plans were made on).
struct FloatBuf {
  float* p = nullptr;
  FloatBuf() = default;
  explicit FloatBuf(int64_t n);
  ~FloatBuf();
  FloatBuf(const FloatBuf&) = delete;
  FloatBuf& operator=(const FloatBuf&) = delete;
  FloatBuf(FloatBuf&& o) noexcept : p(o.p) { o.p = nullptr; }
  FloatBuf& operator=(FloatBuf&& o) noexcept;
};

// A pair of real transforms of size m (r2c, and c2r which destroys its input), made once per size
// for the life of the process; executed with FFTW's new-array functions from any thread.
struct FftPlans {
  fftwf_plan r2c = nullptr;
  fftwf_plan c2r = nullptr;
};
FftPlans GetPlans(int64_t m);

// Smallest even 2^a 3^b 5^c >= n (FFTW's fastest real sizes).
int64_t FastSize(int64_t n);
// Floats of a padded column of m reals and of a padded spectrum of m / 2 + 1 bins.
inline int64_t PaddedReals(int64_t m) { return (m + 15) / 16 * 16; }
inline int64_t PaddedSpectrum(int64_t m) { return (2 * (m / 2 + 1) + 15) / 16 * 16; }

// out (+)= a * b, or conj(a) * b, over `bins` complex values stored as float pairs.
void MulSpectra(const float* a, const float* b, float* out, int64_t bins, bool accumulate);
void MulConjSpectra(const float* a, const float* b, float* out, int64_t bins, bool accumulate);

// Spectrum of taps [first, first + taps) of column c of h ([L, C], strided), zero-padded to m,
// times 1 / m (the inverse transform's normalization folded in).
void FilterSpectrum(const TensorView& h, int64_t c, int64_t first, int64_t taps, int64_t m,
                    const FftPlans& plans, float* real, float* spec);

// The largest FFT the paths make.
constexpr int64_t kMaxFftSize = int64_t{1} << 30;

// kAuto's rule: the direct sum when its multiply-adds (N L - L (L - 1) / 2 per channel) are at
// most a measured factor times M log2 M for the FFT size M (docs/longconv.md), or the FFT would
// be too large.
bool UseDirect(int64_t n, int64_t l, LongConvPath path);

// One column: y[t] = sum_{s <= min(t, L - 1)} h[s] x[t - s] (causal), its transpose
// dx[t] = sum_{s < L, t + s < N} h[s] dy[t + s], and the filter's gradient
// dh[s] += sum_{t >= s} dy[t] x[t - s] for s < L. Contiguous arrays of N (h: L) floats.
void DirectColumn(const float* x, int64_t n, const float* h, int64_t l, float* y);
void DirectColumnTransposed(const float* dy, int64_t n, const float* h, int64_t l, float* dx);
void DirectColumnFilterGrad(const float* dy, const float* x, int64_t n, int64_t l, float* dh);

// Validation: an f32 view of the given rank and shape (-1: any extent).
Status CheckF32View(const char* name, const TensorView& t, int32_t rank, const int64_t* shape,
                    const std::string& what, bool writable);
std::string Dims(std::initializer_list<int64_t> dims);
// filter [L, C] f32 with 1 <= L <= max_len, bias [C] f32 if set.
Status ValidateFilterAndBias(const char* filter_name, const TensorView& filter,
                             const char* bias_name, const TensorView& bias, int64_t C,
                             int64_t max_len);

// ctx.num_threads >= 0 (0: the default), else InvalidArgument naming it.
Status ValidateThreads(const Context& ctx);

// LongConv1D and LongConv1DBackward after validation (non-empty), with `threads` workers.
void ConvolveValidated(const LongConvParams& p, int32_t threads);
void ConvolveBackwardValidated(const LongConvBackwardParams& p, int32_t threads);

}  // namespace longconv_detail
}  // namespace tessera
