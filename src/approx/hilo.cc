// SPDX-License-Identifier: Apache-2.0
// HiLo attention (LITv2, Pan et al. 2022), non-causal, over tokens on a grid_h x grid_w grid
// (row-major, S = grid_h * grid_w).
//
// What it computes: the Hq heads are split. The first Hq - lofi_heads heads (Hi-Fi) attend within
// non-overlapping s x s windows (s = hilo.window): window (wy, wx) holds rows [wy s, (wy + 1) s)
// and columns [wx s, (wx + 1) s) of the grid, cut at the grid's edge, so when a side is not a
// multiple of s the last windows along it are partial (fewer tokens, never shifted or padded:
// every token belongs to exactly one window and attends to exactly the tokens of its window).
// The last lofi_heads heads (Lo-Fi) attend from every token to the grid's s x s average-pooled
// keys and values: ceil(grid_h / s) x ceil(grid_w / s) pooled tokens, one per window, each the
// mean of the window's (possibly partial) tokens. A window larger than a grid side spans it.
//
// Error against full softmax attention: a Hi-Fi head drops every key outside the query's window
// (exact when one window covers the grid); a Lo-Fi head replaces each window's keys by their mean
// (exact at s = 1; otherwise the error grows with the spread of keys inside a window, small for
// smooth images, large for random tokens). In LITv2 the split is trained in; measured against
// full attention on untrained inputs it is a large, knob-dependent distance (docs/approx.md).
//
// How and cost: both parts are exact attentions through the tiled exact kernel. Hi-Fi gathers
// Q, K and V into window-major order (each window's tokens contiguous), runs the kernel on them
// as a varlen batch with one sequence per window (partial windows are shorter sequences; no mask
// and no tile shared by two windows), and scatters the output back: O(S s^2 D) per head plus
// three gathers and a scatter of O(S D). (Measured: 1.4-1.5x faster than one masked call with
// document ids = window index, and faster than calls per band of s rows, whose per-call cost
// dominates.) Lo-Fi pools K/V (O(S D)) and runs the kernel with S queries over
// P = ceil(h / s) ceil(w / s) keys, O(S P D) per head. At a fixed s the Lo-Fi part is
// quadratic in S (1 / s^2 of full attention) and dominates at long S; no choice of s makes the
// sum linear (Hi-Fi grows as S s^2, Lo-Fi as S^2 / s^2; s ~ S^(1/4) gives S^1.5). GQA: a Lo-Fi
// query head pools its KV head; query heads of one KV head may be split between Hi-Fi and Lo-Fi.
// lse (optional): each head's log-sum-exp over the keys it attended (window or pooled tokens).
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "approx/approx_internal.h"
#include "core/check.h"
#include "core/parallel.h"
#include "tessera/attention.h"

