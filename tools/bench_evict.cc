// SPDX-License-Identifier: Apache-2.0
// `tessera bench --op evict`: an eviction policy (kv_policy.h) and CompactKV over a multi-layer
// KV cache, and the quality of what is left.
//
// Per layer, the first N tokens' keys and values form the cache (KVCache + AppendKV, --kv-dtype,
// contiguous or --page-size pages) and M later tokens' queries are held out. Each policy gets
// the statistics it reads from the real calls: the prefill window statistics of the last W
// query rows over the cache tokens (AttentionForward with AttentionStats: key_mass and
// key_mass_sq per query head; H2O's accumulated attention is the key_mass of every row), or
// the current query's probabilities (Decode with DecodeStats::probs for the last cache token's
// query: TOVA). Where this build's kernels do not compute statistics yet (Unimplemented), the
// fp64 references give them instead (stats_source in the report). The held-out queries then
// attend (Decode, every cache token visible) to the full cache and to the compacted one;
// out_error is the relative Frobenius error of their outputs, per layer and the mean.
//
// Windows: SnapKV and CAKE keep the last min(W, budget) tokens (their observation window), H2O
// the last min(W, budget / 2) (its paper's even split of heavy hitters and recent tokens),
// StreamingLLM --sinks first tokens and the most recent rest; PyramidKV's beta is 20 and SnapKV's
// pooling a max over 7 keys (both as in their papers), CAKE's an average over 5.
//
// ms: the policy and CompactKV, the median of --reps repeats (default 5; the cache restored
// from a copy before each) summed over the layers, CAKE's preferences and allocation (once)
// included; ms_min the same with the fastest repeats; the statistics are stats_ms.
//
// Data: --data synthetic builds per-layer Q/K/V with planted structure (bench_evict.cc's
// SyntheticLayer: heavy hitters every query sees, a recency pattern, per-layer attention
// temperature, and a needle key that only the held-out queries look for); --data PATH.npz
// reads arrays q [L, S, Hq, D], k, v [L, S, Hkv, D] f32 from an uncompressed .npz
// (bench/record_minilm.py), with N = S - M.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "bench_harness.h"
#include "ref/attention_ref.h"
#include "ref/decode_ref.h"
#include "tessera/attention.h"
#include "tessera/decode.h"
#include "tessera/kv_cache.h"
#include "tessera/kv_policy.h"
#include "tessera/system.h"
#include "tessera/version.h"

