// SPDX-License-Identifier: Apache-2.0
// Internal: a LinearAttentionParams after validation, normalized to rank-4 strided views and
// resolved options, shared by the chunked, recurrent and backward kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "tessera/linear.h"

namespace tessera {

struct LinearProblem {
  int64_t batch = 0, seq = 0, heads_q = 0, heads_kv = 0, group = 1;
  int64_t dk = 0, dv = 0, feat = 0;  // feat = F, the feature dim of phi
  DType dtype = DType::kF32;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  int64_t q_stride[4] = {0, 0, 0, 0}, k_stride[4] = {0, 0, 0, 0}, v_stride[4] = {0, 0, 0, 0},
          out_stride[4] = {0, 0, 0, 0};

  LinearFeatureMap map = LinearFeatureMap::kIdentity;
  float scale = 1.0f;
  bool causal = true;
  int64_t prefix = 0;  // keys [0, prefix) visible to every query (non-causal: prefix = seq)
  bool normalize = false;
  float eps = 1e-6f;
  const float* decay = nullptr;  // lambda per query head
  int64_t decay_stride = 0;
  const float* gates = nullptr;            // [b, t, h, c] log-space
  int64_t gates_stride[4] = {0, 0, 0, 0};  // scalar gates: channel stride 0
  bool scalar_gates = false;               // one gate per (b, t, h) shared by every channel
  int64_t window = 0;
  const float* lrpe_theta = nullptr;  // [h, f] (stride 0 over heads for a shared [Dk]); or off
  int64_t lrpe_theta_stride[2] = {0, 0};
  int64_t position_offset = 0;
  const float* state_in = nullptr;  // [b, h, f, d]
  int64_t state_in_stride[4] = {0, 0, 0, 0};
  const float* norm_in = nullptr;  // [b, h, f]
  int64_t norm_in_stride[3] = {0, 0, 0};
  float* state_out = nullptr;
  int64_t state_out_stride[4] = {0, 0, 0, 0};
  float* norm_out = nullptr;
  int64_t norm_out_stride[3] = {0, 0, 0};
  int64_t chunk = 64;

  int64_t offset(const int64_t* s, int64_t b, int64_t t, int64_t h) const {
    return b * s[0] + t * s[1] + h * s[2];
  }
};

struct LinearBackwardProblem {
  LinearProblem fwd;  // state_out / norm_out: none (the backward ignores forward.final_state)
  const void* dout = nullptr;
  void* dq = nullptr;  // each gradient output: nullptr = not computed
  void* dk = nullptr;
  void* dv = nullptr;
  float* dgates = nullptr;
  int64_t dout_stride[4] = {0, 0, 0, 0}, dq_stride[4] = {0, 0, 0, 0}, dk_stride[4] = {0, 0, 0, 0},
          dv_stride[4] = {0, 0, 0, 0}, dgates_stride[4] = {0, 0, 0, 0};  // scalar gates: rank 3
  // Gradients of the final state (inputs) and of the initial state (outputs), [b, h, f, d] and
  // [b, h, f], in the API's feature basis like the states.
  const float* d_state_in = nullptr;
  const float* d_norm_in = nullptr;
  float* d_state_out = nullptr;
  float* d_norm_out = nullptr;
  int64_t d_state_in_stride[4] = {0, 0, 0, 0}, d_state_out_stride[4] = {0, 0, 0, 0};
  int64_t d_norm_in_stride[3] = {0, 0, 0}, d_norm_out_stride[3] = {0, 0, 0};
};

// 1 / (den + eps) of a normalized row. With features of both signs (identity, Taylor) den can be
// exactly -eps: that row has no finite normalization, so its output (and gradient) is non-finite
// as in the math, through an infinite reciprocal rather than a division by zero.
inline float NormalizerReciprocal(float den, float eps) {
  const float sum = den + eps;
  return sum != 0.0f ? 1.0f / sum : std::copysign(std::numeric_limits<float>::infinity(), sum);
}

// Validates `params` and fills `problem`; kInvalidArgument naming the argument, what was expected
// and what was given. Writes nothing else. with_out = false: params.out is not checked and may be
// unset (the backward, which does not read it; a state-only forward).
Status ValidateLinearAttention(const LinearAttentionParams& params, LinearProblem* problem,
                               bool with_out = true);
Status ValidateLinearAttentionBackward(const LinearAttentionBackwardParams& params,
                                       LinearBackwardProblem* problem);

}  // namespace tessera
