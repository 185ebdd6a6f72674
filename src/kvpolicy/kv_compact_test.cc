// SPDX-License-Identifier: Apache-2.0
// CompactKV: for every KV dtype, contiguous and paged (page sizes that do not divide the
// lengths), ReadKV of the compacted cache equals the kept rows of the original exactly (rows and
// scales move as bytes), the tables and freed pages are what the header says, decode over the
// compacted cache equals decode over a cache built from the kept rows alone; re-indexing equals
// RoPE applied to the un-rotated keys at the new positions; bad input writes nothing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "tessera/decode.h"
#include "tessera/kv_cache.h"
#include "tessera/kv_policy.h"

namespace tessera {
namespace {

constexpr KVDType kAllKVDTypes[] = {KVDType::kF32, KVDType::kBF16, KVDType::kF16, KVDType::kInt8,
                                    KVDType::kInt4};

std::vector<float> Normal(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist;
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// A cache of `lens` sequences (Hkv heads, head dim D), contiguous (page_size 0) or paged with the
// pages of each sequence in a scrambled order, filled with the given [len, Hkv, D] rows.
struct TestCache {
  KVCache cache;
  std::vector<int32_t> lens, table;
  int64_t max_pages = 0, page_size = 0, hkv = 0, dim = 0;

  KVBatchView Batch() {
    KVBatchView kv;
    kv.batch = static_cast<int64_t>(lens.size());
    kv.seq_lens = MakeView1(lens.data(), DType::kI32, kv.batch);
    if (!table.empty()) {
      const int64_t shape[2] = {kv.batch, max_pages};
      kv.block_table = MakeContiguousView(table.data(), DType::kI32, 2, shape);
    }
    return kv;
  }
  // Sequence b alone, as AppendKV's batch of one.
  void Append(int64_t b, std::vector<float>& k, std::vector<float>& v, const RotaryParams& rot) {
    KVCacheView view = cache.view();
    KVBatchView one;
    one.batch = 1;
    int32_t zero = 0;
    one.seq_lens = MakeView1(&zero, DType::kI32, 1);
    if (table.empty()) {
      const int64_t rows = view.page_size * hkv, rb = KVRowBytes(view.dtype, dim);
      view.num_pages = 1;
      view.k = static_cast<uint8_t*>(view.k) + b * rows * rb;
      view.v = static_cast<uint8_t*>(view.v) + b * rows * rb;
      if (view.k_scales != nullptr) {
        view.k_scales += 2 * b * rows;
        view.v_scales += 2 * b * rows;
      }
    } else {
      const int64_t shape[2] = {1, max_pages};
      one.block_table = MakeContiguousView(&table[b * max_pages], DType::kI32, 2, shape);
    }
    AppendKVParams ap;
    ap.k_new = MakeView4(k.data(), DType::kF32, 1, lens[b], hkv, dim);
    ap.v_new = MakeView4(v.data(), DType::kF32, 1, lens[b], hkv, dim);
    ap.cache = view;
    ap.batch = one;
    ap.rotary = rot;
    ASSERT_TRUE(AppendKV(ap, Context()).ok());
  }
};

// rows[b]: the K (or V) rows [len, Hkv, D] appended to sequence b.
void Build(KVDType dtype, int64_t page_size, const std::vector<int32_t>& lens, int64_t hkv,
           int64_t dim, std::vector<std::vector<float>>& k, std::vector<std::vector<float>>& v,
           TestCache* tc, const RotaryParams& rot = RotaryParams()) {
  tc->lens = lens;
  tc->hkv = hkv;
  tc->dim = dim;
  int64_t pages = 0;
  if (page_size == 0) {
    tc->page_size = *std::max_element(lens.begin(), lens.end());
    pages = static_cast<int64_t>(lens.size());
  } else {
    tc->page_size = page_size;
    for (int32_t len : lens) {
      tc->max_pages = std::max<int64_t>(tc->max_pages, (len + page_size - 1) / page_size);
    }
    pages = tc->max_pages * static_cast<int64_t>(lens.size()) + 2;  // a few spare
    tc->table.assign(lens.size() * size_t(tc->max_pages), -7);
    int32_t next = static_cast<int32_t>(pages) - 1;  // hand pages out backwards
    for (size_t b = 0; b < lens.size(); ++b) {
      for (int64_t i = 0; i < (lens[b] + page_size - 1) / page_size; ++i) {
        tc->table[b * size_t(tc->max_pages) + size_t(i)] = next--;
      }
    }
  }
  ASSERT_TRUE(tc->cache.Allocate(dtype, pages, tc->page_size, hkv, dim).ok());
  for (size_t b = 0; b < lens.size(); ++b) tc->Append(int64_t(b), k[b], v[b], rot);
}

struct Rows {
  std::vector<float> k, v;
};
Rows ReadSeq(TestCache& tc, int64_t b) {
  const int64_t len = tc.lens[b];
  Rows r{std::vector<float>(size_t(len * tc.hkv * tc.dim)),
         std::vector<float>(size_t(len * tc.hkv * tc.dim))};
  ReadKVParams p{tc.cache.view(), tc.Batch(), b,
                 MakeView3(r.k.data(), DType::kF32, len, tc.hkv, tc.dim),
                 MakeView3(r.v.data(), DType::kF32, len, tc.hkv, tc.dim)};
  EXPECT_TRUE(ReadKV(p, Context()).ok());
  return r;
}

// A keep-set from H2O over random scores (each head its own tokens).
KeepSet RandomKeep(std::vector<int32_t> lens, int64_t hkv, int64_t budget, uint64_t seed) {
  const int64_t S = *std::max_element(lens.begin(), lens.end());
  std::vector<float> scores = Normal(lens.size() * size_t(hkv * S), seed);
  H2OParams p;
  p.target = {MakeView1(lens.data(), DType::kI32, int64_t(lens.size())), hkv, budget};
  p.scores = MakeView3(scores.data(), DType::kF32, int64_t(lens.size()), hkv, S);
  p.recent = 2;
  KeepSet keep;
  EXPECT_TRUE(H2OKeep(p, &keep).ok());
  return keep;
}

std::vector<float> RunDecodeF32(TestCache& tc, const std::vector<float>& q, int64_t Q, int64_t hq) {
  std::vector<float> qq = q, out(q.size());
  DecodeParams p;
  const int64_t B = static_cast<int64_t>(tc.lens.size());
  p.q = MakeView4(qq.data(), DType::kF32, B, Q, hq, tc.dim);
  p.cache = tc.cache.view();
  p.kv = tc.Batch();
  p.out = MakeView4(out.data(), DType::kF32, B, Q, hq, tc.dim);
  const Status s = Decode(p, Context());
  EXPECT_TRUE(s.ok()) << s.ToString();
  return out;
}

TEST(CompactKV, EveryDTypeAndLayout) {
  const std::vector<int32_t> lens = {13, 9, 20};
  const int64_t hkv = 2, D = 7, hq = 4, Q = 2, budget = 10;
  std::vector<std::vector<float>> k, v;
  for (size_t b = 0; b < lens.size(); ++b) {
    k.push_back(Normal(size_t(lens[b] * hkv * D), 10 + b));
    v.push_back(Normal(size_t(lens[b] * hkv * D), 20 + b));
  }
  const KeepSet keep = RandomKeep(lens, hkv, budget, 5);
  const std::vector<float> q = Normal(lens.size() * size_t(Q * hq * D), 99);
  for (KVDType dtype : kAllKVDTypes) {
    for (int64_t page_size : {0, 3, 4, 16}) {
      SCOPED_TRACE(std::string(KVDTypeName(dtype)) + " page_size " + std::to_string(page_size));
      TestCache tc;
      Build(dtype, page_size, lens, hkv, D, k, v, &tc);
      std::vector<Rows> before;
      for (size_t b = 0; b < lens.size(); ++b) before.push_back(ReadSeq(tc, int64_t(b)));
      const std::vector<int32_t> old_table = tc.table;
      CompactKVParams cp;
      cp.cache = tc.cache.view();
      cp.batch = tc.Batch();
      cp.keep = &keep;
      CompactKVResult result;
      Context ctx;
      ctx.num_threads = 2;
      ASSERT_TRUE(CompactKV(cp, ctx, &result).ok());
      std::vector<int32_t> want_freed;
      for (size_t b = 0; b < lens.size(); ++b) {
        const int64_t count = std::min<int64_t>(budget, lens[b]);
        ASSERT_EQ(tc.lens[b], count);
        const Rows after = ReadSeq(tc, int64_t(b));
        for (int64_t h = 0; h < hkv; ++h) {
          for (int64_t i = 0; i < count; ++i) {
            const int64_t src = keep.Tokens(int64_t(b), h)[i];
            for (int64_t c = 0; c < D; ++c) {
              ASSERT_EQ(after.k[size_t((i * hkv + h) * D + c)],
                        before[b].k[size_t((src * hkv + h) * D + c)]);
              ASSERT_EQ(after.v[size_t((i * hkv + h) * D + c)],
                        before[b].v[size_t((src * hkv + h) * D + c)]);
            }
          }
        }
        if (page_size > 0) {
          const int64_t used = (count + page_size - 1) / page_size;
          const int64_t had = (lens[b] + page_size - 1) / page_size;
          for (int64_t i = 0; i < tc.max_pages; ++i) {
            const size_t at = b * size_t(tc.max_pages) + size_t(i);
            if (i >= used && i < had) {
              want_freed.push_back(old_table[at]);
              EXPECT_EQ(tc.table[at], -1);
            } else {
              EXPECT_EQ(tc.table[at], old_table[at]);
            }
          }
        }
      }
      EXPECT_EQ(result.freed_pages, want_freed);
      if (KVDTypeIsQuantized(dtype)) continue;
      // Decode over the compacted cache equals decode over a cache built from the kept rows
      // (the rows are already rounded to the dtype, so storing them again is exact).
      std::vector<std::vector<float>> kk, vv;
      std::vector<int32_t> counts;
      for (size_t b = 0; b < lens.size(); ++b) {
        const int64_t count = tc.lens[b];
        counts.push_back(static_cast<int32_t>(count));
        kk.emplace_back(size_t(count * hkv * D));
        vv.emplace_back(size_t(count * hkv * D));
        for (int64_t h = 0; h < hkv; ++h) {
          for (int64_t i = 0; i < count; ++i) {
            const int64_t src = keep.Tokens(int64_t(b), h)[i];
            std::memcpy(&kk[b][size_t((i * hkv + h) * D)],
                        &before[b].k[size_t((src * hkv + h) * D)], size_t(D) * 4);
            std::memcpy(&vv[b][size_t((i * hkv + h) * D)],
                        &before[b].v[size_t((src * hkv + h) * D)], size_t(D) * 4);
          }
        }
      }
      TestCache fresh;
      Build(dtype, page_size, counts, hkv, D, kk, vv, &fresh);
      const std::vector<float> got = RunDecodeF32(tc, q, Q, hq);
      const std::vector<float> want = RunDecodeF32(fresh, q, Q, hq);
      for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-6f) << i;
    }
  }
}

TEST(CompactKV, ReindexEqualsRopeAtNewPositions) {
  const std::vector<int32_t> lens = {17, 11};
  const int64_t hkv = 2, D = 8, budget = 6;
  RotaryParams rot;
  rot.rotary_dim = 6;
  rot.base = 100.0f;
  std::vector<std::vector<float>> k, v;
  for (size_t b = 0; b < lens.size(); ++b) {
    k.push_back(Normal(size_t(lens[b] * hkv * D), 30 + b));
    v.push_back(Normal(size_t(lens[b] * hkv * D), 40 + b));
  }
  const KeepSet keep = RandomKeep(lens, hkv, budget, 6);
  for (KVDType dtype : {KVDType::kF32, KVDType::kBF16, KVDType::kF16}) {
    for (bool interleaved : {false, true}) {
      SCOPED_TRACE(std::string(KVDTypeName(dtype)) + (interleaved ? " interleaved" : ""));
      rot.interleaved = interleaved;
      TestCache tc;
      Build(dtype, 5, lens, hkv, D, k, v, &tc, rot);  // keys RoPE'd at their positions
      std::vector<int32_t> positions(lens.size() * size_t(hkv) * 20, -1);
      for (size_t b = 0; b < lens.size(); ++b) {
        for (int64_t h = 0; h < hkv; ++h) {
          for (int64_t j = 0; j < 20; ++j) positions[(b * hkv + h) * 20 + j] = int32_t(j);
        }
      }
      CompactKVParams cp;
      cp.cache = tc.cache.view();
      cp.batch = tc.Batch();
      cp.keep = &keep;
      cp.reindex = true;
      cp.rotary = rot;
      cp.positions = MakeView3(positions.data(), DType::kI32, int64_t(lens.size()), hkv, 20);
      CompactKVResult result;
      ASSERT_TRUE(CompactKV(cp, Context(), &result).ok());
      const double tol = dtype == KVDType::kF32 ? 2e-6 : dtype == KVDType::kF16 ? 4e-3 : 3e-2;
      for (size_t b = 0; b < lens.size(); ++b) {
        // The kept un-rotated keys, RoPE'd at positions 0 .. count - 1.
        const int64_t count = tc.lens[b];
        std::vector<float> want(size_t(count * hkv * D));
        for (int64_t h = 0; h < hkv; ++h) {
          for (int64_t i = 0; i < count; ++i) {
            const int64_t src = keep.Tokens(int64_t(b), h)[i];
            std::memcpy(&want[size_t((i * hkv + h) * D)], &k[b][size_t((src * hkv + h) * D)],
                        size_t(D) * 4);
            EXPECT_EQ(positions[(b * hkv + size_t(h)) * 20 + size_t(i)], i);
          }
        }
        ApplyRotaryParams ar;
        ar.x = MakeView4(want.data(), DType::kF32, 1, count, hkv, D);
        ar.rotary = rot;
        ASSERT_TRUE(ApplyRotary(ar, Context()).ok());
        const Rows got = ReadSeq(tc, int64_t(b));
        for (size_t i = 0; i < want.size(); ++i) {
          ASSERT_NEAR(got.k[i], want[i], tol * (1.0 + std::abs(want[i]))) << "b " << b << " " << i;
        }
      }
    }
  }
}

TEST(CompactKV, PositionsFollowTheTokens) {
  const std::vector<int32_t> lens = {12};
  const int64_t hkv = 2, D = 4;
  std::vector<std::vector<float>> k = {Normal(12 * 2 * 4, 1)}, v = {Normal(12 * 2 * 4, 2)};
  TestCache tc;
  Build(KVDType::kF32, 0, lens, hkv, D, k, v, &tc);
  std::vector<int32_t> positions(2 * 12);
  for (int32_t i = 0; i < 24; ++i) positions[size_t(i)] = 100 + i;
  const KeepSet keep = RandomKeep(lens, hkv, 5, 3);
  CompactKVParams cp;
  cp.cache = tc.cache.view();
  cp.batch = tc.Batch();
  cp.keep = &keep;
  cp.positions = MakeView3(positions.data(), DType::kI32, 1, hkv, 12);
  CompactKVResult result;
  ASSERT_TRUE(CompactKV(cp, Context(), &result).ok());
  for (int64_t h = 0; h < hkv; ++h) {
    for (int64_t i = 0; i < 5; ++i) {
      EXPECT_EQ(positions[size_t(h * 12 + i)], 100 + h * 12 + keep.Tokens(0, h)[i]);
    }
  }
}

std::vector<uint8_t> Bytes(const KVCacheView& c) {
  const size_t rows = size_t(c.num_pages * c.page_size * c.num_kv_heads);
  const size_t pool = rows * size_t(KVRowBytes(c.dtype, c.head_dim));
  std::vector<uint8_t> out(static_cast<uint8_t*>(c.k), static_cast<uint8_t*>(c.k) + pool);
  out.insert(out.end(), static_cast<uint8_t*>(c.v), static_cast<uint8_t*>(c.v) + pool);
  if (c.k_scales != nullptr) {
    const uint8_t* s = reinterpret_cast<const uint8_t*>(c.k_scales);
    out.insert(out.end(), s, s + rows * 8);
  }
  return out;
}

TEST(CompactKV, BadInputWritesNothing) {
  const std::vector<int32_t> lens = {9, 7};
  const int64_t hkv = 2, D = 4;
  std::vector<std::vector<float>> k = {Normal(9 * 8, 1), Normal(7 * 8, 2)};
  std::vector<std::vector<float>> v = {Normal(9 * 8, 3), Normal(7 * 8, 4)};
  TestCache tc;
  Build(KVDType::kInt8, 4, lens, hkv, D, k, v, &tc);
  const std::vector<uint8_t> bytes = Bytes(tc.cache.view());
  const std::vector<int32_t> table = tc.table;
  const KeepSet good = RandomKeep(lens, hkv, 3, 1);
  auto run = [&](const KeepSet& keep, bool reindex) {
    CompactKVParams cp;
    cp.cache = tc.cache.view();
    cp.batch = tc.Batch();
    cp.keep = &keep;
    cp.reindex = reindex;
    cp.rotary.rotary_dim = 2;
    CompactKVResult result;
    return CompactKV(cp, Context(), &result);
  };
  auto expect_error = [&](const Status& s, const std::string& name, StatusCode code) {
    EXPECT_EQ(s.code(), code) << s.ToString();
    EXPECT_NE(s.message().find(name), std::string::npos) << s.ToString();
    EXPECT_EQ(Bytes(tc.cache.view()), bytes);
    EXPECT_EQ(tc.table, table);
    EXPECT_EQ(tc.lens, lens);
  };
  expect_error(run(good, true), "int8", StatusCode::kUnimplemented);
  KeepSet bad = good;
  std::swap(bad.tokens[0], bad.tokens[1]);  // descending
  expect_error(run(bad, false), "keep->Tokens(0, 0)[1]", StatusCode::kInvalidArgument);
  bad = good;
  bad.tokens.back() = 7;  // == seq_lens[1]
  expect_error(run(bad, false), "keep->Tokens(1, 1)[2]", StatusCode::kInvalidArgument);
  bad = good;
  bad.num_kv_heads = 1;
  expect_error(run(bad, false), "keep->num_kv_heads", StatusCode::kInvalidArgument);
  bad = good;
  bad.counts[0] = 10;
  expect_error(run(bad, false), "keep->counts[0]", StatusCode::kInvalidArgument);
  tc.table[size_t(tc.max_pages)] = tc.table[0];  // sequence 1 shares sequence 0's first page
  const std::vector<int32_t> shared = tc.table;
  CompactKVParams cp;
  cp.cache = tc.cache.view();
  cp.batch = tc.Batch();
  cp.keep = &good;
  CompactKVResult result;
  const Status s = CompactKV(cp, Context(), &result);
  EXPECT_NE(s.message().find("batch.block_table"), std::string::npos) << s.ToString();
  EXPECT_EQ(tc.table, shared);
  EXPECT_EQ(Bytes(tc.cache.view()), bytes);
}

}  // namespace
}  // namespace tessera
