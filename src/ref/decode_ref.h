// SPDX-License-Identifier: Apache-2.0
// fp64 reference for decode (tessera/decode.h): scalar, materializing, obviously right. It reads
// the cache only through tessera::ReadKV (the dequantized cache, exactly as stored), so what it
// checks is the attention kernel, not the storage format.
#pragma once

#include "tessera/decode.h"

namespace tessera {
namespace ref {

struct DecodeRefOptions {
  // Quantized KV dtypes (int8 / int4) only, ignored otherwise: replace every query row of every
  // head by the query the integer kernels actually use, so that a comparison isolates the
  // kernel's error from the documented query quantization. With n[c] = k_channel_scales[h_kv][c]:
  //   q'[c] = q[c] * n[c] (float),  sigma = max_c |q'[c]| / 127 (float),
  //   q8[c] = nearbyint(q'[c] / sigma) (ties to even; sigma == 0: all 0),
  //   q~[c] = sigma * q8[c] / n[c]   (double; 0 where q8[c] == 0).
  // The softmax scale is not part of q': the kernels apply it after the integer dot product.
  bool quantize_query = false;
  // When set: probs[((b * Hq + h) * Q + i) * probs_keys + j] = p_ij, the final probability of key
  // j for query row i (0 for a masked key), for j < seq_lens[b]; later entries are left as is.
  double* probs = nullptr;
  int64_t probs_keys = 0;
};

// Decode in fp64 on the dequantized cache. For sequence b of kv.seq_lens[b] = len tokens, query
// row i of head h sits at position pos = len - Q + i and reads KV head h / (Hq / Hkv); logits are
// s = scale * q.k (scale default: the float nearest 1/sqrt(D)), then softcap (c * tanh(s / c)),
// then ALiBi (-slope * |pos - j|), then the mask (causal: j <= pos; window_left >= 0:
// j >= pos - window_left). Rows with no visible key get out 0 and lse -inf.
// `params` must be valid (Decode's validation passed); params.out and params.lse are ignored.
//   out  contiguous [B, Q, Hq, D]
//   lse  contiguous [B, Hq, Q], natural log; may be nullptr
// A sequence whose ReadKV fails gets NaN everywhere (the comparators reject a NaN reference).
void DecodeF64(const DecodeParams& params, double* out, double* lse);

// DecodeF64 with DecodeRefOptions::quantize_query set.
void DecodeF64QuantizedQuery(const DecodeParams& params, double* out, double* lse);

// DecodeF64 with explicit options. `magnitude` (optional, layout of out) receives
// sum_j p_ij |v_jd|, the magnitude of the terms behind each output element (the scale of the fp32
// relative-error rule, tests/tolerances.h), computed in the same pass.
void DecodeF64WithOptions(const DecodeParams& params, const DecodeRefOptions& options, double* out,
                          double* lse, double* magnitude = nullptr);

}  // namespace ref
}  // namespace tessera
