// SPDX-License-Identifier: Apache-2.0
// Concurrent calls into the library from several std::threads, each result compared bitwise with
// the same call made alone: separate Contexts, one shared Context, one DecodePlan shared by
// RunDecode calls, and decode reading a KV cache while other threads append to other sequences'
// pages. Run under ThreadSanitizer by `make test` (build-tsan); a data race is a TSan report.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "tessera/tessera.h"
#include "test_util.h"

namespace tessera {
namespace {

constexpr int kThreads = 4;

std::vector<float> Random(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

// Runs fn(i) for i in [0, n) on n threads at once (released together) and waits for all.
void RunTogether(int n, const std::function<void(int)>& fn) {
  std::vector<std::thread> threads;
  std::atomic<int> ready{0};
  for (int i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      ready.fetch_add(1);
      while (ready.load() < n) std::this_thread::yield();
      fn(i);
    });
  }
  for (std::thread& t : threads) t.join();
}

bool Bitwise(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// One independent job: its own inputs, and a call that returns its outputs (concatenated).
struct Job {
  std::string name;
  std::function<std::vector<float>(const Context&)> run;
};

int64_t Small(int64_t normal, int64_t small) { return test::SmallTests() ? small : normal; }

// Forward, backward, linear attention and a merge, each on its own random problem.
std::vector<Job> MakeJobs() {
  std::vector<Job> jobs;
  const int64_t b = 1, s = Small(96, 40), h = 2, d = 32;
  for (int variant = 0; variant < 2; ++variant) {
    const bool causal = variant == 1;
    auto q = std::make_shared<std::vector<float>>(Random(b * s * h * d, 10 + variant));
    auto k = std::make_shared<std::vector<float>>(Random(b * s * h * d, 20 + variant));
    auto v = std::make_shared<std::vector<float>>(Random(b * s * h * d, 30 + variant));
    auto dout = std::make_shared<std::vector<float>>(Random(b * s * h * d, 40 + variant));
    jobs.push_back({"forward" + std::to_string(variant), [=](const Context& ctx) {
                      std::vector<float> out(q->size()), lse(b * h * s);
                      AttentionParams p;
                      p.q = MakeView4(q->data(), DType::kF32, b, s, h, d);
                      p.k = MakeView4(k->data(), DType::kF32, b, s, h, d);
                      p.v = MakeView4(v->data(), DType::kF32, b, s, h, d);
                      p.out = MakeView4(out.data(), DType::kF32, b, s, h, d);
                      p.lse = MakeView3(lse.data(), DType::kF32, b, h, s);
                      p.causal = causal;
                      EXPECT_TRUE(AttentionForward(p, ctx).ok());
                      out.insert(out.end(), lse.begin(), lse.end());
                      return out;
                    }});
    jobs.push_back({"backward" + std::to_string(variant), [=](const Context& ctx) {
                      std::vector<float> out(q->size()), lse(b * h * s);
                      AttentionBackwardParams p;
                      AttentionParams& f = p.forward;
                      f.q = MakeView4(q->data(), DType::kF32, b, s, h, d);
                      f.k = MakeView4(k->data(), DType::kF32, b, s, h, d);
                      f.v = MakeView4(v->data(), DType::kF32, b, s, h, d);
                      f.out = MakeView4(out.data(), DType::kF32, b, s, h, d);
                      f.lse = MakeView3(lse.data(), DType::kF32, b, h, s);
                      f.causal = causal;
                      EXPECT_TRUE(AttentionForward(f, ctx).ok());
                      std::vector<float> dq(q->size()), dk(k->size()), dv(v->size());
                      p.dout = MakeView4(dout->data(), DType::kF32, b, s, h, d);
                      p.dq = MakeView4(dq.data(), DType::kF32, b, s, h, d);
                      p.dk = MakeView4(dk.data(), DType::kF32, b, s, h, d);
                      p.dv = MakeView4(dv.data(), DType::kF32, b, s, h, d);
                      EXPECT_TRUE(AttentionBackward(p, ctx).ok());
                      dq.insert(dq.end(), dk.begin(), dk.end());
                      dq.insert(dq.end(), dv.begin(), dv.end());
                      return dq;
                    }});
    jobs.push_back({"linear" + std::to_string(variant), [=](const Context& ctx) {
                      std::vector<float> out(q->size());
                      LinearAttentionParams p;
                      p.q = MakeView4(q->data(), DType::kF32, b, s, h, d);
                      p.k = MakeView4(k->data(), DType::kF32, b, s, h, d);
                      p.v = MakeView4(v->data(), DType::kF32, b, s, h, d);
                      p.out = MakeView4(out.data(), DType::kF32, b, s, h, d);
                      p.feature_map = causal ? LinearFeatureMap::kElu1 : LinearFeatureMap::kRelu;
                      p.normalize = causal;
                      p.chunk_size = 16;
                      EXPECT_TRUE(LinearAttentionForward(p, ctx).ok());
                      return out;
                    }});
  }
  const int64_t parts = 3, tokens = Small(64, 16), heads = 2, dim = 24;
  auto out_parts = std::make_shared<std::vector<float>>(Random(parts * tokens * heads * dim, 50));
  auto lse_parts = std::make_shared<std::vector<float>>(Random(parts * tokens * heads, 51));
  jobs.push_back({"merge", [=](const Context& ctx) {
                    std::vector<float> out(tokens * heads * dim), lse(tokens * heads);
                    MergeStatesParams p;
                    p.out_parts =
                        MakeView4(out_parts->data(), DType::kF32, parts, tokens, heads, dim);
                    const int64_t lse_shape[3] = {parts, tokens, heads};
                    p.lse_parts = MakeContiguousView(lse_parts->data(), DType::kF32, 3, lse_shape);
                    p.out = MakeView3(out.data(), DType::kF32, tokens, heads, dim);
                    const int64_t shape2[2] = {tokens, heads};
                    p.lse = MakeContiguousView(lse.data(), DType::kF32, 2, shape2);
                    EXPECT_TRUE(MergeStates(p, ctx).ok());
                    out.insert(out.end(), lse.begin(), lse.end());
                    return out;
                  }});
  return jobs;
}

// Every job alone, then all of them at once (each job on its own thread, twice), bitwise equal.
void CheckJobsConcurrently(bool shared_context) {
  const std::vector<Job> jobs = MakeJobs();
  Context alone;
  alone.num_threads = 2;
  std::vector<std::vector<float>> want;
  for (const Job& job : jobs) want.push_back(job.run(alone));

  const int n = static_cast<int>(jobs.size());
  std::vector<std::vector<float>> got(2 * jobs.size());
  const Context shared = alone;
  RunTogether(2 * n, [&](int i) {
    Context own;
    own.num_threads = 1 + i % 2;  // separate contexts differ: results must not depend on it
    got[i] = jobs[i % n].run(shared_context ? shared : own);
  });
  for (int i = 0; i < 2 * n; ++i) {
    EXPECT_TRUE(Bitwise(got[i], want[i % n])) << jobs[i % n].name << " on thread " << i;
  }
}

TEST(Concurrency, SeparateContexts) { CheckJobsConcurrently(false); }

TEST(Concurrency, SharedContext) { CheckJobsConcurrently(true); }

// ---------------------------------------------------------------------------------------------
// Decode over one shared KV cache.

struct PagedCache {
  KVCache cache;
  int64_t batch = 0, pages_per_seq = 0, page_size = 0, heads_kv = 0, dim = 0;
  std::vector<int32_t> lens, table;  // lens[b]; table [batch, pages_per_seq]

  // Sequence b owns pages [b * pages_per_seq, (b + 1) * pages_per_seq), in reverse order.
  void Init(KVDType dtype, int64_t b, int64_t pages, int64_t ps, int64_t hkv, int64_t d) {
    batch = b, pages_per_seq = pages, page_size = ps, heads_kv = hkv, dim = d;
    ASSERT_TRUE(cache.Allocate(dtype, b * pages, ps, hkv, d).ok());
    lens.assign(static_cast<size_t>(b), 0);
    for (int64_t s = 0; s < b; ++s) {
      for (int64_t p = 0; p < pages; ++p)
        table.push_back(static_cast<int32_t>((s + 1) * pages - 1 - p));
    }
  }
  // A view of sequences [first, first + count).
  KVBatchView View(int64_t first, int64_t count) {
    KVBatchView v;
    v.batch = count;
    v.seq_lens = test::I32View(lens.data() + first, count);
    v.block_table = test::I32View(table.data() + first * pages_per_seq, count, pages_per_seq);
    return v;
  }
  // Appends n tokens of random K / V to sequences [first, first + count).
  Status Append(int64_t first, int64_t count, int64_t n, uint64_t seed, const Context& ctx) {
    const std::vector<float> k = Random(count * n * heads_kv * dim, seed);
    const std::vector<float> v = Random(count * n * heads_kv * dim, seed + 1);
    AppendKVParams p;
    p.k_new = MakeView4(const_cast<float*>(k.data()), DType::kF32, count, n, heads_kv, dim);
    p.v_new = MakeView4(const_cast<float*>(v.data()), DType::kF32, count, n, heads_kv, dim);
    p.cache = cache.view();
    p.batch = View(first, count);
    const Status s = AppendKV(p, ctx);
    if (s.ok()) {
      for (int64_t b = first; b < first + count; ++b) lens[b] += static_cast<int32_t>(n);
    }
    return s;
  }
};

DecodeParams DecodeCall(PagedCache* c, int64_t first, int64_t count, int64_t heads_q,
                        const std::vector<float>& q, std::vector<float>* out) {
  DecodeParams p;
  p.q = MakeView4(const_cast<float*>(q.data()), DType::kF32, count, 1, heads_q, c->dim);
  out->assign(q.size(), 0.0f);
  p.out = MakeView4(out->data(), DType::kF32, count, 1, heads_q, c->dim);
  p.cache = c->cache.view();
  p.kv = c->View(first, count);
  p.split_tokens = 16;  // several splits per sequence: the stream-K merge runs
  return p;
}

TEST(Concurrency, SharedDecodePlan) {
  for (KVDType dtype : {KVDType::kF16, KVDType::kInt8}) {
    SCOPED_TRACE(KVDTypeName(dtype));
    PagedCache c;
    c.Init(dtype, 2, 4, 16, 2, 32);
    ASSERT_TRUE(c.Append(0, 2, Small(60, 40), 1, Context()).ok());
    const int64_t heads_q = 4;
    Context ctx;
    ctx.num_threads = 2;
    std::vector<std::vector<float>> queries, want(kThreads);
    DecodePlan plan;
    for (int t = 0; t < kThreads; ++t) {
      queries.push_back(Random(2 * heads_q * c.dim, 100 + t));
      const DecodeParams p = DecodeCall(&c, 0, 2, heads_q, queries[t], &want[t]);
      if (t == 0) {
        ASSERT_TRUE(PlanDecode(p, ctx, &plan).ok());
      }
      ASSERT_TRUE(RunDecode(plan, p, ctx).ok());
    }
    std::vector<std::vector<float>> got(kThreads);
    RunTogether(kThreads, [&](int t) {
      const DecodeParams p = DecodeCall(&c, 0, 2, heads_q, queries[t], &got[t]);
      EXPECT_TRUE(RunDecode(plan, p, ctx).ok());  // one plan, read by every thread
    });
    for (int t = 0; t < kThreads; ++t) EXPECT_TRUE(Bitwise(got[t], want[t])) << "thread " << t;
  }
}

TEST(Concurrency, DecodeWhileAppendingToOtherSequences) {
  for (KVDType dtype : {KVDType::kF16, KVDType::kInt8}) {
    SCOPED_TRACE(KVDTypeName(dtype));
    // Sequences 0-1 are decoded; sequences 2-3 receive tokens meanwhile, on pages of their own.
    // The int8 cache is calibrated (channel scales set) by the first append, so later appends
    // write only their own pages.
    PagedCache c, alone;
    const int64_t steps = Small(8, 4), n = 3;
    for (PagedCache* pc : {&c, &alone}) {
      pc->Init(dtype, 4, 4, 16, 2, 32);
      ASSERT_TRUE(pc->Append(0, 4, 20, 1, Context()).ok());
    }
    const int64_t heads_q = 2;
    const std::vector<float> q = Random(2 * heads_q * c.dim, 7);
    std::vector<float> want;
    {
      const DecodeParams p = DecodeCall(&alone, 0, 2, heads_q, q, &want);
      ASSERT_TRUE(Decode(p, Context()).ok());
      for (int64_t i = 0; i < steps; ++i)
        ASSERT_TRUE(alone.Append(2, 2, n, 50 + i, Context()).ok());
    }
    std::vector<std::vector<float>> got(kThreads);
    RunTogether(kThreads, [&](int t) {
      if (t == 0) {
        for (int64_t i = 0; i < steps; ++i) EXPECT_TRUE(c.Append(2, 2, n, 50 + i, Context()).ok());
        return;
      }
      Context ctx;
      ctx.num_threads = 1 + t % 2;
      for (int64_t i = 0; i < steps; ++i) {
        std::vector<float> out;
        const DecodeParams p = DecodeCall(&c, 0, 2, heads_q, q, &out);
        EXPECT_TRUE(Decode(p, ctx).ok());
        EXPECT_TRUE(Bitwise(out, want)) << "thread " << t << ", step " << i;
      }
    });
    // The appends made meanwhile equal the same appends made alone.
    EXPECT_EQ(c.lens, alone.lens);
    for (int64_t b = 2; b < 4; ++b) {
      const int64_t len = c.lens[b];
      std::vector<float> k1(len * c.heads_kv * c.dim), v1(k1.size()), k2(k1.size()), v2(k1.size());
      auto view = [&](std::vector<float>& x) {
        return MakeView3(x.data(), DType::kF32, len, c.heads_kv, c.dim);
      };
      auto read = [&](PagedCache& from, std::vector<float>& k, std::vector<float>& v) {
        ReadKVParams p;
        p.cache = from.cache.view();
        p.batch = from.View(0, 4);
        p.b = b;
        p.k_out = view(k);
        p.v_out = view(v);
        return ReadKV(p, Context());
      };
      ASSERT_TRUE(read(c, k1, v1).ok());
      ASSERT_TRUE(read(alone, k2, v2).ok());
      EXPECT_TRUE(Bitwise(k1, k2) && Bitwise(v1, v2)) << "sequence " << b;
    }
  }
}

}  // namespace
}  // namespace tessera
