// SPDX-License-Identifier: Apache-2.0
// tessera: long causal convolutions (H3, Hyena, FlashConv): one filter per channel, as long as
// the sequence.
//
//   y[b, t, c] = sum_{s = 0..min(t, L - 1)} h[s, c] * u[b, t - s, c]  (+ D[c] * u[b, t, c])
//
// Shapes (any strides, in elements):
//   u     [B, N, C]  f32
//   h     [L, C]     f32, 1 <= L <= N (a filter shorter than the sequence is zero past L)
//   bias  [C]        f32, optional: the skip term D (H3 / Hyena's "D u")
//   y     [B, N, C]  f32, written
//
// Two paths: the direct sum (O(N L) per channel, vectorized over channels), fastest for short
// filters, and the FFT path (FFTW single precision, real transforms of a fast size M >= N + L - 1;
// plans made once per size and shared by every thread). kAuto picks by the measured crossover
// (docs/longconv.md). LongConvStream is FlashConv's block form: the sequence in blocks, each
// block convolved by FFT and the contribution of earlier blocks carried in a state.
#pragma once

#include <cstdint>
#include <memory>

#include "tessera/context.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {

enum class LongConvPath : int32_t {
  kAuto = 0,  // direct below the crossover (docs/longconv.md), else FFT
  kDirect,    // the O(N L) sum
  kFft,       // FFT of size M >= N + L - 1
};

struct LongConvParams {
  TensorView u;       // [B, N, C] f32
  TensorView filter;  // [L, C] f32, 1 <= L <= N
  TensorView bias;    // [C] f32; data == nullptr: no skip term
  TensorView y;       // [B, N, C] f32, written
  LongConvPath path = LongConvPath::kAuto;
};

// Validates every argument before any work; on error nothing is written. Results are
// bitwise-identical across thread counts for a given path.
Status LongConv1D(const LongConvParams& params, const Context& ctx);

// The gradients of LongConv1D for the loss sum(dy * y): the transposed (anti-causal)
// convolution and the correlation of dy with u, by the same path rule as the forward.
//   du[b, t, c]   = sum_{s < L, t + s < N} h[s, c] dy[b, t + s, c]  (+ bias[c] dy[b, t, c])
//   dfilter[s, c] = sum_b sum_{t >= s} dy[b, t, c] u[b, t - s, c]
//   dbias[c]      = sum_b sum_t dy[b, t, c] u[b, t, c]
struct LongConvBackwardParams {
  LongConvParams forward;  // u, filter, bias and path of the forward; forward.y is not read
  TensorView dy;           // [B, N, C] f32
  TensorView du;           // [B, N, C] f32, written; data == nullptr: not computed
  TensorView dfilter;      // [L, C] f32, written; data == nullptr: not computed
  TensorView dbias;        // [C] f32, written (forward.bias set); data == nullptr: not computed
};

// Validates every argument before any work; on error nothing is written. Results are
// bitwise-identical across thread counts for a given path.
Status LongConv1DBackward(const LongConvBackwardParams& params, const Context& ctx);

// H3 (Hungry Hungry Hippos, Fu et al. 2023), the layer between its projections: q, k, v are the
// projected inputs, split into H heads of d channels (channel h * d + i of the model is head h,
// channel i). With K = k shifted by the shift SSM (a short causal convolution per channel),
//   K[b, t, h, i]     = sum_s shift_filter[s, h d + i] k[b, t - s, h, i] (+ shift_bias[h d + i] k)
//   S[b, t, h, i, j]  = sum_s ssm_filter[s, h] (K_i v_j)[b, t - s, h] (+ ssm_bias[h] K_i v_j)
//   out[b, t, h, j]   = sum_i q[b, t, h, i] S[b, t, h, i, j]
// i.e. the diagonal SSM (its kernel materialized, as FlashConv takes it) runs on the d x d outer
// products K_t v_t^T of each head and q reads the result out. d = 1 is the paper's default.
// Shapes (any strides, in elements; f32):
//   q, k, v, out   [B, N, H, d]
//   shift_filter   [Ls, H d], 1 <= Ls <= N;  shift_bias [H d], optional
//   ssm_filter     [L, H],    1 <= L <= N;   ssm_bias   [H],   optional
struct H3Params {
  TensorView q;
  TensorView k;
  TensorView v;
  TensorView shift_filter;
  TensorView shift_bias;  // data == nullptr: none
  TensorView ssm_filter;
  TensorView ssm_bias;                      // data == nullptr: none
  TensorView out;                           // written
  LongConvPath path = LongConvPath::kAuto;  // for both convolutions
};

