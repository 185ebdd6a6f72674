// SPDX-License-Identifier: Apache-2.0
// tessera: linear-time attention, one chunked engine (Lightning Attention-2's tiling) for plain,
// decayed (RetNet, TransNormerLLM / Lightning Attention) and gated (GLA) linear attention and
// BASED, with a recurrent form for decode.
//
// The unnormalized causal form, for query t of head h (GQA: K/V head h / (Hq / Hkv)):
//   o_t = sum_{s <= t} decay(t, s) * scale * phi(q_t) . phi(k_s) * v_s
// with decay(t, s) = 1 (plain), lambda_h^(t - s) (decay) or, per feature channel c,
// exp(sum_{r = s+1..t} g_{r,c}) (GLA, gates g <= 0 in log space; with scalar gates, one g_r per
// token and head shared by every channel). With `normalize`, o_t is divided
// by the same sum without v (plus eps): sum_{s <= t} decay(t, s) * scale * phi(q_t) . phi(k_s).
// Non-causal: every s in [0, S). Prefix (JRT): keys s < prefix_len are visible to every query,
// keys s >= prefix_len causally (plain form only: no decay, no gates).
//
// Three forms compute it and agree (tests): the parallel form (materialized, fp64, the oracle in
// src/ref), the chunked form (LinearAttentionForward: inside a chunk of C tokens a masked C x C
// product, across chunks a F x Dv state carried forward) and the recurrent form
// (LinearAttentionRecurrent: one token at a time with an O(1) state, for decode).
//
// Shapes (default layout [batch, seq, heads, dim]; any strides, in elements):
//   q     [B, S, Hq, Dk]     f32, bf16 or f16
//   k     [B, S, Hkv, Dk]    dtype of q; Hq % Hkv == 0
//   v     [B, S, Hkv, Dv]    dtype of q
//   out   [B, S, Hq, Dv]     dtype of q, written (LinearAttentionForward: optional, see below)
// F = LinearFeatureDim(feature_map, Dk) is the feature dim of phi (Dk, or 1 + Dk + Dk^2 for the
// Taylor map). States are f32: state [B, Hq, F, Dv] = sum_s decay * phi(k_s) v_s^T and, with
// normalize, normalizer [B, Hq, F] = sum_s decay * phi(k_s), both as seen after the last token.
#pragma once

#include <cstdint>
#include <optional>

#include "tessera/context.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {

enum class LinearFeatureMap : int32_t {
  kIdentity = 0,  // phi(x) = x
  kElu1 = 1,      // phi(x) = elu(x) + 1 (Katharopoulos et al.)
  kRelu = 2,      // phi(x) = max(x, 0)
  kTaylor2 = 3,   // BASED: [1, x / Dk^(1/4), vec(x x^T) / (sqrt(2) sqrt(Dk))], so that
                  // phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(Dk)
};

// Feature dim F of phi for head dim dk (INT64_MAX when 1 + dk + dk^2 overflows); twice that with
// LRPE (lrpe_theta set).
int64_t LinearFeatureDim(LinearFeatureMap map, int64_t dk, bool lrpe = false);
// Largest feature dim the ops accept (the Taylor map up to Dk = 90): a caller that allocates
// states of F x Dv floats checks F against it first.
constexpr int64_t kMaxLinearFeatureDim = 8192;

struct LinearAttentionParams {
  TensorView q;  // [B, S, Hq, Dk]
  TensorView k;  // [B, S, Hkv, Dk]
  TensorView v;  // [B, S, Hkv, Dv]
  // [B, S, Hq, Dv], written. LinearAttentionForward only: data == nullptr with final_state set is
  // a state-only call (final_state, and final_normalizer with normalize, and nothing else: no
  // intra-chunk products, O(S F Dv) work); unset without final_state is an error.
  TensorView out;

  LinearFeatureMap feature_map = LinearFeatureMap::kIdentity;
  // Multiplies phi(q) . phi(k); default 1/sqrt(Dk), or 1 for the Taylor map (which carries its
  // own 1/sqrt(Dk)). Must be finite.
  std::optional<float> scale;
  bool causal = true;
  int64_t prefix_len = 0;  // JRT prefix form: 0 <= prefix_len <= S; plain form only
  bool normalize = false;
  float eps = 1e-6f;  // added to the normalizer (normalize only), > 0

  // Constant decay per query head (RetNet, TransNormerLLM, Lightning Attention): f32 [Hq] with
  // lambda in (0, 1]. data == nullptr: off. Causal only.
  TensorView decay;
  // Data-dependent gates (GLA), log space, finite, g <= 0; identity feature map only (F = Dk).
  // data == nullptr: off. Causal only. Two forms, told apart by the rank:
  //   rank 4: f32 [B, S, Hq, Dk], one gate per query head and key channel (GLA);
  //   rank 3: f32 [B, S, Hq], one gate per token and query head applied to every key channel
  //           (scalar gates: GLA's simple form, Mamba-2 / fla's chunk_simple_gla).
  TensorView gates;

  // BASED's exact part: with window > 0, out += the exact causal softmax attention of q, k, v over
  // the last `window` keys (self included), scale 1/sqrt(Dk), added to the linear part (any Dv).
  // It reads the raw keys of the call only: a continuation through the state does not see the
  // previous call's last window keys. A window >= S is the same as S (every key of the call).
  int64_t window = 0;

