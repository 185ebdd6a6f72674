// SPDX-License-Identifier: Apache-2.0
// Attention over gathered segments (gathered_attention.h): validation, the per-segment SIMD
// kernel (one copy per Highway target) and the LSE merge of queries listed in several segments.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "approx/gathered_attention.cc"
#include "approx/gathered_attention.h"

#include <hwy/aligned_allocator.h>
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "core/attention_problem.h"
#include "core/parallel.h"
#include "simd/convert-inl.h"
#include "simd/online_softmax-inl.h"
#include "simd/tile_gemm-inl.h"

#ifndef TESSERA_APPROX_GATHERED_JOB_
#define TESSERA_APPROX_GATHERED_JOB_
#include <cstdint>

namespace tessera {
namespace approx {
namespace gathered {

// A validated call, with where each query occurrence's state goes.
struct Job {
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  float* out = nullptr;
  float* lse = nullptr;  // nullptr: not written
  int64_t q_stride[4], k_stride[4], v_stride[4], out_stride[4], lse_stride[3];
  int64_t heads_q = 0, group = 1, dim = 0;
  float scale = 1.0f;
  bool causal = false;
  GatheredSegments seg;
  const int64_t* segment_row = nullptr;  // [num_segments]: b * Hq + h
  int64_t num_segments = 0;
  // Per query occurrence: -1 writes out / lse directly (the query's only occurrence), else the
  // index of its state in state_out [.][dim] / state_lse, merged afterwards.
  const int64_t* slot = nullptr;
  float* state_out = nullptr;
  float* state_lse = nullptr;
  bool fast = false;  // compile-time head dim
};

}  // namespace gathered
}  // namespace approx
}  // namespace tessera
#endif  // TESSERA_APPROX_GATHERED_JOB_

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace gathered_impl {

namespace hn = hwy::HWY_NAMESPACE;
using approx::gathered::Job;

// Query rows per block (as the exact forward's tasks) and keys per tile.
constexpr size_t kBlockRows = 192;
constexpr size_t kKeyTile = 128;

// One worker's buffers; the K/V part grows with the largest segment it runs.
struct Scratch {
  hwy::AlignedFreeUniquePtr<float[]> fixed;
  hwy::AlignedFreeUniquePtr<float[]> kv;
  size_t kv_floats = 0;
  std::vector<int32_t> keys, order;
  float *qt, *ot, *st, *m, *l, *alpha, *tile_max, *pos, *slope;
  int32_t *lo, *hi;
  float *kbuf, *vbuf;

  void Init(size_t dim) {
    const size_t mp = kBlockRows;
    fixed = hwy::AllocateAligned<float>(2 * dim * mp + kKeyTile * mp + 8 * mp);
    if (!fixed) throw std::bad_alloc();
    qt = fixed.get();
    ot = qt + dim * mp;
    st = ot + dim * mp;
    m = st + kKeyTile * mp;
    l = m + mp;
    alpha = l + mp;
    tile_max = alpha + mp;
    pos = tile_max + mp;
    slope = pos + mp;
    lo = reinterpret_cast<int32_t*>(slope + mp);
    hi = lo + mp;
  }
  void ReserveKeys(size_t nk, size_t dim) {
    if (2 * nk * dim <= kv_floats && kv) return;
    kv_floats = std::max<size_t>(2 * nk * dim, dim);
    kv = hwy::AllocateAligned<float>(kv_floats);
    if (!kv) throw std::bad_alloc();
    kbuf = kv.get();
    vbuf = kbuf + kv_floats / 2;
  }
};

inline int64_t Offset(const int64_t* stride, int64_t b, int64_t t, int64_t h) {
  return b * stride[0] + t * stride[1] + h * stride[2];
}

template <int kD>
void RunSegment(const Job& job, int64_t seg, Scratch& s) {
  const size_t dim = kD != 0 ? static_cast<size_t>(kD) : static_cast<size_t>(job.dim);
  const int64_t row = job.segment_row[seg];
  const int64_t b = row / job.heads_q, h = row % job.heads_q, hk = h / job.group;
  const int64_t q0 = job.seg.q_begin[seg], nq = job.seg.q_begin[seg + 1] - q0;
  const int64_t k0 = job.seg.k_begin[seg], nk = job.seg.k_begin[seg + 1] - k0;
  if (nq == 0) return;

  // Keys sorted by position, their K/V rows gathered once for all query blocks.
  s.keys.assign(job.seg.k_index + k0, job.seg.k_index + k0 + nk);
  std::sort(s.keys.begin(), s.keys.end());
  s.ReserveKeys(static_cast<size_t>(nk), dim);
  for (int64_t j = 0; j < nk; ++j) {
    LoadRow(DType::kF32, job.k, Offset(job.k_stride, b, s.keys[j], hk), job.k_stride[3], dim,
            s.kbuf + static_cast<size_t>(j) * dim);
    LoadRow(DType::kF32, job.v, Offset(job.v_stride, b, s.keys[j], hk), job.v_stride[3], dim,
            s.vbuf + static_cast<size_t>(j) * dim);
  }
  // Queries by position: under causal a block's last row then sees the most keys.
  s.order.resize(static_cast<size_t>(nq));
  for (int64_t t = 0; t < nq; ++t) s.order[t] = static_cast<int32_t>(t);
  const int32_t* qidx = job.seg.q_index + q0;
  if (job.causal) {
    std::stable_sort(s.order.begin(), s.order.end(),
                     [qidx](int32_t x, int32_t y) { return qidx[x] < qidx[y]; });
  }

  static const AttentionProblem kNoModifiers{};
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t rb = 0; rb < nq; rb += static_cast<int64_t>(kBlockRows)) {
    const size_t rows = static_cast<size_t>(std::min<int64_t>(kBlockRows, nq - rb));
    const size_t mp = hwy::DivCeil(rows, kLanes) * kLanes;
    std::memset(s.qt, 0, dim * mp * sizeof(float));
    std::memset(s.ot, 0, dim * mp * sizeof(float));
    for (size_t r = 0; r < mp; ++r) {
      s.m[r] = neg_inf;
      s.l[r] = 0.0f;
      s.pos[r] = 0.0f;
      s.slope[r] = 0.0f;
      s.lo[r] = 1;  // padding rows see nothing
      s.hi[r] = 0;
    }
    // Row r sees the gathered keys [0, n_r): all of them, or under causal those at positions
    // <= its own (a prefix, the keys being sorted).
    int64_t max_n = 0, min_n = nk;
    for (size_t r = 0; r < rows; ++r) {
      const int32_t qi = qidx[s.order[static_cast<size_t>(rb) + r]];
      const int64_t n =
          job.causal ? std::upper_bound(s.keys.begin(), s.keys.end(), qi) - s.keys.begin() : nk;
      s.lo[r] = 0;
      s.hi[r] = static_cast<int32_t>(n - 1);
      max_n = std::max(max_n, n);
      min_n = std::min(min_n, n);
      float* tmp = s.st;  // free until the tile loop
      LoadRow(DType::kF32, job.q, Offset(job.q_stride, b, qi, h), job.q_stride[3], dim, tmp);
      for (size_t d = 0; d < dim; ++d) s.qt[d * mp + r] = job.scale * tmp[d];
    }
    const size_t nvec = mp / kLanes;
    for (int64_t a = 0; a < max_n; a += static_cast<int64_t>(kKeyTile)) {
      const size_t nkeys = static_cast<size_t>(std::min<int64_t>(kKeyTile, max_n - a));
      // Full: every row sees every key of the tile, no predicate needed.
      const bool full = min_n >= a + static_cast<int64_t>(nkeys);
      const float* kt = s.kbuf + static_cast<size_t>(a) * dim;
      const float* vt = s.vbuf + static_cast<size_t>(a) * dim;
      TileFeed feed_k, feed_v;
      for (size_t v0 = 0; v0 < nvec; v0 += kTileVecs) {
        const size_t c = std::min<size_t>(kTileVecs, nvec - v0);
        const size_t i0 = v0 * kLanes, i1 = i0 + c * kLanes;
        RowStripProduct<kD>(kt, dim, nkeys, dim, s.qt + i0, mp, c, s.st + i0,
                            full ? s.tile_max + i0 : nullptr, feed_k);
        SoftmaxColumns(kNoModifiers, s, nkeys, mp, a, nullptr, !full, WindowPredicate{s.lo, s.hi},
                       i0, i1);
        TransposedStripAccumulate<kD>(vt, dim, nkeys, dim, s.st + i0, mp, c, s.alpha + i0,
                                      s.ot + i0, feed_v);
      }
    }
    // Deferred normalization; a row that saw no key gets (0, -inf), a NaN l stays NaN.
    for (size_t r = 0; r < rows; ++r) {
      const int64_t occ = q0 + s.order[static_cast<size_t>(rb) + r];
      const int32_t qi = job.seg.q_index[occ];
      const float l = s.l[r];
      const bool none = l <= 0.0f;
      const float inv = none ? 0.0f : 1.0f / l;
      const float lse = none ? neg_inf : s.m[r] + std::log(l);
      const int64_t slot = job.slot[occ];
      if (slot < 0) {
        StoreStridedScaled(DType::kF32, s.ot + r, mp, dim, inv, job.out,
                           Offset(job.out_stride, b, qi, h), job.out_stride[3]);
        if (job.lse != nullptr) {
          job.lse[b * job.lse_stride[0] + h * job.lse_stride[1] + qi * job.lse_stride[2]] = lse;
        }
      } else {
        float* dst = job.state_out + slot * static_cast<int64_t>(dim);
        for (size_t d = 0; d < dim; ++d) dst[d] = inv * s.ot[d * mp + r];
        job.state_lse[slot] = lse;
      }
    }
  }
}

