// SPDX-License-Identifier: Apache-2.0
#include "distributed_cases.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "tessera/attention.h"
#include "tessera/linear.h"

namespace tessera {
namespace test {
namespace {

std::vector<float> Random(int64_t n, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(gen);
  return v;
}

// Global positions of each rank's rows under a layout.
std::vector<std::vector<int64_t>> GlobalRows(ShardLayout layout,
                                             const std::vector<int64_t>& lengths) {
  std::vector<std::vector<ShardSegment>> segs;
  EXPECT_TRUE(PlanShards(layout, lengths, &segs).ok());
  std::vector<std::vector<int64_t>> rows(lengths.size());
  for (size_t r = 0; r < lengths.size(); ++r)
    for (const auto& s : segs[r])
      for (int64_t i = 0; i < s.length; ++i) rows[r].push_back(s.global_start + i);
  return rows;
}

// Rows `rows` of a [B, N, H, D] tensor, as a [B, rows, H, D] tensor.
std::vector<float> Gather(const std::vector<float>& x, const Shape& s, int64_t h,
                          const std::vector<int64_t>& rows) {
  std::vector<float> out;
  for (int64_t b = 0; b < s.b; ++b)
    for (int64_t t : rows)
      for (int64_t i = 0; i < h * s.d; ++i) out.push_back(x[(b * s.n + t) * h * s.d + i]);
  return out;
}

double MaxRelDiff(const std::vector<float>& got, const std::vector<float>& want) {
  double scale = 1e-30, diff = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    scale = std::max(scale, double(std::fabs(want[i])));
    diff = std::max(diff, double(std::fabs(got[i] - want[i])));
  }
  return diff / std::max(1.0, scale);
}

}  // namespace

std::string Name(const Case& c) {
  return std::string(c.algo == Algo::kRing ? "ring" : "ulysses") + " P=" + std::to_string(c.ranks) +
         " " + ShardLayoutName(c.layout) + (c.causal ? " causal" : "") +
         " N=" + std::to_string(c.shape.n) + " window " + std::to_string(c.window_left) + "," +
         std::to_string(c.window_right) + " Hq=" + std::to_string(c.shape.hq) +
         " Hkv=" + std::to_string(c.shape.hkv);
}

std::vector<int64_t> Lengths(const Case& c) {
  if (!c.lengths.empty()) return c.lengths;
  std::vector<int64_t> l(c.ranks);
  for (int r = 0; r < c.ranks; ++r) {
    l[r] = c.layout == ShardLayout::kZigzag
               ? ZigzagShardLength(c.shape.n, c.ranks, r)
               : c.shape.n / c.ranks + (r < c.shape.n % c.ranks ? 1 : 0);
  }
  return l;
}

std::string CheckRank(const Case& c, int r, Communicator& comm) {
  const Shape& s = c.shape;
  const auto q = Random(s.b * s.n * s.hq * s.d, 1), k = Random(s.b * s.n * s.hkv * s.d, 2),
             v = Random(s.b * s.n * s.hkv * s.d, 3), dout = Random(s.b * s.n * s.hq * s.d, 4);
  std::vector<float> out(q.size()), lse(s.b * s.hq * s.n), dq(q.size()), dk(k.size()), dv(v.size());
  AttentionParams full;
  full.q = MakeView4(const_cast<float*>(q.data()), DType::kF32, s.b, s.n, s.hq, s.d);
  full.k = MakeView4(const_cast<float*>(k.data()), DType::kF32, s.b, s.n, s.hkv, s.d);
  full.v = MakeView4(const_cast<float*>(v.data()), DType::kF32, s.b, s.n, s.hkv, s.d);
  full.out = MakeView4(out.data(), DType::kF32, s.b, s.n, s.hq, s.d);
  full.lse = MakeView3(lse.data(), DType::kF32, s.b, s.hq, s.n);
  full.causal = c.causal;
  full.window_left = c.window_left;
  full.window_right = c.window_right;
  Context ctx;
  ctx.num_threads = 1;
  if (!AttentionForward(full, ctx).ok()) return "single-process forward failed";
  AttentionBackwardParams fb;
  fb.forward = full;
  fb.dout = MakeView4(const_cast<float*>(dout.data()), DType::kF32, s.b, s.n, s.hq, s.d);
  fb.dq = MakeView4(dq.data(), DType::kF32, s.b, s.n, s.hq, s.d);
  fb.dk = MakeView4(dk.data(), DType::kF32, s.b, s.n, s.hkv, s.d);
  fb.dv = MakeView4(dv.data(), DType::kF32, s.b, s.n, s.hkv, s.d);
  if (!AttentionBackward(fb, ctx).ok()) return "single-process backward failed";

  const auto lengths = Lengths(c);
  const auto rows = GlobalRows(c.layout, lengths);
  {
    const int64_t n = lengths[r];
    auto lq = Gather(q, s, s.hq, rows[r]), lk = Gather(k, s, s.hkv, rows[r]),
         lv = Gather(v, s, s.hkv, rows[r]), ldout = Gather(dout, s, s.hq, rows[r]);
    std::vector<float> lout(lq.size(), NAN), llse(s.b * s.hq * n, NAN), ldq(lq.size(), NAN),
        ldk(lk.size(), NAN), ldv(lv.size(), NAN);
    SequenceParallelParams p;
    p.layout = c.layout;
    p.local.q = MakeView4(lq.data(), DType::kF32, s.b, n, s.hq, s.d);
    p.local.k = MakeView4(lk.data(), DType::kF32, s.b, n, s.hkv, s.d);
    p.local.v = MakeView4(lv.data(), DType::kF32, s.b, n, s.hkv, s.d);
    p.local.out = MakeView4(lout.data(), DType::kF32, s.b, n, s.hq, s.d);
    p.local.lse = MakeView3(llse.data(), DType::kF32, s.b, s.hq, n);
    p.local.causal = c.causal;
    p.local.window_left = c.window_left;
    p.local.window_right = c.window_right;
    Context one;
    one.num_threads = 1;
    Status st = c.algo == Algo::kRing ? RingAttentionForward(p, comm, one)
                                      : UlyssesAttentionForward(p, comm, one);
    if (!st.ok()) return st.ToString();
    SequenceParallelBackwardParams bp;
    bp.layout = c.layout;
    bp.local.forward = p.local;
    bp.local.dout = MakeView4(ldout.data(), DType::kF32, s.b, n, s.hq, s.d);
    bp.local.dq = MakeView4(ldq.data(), DType::kF32, s.b, n, s.hq, s.d);
    bp.local.dk = MakeView4(ldk.data(), DType::kF32, s.b, n, s.hkv, s.d);
    bp.local.dv = MakeView4(ldv.data(), DType::kF32, s.b, n, s.hkv, s.d);
    st = c.algo == Algo::kRing ? RingAttentionBackward(bp, comm, one)
                               : UlyssesAttentionBackward(bp, comm, one);
    if (!st.ok()) return st.ToString();
    std::vector<float> want_lse;
    for (int64_t b = 0; b < s.b; ++b)
      for (int64_t h = 0; h < s.hq; ++h)
        for (int64_t t : rows[r]) want_lse.push_back(lse[(b * s.hq + h) * s.n + t]);
    const double e_out = MaxRelDiff(lout, Gather(out, s, s.hq, rows[r]));
    const double e_lse = MaxRelDiff(llse, want_lse);
    const double e_dq = MaxRelDiff(ldq, Gather(dq, s, s.hq, rows[r]));
    const double e_dk = MaxRelDiff(ldk, Gather(dk, s, s.hkv, rows[r]));
    const double e_dv = MaxRelDiff(ldv, Gather(dv, s, s.hkv, rows[r]));
    if (!(e_out <= 2e-6 && e_lse <= 2e-6 && e_dq <= 2e-5 && e_dk <= 2e-5 && e_dv <= 2e-5)) {
      return "rank " + std::to_string(r) + ": out " + std::to_string(e_out) + " lse " +
             std::to_string(e_lse) + " dq " + std::to_string(e_dq) + " dk " + std::to_string(e_dk) +
             " dv " + std::to_string(e_dv);
    }
  }
  return "";
}

std::string Name(const Lasp2Case& c) {
  static const char* names[] = {"plain", "decay", "gla", "scalar-gla", "normalized-elu", "taylor"};
  std::string lengths;
  for (int64_t l : c.lengths) lengths += (lengths.empty() ? " lengths " : ",") + std::to_string(l);
  return std::string("lasp2 ") + names[static_cast<int>(c.variant)] +
         " P=" + std::to_string(c.ranks) + " N=" + std::to_string(c.shape.n) +
         " Hq=" + std::to_string(c.shape.hq) + " Hkv=" + std::to_string(c.shape.hkv) + lengths;
}

std::string CheckLasp2Rank(const Lasp2Case& c, int r, Communicator& comm) {
  const Shape& s = c.shape;
  const bool gla = c.variant == LinearVariant::kGla || c.variant == LinearVariant::kScalarGla;
  const bool scalar = c.variant == LinearVariant::kScalarGla;
  auto q = Random(s.b * s.n * s.hq * s.d, 11), k = Random(s.b * s.n * s.hkv * s.d, 12),
       v = Random(s.b * s.n * s.hkv * s.d, 13), dout = Random(s.b * s.n * s.hq * s.d, 14);
  // Keys small enough that plain linear attention stays O(1) over the sequence.
  for (float& x : k) x *= 0.3f;
  const int64_t gate_width = scalar ? 1 : s.d;
  std::vector<float> gates = Random(s.b * s.n * s.hq * gate_width, 15);
  for (float& g : gates) g = -0.05f - 0.2f * std::fabs(g);  // log-space gates <= 0
  std::vector<float> decay(s.hq);
  for (int64_t h = 0; h < s.hq; ++h) decay[h] = 0.8f + 0.05f * float(h);

  auto setup = [&](LinearAttentionParams* p) {
    p->causal = true;
    p->chunk_size = 16;
    if (c.variant == LinearVariant::kDecay) p->decay = MakeView1(decay.data(), DType::kF32, s.hq);
    if (c.variant == LinearVariant::kNormalizedElu) {
      p->feature_map = LinearFeatureMap::kElu1;
      p->normalize = true;
    }
    if (c.variant == LinearVariant::kTaylor) p->feature_map = LinearFeatureMap::kTaylor2;
  };
  auto gates_view = [&](float* data, int64_t n) {
    return scalar ? MakeView3(data, DType::kF32, s.b, n, s.hq)
                  : MakeView4(data, DType::kF32, s.b, n, s.hq, s.d);
  };
  std::vector<float> out(q.size()), dq(q.size()), dk(k.size()), dv(v.size()), dg(gates.size());
  LinearAttentionParams full;
  setup(&full);
  full.q = MakeView4(q.data(), DType::kF32, s.b, s.n, s.hq, s.d);
  full.k = MakeView4(k.data(), DType::kF32, s.b, s.n, s.hkv, s.d);
  full.v = MakeView4(v.data(), DType::kF32, s.b, s.n, s.hkv, s.d);
  full.out = MakeView4(out.data(), DType::kF32, s.b, s.n, s.hq, s.d);
  if (gla) full.gates = gates_view(gates.data(), s.n);
  Context ctx;
  ctx.num_threads = 1;
  Status st = LinearAttentionForward(full, ctx);
  if (!st.ok()) return "single-process forward: " + st.ToString();
  LinearAttentionBackwardParams fb;
  fb.forward = full;
  fb.dout = MakeView4(dout.data(), DType::kF32, s.b, s.n, s.hq, s.d);
  fb.dq = MakeView4(dq.data(), DType::kF32, s.b, s.n, s.hq, s.d);
  fb.dk = MakeView4(dk.data(), DType::kF32, s.b, s.n, s.hkv, s.d);
  fb.dv = MakeView4(dv.data(), DType::kF32, s.b, s.n, s.hkv, s.d);
  if (gla) fb.dgates = gates_view(dg.data(), s.n);
  st = LinearAttentionBackward(fb, ctx);
  if (!st.ok()) return "single-process backward: " + st.ToString();

  std::vector<int64_t> lengths = c.lengths;
  if (lengths.empty()) {
    for (int i = 0; i < c.ranks; ++i) lengths.push_back(s.n / c.ranks + (i < s.n % c.ranks));
  }
  const auto rows = GlobalRows(ShardLayout::kContiguous, lengths);
  const int64_t n = lengths[r];
  auto lq = Gather(q, s, s.hq, rows[r]), lk = Gather(k, s, s.hkv, rows[r]),
       lv = Gather(v, s, s.hkv, rows[r]), ldout = Gather(dout, s, s.hq, rows[r]);
  // Gates rows: [B, N, Hq, w] like a tensor of Hq heads of width w.
  const Shape gs{s.b, s.n, s.hq, s.hq, gate_width};
  auto lg = Gather(gates, gs, s.hq, rows[r]);
  std::vector<float> lout(lq.size(), NAN), ldq(lq.size(), NAN), ldk(lk.size(), NAN),
      ldv(lv.size(), NAN), ldg(lg.size(), NAN);
  Lasp2Params p;
  setup(&p.local);
  p.local.q = MakeView4(lq.data(), DType::kF32, s.b, n, s.hq, s.d);
  p.local.k = MakeView4(lk.data(), DType::kF32, s.b, n, s.hkv, s.d);
  p.local.v = MakeView4(lv.data(), DType::kF32, s.b, n, s.hkv, s.d);
  p.local.out = MakeView4(lout.data(), DType::kF32, s.b, n, s.hq, s.d);
  if (gla) p.local.gates = gates_view(lg.data(), n);
  st = Lasp2Forward(p, comm, ctx);
  if (!st.ok()) return st.ToString();
  Lasp2BackwardParams bp;
  bp.local.forward = p.local;
  bp.local.dout = MakeView4(ldout.data(), DType::kF32, s.b, n, s.hq, s.d);
  bp.local.dq = MakeView4(ldq.data(), DType::kF32, s.b, n, s.hq, s.d);
  bp.local.dk = MakeView4(ldk.data(), DType::kF32, s.b, n, s.hkv, s.d);
  bp.local.dv = MakeView4(ldv.data(), DType::kF32, s.b, n, s.hkv, s.d);
  if (gla) bp.local.dgates = gates_view(ldg.data(), n);
  st = Lasp2Backward(bp, comm, ctx);
  if (!st.ok()) return st.ToString();
  const double e_out = MaxRelDiff(lout, Gather(out, s, s.hq, rows[r]));
  const double e_dq = MaxRelDiff(ldq, Gather(dq, s, s.hq, rows[r]));
  const double e_dk = MaxRelDiff(ldk, Gather(dk, s, s.hkv, rows[r]));
  const double e_dv = MaxRelDiff(ldv, Gather(dv, s, s.hkv, rows[r]));
  const double e_dg = gla ? MaxRelDiff(ldg, Gather(dg, gs, s.hq, rows[r])) : 0.0;
  // The chunked engine regroups its sums differently on a shard than on the whole sequence:
  // agreement to fp32 rounding of O(1) values accumulated over N tokens.
  const double tol = 2e-5;
  if (!(e_out <= tol && e_dq <= tol && e_dk <= tol && e_dv <= tol && e_dg <= tol)) {
    return "rank " + std::to_string(r) + ": out " + std::to_string(e_out) + " dq " +
           std::to_string(e_dq) + " dk " + std::to_string(e_dk) + " dv " + std::to_string(e_dv) +
           " dgates " + std::to_string(e_dg);
  }
  return "";
}

}  // namespace test
}  // namespace tessera