namespace tessera {
namespace approx {
namespace {

std::string Str(int64_t x) { return std::to_string(x); }

Status Invalid(const char* name, const std::string& what, const std::string& got) {
  return Status::InvalidArgument(Expected(name, what, got));
}

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Heads [h0, h0 + count) of a [B, S, H, D] view.
TensorView HeadSlice(const TensorView& t, int64_t h0, int64_t count) {
  TensorView r = t;
  r.data = static_cast<float*>(t.data) + h0 * t.strides[2];
  r.shape[2] = count;
  return r;
}

// Heads [h0, h0 + count) of a [B, H, S] lse view (unset stays unset).
TensorView LseSlice(const TensorView& t, int64_t h0, int64_t count) {
  if (t.data == nullptr) return t;
  TensorView r = t;
  r.data = static_cast<float*>(t.data) + h0 * t.strides[1];
  r.shape[1] = count;
  return r;
}

// Exact attention of query heads [h0, h1) of q / out / lse (absolute head indices) on K/V whose
// head axis starts at KV head kv0 (query head h reads KV head h / group). The kernel maps query
// heads to KV heads by Hq / Hkv, so the range is cut at group boundaries: at most three calls
// (a partial group, the whole groups, a partial group).
Status RunHeads(AttentionParams base, const TensorView& q, const TensorView& k, const TensorView& v,
                const TensorView& out, const TensorView& lse, int64_t h0, int64_t h1, int64_t group,
                int64_t kv0, const Context& ctx) {
  int64_t h = h0;
  while (h < h1) {
    int64_t end = std::min(h1, (h / group + 1) * group);
    if (h % group == 0 && h1 - h >= group) end = h + (h1 - h) / group * group;
    const int64_t kv_first = h / group, kv_count = (end - 1) / group - kv_first + 1;
    base.q = HeadSlice(q, h, end - h);
    base.out = HeadSlice(out, h, end - h);
    base.lse = LseSlice(lse, h, end - h);
    base.k = HeadSlice(k, kv_first - kv0, kv_count);
    base.v = HeadSlice(v, kv_first - kv0, kv_count);
    Status s = AttentionForward(base, ctx);
    if (!s.ok()) return s;
    h = end;
  }
  return Status::Ok();
}

// Copies heads [0, heads) of src[b, perm[t]] to dst[b, t] (dst contiguous [B, S, heads, D]), or
// the reverse (scatter) when `to_src`.
void Permute(const TensorView& src, float* dst, int64_t heads, const std::vector<int64_t>& perm,
             bool to_src, int32_t threads) {
  const int64_t B = src.shape[0], S = src.shape[1], D = src.shape[3];
  float* sd = static_cast<float*>(src.data);
  ParallelFor(threads, B * S, [&](int64_t task, int32_t) {
    const int64_t b = task / S, t = task % S;
    const int64_t p = perm[static_cast<size_t>(t)];
    for (int64_t h = 0; h < heads; ++h) {
      float* x = sd + b * src.strides[0] + p * src.strides[1] + h * src.strides[2];
      float* y = dst + (task * heads + h) * D;
      if (to_src) {
        for (int64_t d = 0; d < D; ++d) x[d * src.strides[3]] = y[d];
      } else {
        for (int64_t d = 0; d < D; ++d) y[d] = x[d * src.strides[3]];
      }
    }
  });
}

}  // namespace

Status HiLoForward(const ApproxParams& params, const ApproxShape& shape, const Context& ctx) {
  const HiLoOptions& o = params.hilo;
  const int64_t B = shape.batch, S = shape.seq, Hq = shape.heads_q, Hkv = shape.heads_kv,
                D = shape.dim, group = shape.group();
  if (params.causal) {
    return Invalid("causal", "false (HiLo windows and pooled keys are two-sided)", "true");
  }
  if (o.grid_h < 1) return Invalid("hilo.grid_h", ">= 1", Str(o.grid_h));
  if (o.grid_w < 1) return Invalid("hilo.grid_w", ">= 1", Str(o.grid_w));
  if (o.grid_h > S / o.grid_w || o.grid_h * o.grid_w != S) {
    return Invalid("hilo.grid_h * hilo.grid_w", "the sequence length " + Str(S),
                   Str(o.grid_h) + " x " + Str(o.grid_w));
  }
  if (B > std::numeric_limits<int32_t>::max() / S) {
    return Invalid("q", "B * S below 2^31 (window offsets are i32)", Str(B) + " * " + Str(S));
  }
  if (o.window < 1) return Invalid("hilo.window", ">= 1", Str(o.window));
  if (o.lofi_heads < 0 || o.lofi_heads > Hq) {
    return Invalid("hilo.lofi_heads", "0..Hq = 0.." + Str(Hq), Str(o.lofi_heads));
  }

  const int32_t threads = ResolveThreads(ctx);
  const int64_t gh = o.grid_h, gw = o.grid_w, s = std::min(o.window, std::max(gh, gw));
  const int64_t nwy = CeilDiv(gh, s), nwx = CeilDiv(gw, s), windows = nwy * nwx;
  const int64_t hi_heads = Hq - o.lofi_heads;
  AttentionParams base;
  base.scale = shape.scale;

  if (hi_heads > 0) {
    // Window-major order: perm[t] is the grid token at position t. Each window is then one
    // sequence of a varlen batch (cu: the window starts, over B copies of the grid), so the
    // kernel sees no mask and no tile spans two windows.
    std::vector<int64_t> perm;
    std::vector<int32_t> cu = {0};
    perm.reserve(static_cast<size_t>(S));
    for (int64_t wy = 0; wy < nwy; ++wy) {
      for (int64_t wx = 0; wx < nwx; ++wx) {
        for (int64_t y = wy * s; y < std::min(gh, (wy + 1) * s); ++y) {
          for (int64_t x = wx * s; x < std::min(gw, (wx + 1) * s); ++x) perm.push_back(y * gw + x);
        }
        cu.push_back(static_cast<int32_t>(perm.size()));
      }
    }
    for (int64_t b = 1; b < B; ++b) {
      for (int64_t w = 1; w <= windows; ++w) {
        cu.push_back(static_cast<int32_t>(b * S + cu[static_cast<size_t>(w)]));
      }
    }
    bool identity = B == 1;
    for (int64_t t = 0; t < S && identity; ++t) identity = perm[static_cast<size_t>(t)] == t;
    AttentionParams hi = base;
    hi.cu_seqlens_q = MakeView1(cu.data(), DType::kI32, static_cast<int64_t>(cu.size()));
    hi.cu_seqlens_k = hi.cu_seqlens_q;
    hi.num_seqs = static_cast<int32_t>(B * windows);
    const int64_t hi_kv = CeilDiv(hi_heads, group);
    if (identity) {
      // One sequence whose windows are already contiguous (s >= grid_w, s = 1, a single row).
      Status st = RunHeads(hi, params.q, params.k, params.v, params.out, params.lse, 0, hi_heads,
                           group, 0, ctx);
      if (!st.ok()) return st;
    } else {
      const int64_t T = B * S;
      std::vector<float> qw(static_cast<size_t>(T * hi_heads * D));
      std::vector<float> kw(static_cast<size_t>(T * hi_kv * D)), vw(kw.size());
      std::vector<float> ow(qw.size());
      std::vector<float> lw(params.lse.data != nullptr ? static_cast<size_t>(hi_heads * T) : 0);
      Permute(params.q, qw.data(), hi_heads, perm, false, threads);
      Permute(params.k, kw.data(), hi_kv, perm, false, threads);
      Permute(params.v, vw.data(), hi_kv, perm, false, threads);
      const TensorView lse_w =
          lw.empty() ? TensorView() : MakeView3(lw.data(), DType::kF32, 1, hi_heads, T);
      Status st = RunHeads(hi, MakeView4(qw.data(), DType::kF32, 1, T, hi_heads, D),
                           MakeView4(kw.data(), DType::kF32, 1, T, hi_kv, D),
                           MakeView4(vw.data(), DType::kF32, 1, T, hi_kv, D),
                           MakeView4(ow.data(), DType::kF32, 1, T, hi_heads, D), lse_w, 0, hi_heads,
                           group, 0, ctx);
      if (!st.ok()) return st;
      Permute(params.out, ow.data(), hi_heads, perm, true, threads);
      if (!lw.empty()) {
        const TensorView& l = params.lse;
        float* ld = static_cast<float*>(l.data);
        ParallelFor(threads, B * hi_heads, [&](int64_t task, int32_t) {
          const int64_t b = task / hi_heads, h = task % hi_heads;
          const float* src = lw.data() + h * T + b * S;
          float* dst = ld + b * l.strides[0] + h * l.strides[1];
          for (int64_t t = 0; t < S; ++t) dst[perm[static_cast<size_t>(t)] * l.strides[2]] = src[t];
        });
      }
    }
  }

  if (o.lofi_heads > 0) {
    // Pooled K/V of the KV heads the Lo-Fi heads read: one token per window, the mean of the
    // window's tokens (summed in double, in row-major order within the window).
    const int64_t kv0 = hi_heads / group, lo_kv = Hkv - kv0;
    std::vector<float> kp(static_cast<size_t>(B * windows * lo_kv * D)), vp(kp.size());
    ParallelFor(threads, B * windows, [&](int64_t task, int32_t) {
      const int64_t b = task / windows, w = task % windows, wy = w / nwx, wx = w % nwx;
      const int64_t y1 = std::min(gh, (wy + 1) * s), x1 = std::min(gw, (wx + 1) * s);
      const double inv = 1.0 / static_cast<double>((y1 - wy * s) * (x1 - wx * s));
      std::vector<double> acc(static_cast<size_t>(lo_kv * D));
      const TensorView* src[2] = {&params.k, &params.v};
      float* dst[2] = {kp.data(), vp.data()};
      for (int which = 0; which < 2; ++which) {
        const TensorView& t = *src[which];
        const float* td = static_cast<const float*>(t.data);
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t y = wy * s; y < y1; ++y) {
          for (int64_t x = wx * s; x < x1; ++x) {
            const int64_t tok = y * gw + x;
            for (int64_t h = 0; h < lo_kv; ++h) {
              const float* e =
                  td + b * t.strides[0] + tok * t.strides[1] + (kv0 + h) * t.strides[2];
              double* a = acc.data() + h * D;
              for (int64_t d = 0; d < D; ++d) a[d] += e[d * t.strides[3]];
            }
          }
        }
        float* out = dst[which] + task * lo_kv * D;
        for (int64_t c = 0; c < lo_kv * D; ++c) {
          out[c] = static_cast<float>(acc[static_cast<size_t>(c)] * inv);
        }
      }
    });
    Status st = RunHeads(base, params.q, MakeView4(kp.data(), DType::kF32, B, windows, lo_kv, D),
                         MakeView4(vp.data(), DType::kF32, B, windows, lo_kv, D), params.out,
                         params.lse, hi_heads, Hq, group, kv0, ctx);
    if (!st.ok()) return st;
  }
  return Status::Ok();
}

}  // namespace approx
}  // namespace tessera
