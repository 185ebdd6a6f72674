// SPDX-License-Identifier: Apache-2.0
// Every numerical threshold the tests use, in one place. A test never writes a tolerance literal
// of its own: it picks a rule here, so that loosening a rule is one reviewed edit, not a
// scattered search.
//
// Notation: err(x) = max over elements of |x - ref64|; NMSE(a, b) = sum (a - b)^2 / sum b^2.
#pragma once

#include "tessera/types.h"

namespace tessera {
namespace test {

// Ratio rule, forward with bf16/f16 inputs: err(kernel) <= kForwardRatio * err(naive) + floor,
// where `naive` is the materialized algorithm evaluated in the input precision.
// Where the naive computation itself overflows (class 4 inputs in f16), it bounds nothing and
// the output ceiling of the dtype applies instead.
inline constexpr double kForwardRatio = 2.0;

// Ratio rule for gradients (bf16/f16): err(dX) <= kGradRatio * err(naive dX) + floor_g, plus
// kGradSoftcapExtra when softcap is on.
inline constexpr double kGradRatio = 3.0;
inline constexpr double kGradSoftcapExtra = 3e-4;

// Noise floor: floor = kNoiseFloorFactor * max |(ref + s - s) - ref| with s = kNoiseFloorShift,
// evaluated in the output dtype: the rounding of one add/sub at the reference's magnitude. It
// keeps the ratio rule meaningful where the naive error happens to be 0. It is never below one
// ulp of the largest |ref| (when 0.3 is under one ulp the literal formula collapses to 0).
inline constexpr double kNoiseFloorFactor = 2.0;
inline constexpr double kNoiseFloorShift = 0.3;

// Element-wise ceiling |x - ref| <= atol + rtol * |ref|.
struct Ceiling {
  double atol;
  double rtol;
};

// Absolute ceilings on outputs (applied together with the ratio rule).
inline constexpr Ceiling kOutputCeilingF32 = {1e-5, 5e-6};
inline constexpr Ceiling kOutputCeilingBF16 = {5e-2, 5e-2};
inline constexpr Ceiling kOutputCeilingF16 = {1e-2, 1e-2};

inline Ceiling OutputCeiling(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return kOutputCeilingF32;
    case DType::kBF16:
      return kOutputCeilingBF16;
    case DType::kF16:
      return kOutputCeilingF16;
    default:  // mask dtypes carry no attention output
      break;
  }
  return kOutputCeilingF32;
}

// Absolute ceilings on gradients.
inline constexpr Ceiling kGradCeilingF32 = {1.25e-5, 5.25e-6};
inline constexpr Ceiling kGradCeilingBF16 = {5e-2, 5e-2};
inline constexpr Ceiling kGradCeilingBF16Gqa = {1e-1, 1e-1};
inline constexpr Ceiling kGradCeilingF16 = {1e-1, 1e-1};

// The fp64 backward reference against fp64 central finite differences of the fp64 forward
// reference (Richardson-extrapolated steps 2^-8 and 2^-9 on exactly representable inputs, tiny
// shapes): truncation and rounding leave ~1e-10, so this ceiling only admits the method's error.
inline constexpr Ceiling kFiniteDifferenceCeiling = {1e-8, 1e-7};

// End-to-end training (tests/training_test.cc): the per-step loss of a tiny model trained with
// the kernels against the same model trained with the fp64 reference path, relative difference.
inline constexpr double kTrainingLossRelTol = 1e-6;

// Attention statistics (AttentionStats, DecodeStats) against fp64: probabilities computed in
// fp32 from the same rounded inputs, p = exp(s - lse), carry the fp32 error of the score and of
// the kernel's LSE, ~1e-6 relative; sums over a window of rows add fp32 rounding. The entropy
// sums p (lse - s) over every key.
inline constexpr Ceiling kStatsCeiling = {1e-6, 5e-5};
inline constexpr Ceiling kEntropyCeiling = {5e-5, 5e-5};
// fp32 inputs with fp32 accumulation: additionally NMSE <= kF32MaxNmse against fp64, and an
// element-wise relative error <= kF32MaxRelErr wherever the magnitude > kF32RelErrMinMagnitude.
//
// The magnitude of out[i, d] is sum_j p_ij |v_jd| (>= |ref|): the size of the terms the kernel
// sums, which is what fp32 rounding scales with. Taken literally against |ref| the rule fails
// any honest fp32 implementation on random data: an output that cancels to |ref| ~ 1e-3 from
// terms of size ~1 carries ~1e-7 absolute error, i.e. ~1e-4 relative (measured: the naive fp32
// computation reaches 5.6e-4 that way, but stays <= 1.3e-6 relative to the magnitude).
inline constexpr double kF32MaxNmse = 1e-9;
inline constexpr double kF32MaxRelErr = 1e-5;
inline constexpr double kF32RelErrMinMagnitude = 1e-3;

// Quantized or mixed KV types: NMSE against the fp64 reference on the dequantized K/V.
inline constexpr double kQuantKvMaxNmse = 5e-4;

// Quantized V: on VNNI targets decode rounds each 32-key tile's P.V weights p_j * step_j to 15-bit
// integers per query row (src/decode/decode_pv-inl.h, PvCodesVnni), which adds at most
// 32 x (largest code) / (2 x 32767) of the largest V quantization step n_c * step_j to an output
// element: 0.125 steps for int8 (codes <= 255), 0.0073 for int4 (<= 15). Against the fp64
// reference fed the kernel's quantized query, quantized-cache outputs must stay within the fp32
// ceiling plus that many steps.
inline constexpr double kQuantPvStepFractionInt8 = 32.0 * 255.0 / (2.0 * 32767.0);
inline constexpr double kQuantPvStepFractionInt4 = 32.0 * 15.0 / (2.0 * 32767.0);

// LSE (always f32, natural log). The rules above say nothing of the LSE; this is tessera's choice:
// the LSE is computed in fp32 from exactly upcast inputs whatever the input dtype, so it gets an
// fp32-class ceiling. Its relative part scales with |LSE|, which tracks the logit magnitude, the
// quantity that bounds the fp32 error of the dot products feeding it.
inline constexpr Ceiling kLseCeiling = {1e-5, 1e-5};

// Linear attention, f32 kernels against the fp64 parallel form: |x - ref| <= atol * max|ref| +
// rtol * |ref|. The absolute part is relative to the largest output because an unnormalized
// output is a sum of S terms whose cancellation leaves small entries with the rounding of the
// large ones (chunked and recurrent forms sum in different orders).
inline constexpr Ceiling kLinearCeilingF32 = {2e-5, 1e-4};

// Two fp64 evaluations of the same value in different orders (parallel against recurrent, one
// call against two): only rounding separates them.
inline constexpr Ceiling kLinearFp64Agreement = {1e-11, 1e-10};
// A state handed from one call to the next through an f32 tensor: the f32 rounding of the state.
inline constexpr Ceiling kLinearF32StateHandover = {1e-6, 1e-6};
// Chunked against recurrent f32 linear attention over 2^20 tokens with a decay: two f32 summation
// orders of a state that is rescaled a million times, relative to 1 + |recurrent|.
inline constexpr double kLinearLongRunRelTol = 1e-3;

// Random-feature estimators (src/approx: Performer, WERSA). Unbiasedness: the mean over seeds of
// an estimate lies within this many standard errors of the mean of its expectation. The error
// rate: error(m_small) / error(m_large) >= sqrt(m_large / m_small) / kRootMRateSlack.
inline constexpr double kMonteCarloSigmas = 4.0;
inline constexpr double kRootMRateSlack = 2.0;

// Identities between two runs of the library that are not promised bitwise (GQA vs repeated
// K/V, window >= S vs causal, split + merge vs one pass): the output ceiling of the dtype,
// measured against the other run instead of fp64.
inline Ceiling IdentityCeiling(DType dtype) { return OutputCeiling(dtype); }

}  // namespace test
}  // namespace tessera
