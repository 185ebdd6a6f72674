// SPDX-License-Identifier: Apache-2.0
// The naive same-precision attention: the materialized forward and its autograd evaluated in the
// input precision, the baseline of the ratio rule (comparator.h), and the magnitudes that scale
// the fp32 relative-error rule of gradients.
#pragma once

#include "tessera/attention.h"

namespace tessera {
namespace test {

// The materialized algorithm evaluated in the input precision (params.q.dtype), with another
// operation order than the kernels: K is scaled instead of Q, S and P are rounded to the dtype,
// P is normalized before P.V, and the output is rounded to the dtype (the FlashAttention tests'
// reorder_ops reference). Accumulation is f32. Same conventions, inputs and output layouts as
// ref::AttentionForwardF64; lse is the f32 value computed from the rounded scores.
void AttentionForwardNaive(const AttentionParams& params, double* out, double* lse);

// The naive same-precision backward: the autograd of the materialized forward above, evaluated
// in the input precision with f32 accumulation, every intermediate (S, P, O, dP, dS, per-head
// dK/dV) rounded to the dtype, and another operation order than the kernels: K is scaled instead
// of Q, D_i = sum_j P_ij dP_ij from the rounded P and dP (the kernels use rowsum(dO * O)), and the
// softcap derivative is 1 - t^2 with the rounded t = tanh(u / c). Reads params.forward's inputs
// and options and params.dout (out and lse are ignored); writes dq, dk, dv rounded to the dtype,
// in the layouts and with the conventions of ref::AttentionBackwardF64.
void AttentionBackwardNaive(const AttentionBackwardParams& params, double* dq, double* dk,
                            double* dv);

// The magnitude of the terms behind each gradient element, in fp64 (the scale of the f32
// relative-error rule, as `magnitude` is for outputs): with a_ij = sum_d |dO_id| |v_jd|,
// A_i = sum_j P_ij a_ij and m_ij = P_ij (a_ij + A_i) |ds/du|_ij (a bound on |dS_ij|),
//   dq_id = |scale| sum_j m_ij |k_jd|,  dk_jd = |scale| sum_i m_ij |q_id|,
//   dv_jd = sum_i P_ij |dO_id|
// (dk, dv summed over the GQA group). Same layouts and conventions as ref::AttentionBackwardF64.
void AttentionBackwardMagnitude(const AttentionBackwardParams& params, double* dq, double* dk,
                                double* dv);

}  // namespace test
}  // namespace tessera
