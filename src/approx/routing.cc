// SPDX-License-Identifier: Apache-2.0
// Routing attention (Routing Transformer, Roy et al.): exact softmax attention restricted to the
// tokens that online k-means routes to the same cluster.
//
// What it approximates: softmax attention of each query over all (causal: all earlier) keys,
// by attention over the keys that share a cluster with the query. Queries and keys are
// L2-normalized (a zero row stays zero) and scored against the C centroids of their query head,
// score = x / |x| . centroid (routing.centroids [Hq, C, D]; keys come from the KV head, scored
// against the query head's centroids). The assignment is balanced: cluster c takes the w
// queries and the w keys of highest score (w = routing.window, default S / C; ties go to the
// earlier token), so a token may be in several clusters or in none. Inside each cluster the
// queries attend to its keys exactly (the raw q, k, v and the call's scale), with causality on
// the ORIGINAL positions, through the gathered-segment primitive (gathered_attention.h). A query
// in several clusters gets the LSE merge of its states (a key in two of those clusters counts
// twice); a query in no cluster, or (causal) whose clusters hold no key at or before it, gets
// out = 0 and lse = -inf.
//
// Error: the mass of the keys outside the query's clusters is dropped. It is 0 with one cluster
// and w = S (exact attention); it shrinks as w grows (more keys per cluster) and as the inputs
// concentrate around the centroids (peaked keys near a few directions, which is what routing is
// for); on random, unclustered inputs the dropped mass is about 1 - w / S.
//
// Online k-means: with routing.updated_centroids, each normalized q row of (b, h) and k row of
// (b, h / G) goes to its nearest centroid (highest score, ties to the lower cluster: the
// paper's assignment, unbalanced), and centroid <- ema * centroid + (1 - ema) * (mean of its
// rows over the batch); a centroid with no rows is copied unchanged.
//
// Cost per (sequence, query head): the scores, 2 * S * C * D FLOPs for q and for k each (a tile
// GEMM); the top-w selection, O(S) per cluster (nth_element); the attention, C * w^2 * D * 4
// FLOPs (about half causal). At fixed w (C = S / w) the attention is linear in S, the routing
// quadratic with a small constant: its share is about C / w of the attention's (causal: 2C / w).
// Deterministic: each (sequence, head) is routed by one task, the k-means sums are reduced over
// the batch in order, and the attention is the primitive's (bitwise identical for every thread
// count).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "approx/routing.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "simd/convert-inl.h"
#include "simd/tile_gemm-inl.h"

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {

// scores[c][i] = centroids[c] . x_i / |x_i| for the S rows x_i of one head (row i at x + i *
// row_stride, elements elem_stride apart); xt [D][mp] receives the normalized rows transposed
// (columns S..mp zero), scores is [C][mp]; both aligned, mp a multiple of the vector width.
template <int kD>
void ScoreRows(const float* x, int64_t row_stride, int64_t elem_stride, int64_t seq, int64_t dim,
               const float* centroids, int64_t clusters, float* xt, float* scores, size_t mp) {
  const size_t D = static_cast<size_t>(dim);
  std::vector<float> row(D);
  for (int64_t i = 0; i < seq; ++i) {
    LoadRow(DType::kF32, x, i * row_stride, elem_stride, D, row.data());
    double n2 = 0.0;
    for (size_t d = 0; d < D; ++d) n2 += static_cast<double>(row[d]) * row[d];
    const float inv = n2 > 0.0 ? static_cast<float>(1.0 / std::sqrt(n2)) : 0.0f;
    for (size_t d = 0; d < D; ++d) xt[d * mp + static_cast<size_t>(i)] = row[d] * inv;
  }
  for (size_t d = 0; d < D; ++d) {
    std::memset(xt + d * mp + seq, 0, (mp - static_cast<size_t>(seq)) * sizeof(float));
  }
  TileFeed feed;
  RowPanelProduct<kD>(centroids, D, static_cast<size_t>(clusters), D, xt, mp, scores, nullptr,
                      feed);
}

void RoutingScores(const float* x, int64_t row_stride, int64_t elem_stride, int64_t seq,
                   int64_t dim, const float* centroids, int64_t clusters, float* xt, float* scores,
                   size_t mp, bool fast) {
  if (fast && dim == 64) {
    return ScoreRows<64>(x, row_stride, elem_stride, seq, dim, centroids, clusters, xt, scores, mp);
  }
  if (fast && dim == 128) {
    return ScoreRows<128>(x, row_stride, elem_stride, seq, dim, centroids, clusters, xt, scores,
                          mp);
  }
  if (fast && dim == 256) {
    return ScoreRows<256>(x, row_stride, elem_stride, seq, dim, centroids, clusters, xt, scores,
                          mp);
  }
  ScoreRows<0>(x, row_stride, elem_stride, seq, dim, centroids, clusters, xt, scores, mp);
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <hwy/aligned_allocator.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <new>
#include <string>

#include "approx/approx_internal.h"
#include "approx/gathered_attention.h"
#include "core/check.h"
#include "core/dispatch.h"
#include "core/parallel.h"

namespace tessera {

HWY_EXPORT(RoutingScores);

namespace approx {
namespace {

std::string Str(int64_t x) { return std::to_string(x); }

Status Invalid(const char* name, const std::string& what, const std::string& got) {
  return Status::InvalidArgument(Expected(name, what, got));
}

Status CheckCentroids(const char* name, const TensorView& t, int64_t hq, int64_t c, int64_t d,
                      bool writable) {
  if (t.data == nullptr && t.numel() != 0) return Invalid(name, "a non-null pointer", "nullptr");
  if (t.dtype != DType::kF32) return Invalid(name, "dtype f32", DTypeName(t.dtype));
  const int64_t shape[3] = {hq, c, d};
  return CheckShape(name, t, 3, shape,
                    "[Hq, C, D] = [" + Str(hq) + ", " + Str(c) + ", " + Str(d) + "]", writable);
}

Status Validate(const ApproxParams& p, const ApproxShape& sh) {
  const RoutingOptions& ro = p.routing;
  const int64_t S = sh.seq;
  if (ro.clusters < 1 || ro.clusters > S) {
    return Invalid("routing.clusters", "1 <= clusters <= S = " + Str(S), Str(ro.clusters));
  }
  if (ro.window < 0 || ro.window > S) {
    return Invalid("routing.window", "0 (S / clusters) or 1..S = " + Str(S), Str(ro.window));
  }
  if (!(ro.ema >= 0.0f && ro.ema < 1.0f)) {
    return Invalid("routing.ema", "a value in [0, 1)", std::to_string(ro.ema));
  }
  if (ro.centroids.data == nullptr) {
    return Invalid("routing.centroids", "f32 [Hq, C, D] centroids (required)", "unset");
  }
  Status s =
      CheckCentroids("routing.centroids", ro.centroids, sh.heads_q, ro.clusters, sh.dim, false);
  if (!s.ok()) return s;
  std::vector<Region> outputs = {ViewRegion("out", p.out)};
  if (p.lse.data != nullptr) outputs.push_back(ViewRegion("lse", p.lse));
  if (ro.updated_centroids.data != nullptr) {
    s = CheckCentroids("routing.updated_centroids", ro.updated_centroids, sh.heads_q, ro.clusters,
                       sh.dim, true);
    if (!s.ok()) return s;
    outputs.push_back(ViewRegion("routing.updated_centroids", ro.updated_centroids));
  }
  return CheckDisjoint(outputs, {ViewRegion("q", p.q), ViewRegion("k", p.k), ViewRegion("v", p.v),
                                 ViewRegion("routing.centroids", ro.centroids)});
}

// The w indices of highest score (ties to the lower index) in ascending order; NaN scores rank
// lowest (as -inf). tmp has S floats.
void SelectTopW(const float* score, int64_t seq, int64_t w, float* tmp, int32_t* dest) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < seq; ++i) tmp[i] = std::isnan(score[i]) ? neg_inf : score[i];
  std::nth_element(tmp, tmp + (w - 1), tmp + seq, std::greater<float>());
  const float t = tmp[w - 1];
  int64_t above = 0;
  for (int64_t i = 0; i < seq; ++i) above += score[i] > t ? 1 : 0;  // NaN: false
  int64_t ties = w - above, n = 0;
  for (int64_t i = 0; i < seq; ++i) {
    const float x = std::isnan(score[i]) ? neg_inf : score[i];
    if (x > t || (x == t && ties-- > 0)) dest[n++] = static_cast<int32_t>(i);
  }
}

}  // namespace

Status RoutingForward(const ApproxParams& params, const ApproxShape& shape, const Context& ctx) {
  Status s = Validate(params, shape);
  if (!s.ok()) return s;
  const RoutingOptions& ro = params.routing;
  const int64_t B = shape.batch, S = shape.seq, Hq = shape.heads_q, D = shape.dim,
                G = shape.group(), C = ro.clusters;
  const int64_t w = ro.window > 0 ? ro.window : S / C;
  const bool update = ro.updated_centroids.data != nullptr;

  // The centroids, contiguous [Hq][C][D].
  std::vector<float> mu(static_cast<size_t>(Hq * C * D));
  const float* cen = static_cast<const float*>(ro.centroids.data);
  for (int64_t h = 0; h < Hq; ++h) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t d = 0; d < D; ++d) {
        mu[(h * C + c) * D + d] = cen[h * ro.centroids.strides[0] + c * ro.centroids.strides[1] +
                                      d * ro.centroids.strides[2]];
      }
    }
  }

  // Segments: row r = b * Hq + h owns clusters [r * C, (r + 1) * C), each with w queries and w
  // keys.
  const int64_t rows = B * Hq;
  std::vector<int64_t> row_begin(static_cast<size_t>(rows) + 1),
      seg_begin(static_cast<size_t>(rows * C) + 1);
  for (int64_t r = 0; r <= rows; ++r) row_begin[r] = r * C;
  for (int64_t sg = 0; sg <= rows * C; ++sg) seg_begin[sg] = sg * w;
  std::vector<int32_t> q_index(static_cast<size_t>(rows * C * w)),
      k_index(static_cast<size_t>(rows * C * w));
  // k-means sums per row (double), reduced over the batch afterwards.
  std::vector<double> sums(update ? static_cast<size_t>(rows * C * D) : 0, 0.0);
  std::vector<int64_t> counts(update ? static_cast<size_t>(rows * C) : 0, 0);

  // Row stride of the transposed rows and the scores: one cache line past a multiple of 64
  // floats, so that their D (C) rows do not all fall in the same cache sets when S is a power
  // of two (measured at S = 65536: 4x the time of S = 32768 without it).
  const size_t mp = hwy::DivCeil(static_cast<size_t>(S), size_t{64}) * 64 + 16;
  const int32_t threads = ResolveThreads(ctx);
  const int32_t workers = static_cast<int32_t>(std::min<int64_t>(threads, rows));
  struct Buffers {
    hwy::AlignedFreeUniquePtr<float[]> xt, scores;
    std::vector<float> tmp, best;
    std::vector<int32_t> nearest;
  };
  std::vector<Buffers> bufs(static_cast<size_t>(std::max(workers, 1)));
  const bool fast = ctx.path != Path::kGeneric && HasFastHeadDim(D);
  ParallelFor(workers, rows, [&](int64_t r, int32_t worker) {
    Buffers& bf = bufs[static_cast<size_t>(worker)];
    if (!bf.xt) {
      bf.xt = hwy::AllocateAligned<float>(static_cast<size_t>(D) * mp);
      bf.scores = hwy::AllocateAligned<float>(static_cast<size_t>(C) * mp);
      if (!bf.xt || !bf.scores) throw std::bad_alloc();
      bf.tmp.resize(static_cast<size_t>(S));
      bf.best.resize(static_cast<size_t>(S));
      bf.nearest.resize(static_cast<size_t>(S));
    }
    const int64_t b = r / Hq, h = r % Hq;
    for (int kind = 0; kind < 2; ++kind) {
      const TensorView& x = kind == 0 ? params.q : params.k;
      const int64_t head = kind == 0 ? h : h / G;
      const float* base =
          static_cast<const float*>(x.data) + b * x.strides[0] + head * x.strides[2];
      HWY_DYNAMIC_DISPATCH(RoutingScores)
      (base, x.strides[1], x.strides[3], S, D, mu.data() + h * C * D, C, bf.xt.get(),
       bf.scores.get(), mp, fast);
      int32_t* dest = (kind == 0 ? q_index : k_index).data() + r * C * w;
      for (int64_t c = 0; c < C; ++c) {
        SelectTopW(bf.scores.get() + c * mp, S, w, bf.tmp.data(), dest + c * w);
      }
      if (!update) continue;
      // Nearest centroid of each row (ties to the lower cluster; a NaN score never wins, so a
      // row of NaN scores stays with cluster 0 and its NaN reaches that centroid).
      std::copy(bf.scores.get(), bf.scores.get() + S, bf.best.begin());
      std::fill(bf.nearest.begin(), bf.nearest.end(), 0);
      for (int64_t c = 1; c < C; ++c) {
        const float* sc = bf.scores.get() + c * mp;
        for (int64_t i = 0; i < S; ++i) {
          const bool better = sc[i] > bf.best[i];
          bf.best[i] = better ? sc[i] : bf.best[i];
          bf.nearest[i] = better ? static_cast<int32_t>(c) : bf.nearest[i];
        }
      }
      double* row_sums = sums.data() + r * C * D;
      for (int64_t i = 0; i < S; ++i) ++counts[r * C + bf.nearest[i]];
      for (int64_t d = 0; d < D; ++d) {
        const float* xd = bf.xt.get() + static_cast<size_t>(d) * mp;
        for (int64_t i = 0; i < S; ++i) row_sums[bf.nearest[i] * D + d] += xd[i];
      }
    }
  });

  GatheredAttentionParams gp;
  gp.q = params.q;
  gp.k = params.k;
  gp.v = params.v;
  gp.out = params.out;
  gp.lse = params.lse;
  gp.scale = shape.scale;
  gp.causal = params.causal;
  gp.segments = {row_begin.data(), seg_begin.data(), q_index.data(), seg_begin.data(),
                 k_index.data()};
  s = GatheredAttention(gp, ctx);
  if (!s.ok() || !update) return s;

  const float ema = ro.ema;
  const TensorView& uc = ro.updated_centroids;
  float* dst = static_cast<float*>(uc.data);
  for (int64_t h = 0; h < Hq; ++h) {
    for (int64_t c = 0; c < C; ++c) {
      int64_t n = 0;
      for (int64_t b = 0; b < B; ++b) n += counts[(b * Hq + h) * C + c];
      for (int64_t d = 0; d < D; ++d) {
        double total = 0.0;
        for (int64_t b = 0; b < B; ++b) total += sums[((b * Hq + h) * C + c) * D + d];
        const float m = mu[(h * C + c) * D + d];
        dst[h * uc.strides[0] + c * uc.strides[1] + d * uc.strides[2]] =
            n > 0 ? static_cast<float>(ema * static_cast<double>(m) +
                                       (1.0 - ema) * total / static_cast<double>(n))
                  : m;
      }
    }
  }
  return Status::Ok();
}

}  // namespace approx
}  // namespace tessera
#endif  // HWY_ONCE