namespace tessera {
namespace cli {
namespace bench {
namespace {

// One layer's inputs: T = N + M tokens.
struct LayerData {
  std::vector<float> q;  // [T, Hq, D]
  std::vector<float> k;  // [T, Hkv, D]
  std::vector<float> v;  // [T, Hkv, D]
};

struct EvictData {
  int64_t layers = 0, tokens = 0, heads = 0, kv_heads = 0, dim = 0;
  std::vector<LayerData> layer;
};

// ---------------------------------------------------------------------------------------------
// Uncompressed .npz: a zip archive of .npy members (np.savez). The central directory gives
// each member's local header, after which its bytes follow as stored.

uint64_t Le(const uint8_t* p, int bytes) {
  uint64_t x = 0;
  for (int i = bytes - 1; i >= 0; --i) x = (x << 8) | p[i];
  return x;
}

bool ReadNpz(const std::string& path, std::map<std::string, NpyArray>* arrays, std::string* error) {
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    *error = path + ": cannot open";
    return false;
  }
  const std::vector<uint8_t> z((std::istreambuf_iterator<char>(f)),
                               std::istreambuf_iterator<char>());
  const auto bad = [&](const std::string& what) {
    *error = path + ": not an uncompressed .npz (" + what + ")";
    return false;
  };
  if (z.size() < 22) return bad("too short for a zip archive");
  int64_t eocd = -1;
  for (int64_t i = static_cast<int64_t>(z.size()) - 22; i >= 0 && i + 65557 >= int64_t(z.size());
       --i) {
    if (Le(&z[size_t(i)], 4) == 0x06054b50) {
      eocd = i;
      break;
    }
  }
  if (eocd < 0) return bad("no end-of-central-directory record");
  uint64_t entries = Le(&z[size_t(eocd) + 10], 2);
  uint64_t cd = Le(&z[size_t(eocd) + 16], 4);
  if (cd == 0xFFFFFFFFu && eocd >= 20 && Le(&z[size_t(eocd) - 20], 4) == 0x07064b50) {
    const uint64_t z64 = Le(&z[size_t(eocd) - 12], 8);
    if (z64 + 56 > z.size() || Le(&z[z64], 4) != 0x06064b50) return bad("bad zip64 record");
    entries = Le(&z[z64 + 32], 8);
    cd = Le(&z[z64 + 48], 8);
  }
  uint64_t at = cd;
  for (uint64_t e = 0; e < entries; ++e) {
    if (at + 46 > z.size() || Le(&z[at], 4) != 0x02014b50) return bad("bad central directory");
    const uint64_t method = Le(&z[at + 10], 2);
    uint64_t csize = Le(&z[at + 20], 4), usize = Le(&z[at + 24], 4);
    const uint64_t name_len = Le(&z[at + 28], 2), extra_len = Le(&z[at + 30], 2);
    const uint64_t comment_len = Le(&z[at + 32], 2);
    uint64_t local = Le(&z[at + 42], 4);
    if (at + 46 + name_len + extra_len > z.size()) return bad("truncated central directory");
    const std::string name(reinterpret_cast<const char*>(&z[at + 46]), size_t(name_len));
    // Zip64 sizes and offset, in that order, for the fields set to 0xFFFFFFFF.
    for (uint64_t x = at + 46 + name_len; x + 4 <= at + 46 + name_len + extra_len;) {
      const uint64_t id = Le(&z[x], 2), len = Le(&z[x + 2], 2);
      if (id == 1) {
        uint64_t y = x + 4;
        if (usize == 0xFFFFFFFFu) usize = Le(&z[y], 8), y += 8;
        if (csize == 0xFFFFFFFFu) csize = Le(&z[y], 8), y += 8;
        if (local == 0xFFFFFFFFu) local = Le(&z[y], 8);
      }
      x += 4 + len;
    }
    if (method != 0)
      return bad(name + " is compressed: write it with np.savez, not savez_compressed");
    if (local + 30 > z.size() || Le(&z[local], 4) != 0x04034b50) return bad("bad local header");
    const uint64_t data = local + 30 + Le(&z[local + 26], 2) + Le(&z[local + 28], 2);
    if (data + usize > z.size() || csize != usize) return bad(name + " is truncated");
    std::string key = name;
    if (key.size() > 4 && key.compare(key.size() - 4, 4, ".npy") == 0) key.resize(key.size() - 4);
    NpyArray array;
    std::string npy_error;
    if (!ParseNpy(&z[data], size_t(usize), {DType::kF32}, &array, &npy_error)) {
      *error = path + ": member " + name + ": " + npy_error;
      return false;
    }
    (*arrays)[key] = std::move(array);
    at += 46 + name_len + extra_len + comment_len;
  }
  return true;
}

bool LoadEvictData(const std::string& path, EvictData* d, std::string* error) {
  std::map<std::string, NpyArray> a;
  if (!ReadNpz(path, &a, error)) return false;
  for (const char* name : {"q", "k", "v"}) {
    if (a.count(name) == 0 || a[name].shape.size() != 4) {
      *error = path + ": expected arrays q [L, S, Hq, D], k and v [L, S, Hkv, D] (float32), got " +
               (a.count(name) == 0 ? std::string("no ") + name
                                   : std::string(name) + " " + ShapeToString(a[name].shape));
      return false;
    }
  }
  const std::vector<int64_t>& qs = a["q"].shape;
  const std::vector<int64_t>& ks = a["k"].shape;
  if (a["v"].shape != ks || ks[0] != qs[0] || ks[1] != qs[1] || ks[3] != qs[3] || ks[2] < 1 ||
      qs[2] % ks[2] != 0) {
    *error = path +
             ": expected q [L, S, Hq, D] and k, v [L, S, Hkv, D] with Hq a multiple of Hkv, "
             "got q " +
             ShapeToString(qs) + ", k " + ShapeToString(ks) + ", v " + ShapeToString(a["v"].shape);
    return false;
  }
  d->layers = qs[0];
  d->tokens = qs[1];
  d->heads = qs[2];
  d->kv_heads = ks[2];
  d->dim = qs[3];
  const size_t qn = size_t(d->tokens * d->heads * d->dim),
               kn = size_t(d->tokens * d->kv_heads * d->dim);
  for (int64_t l = 0; l < d->layers; ++l) {
    LayerData ld;
    const float* q = reinterpret_cast<const float*>(a["q"].data.get()) + size_t(l) * qn;
    const float* k = reinterpret_cast<const float*>(a["k"].data.get()) + size_t(l) * kn;
    const float* v = reinterpret_cast<const float*>(a["v"].data.get()) + size_t(l) * kn;
    ld.q.assign(q, q + qn);
    ld.k.assign(k, k + kn);
    ld.v.assign(v, v + kn);
    d->layer.push_back(std::move(ld));
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Synthetic layers. Logit contributions (q.k / sqrt(D)) planted on top of normal-ish noise:
//   heavy hitters: 8 tokens (the first and 7 spread over the cache) carry a direction u_h of
//     their KV head, every query carries it too: +4 for each query;
//   recency: the first 16 channels of q and k carry cos / sin of the position at 8 frequencies,
//     so a query prefers the keys just before it (+`local` at distance 0), strong in odd layers;
//   temperature: queries scaled by 0.5 (layer 0) .. 2 (last layer), so early layers attend
//     broadly and late ones sharply;
//   needle: one token at N / 5 carries a direction w_h (orthogonal to u_h) that only every
//     other held-out query carries (+6 for those, noise for the prefill queries), with its
//     value doubled.
void SyntheticLayer(int64_t l, int64_t L, int64_t N, int64_t M, int64_t Hq, int64_t Hkv, int64_t D,
                    uint64_t seed, LayerData* out) {
  const int64_t T = N + M, g = Hq / Hkv;
  Random rng(seed * 1000003 + static_cast<uint64_t>(l) * 7919 + 1);
  out->q.resize(size_t(T * Hq * D));
  out->k.resize(size_t(T * Hkv * D));
  out->v.resize(size_t(T * Hkv * D));
  FillNormalish(out->q.data(), T * Hq * D, &rng);
  FillNormalish(out->k.data(), T * Hkv * D, &rng);
  FillNormalish(out->v.data(), T * Hkv * D, &rng);
  const double sqrt_d = std::sqrt(static_cast<double>(D));
  // Unit directions u_h and w_h (w orthogonal to u).
  std::vector<double> u(size_t(Hkv * D)), w(size_t(Hkv * D));
  for (int64_t h = 0; h < Hkv; ++h) {
    double nu = 0, nw = 0, dot = 0;
    for (int64_t c = 0; c < D; ++c) {
      u[size_t(h * D + c)] = rng.Next();
      w[size_t(h * D + c)] = rng.Next();
    }
    for (int64_t c = 0; c < D; ++c) nu += u[size_t(h * D + c)] * u[size_t(h * D + c)];
    for (int64_t c = 0; c < D; ++c) u[size_t(h * D + c)] /= std::sqrt(nu);
    for (int64_t c = 0; c < D; ++c) dot += u[size_t(h * D + c)] * w[size_t(h * D + c)];
    for (int64_t c = 0; c < D; ++c) w[size_t(h * D + c)] -= dot * u[size_t(h * D + c)];
    for (int64_t c = 0; c < D; ++c) nw += w[size_t(h * D + c)] * w[size_t(h * D + c)];
    for (int64_t c = 0; c < D; ++c) w[size_t(h * D + c)] /= std::sqrt(nw);
  }
  const double hh = std::sqrt(4.0 * sqrt_d), needle = std::sqrt(6.0 * sqrt_d);
  std::vector<int64_t> hitters = {0};
  for (int64_t i = 1; i < 8 && N > 8; ++i) hitters.push_back(1 + (i * N) / 8 - 1 - (i % 3));
  const int64_t needle_pos = N / 5;
  const double local = (l % 2 == 1) ? 6.0 : 2.0;
  const int64_t F = std::min<int64_t>(8, D / 2);
  const double pos_amp = F > 0 ? std::sqrt(local * sqrt_d / static_cast<double>(F)) : 0.0;
  const double temp = L > 1 ? 0.5 + 1.5 * static_cast<double>(l) / static_cast<double>(L - 1) : 1.0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t f = 0; f < F; ++f) {
      const double omega = 1.0 / (2.0 * std::pow(2.0, static_cast<double>(f)));
      const float c = static_cast<float>(pos_amp * std::cos(omega * static_cast<double>(t)));
      const float s = static_cast<float>(pos_amp * std::sin(omega * static_cast<double>(t)));
      for (int64_t h = 0; h < Hkv; ++h) {
        out->k[size_t((t * Hkv + h) * D + 2 * f)] += c;
        out->k[size_t((t * Hkv + h) * D + 2 * f + 1)] += s;
      }
      for (int64_t h = 0; h < Hq; ++h) {
        out->q[size_t((t * Hq + h) * D + 2 * f)] += c;
        out->q[size_t((t * Hq + h) * D + 2 * f + 1)] += s;
      }
    }
    for (int64_t h = 0; h < Hq; ++h) {
      float* q = &out->q[size_t((t * Hq + h) * D)];
      const double* uh = &u[size_t((h / g) * D)];
      const double* wh = &w[size_t((h / g) * D)];
      for (int64_t c = 0; c < D; ++c) {
        double x = q[c] + hh * uh[c];
        if (t >= N && (t - N) % 2 == 0) x += needle * wh[c];
        q[c] = static_cast<float>(temp * x);
      }
    }
  }
  for (int64_t h = 0; h < Hkv; ++h) {
    for (int64_t t : hitters) {
      for (int64_t c = 0; c < D; ++c)
        out->k[size_t((t * Hkv + h) * D + c)] += float(hh * u[size_t(h * D + c)]);
    }
    for (int64_t c = 0; c < D; ++c) {
      out->k[size_t((needle_pos * Hkv + h) * D + c)] += float(needle * w[size_t(h * D + c)]);
      out->v[size_t((needle_pos * Hkv + h) * D + c)] *= 2.0f;
    }
  }
}

// ---------------------------------------------------------------------------------------------

constexpr int kEvictReps = 5;  // timed repeats of the policy + compaction (--reps 0)

struct LayerCache {
  KVCache cache;
  std::vector<int32_t> lens{0};
  std::vector<int32_t> table;
  KVBatchView Batch() {
    KVBatchView kv;
    kv.batch = 1;
    kv.seq_lens = MakeView1(lens.data(), DType::kI32, 1);
    if (!table.empty()) {
      const int64_t shape[2] = {1, static_cast<int64_t>(table.size())};
      kv.block_table = MakeContiguousView(table.data(), DType::kI32, 2, shape);
    }
    return kv;
  }
};

// A layer's pool bytes and tables, to undo a compaction between timed repeats.
struct CacheSnapshot {
  std::vector<uint8_t> k, v;
  std::vector<float> k_scales, v_scales;
  std::vector<int32_t> lens, table;
};

CacheSnapshot Save(LayerCache& lc) {
  const KVCacheView c = lc.cache.view();
  const size_t rows = static_cast<size_t>(c.num_pages * c.num_kv_heads * c.page_size);
  const size_t bytes = rows * static_cast<size_t>(KVRowBytes(c.dtype, c.head_dim));
  CacheSnapshot s;
  s.k.assign(static_cast<uint8_t*>(c.k), static_cast<uint8_t*>(c.k) + bytes);
  s.v.assign(static_cast<uint8_t*>(c.v), static_cast<uint8_t*>(c.v) + bytes);
  if (KVDTypeIsQuantized(c.dtype)) {
    s.k_scales.assign(c.k_scales, c.k_scales + 2 * rows);
    s.v_scales.assign(c.v_scales, c.v_scales + 2 * rows);
  }
  s.lens = lc.lens;
  s.table = lc.table;
  return s;
}

void Restore(const CacheSnapshot& s, LayerCache* lc) {
  const KVCacheView c = lc->cache.view();
  std::memcpy(c.k, s.k.data(), s.k.size());
  std::memcpy(c.v, s.v.data(), s.v.size());
  if (!s.k_scales.empty()) {
    std::memcpy(c.k_scales, s.k_scales.data(), s.k_scales.size() * sizeof(float));
    std::memcpy(c.v_scales, s.v_scales.data(), s.v_scales.size() * sizeof(float));
  }
  lc->lens = s.lens;
  lc->table = s.table;
}

Status BuildCache(KVDType dtype, int64_t page_size, int64_t N, int64_t Hkv, int64_t D,
                  LayerData& ld, const Context& ctx, LayerCache* lc) {
  int64_t pages = 1, ps = N;
  if (page_size > 0) {
    ps = page_size;
    pages = (N + ps - 1) / ps;
    for (int64_t i = 0; i < pages; ++i) lc->table.push_back(static_cast<int32_t>(i));
  }
  Status s = lc->cache.Allocate(dtype, pages, ps, Hkv, D);
  if (!s.ok()) return s;
  AppendKVParams ap;
  ap.k_new = MakeView4(ld.k.data(), DType::kF32, 1, N, Hkv, D);
  ap.v_new = MakeView4(ld.v.data(), DType::kF32, 1, N, Hkv, D);
  ap.cache = lc->cache.view();
  ap.batch = lc->Batch();
  s = AppendKV(ap, ctx);
  if (!s.ok()) return s;
  lc->lens[0] = static_cast<int32_t>(N);
  return Status::Ok();
}

// The outputs [M, Hq, D] of the held-out queries (tokens N .. N + M - 1) over the cache.
Status HeldOut(LayerCache& lc, LayerData& ld, int64_t N, int64_t M, int64_t Hq, int64_t D,
               const Context& ctx, std::vector<float>* out) {
  out->assign(size_t(M * Hq * D), 0.0f);
  for (int64_t i = 0; i < M; i += kMaxDecodeQueries) {
    const int64_t m = std::min(kMaxDecodeQueries, M - i);
    DecodeParams p;
    p.q = MakeView4(&ld.q[size_t((N + i) * Hq * D)], DType::kF32, 1, m, Hq, D);
    p.cache = lc.cache.view();
    p.kv = lc.Batch();
    p.out = MakeView4(&(*out)[size_t(i * Hq * D)], DType::kF32, 1, m, Hq, D);
    const Status s = Decode(p, ctx);
    if (!s.ok()) return s;
  }
  return Status::Ok();
}

// Window statistics [Hq, N] of the last `window` of the N cache tokens' queries.
Status WindowStats(LayerData& ld, int64_t N, int64_t Hq, int64_t Hkv, int64_t D, int64_t window,
                   bool causal, bool want_sq, const Context& ctx, std::vector<float>* km,
                   std::vector<float>* km2, bool* used_reference) {
  km->assign(size_t(Hq * N), 0.0f);
  km2->assign(want_sq ? size_t(Hq * N) : 0, 0.0f);
  std::vector<float> out(size_t(N * Hq * D));
  AttentionParams ap;
  ap.q = MakeView4(ld.q.data(), DType::kF32, 1, N, Hq, D);
  ap.k = MakeView4(ld.k.data(), DType::kF32, 1, N, Hkv, D);
  ap.v = MakeView4(ld.v.data(), DType::kF32, 1, N, Hkv, D);
  ap.out = MakeView4(out.data(), DType::kF32, 1, N, Hq, D);
  ap.causal = causal;
  ap.stats.window = window;
  ap.stats.key_mass = MakeView3(km->data(), DType::kF32, 1, Hq, N);
  if (want_sq) ap.stats.key_mass_sq = MakeView3(km2->data(), DType::kF32, 1, Hq, N);
  Status s = AttentionForward(ap, ctx);
  if (s.code() != StatusCode::kUnimplemented) return s;
  *used_reference = true;
  std::vector<double> a(size_t(Hq * N)), b(want_sq ? size_t(Hq * N) : 0);
  ref::AttentionStatsF64(ap, a.data(), want_sq ? b.data() : nullptr, nullptr);
  for (size_t i = 0; i < a.size(); ++i) (*km)[i] = static_cast<float>(a[i]);
  for (size_t i = 0; i < b.size(); ++i) (*km2)[i] = static_cast<float>(b[i]);
  return Status::Ok();
}

// The last cache token's query's probabilities [Hq, 1, N] over the cache (TOVA).
Status CurrentProbs(LayerCache& lc, LayerData& ld, int64_t N, int64_t Hq, int64_t D,
                    const Context& ctx, std::vector<float>* probs, bool* used_reference) {
  probs->assign(size_t(Hq * N), 0.0f);
  std::vector<float> out(size_t(Hq * D));
  DecodeParams p;
  p.q = MakeView4(&ld.q[size_t((N - 1) * Hq * D)], DType::kF32, 1, 1, Hq, D);
  p.cache = lc.cache.view();
  p.kv = lc.Batch();
  p.out = MakeView4(out.data(), DType::kF32, 1, 1, Hq, D);
  p.stats.probs = MakeView4(probs->data(), DType::kF32, 1, Hq, 1, N);
  Status s = Decode(p, ctx);
  if (s.code() != StatusCode::kUnimplemented) return s;
  *used_reference = true;
  p.stats = DecodeStats();
  std::vector<double> pr(size_t(Hq * N)), o(size_t(Hq * D));
  ref::DecodeRefOptions opt;
  opt.probs = pr.data();
  opt.probs_keys = N;
  ref::DecodeF64WithOptions(p, opt, o.data(), nullptr);
  for (size_t i = 0; i < pr.size(); ++i) (*probs)[i] = static_cast<float>(pr[i]);
  return Status::Ok();
}

double RelativeError(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = static_cast<double>(got[i]) - want[i];
    num += d * d;
    den += static_cast<double>(want[i]) * want[i];
  }
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

const char* const kPolicies[] = {"cake", "h2o", "tova", "snapkv", "pyramidkv", "streaming"};

}  // namespace

int BenchEvict(const BenchOptions& o) {
  const char* cmd = "bench";
  std::string error;
  KVDType kv_dtype = KVDType::kF16;
  Context ctx;
  if (!ParseKVDType(o.kv_dtype, &kv_dtype, &error)) return Fail(cmd, error);
  if (!CheckThreads(o.threads, &error)) return Fail(cmd, error);
  ctx.num_threads = o.threads;
  const std::string& policy = o.policy;
  if (std::find_if(std::begin(kPolicies), std::end(kPolicies),
                   [&](const char* p) { return policy == p; }) == std::end(kPolicies)) {
    return Fail(cmd, "--policy: expected cake, h2o, tova, snapkv, pyramidkv or streaming, got '" +
                         policy + "'");
  }
  if (!(o.budget > 0.0 && o.budget <= 1.0)) {
    return Fail(cmd, "--budget: expected a fraction of the cache in (0, 1], got " +
                         std::to_string(o.budget));
  }
  int64_t window = 32;
  if (!o.window.empty() && !ParseNonNegative("--window", o.window, &window, &error)) {
    return Fail(cmd, error);
  }
  if (window < 1) return Fail(cmd, "--window: expected >= 1 observation rows, got 0");
  if (o.held_out < 1) {
    return Fail(cmd,
                "--held-out: expected >= 1 held-out queries, got " + std::to_string(o.held_out));
  }
  if (o.page_size < 0) {
    return Fail(cmd,
                "--page-size: expected >= 0 (0 = contiguous), got " + std::to_string(o.page_size));
  }
  if (o.layers < 0) return Fail(cmd, "--layers: expected >= 1, got " + std::to_string(o.layers));
  if (o.sinks < 0) return Fail(cmd, "--sinks: expected >= 0, got " + std::to_string(o.sinks));
  if (o.has_mask) return Fail(cmd, "--mask: expected --op forward or backward, got --op evict");

  // Data.
  EvictData data;
  const int64_t M = o.held_out;
  if (o.data == "synthetic") {
    data.layers = o.layers == 0 ? 4 : o.layers;
    data.heads = o.heads;
    data.kv_heads = o.kv_heads == 0 ? o.heads : o.kv_heads;
    data.dim = o.dim;
    if (data.heads < 1 || data.kv_heads < 1 || data.dim < 1 || data.heads % data.kv_heads != 0) {
      return Fail(cmd,
                  "expected --heads, --kv-heads, --dim >= 1 with --heads a multiple of "
                  "--kv-heads, got " +
                      std::to_string(data.heads) + ", " + std::to_string(data.kv_heads) + ", " +
                      std::to_string(data.dim));
    }
    if (o.seq < 2 || o.seq > (int64_t{1} << 20)) {
      return Fail(cmd, "--seq: expected 2..1048576 cache tokens, got " + std::to_string(o.seq));
    }
    int64_t n = 0;
    if (!TensorElements("the queries [L, N + M, Hq, D]",
                        {data.layers, o.seq + M, data.heads, data.dim}, &n, &error)) {
      return Fail(cmd, error);
    }
    data.tokens = o.seq + M;
    data.layer.resize(size_t(data.layers));
    for (int64_t l = 0; l < data.layers; ++l) {
      SyntheticLayer(l, data.layers, o.seq, M, data.heads, data.kv_heads, data.dim, o.seed,
                     &data.layer[size_t(l)]);
    }
  } else {
    if (!LoadEvictData(o.data, &data, &error)) return Fail(cmd, error);
    if (o.layers > data.layers) {
      return Fail(cmd, "--layers: expected at most the " + std::to_string(data.layers) +
                           " layers of " + o.data + ", got " + std::to_string(o.layers));
    }
    if (o.layers > 0 && o.layers < data.layers) {
      data.layers = o.layers;
      data.layer.resize(size_t(o.layers));
    }
    if (data.tokens - M < 2) {
      return Fail(cmd, "--held-out: expected fewer than " + std::to_string(data.tokens - 1) +
                           " of the data's " + std::to_string(data.tokens) + " tokens, got " +
                           std::to_string(M));
    }
  }
  const int64_t L = data.layers, N = data.tokens - M, Hq = data.heads, Hkv = data.kv_heads,
                D = data.dim;
  const int64_t W = std::min(window, N);
  const int64_t budget = std::max<int64_t>(1, std::llround(o.budget * static_cast<double>(N)));

  // Caches, full-cache outputs, statistics.
  std::vector<LayerCache> caches(static_cast<size_t>(L));
  const size_t layers = static_cast<size_t>(L);
  std::vector<std::vector<float>> full(layers), km(layers), km2(layers);
  bool used_reference = false;
  double stats_ms = 0.0;
  for (int64_t l = 0; l < L; ++l) {
    LayerData& ld = data.layer[size_t(l)];
    Status s = BuildCache(kv_dtype, o.page_size, N, Hkv, D, ld, ctx, &caches[size_t(l)]);
    if (s.ok()) s = HeldOut(caches[size_t(l)], ld, N, M, Hq, D, ctx, &full[size_t(l)]);
    if (!s.ok()) return Fail(cmd, s.ToString());
    const auto start = std::chrono::steady_clock::now();
    if (policy == "tova") {
      s = CurrentProbs(caches[size_t(l)], ld, N, Hq, D, ctx, &km[size_t(l)], &used_reference);
    } else if (policy != "streaming") {
      const bool h2o = policy == "h2o";
      s = WindowStats(ld, N, Hq, Hkv, D, h2o ? N : W, o.causal, policy == "cake", ctx,
                      &km[size_t(l)], &km2[size_t(l)], &used_reference);
    }
    if (!s.ok()) return Fail(cmd, s.ToString());
    stats_ms += MillisecondsSince(start);
  }

  // Policy and compaction.
  std::vector<int32_t> seq_lens = {static_cast<int32_t>(N)};
  const EvictionTarget base{MakeView1(seq_lens.data(), DType::kI32, 1), Hkv, budget};
  std::vector<int64_t> budgets(layers, budget);
  CakeParams cake;
  cake.window = W;
  cake.gamma = o.gamma;
  cake.tau1 = o.tau1;
  cake.tau2 = o.tau2;
  double ms = 0.0;
  auto stats_view = [&](std::vector<float>& v) {
    return MakeView3(v.data(), DType::kF32, 1, Hq, N);
  };
  if (policy == "pyramidkv" || policy == "cake") {
    const auto start = std::chrono::steady_clock::now();
    Status s;
    if (policy == "pyramidkv") {
      s = PyramidKVBudgets(budget * L, L, 20.0, &budgets);
    } else {
      CakeAllocator alloc;
      s = alloc.Init(L, budget * L, std::min(W, budget));
      for (int64_t l = 0; l < L && s.ok(); ++l) {
        double pref = 0.0;
        s = CakeLayerPreference(cake, base,
                                {stats_view(km[size_t(l)]), stats_view(km2[size_t(l)]), W}, &pref,
                                nullptr, nullptr);
        if (s.ok()) s = alloc.AddLayer(pref);
      }
      if (s.ok()) budgets = alloc.budgets();
    }
    if (!s.ok()) return Fail(cmd, s.ToString());
    ms += MillisecondsSince(start);
  }
  int64_t kept = 0, freed = 0;
  double ms_min = ms;
  const int reps = o.reps > 0 ? o.reps : kEvictReps;
  std::vector<double> errors;
  Json per_layer = Json::array();
  for (int64_t l = 0; l < L; ++l) {
    EvictionTarget target = base;
    target.budget = std::max<int64_t>(1, budgets[size_t(l)]);
    LayerCache& lc = caches[size_t(l)];
    const CacheSnapshot snapshot = Save(lc);
    KeepSet keep;
    CompactKVResult result;
    std::vector<double> times;
    for (int r = 0; r < reps; ++r) {
      if (r > 0) Restore(snapshot, &lc);  // compaction is in place: each repeat starts full
      const auto start = std::chrono::steady_clock::now();
      Status s;
      if (policy == "streaming") {
        s = StreamingLLMKeep({target, o.sinks}, &keep);
      } else if (policy == "h2o") {
        // H2O's split: half heavy hitters, half recent tokens (at most the window).
        s = H2OKeep({target, stats_view(km[size_t(l)]), std::min(W, target.budget / 2)}, &keep);
      } else if (policy == "tova") {
        s = TovaKeep({target, MakeView4(km[size_t(l)].data(), DType::kF32, 1, Hq, 1, N)}, &keep);
      } else if (policy == "snapkv" || policy == "pyramidkv") {
        s = SnapKVKeep({target, stats_view(km[size_t(l)]), W, 7, PoolKind::kMax}, &keep);
      } else {
        s = CakeKeep(cake, target, {stats_view(km[size_t(l)]), stats_view(km2[size_t(l)]), W},
                     &keep);
      }
      if (s.ok()) {
        CompactKVParams cp;
        cp.cache = lc.cache.view();
        cp.batch = lc.Batch();
        cp.keep = &keep;
        s = CompactKV(cp, ctx, &result);
      }
      if (!s.ok()) return Fail(cmd, s.ToString());
      times.push_back(MillisecondsSince(start));
    }
    ms += Median(times);
    ms_min += *std::min_element(times.begin(), times.end());
    kept += keep.counts[0];
    freed += static_cast<int64_t>(result.freed_pages.size());
    std::vector<float> compact;
    const Status s = HeldOut(caches[size_t(l)], data.layer[size_t(l)], N, M, Hq, D, ctx, &compact);
    if (!s.ok()) return Fail(cmd, s.ToString());
    errors.push_back(RelativeError(compact, full[size_t(l)]));
    per_layer.push_back({{"layer", l},
                         {"budget", target.budget},
                         {"kept", keep.counts[0]},
                         {"out_error", errors.back()}});
  }
  double mean_error = 0.0;
  for (double e : errors) mean_error += e / static_cast<double>(L);
  const double kept_fraction = static_cast<double>(kept) / static_cast<double>(L * N);

  Json result;
  result["op"] = "evict";
  result["policy"] = policy;
  result["budget"] = o.budget;
  result["budget_tokens"] = budget;
  result["data"] = o.data;
  result["layers"] = L;
  result["seq"] = N;
  result["held_out"] = M;
  result["heads"] = Hq;
  result["kv_heads"] = Hkv;
  result["dim"] = D;
  result["kv_dtype"] = KVDTypeName(kv_dtype);
  result["page_size"] = o.page_size;
  result["window"] = W;
  result["causal"] = o.causal;
  result["threads"] = ResolveThreads(ctx);
  result["simd_target"] = SimdTargetName();
  result["version"] = Version();
  result["stats_source"] = policy == "streaming" ? "none" : used_reference ? "reference" : "kernel";
  result["stats_ms"] = stats_ms;
  result["ms"] = ms;
  result["ms_min"] = ms_min;
  result["reps"] = reps;
  result["out_error"] = mean_error;
  result["out_error_per_layer"] = errors;
  result["kept_fraction"] = kept_fraction;
  result["freed_pages"] = freed;
  result["layer_budgets"] = budgets;
  result["per_layer"] = per_layer;
  if (o.json) {
    std::cout << result.dump() << std::endl;
    return kExitOk;
  }
  std::cout << "tessera bench: evict " << policy << " budget " << Fixed(100.0 * o.budget, 1)
            << "% (" << budget << " of " << N << " tokens per layer, L=" << L << ", Hq=" << Hq
            << " Hkv=" << Hkv << " D=" << D << " kv=" << KVDTypeName(kv_dtype) << "): out_error "
            << Fixed(mean_error, 4) << " (per layer";
  for (double e : errors) std::cout << " " << Fixed(e, 4);
  std::cout << "), kept " << Fixed(100.0 * kept_fraction, 1) << "%, policy + compaction "
            << Fixed(ms, 3) << " ms, statistics " << Fixed(stats_ms, 3) << " ms ("
            << result["stats_source"].get<std::string>() << ")" << std::endl;
  return kExitOk;
}

}  // namespace bench
}  // namespace cli
}  // namespace tessera
