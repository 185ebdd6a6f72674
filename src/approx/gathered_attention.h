// SPDX-License-Identifier: Apache-2.0
// Internal: exact softmax attention over gathered subsets of the tokens, with masks on the
// ORIGINAL positions. The primitive of Routing attention (each k-means cluster is a segment), and
// of any method that permutes the sequence and attends inside pieces of the permutation (sorted
// LSH buckets, MMInference-style permutations).
//
// A segment is a list of query token indices and a list of key token indices, both indices into
// the sequence (their original positions). For every (sequence b, query head h) the caller gives
// any number of segments; each query of a segment attends, with exact softmax, to that segment's
// keys (K/V of head h / (Hq / Hkv)); with causal, key j is visible to query i only if j <= i (the
// original positions, whatever the order of the lists). A query listed in several segments (or
// twice in one) gets the LSE merge of its states (MergeStates: the parts are treated as disjoint
// key sets, so a key in two of them counts twice), parts in ascending segment order; a query
// listed nowhere, or seeing no key, gets out = 0 and lse = -inf. Key lists may hold duplicates
// (a listed key counts as often as listed) and come in any order: they are sorted first, so the
// result does not depend on their order.
//
// How: per segment, the keys are sorted and their K/V rows gathered into contiguous f32 tiles
// once; the queries (sorted by position) go in blocks of up to 192 rows through the exact
// kernel's tiled online softmax (simd/tile_gemm-inl.h, simd/online_softmax-inl.h). With sorted
// keys the causal rule is a prefix of the gathered keys per query ([0, n_i), n_i = the number of
// keys at positions <= i), so it runs as the kernel's per-row key interval and a query block
// stops at the last key its last query sees. Cost: sum over segments of nq * nk * D * 4 FLOPs
// (about half with causal), plus one gather of the segment's K/V rows.
//
// Parallel over segments; each query state is computed by one task in a fixed order, and merged
// in segment order, so results are bitwise identical for every thread count.
#pragma once

#include <cstdint>

#include "tessera/context.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {
namespace approx {

// The segments of a call, CSR form. Row r = b * Hq + h owns segments [row_begin[r],
// row_begin[r + 1]); segment s has the queries q_index[q_begin[s] .. q_begin[s + 1]) and the keys
// k_index[k_begin[s] .. k_begin[s + 1]). All offsets non-decreasing from 0; indices in [0, Sq)
// for queries and [0, Sk) for keys.
struct GatheredSegments {
  const int64_t* row_begin = nullptr;  // [B * Hq + 1]
  const int64_t* q_begin = nullptr;    // [num_segments + 1]
  const int32_t* q_index = nullptr;    // [q_begin[num_segments]]
  const int64_t* k_begin = nullptr;    // [num_segments + 1]
  const int32_t* k_index = nullptr;    // [k_begin[num_segments]]
};

struct GatheredAttentionParams {
  TensorView q;    // f32 [B, Sq, Hq, D]
  TensorView k;    // f32 [B, Sk, Hkv, D], Hq % Hkv == 0
  TensorView v;    // f32 [B, Sk, Hkv, D]
  TensorView out;  // f32 [B, Sq, Hq, D], written (every element)
  TensorView lse;  // f32 [B, Hq, Sq], optional, written (natural log)
  float scale = 1.0f;
  bool causal = false;
  GatheredSegments segments;
};

// Checks the views and the segments (InvalidArgument naming the field; nothing written on
// error), then computes the attention of every segment and merges the states.
Status GatheredAttention(const GatheredAttentionParams& params, const Context& ctx);

}  // namespace approx
}  // namespace tessera