void RunSegments(const Job& job, int32_t threads) {
  const int32_t workers =
      static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>(threads, job.num_segments)));
  std::vector<Scratch> scratch(static_cast<size_t>(workers));
  for (Scratch& s : scratch) s.Init(static_cast<size_t>(job.dim));
  const bool fast = job.fast;
  ParallelFor(workers, job.num_segments, [&](int64_t seg, int32_t worker) {
    Scratch& s = scratch[static_cast<size_t>(worker)];
    if (fast && job.dim == 64) return RunSegment<64>(job, seg, s);
    if (fast && job.dim == 128) return RunSegment<128>(job, seg, s);
    if (fast && job.dim == 256) return RunSegment<256>(job, seg, s);
    RunSegment<0>(job, seg, s);
  });
}

}  // namespace gathered_impl

void RunGatheredSegments(const approx::gathered::Job& job, int32_t threads) {
  gathered_impl::RunSegments(job, threads);
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/dispatch.h"
#include "core/guard.h"
#include "core/parallel.h"

namespace tessera {

HWY_EXPORT(RunGatheredSegments);

namespace approx {

namespace {

std::string Str(int64_t x) { return std::to_string(x); }

Status Invalid(const std::string& name, const std::string& what, const std::string& got) {
  return Status::InvalidArgument(Expected(name.c_str(), what, got));
}

Status CheckView(const char* name, const TensorView& t, const int64_t* shape, bool writable) {
  if (t.data == nullptr && t.numel() != 0) return Invalid(name, "a non-null pointer", "nullptr");
  if (t.dtype != DType::kF32) return Invalid(name, "dtype f32", DTypeName(t.dtype));
  return CheckShape(name, t, 4, shape, "[B, S, H, D]", writable);
}

// Offsets non-decreasing from 0 over `n` + 1 entries.
Status CheckOffsets(const char* name, const int64_t* offsets, int64_t n) {
  if (offsets == nullptr) return Invalid(name, "a non-null array", "nullptr");
  if (offsets[0] != 0) return Invalid(std::string(name) + "[0]", "0", Str(offsets[0]));
  for (int64_t i = 0; i < n; ++i) {
    if (offsets[i + 1] < offsets[i]) {
      return Invalid(std::string(name) + "[" + Str(i + 1) + "]",
                     "a value >= the previous one (" + Str(offsets[i]) + ")", Str(offsets[i + 1]));
    }
  }
  return Status::Ok();
}

Status CheckIndices(const char* name, const int32_t* index, int64_t n, int64_t limit) {
  if (n > 0 && index == nullptr) return Invalid(name, "a non-null array", "nullptr");
  for (int64_t i = 0; i < n; ++i) {
    if (index[i] < 0 || index[i] >= limit) {
      return Invalid(std::string(name) + "[" + Str(i) + "]",
                     "a token index in [0, " + Str(limit) + ")", Str(index[i]));
    }
  }
  return Status::Ok();
}

// Merges the states of row `row`'s tokens listed more than once and writes (0, -inf) to those
// listed nowhere. `multi` holds the row's multi-listed occurrences (slot order = occurrence
// order, which is ascending segment order).
void FinishRow(const gathered::Job& job, int64_t row, int64_t seq_q, const int32_t* count,
               const std::vector<int64_t>& occ_of_slot, int64_t slot_begin, int64_t slot_end) {
  const int64_t b = row / job.heads_q, h = row % job.heads_q, D = job.dim;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const auto out_at = [&](int64_t t) {
    return job.out + b * job.out_stride[0] + t * job.out_stride[1] + h * job.out_stride[2];
  };
  const auto lse_at = [&](int64_t t) {
    return job.lse + b * job.lse_stride[0] + h * job.lse_stride[1] + t * job.lse_stride[2];
  };
  for (int64_t t = 0; t < seq_q; ++t) {
    if (count[t] != 0) continue;
    float* o = out_at(t);
    for (int64_t d = 0; d < D; ++d) o[d * job.out_stride[3]] = 0.0f;
    if (job.lse != nullptr) *lse_at(t) = neg_inf;
  }
  if (slot_end == slot_begin) return;
  // The slots of each multi-listed token, in slot order (a stable counting sort by token).
  std::vector<int64_t> first(static_cast<size_t>(seq_q) + 1, 0);
  for (int64_t sl = slot_begin; sl < slot_end; ++sl) {
    ++first[static_cast<size_t>(job.seg.q_index[occ_of_slot[sl]]) + 1];
  }
  for (int64_t t = 0; t < seq_q; ++t) first[t + 1] += first[t];
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  std::vector<int64_t> slots(static_cast<size_t>(slot_end - slot_begin));
  for (int64_t sl = slot_begin; sl < slot_end; ++sl) {
    slots[fill[job.seg.q_index[occ_of_slot[sl]]]++] = sl;
  }
  std::vector<float> acc(static_cast<size_t>(D));
  for (int64_t t = 0; t < seq_q; ++t) {
    const int64_t a = first[t], e = first[t + 1];
    if (a == e) continue;
    // MergeStates: M = max LSE_r, lse = M + ln sum exp(LSE_r - M), O = sum exp(LSE_r - lse) O_r.
    float mx = neg_inf;
    bool nan = false;
    for (int64_t i = a; i < e; ++i) {
      const float x = job.state_lse[slots[i]];
      nan = nan || std::isnan(x);
      mx = std::max(mx, x);
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    float lse = neg_inf;
    if (nan) {
      lse = std::numeric_limits<float>::quiet_NaN();
      std::fill(acc.begin(), acc.end(), lse);
    } else if (mx != neg_inf) {
      float sum = 0.0f;
      for (int64_t i = a; i < e; ++i) sum += std::exp(job.state_lse[slots[i]] - mx);
      lse = mx + std::log(sum);
      for (int64_t i = a; i < e; ++i) {
        const float x = job.state_lse[slots[i]];
        if (x == neg_inf) continue;
        const float w = std::exp(x - lse);
        const float* o = job.state_out + slots[i] * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * o[d];
      }
    }
    float* o = out_at(t);
    for (int64_t d = 0; d < D; ++d) o[d * job.out_stride[3]] = acc[d];
    if (job.lse != nullptr) *lse_at(t) = lse;
  }
}

}  // namespace

Status GatheredAttention(const GatheredAttentionParams& p, const Context& ctx) try {
  const int64_t any4[4] = {-1, -1, -1, -1};
  Status s = CheckView("q", p.q, any4, false);
  if (!s.ok()) return s;
  const int64_t B = p.q.shape[0], Sq = p.q.shape[1], Hq = p.q.shape[2], D = p.q.shape[3];
  const int64_t k_shape[4] = {B, -1, -1, D};
  s = CheckView("k", p.k, k_shape, false);
  if (!s.ok()) return s;
  const int64_t Sk = p.k.shape[1], Hkv = p.k.shape[2];
  if (Hkv < 1 || Hq % Hkv != 0) {
    return Invalid("k", "a KV head count dividing q's " + Str(Hq) + " heads", Str(Hkv));
  }
  if (D < 1 || D > kMaxHeadDim) {
    return Invalid("q", "a head dim in [1, " + Str(kMaxHeadDim) + "]", Str(D));
  }
  const int64_t v_shape[4] = {B, Sk, Hkv, D};
  s = CheckView("v", p.v, v_shape, false);
  if (!s.ok()) return s;
  const int64_t out_shape[4] = {B, Sq, Hq, D};
  s = CheckView("out", p.out, out_shape, true);
  if (!s.ok()) return s;
  if (p.lse.data != nullptr) {
    const int64_t lse_shape[3] = {B, Hq, Sq};
    if (p.lse.dtype != DType::kF32) return Invalid("lse", "dtype f32", DTypeName(p.lse.dtype));
    s = CheckShape("lse", p.lse, 3, lse_shape, "[B, Hq, Sq]", true);
    if (!s.ok()) return s;
  }
  if (!std::isfinite(p.scale)) return Invalid("scale", "a finite value", std::to_string(p.scale));
  std::vector<Region> outputs = {ViewRegion("out", p.out)};
  if (p.lse.data != nullptr) outputs.push_back(ViewRegion("lse", p.lse));
  s = CheckDisjoint(outputs, {ViewRegion("q", p.q), ViewRegion("k", p.k), ViewRegion("v", p.v)});
  if (!s.ok()) return s;

  const GatheredSegments& g = p.segments;
  const int64_t rows = B * Hq;
  s = CheckOffsets("segments.row_begin", g.row_begin, rows);
  if (!s.ok()) return s;
  const int64_t nseg = g.row_begin[rows];
  s = CheckOffsets("segments.q_begin", g.q_begin, nseg);
  if (s.ok()) s = CheckOffsets("segments.k_begin", g.k_begin, nseg);
  if (s.ok()) s = CheckIndices("segments.q_index", g.q_index, g.q_begin[nseg], Sq);
  if (s.ok()) s = CheckIndices("segments.k_index", g.k_index, g.k_begin[nseg], Sk);
  if (!s.ok()) return s;
  if (p.out.numel() == 0) return Status::Ok();

  // Where each query occurrence's state goes: straight to out for a token listed once in its
  // row, else a merge slot (slots numbered in occurrence order, so ascending segment order).
  const int64_t total_q = g.q_begin[nseg];
  std::vector<int64_t> segment_row(static_cast<size_t>(nseg));
  std::vector<int32_t> count(static_cast<size_t>(rows * Sq), 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t sg = g.row_begin[r]; sg < g.row_begin[r + 1]; ++sg) {
      segment_row[sg] = r;
      for (int64_t o = g.q_begin[sg]; o < g.q_begin[sg + 1]; ++o) ++count[r * Sq + g.q_index[o]];
    }
  }
  std::vector<int64_t> slot(static_cast<size_t>(total_q), -1);
  std::vector<int64_t> occ_of_slot;
  std::vector<int64_t> row_slots(static_cast<size_t>(rows) + 1, 0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = g.q_begin[g.row_begin[r]]; o < g.q_begin[g.row_begin[r + 1]]; ++o) {
      if (count[r * Sq + g.q_index[o]] < 2) continue;
      slot[o] = static_cast<int64_t>(occ_of_slot.size());
      occ_of_slot.push_back(o);
    }
    row_slots[r + 1] = static_cast<int64_t>(occ_of_slot.size());
  }
  std::vector<float> state_out(occ_of_slot.size() * static_cast<size_t>(D));
  std::vector<float> state_lse(occ_of_slot.size());

  gathered::Job job;
  job.q = static_cast<const float*>(p.q.data);
  job.k = static_cast<const float*>(p.k.data);
  job.v = static_cast<const float*>(p.v.data);
  job.out = static_cast<float*>(p.out.data);
  job.lse = static_cast<float*>(p.lse.data);
  for (int i = 0; i < 4; ++i) {
    job.q_stride[i] = p.q.strides[i];
    job.k_stride[i] = p.k.strides[i];
    job.v_stride[i] = p.v.strides[i];
    job.out_stride[i] = p.out.strides[i];
  }
  for (int i = 0; i < 3; ++i) job.lse_stride[i] = p.lse.data != nullptr ? p.lse.strides[i] : 0;
  job.heads_q = Hq;
  job.group = Hq / Hkv;
  job.dim = D;
  job.scale = p.scale;
  job.causal = p.causal;
  job.seg = g;
  job.segment_row = segment_row.data();
  job.num_segments = nseg;
  job.slot = slot.data();
  job.state_out = state_out.data();
  job.state_lse = state_lse.data();
  job.fast = ctx.path != Path::kGeneric && HasFastHeadDim(D);
  const int32_t threads = ResolveThreads(ctx);
  HWY_DYNAMIC_DISPATCH(RunGatheredSegments)(job, threads);
  ParallelFor(threads, rows, [&](int64_t r, int32_t) {
    FinishRow(job, r, Sq, count.data() + r * Sq, occ_of_slot, row_slots[r], row_slots[r + 1]);
  });
  return Status::Ok();
}
TESSERA_CATCH_ALL("GatheredAttention")

}  // namespace approx
}  // namespace tessera
#endif  // HWY_ONCE