// Validates every argument before any work; on error nothing is written. Work O(B H d^2 M log M)
// for the FFT size M >= N + L - 1 (direct sums for filters short enough, as LongConv1D's kAuto),
// memory O(B N H d) (the shifted keys) plus O(d N) per thread; bitwise-identical across thread
// counts.
Status H3Layer(const H3Params& params, const Context& ctx);

// The gradients of H3Layer for the loss sum(dout * out). Each output is optional (data ==
// nullptr: not computed); the filter and bias gradients are summed over the batch.
struct H3BackwardParams {
  H3Params forward;                       // forward.out is not read
  TensorView dout;                        // [B, N, H, d]
  TensorView dq, dk, dv;                  // [B, N, H, d], written
  TensorView dshift_filter, dshift_bias;  // like shift_filter, shift_bias
  TensorView dssm_filter, dssm_bias;      // like ssm_filter, ssm_bias
};

Status H3LayerBackward(const H3BackwardParams& params, const Context& ctx);

// A diagonal state-space model per channel (S4D; H3's diagonal SSM), discretized: n complex
// modes for each channel c,
//   x_t[c, m] = a[c, m] x_{t-1}[c, m] + b[c, m] u_t[c]
//   y_t[c]    = Re(sum_m w[c, m] x_t[c, m]) + skip[c] u_t[c]
// i.e. the long convolution with the kernel h[s, c] = Re(sum_m w[c, m] a[c, m]^s b[c, m]) and
// bias `skip`, run as a recurrence whose only memory is the state x: the state-passing form of
// FlashConv, for streams of any length and for decode. Complex values are f32 pairs (re, im) in a
// last dim of 2. Shapes (any strides):
//   a, b, w  [C, n, 2]  f32; |a| <= 1 (a stable model), every value finite
//   skip     [C]        f32, optional
struct DiagonalSsmParams {
  TensorView a;
  TensorView b;
  TensorView w;
  TensorView skip;  // data == nullptr: none
};

// Writes filter [L, C] f32 (any L >= 1): h[s, c] above, computed in fp64. For LongConv1D,
// LongConvStream and H3Layer, which take the kernel materialized.
Status DiagonalSsmKernel(const DiagonalSsmParams& ssm, const TensorView& filter,
                         const Context& ctx);

// The recurrence over u [B, T, C] f32 (T >= 1; T = 1 is a decode step), y [B, T, C] written.
// state [B, C, n, 2] f32, optional: read as x before the first token and overwritten with x after
// the last (data == nullptr: starts from zero, not written). Calls chained through the state
// equal one call over the concatenated tokens, and equal LongConv1D with DiagonalSsmKernel's
// filter (L = the whole length) and bias skip, to rounding. Work O(B T C n), memory the state
// alone; results bitwise-identical across thread counts.
struct DiagonalSsmScanParams {
  DiagonalSsmParams ssm;
  TensorView u;
  TensorView y;
  TensorView state;
};

Status DiagonalSsmScan(const DiagonalSsmScanParams& params, const Context& ctx);

// FlashConv's block form: the sequence is pushed in blocks of `block` tokens, and each block's
// output is its in-block convolution plus the contribution of every earlier block. The filter is
// cut into K = ceil(L / block) segments of `block` taps; the stream keeps the spectra of the
// last K input blocks (a frequency-domain delay line) and the second half of the previous
// block's output (the overlap-add carry). State per (batch, channel): (K + 1) * (block + 1)
// complex values plus `block` floats, i.e. about 2 (L + block) floats: bounded by the filter,
// independent of the sequence length. With L <= block, K = 1: one block of carry.
class LongConvStream {
 public:
  // filter [L, C] f32 and bias [C] f32 (optional) are copied: the views need not outlive the
  // call. block: tokens per block, >= 1. batch: B of every pushed block.
  static Status Create(const TensorView& filter, const TensorView& bias, int64_t block,
                       int64_t batch, std::unique_ptr<LongConvStream>* out);
  ~LongConvStream();
  LongConvStream(const LongConvStream&) = delete;
  LongConvStream& operator=(const LongConvStream&) = delete;

  // Convolves the next T tokens: u [B, T, C] f32, y [B, T, C] f32 written, 1 <= T <= block. A
  // block shorter than `block` ends the stream (later pushes are refused until Reset). The
  // results match LongConv1D over the concatenated blocks to FFT rounding.
  Status Push(const TensorView& u, const TensorView& y, const Context& ctx);
  // Forgets every earlier block (a new sequence).
  void Reset();

  int64_t block() const;
  int64_t channels() const;
  int64_t tokens_seen() const;
  // Bytes of state (delay line, carry and filter spectra) this stream holds.
  int64_t state_bytes() const;

 private:
  struct Impl;
  explicit LongConvStream(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tessera