  // Recurrent state handed over between calls (prefill -> decode, chunked prefill): read before
  // the first token when set, written after the last one when set. f32, contiguous or strided:
  //   initial_state, final_state            [B, Hq, F, Dv]
  //   initial_normalizer, final_normalizer  [B, Hq, F] (normalize only)
  // Causal (or prefix) only. data == nullptr: zero initial state / not written.
  TensorView initial_state;
  TensorView initial_normalizer;
  TensorView final_state;
  TensorView final_normalizer;

  // Tokens per chunk of the chunked form: 16..256, a multiple of 16. Results agree across chunk
  // sizes to rounding.
  int64_t chunk_size = 64;

  // LRPE (TransNormer's linear relative positional encoding): every feature of phi(q_t) and
  // phi(k_t) is doubled into [phi_f cos(p_t theta_f), phi_f sin(p_t theta_f)] (the cosines as
  // features 0..Dk-1, the sines as Dk..2Dk-1), p_t = position_offset + t, so that
  //   phi(q_t) . phi(k_s) = sum_f phi_f(q_t) phi_f(k_s) cos((t - s) theta_f)
  // depends on the relative position; it combines with decay (TransNormerLLM) and the prefix
  // form. F doubles (LinearFeatureDim(map, Dk, true) = 2 Dk), and so do the states. f32 [Dk]
  // (every head) or [Hq, Dk], finite; the identity, elu + 1 and relu maps (not Taylor), no gates.
  // data == nullptr: off.
  TensorView lrpe_theta;
  // The position of token 0 under LRPE, >= 0: a call that continues a state passes the number of
  // tokens before it (a decode step: the tokens seen so far).
  int64_t position_offset = 0;
};

// The chunked form (prefill, training). Validates every argument before any work; on error
// nothing is written. A state-only call (out unset, final_state set: the chunk states that
// sequence parallelism such as LASP-2 all-gathers) computes the same final_state and
// final_normalizer bit for bit as the call with out, at O(S F Dv) cost; the window part, which
// never enters the state, is skipped.
Status LinearAttentionForward(const LinearAttentionParams& params, const Context& ctx);

// The recurrent form: token by token with an O(F x Dv) state per head (decode steps are calls with
// S = 1 and the state handed over). Same parameters and results as LinearAttentionForward, except
// that out is required (a state-only call is LinearAttentionForward's).
Status LinearAttentionRecurrent(const LinearAttentionParams& params, const Context& ctx);

// Gradients of LinearAttentionForward (chunked) for a loss L that reads out and, optionally,
// the final state: dq, dk, dv in the layouts of q, k, v, for GLA dgates f32 in the form of the
// gates ([B, S, Hq, Dk], or [B, S, Hq] for scalar gates: the sum over channels of the per-channel
// gradient), and d_initial_state (d_initial_normalizer) for a forward that started from a state.
//
// forward: the forward call's parameters. forward.out is not read (it may be left unset);
// forward.final_state and forward.final_normalizer may be set and are ignored.
// forward.initial_state (and initial_normalizer) are read: they change dq, dgates (and with
// normalize every gradient). The window part (BASED) is not supported here (kUnimplemented).
//
// Sequence parallelism (LASP-2): a sequence cut into pieces, each piece's forward started from the
// previous piece's final_state, has the gradients of the whole sequence when the pieces' backwards
// run from the last one, each handing its d_initial_state (d_initial_normalizer) to the previous
// piece as d_final_state (d_final_normalizer).
//
// Every gradient output is optional: unset (data == nullptr) it is not computed and its work is
// skipped (a call with only d_initial_state reads q, dout and the gates: O(S F Dv), no C x C
// products; with normalize the forward is recomputed for the denominators, as in every normalized
// backward). At least one must be set (kInvalidArgument otherwise); an empty dq, dk or dv (a
// shaped view with no elements, whose data may be nullptr) counts as set.
struct LinearAttentionBackwardParams {
  LinearAttentionParams forward;
  TensorView dout;    // [B, S, Hq, Dv], dL / d out
  TensorView dq;      // [B, S, Hq, Dk], written when set
  TensorView dk;      // [B, S, Hkv, Dk], written when set (summed over the query heads of a group)
  TensorView dv;      // [B, S, Hkv, Dv], written when set (summed over the query heads of a group)
  TensorView dgates;  // [B, S, Hq, Dk] or [B, S, Hq] (scalar gates) f32, written when set (GLA)

  // Optional input, f32 [B, Hq, F, Dv] (F as for the states): dL / d forward.final_state, as if
  // the final state were an output that later computation used (the next piece of the sequence).
  // data == nullptr: 0. Causal only. Taylor map: the forward writes the two ordered pairs (i, j),
  // (j, i) of a pair feature as equal halves, so only their sum enters.
  TensorView d_final_state;
  // Optional output, f32 [B, Hq, F, Dv]: dL / d forward.initial_state (with or without an initial
  // state in forward): the queries' part plus d_final_state carried back through the chunk's
  // total decay. Causal only. Taylor map: the forward reads S[i, j] + S[j, i] only, so both
  // ordered pairs get the same gradient.
  TensorView d_initial_state;
  // normalize only, f32 [B, Hq, F]: the same for final_normalizer (input) and initial_normalizer
  // (output). data == nullptr: 0 / not written.
  TensorView d_final_normalizer;
  TensorView d_initial_normalizer;
};
Status LinearAttentionBackward(const LinearAttentionBackwardParams& params, const Context& ctx);

}  // namespace tessera
