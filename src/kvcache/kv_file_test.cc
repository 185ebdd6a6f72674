// SPDX-License-Identifier: Apache-2.0
// KV cache files (tessera/kv_file.h): DecodeFromFile against the in-RAM decode of the same cache
// and against the fp64 reference (ref/decode_ref.h; tolerances.h: the fp32 rule for the exactly
// read dtypes, kQuantKvMaxNmse for int8 / int4), for every KV dtype and both readers, awkward
// lengths (1 token, not a multiple of the page or chunk size), GQA, Q > 1, causal, ALiBi and
// softcap; determinism over thread counts and readers; the streaming writer against SaveKVFile
// (byte for byte); and the errors of missing, short, truncated and corrupt files. Files are a few
// hundred KiB in a temporary directory, removed after each test.
#include "tessera/kv_file.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "comparator.h"
#include "ref/decode_ref.h"
#include "tessera/decode.h"
#include "tessera/kv_cache.h"
#include "tolerances.h"

namespace tessera {
namespace {

constexpr int64_t kHkv = 2, kHq = 4, kDim = 64, kPage = 16;

// A temporary directory, removed with its files.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/tessera_kvfile_XXXXXX";
    const char* d = mkdtemp(tmpl);
    dir_ = d != nullptr ? d : "/tmp";
  }
  ~TempDir() {
    for (const std::string& f : files_) std::remove(f.c_str());
    ::rmdir(dir_.c_str());
  }
  std::string File(const std::string& name) {
    files_.push_back(dir_ + "/" + name);
    files_.push_back(dir_ + "/" + name + ".partial");
    return dir_ + "/" + name;
  }

 private:
  std::string dir_;
  std::vector<std::string> files_;
};

std::vector<float> Normalish(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n));
  for (float& v : x) v = u(rng) + u(rng) + u(rng) + u(rng);
  return x;
}

// An in-RAM paged cache of one sequence (pages in reverse order) with `len` random tokens.
struct RamCache {
  KVCache cache;
  std::vector<int32_t> block_table;
  int32_t len = 0;
  std::vector<float> k, v;  // [len, Hkv, D] as appended

  KVBatchView Batch() {
    KVBatchView b;
    b.batch = 1;
    b.seq_lens = MakeView1(&len, DType::kI32, 1);
    const int64_t shape[2] = {1, static_cast<int64_t>(block_table.size())};
    b.block_table = MakeContiguousView(block_table.data(), DType::kI32, 2, shape);
    return b;
  }
};

void BuildRamCache(KVDType dtype, int32_t len, uint64_t seed, RamCache* rc) {
  const int64_t pages = std::max<int64_t>(1, (len + kPage - 1) / kPage);
  ASSERT_TRUE(rc->cache.Allocate(dtype, pages, kPage, kHkv, kDim).ok());
  for (int64_t i = 0; i < pages; ++i)
    rc->block_table.push_back(static_cast<int32_t>(pages - 1 - i));
  rc->k = Normalish(int64_t{len} * kHkv * kDim, seed);
  rc->v = Normalish(int64_t{len} * kHkv * kDim, seed + 1);
  if (len == 0) return;
  rc->len = 0;
  AppendKVParams ap;
  ap.k_new = MakeView4(rc->k.data(), DType::kF32, 1, len, kHkv, kDim);
  ap.v_new = MakeView4(rc->v.data(), DType::kF32, 1, len, kHkv, kDim);
  ap.cache = rc->cache.view();
  ap.batch = rc->Batch();
  const Status s = AppendKV(ap, Context());
  ASSERT_TRUE(s.ok()) << s.ToString();
  rc->len = len;
}

struct Options {
  int64_t q = 1;
  bool causal = false;
  float softcap = 0.0f;
  bool alibi = false;
  int64_t chunk_tokens = 0;
  KVFileReader reader = KVFileReader::kAuto;
  int32_t threads = 2;
};

struct Outputs {
  std::vector<float> out, lse;
};

std::vector<float> kSlopes = {0.5f, 0.25f, 0.125f, 0.0625f};

DecodeParams RamParams(RamCache* rc, const std::vector<float>& q, const Options& o, Outputs* res) {
  res->out.assign(static_cast<size_t>(o.q * kHq * kDim), std::nanf(""));
  res->lse.assign(static_cast<size_t>(o.q * kHq), std::nanf(""));
  DecodeParams p;
  p.q = MakeView4(const_cast<float*>(q.data()), DType::kF32, 1, o.q, kHq, kDim);
  p.cache = rc->cache.view();
  p.kv = rc->Batch();
  p.out = MakeView4(res->out.data(), DType::kF32, 1, o.q, kHq, kDim);
  p.lse = MakeView3(res->lse.data(), DType::kF32, 1, kHq, o.q);
  p.causal = o.causal;
  p.softcap = o.softcap;
  if (o.alibi) p.alibi_slopes = MakeView1(kSlopes.data(), DType::kF32, kHq);
  return p;
}

Status FileDecode(const KVFile& f, const std::vector<float>& q, const Options& o, Outputs* res,
                  KVFileDecodeStats* stats = nullptr) {
  res->out.assign(static_cast<size_t>(o.q * kHq * kDim), std::nanf(""));
  res->lse.assign(static_cast<size_t>(o.q * kHq), std::nanf(""));
  KVFileDecodeParams p;
  p.q = MakeView4(const_cast<float*>(q.data()), DType::kF32, 1, o.q, kHq, kDim);
  p.out = MakeView4(res->out.data(), DType::kF32, 1, o.q, kHq, kDim);
  p.lse = MakeView3(res->lse.data(), DType::kF32, 1, kHq, o.q);
  p.causal = o.causal;
  p.softcap = o.softcap;
  if (o.alibi) p.alibi_slopes = MakeView1(kSlopes.data(), DType::kF32, kHq);
  p.chunk_tokens = o.chunk_tokens;
  p.reader = o.reader;
  p.decode_threads = o.threads;
  Context ctx;
  ctx.num_threads = o.threads;
  return DecodeFromFile(f, p, ctx, stats);
}

std::vector<double> D64(const std::vector<float>& x) { return {x.begin(), x.end()}; }

bool IoUringRefused() {
  // io_uring is optional: a build without liburing, or a kernel / seccomp filter that refuses
  // io_uring_queue_init, makes the reader return Unimplemented (kv_file.h), and the thread-pool
  // reader covers the same cases. Only that answer counts as a refusal: a probe whose own setup
  // fails is not one, so the tests run and report the failure.
  TempDir dir;
  RamCache rc;
  BuildRamCache(KVDType::kF32, 1, 1, &rc);
  const std::string path = dir.File("probe.kv");
  if (!SaveKVFile(rc.cache.view(), rc.Batch(), 0, path).ok()) return false;
  KVFile f;
  if (!KVFile::Open(path, &f).ok()) return false;
  Options o;
  o.reader = KVFileReader::kIoUring;
  Outputs r;
  const std::vector<float> q = Normalish(kHq * kDim, 3);
  return FileDecode(f, q, o, &r).code() == StatusCode::kUnimplemented;
}

// Decodes from RAM and from the file, and checks both against each other and the reference.
void CheckCase(KVDType dtype, int32_t len, const Options& o) {
  SCOPED_TRACE(std::string(KVDTypeName(dtype)) + " len " + std::to_string(len) + " Q " +
               std::to_string(o.q) + " reader " + KVFileReaderName(o.reader) +
               (o.causal ? " causal" : "") + (o.alibi ? " alibi" : "") +
               (o.softcap > 0 ? " softcap" : "") + " chunk " + std::to_string(o.chunk_tokens));
  TempDir dir;
  RamCache rc;
  ASSERT_NO_FATAL_FAILURE(BuildRamCache(dtype, len, 100 + len, &rc));
  const std::string path = dir.File("cache.kv");
  Status s = SaveKVFile(rc.cache.view(), rc.Batch(), 0, path);
  ASSERT_TRUE(s.ok()) << s.ToString();
  KVFile f;
  s = KVFile::Open(path, &f);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(f.info().tokens, len);
  const std::vector<float> q = Normalish(o.q * kHq * kDim, 7);
  Outputs ram, file;
  const DecodeParams rp = RamParams(&rc, q, o, &ram);
  Context ctx;
  ctx.num_threads = o.threads;
  s = Decode(rp, ctx);
  ASSERT_TRUE(s.ok()) << s.ToString();
  KVFileDecodeStats stats;
  s = FileDecode(f, q, o, &file, &stats);
  ASSERT_TRUE(s.ok()) << s.ToString();
  if (o.reader != KVFileReader::kAuto) {
    EXPECT_EQ(stats.reader, o.reader);
  }
  // Against the in-RAM decode: only the grouping of the split merges differs.
  EXPECT_TRUE(test::CheckClose(D64(file.out), D64(ram.out), test::OutputCeiling(DType::kF32),
                               "out vs in-RAM decode"));
  EXPECT_TRUE(test::CheckClose(D64(file.lse), D64(ram.lse), {1e-5, 1e-5}, "lse vs in-RAM"));
  // Against the fp64 reference on the dequantized cache.
  const size_t n_out = file.out.size();
  std::vector<double> ref(n_out), ref_lse(file.lse.size()), magnitude(n_out);
  ref::DecodeF64WithOptions(rp, ref::DecodeRefOptions(), ref.data(), ref_lse.data(),
                            magnitude.data());
  if (KVDTypeIsQuantized(dtype)) {
    EXPECT_LE(test::Nmse(D64(file.out), ref), test::kQuantKvMaxNmse);
  } else {
    EXPECT_TRUE(test::CheckOutput(DType::kF32, D64(file.out), ref, nullptr, test::Rule::kStandard,
                                  &magnitude));
    EXPECT_TRUE(test::CheckLse(D64(file.lse), ref_lse));
  }
}

class KVFileDecode : public ::testing::TestWithParam<std::tuple<KVDType, KVFileReader>> {};

TEST_P(KVFileDecode, MatchesInRamDecodeAndReference) {
  const KVDType dtype = std::get<0>(GetParam());
  Options o;
  o.reader = std::get<1>(GetParam());
  // The io_uring reader is optional (IoUringRefused); the thread-pool cases still run.
  if (o.reader == KVFileReader::kIoUring && IoUringRefused()) {
    GTEST_SKIP() << "io_uring is not available (build without liburing, or refused)";
  }
  o.chunk_tokens = 96;  // 6 pages: many chunks, the last one partial
  o.q = 3;
  o.causal = true;
  CheckCase(dtype, 1, o);
  CheckCase(dtype, 1003, o);
  o.q = 1;
  o.causal = false;
  o.chunk_tokens = 0;
  CheckCase(dtype, 203, o);
}

INSTANTIATE_TEST_SUITE_P(
    DTypesAndReaders, KVFileDecode,
    ::testing::Combine(::testing::Values(KVDType::kF32, KVDType::kBF16, KVDType::kF16,
                                         KVDType::kInt8, KVDType::kInt4),
                       ::testing::Values(KVFileReader::kIoUring, KVFileReader::kThreadPool)),
    [](const ::testing::TestParamInfo<std::tuple<KVDType, KVFileReader>>& pi) {
      return std::string(KVDTypeName(std::get<0>(pi.param))) + "_" +
             (std::get<1>(pi.param) == KVFileReader::kIoUring ? "io_uring" : "threads");
    });

// Absolute positions: causal with Q > 1 (a last chunk shorter than Q - 1 joins the one before),
// ALiBi (shifted LSE per chunk), softcap.
TEST(KVFileDecodeOptions, PositionsAreAbsolute) {
  Options o;
  o.q = 5;
  o.chunk_tokens = 32;
  for (int32_t len : {64 + 2, 64 + 4, 64 + 9, 3, 33}) {
    o.causal = true;
    o.alibi = false;
    o.softcap = 0.0f;
    CheckCase(KVDType::kF16, len, o);
    o.alibi = true;
    CheckCase(KVDType::kF16, len, o);
    o.causal = false;
    o.softcap = 5.0f;
    CheckCase(KVDType::kF16, len, o);
  }
  o.q = 1;
  o.causal = true;
  o.alibi = true;
  CheckCase(KVDType::kInt8, 300, o);
}

TEST(KVFileDecodeOptions, BoundedWindowIsUnimplemented) {
  TempDir dir;
  RamCache rc;
  ASSERT_NO_FATAL_FAILURE(BuildRamCache(KVDType::kF16, 50, 1, &rc));
  const std::string path = dir.File("w.kv");
  ASSERT_TRUE(SaveKVFile(rc.cache.view(), rc.Batch(), 0, path).ok());
  KVFile f;
  ASSERT_TRUE(KVFile::Open(path, &f).ok());
  std::vector<float> q = Normalish(kHq * kDim, 2), out(q.size(), -7.0f);
  KVFileDecodeParams p;
  p.q = MakeView4(q.data(), DType::kF32, 1, 1, kHq, kDim);
  p.out = MakeView4(out.data(), DType::kF32, 1, 1, kHq, kDim);
  p.window_left = 10;
  Status s = DecodeFromFile(f, p, Context());
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented) << s.ToString();
  EXPECT_NE(s.message().find("window_left"), std::string::npos) << s.message();
  for (float x : out) ASSERT_EQ(x, -7.0f) << "out written on error";
  p.window_left = 50;  // covers every key: unbounded
  EXPECT_TRUE(DecodeFromFile(f, p, Context()).ok());
  // Other bad arguments: nothing written.
  std::fill(out.begin(), out.end(), -7.0f);
  p.window_left = -1;
  p.chunk_tokens = 20;  // not a multiple of the page size
  s = DecodeFromFile(f, p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("chunk_tokens"), std::string::npos) << s.message();
  p.chunk_tokens = 0;
  p.softcap = -1.0f;
  s = DecodeFromFile(f, p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  for (float x : out) ASSERT_EQ(x, -7.0f) << "out written on error";
}

TEST(KVFileDecodeDeterminism, ThreadCountsAndReadersBitwise) {
  TempDir dir;
  RamCache rc;
  ASSERT_NO_FATAL_FAILURE(BuildRamCache(KVDType::kInt4, 777, 5, &rc));
  const std::string path = dir.File("d.kv");
  ASSERT_TRUE(SaveKVFile(rc.cache.view(), rc.Batch(), 0, path).ok());
  KVFile f;
  ASSERT_TRUE(KVFile::Open(path, &f).ok());
  const std::vector<float> q = Normalish(2 * kHq * kDim, 9);
  Options o;
  o.q = 2;
  o.causal = true;
  o.chunk_tokens = 64;
  o.threads = 1;
  o.reader = KVFileReader::kThreadPool;
  Outputs a, b;
  ASSERT_TRUE(FileDecode(f, q, o, &a).ok());
  o.threads = 2;
  ASSERT_TRUE(FileDecode(f, q, o, &b).ok());
  EXPECT_EQ(0, std::memcmp(a.out.data(), b.out.data(), a.out.size() * 4)) << "threads 1 vs 2";
  EXPECT_EQ(0, std::memcmp(a.lse.data(), b.lse.data(), a.lse.size() * 4)) << "threads 1 vs 2";
  if (!IoUringRefused()) {
    o.reader = KVFileReader::kIoUring;
    ASSERT_TRUE(FileDecode(f, q, o, &b).ok());
    EXPECT_EQ(0, std::memcmp(a.out.data(), b.out.data(), a.out.size() * 4)) << "io_uring";
  }
}

TEST(KVFileDecodeRegression, EmptyFile) {
  TempDir dir;
  RamCache rc;
  ASSERT_NO_FATAL_FAILURE(BuildRamCache(KVDType::kInt8, 0, 5, &rc));
  const std::string path = dir.File("e.kv");
  ASSERT_TRUE(SaveKVFile(rc.cache.view(), rc.Batch(), 0, path).ok());
  KVFile f;
  Status s = KVFile::Open(path, &f);
  ASSERT_TRUE(s.ok()) << s.ToString();
  Outputs r;
  const std::vector<float> q = Normalish(kHq * kDim, 9);
  s = FileDecode(f, q, Options(), &r);
  ASSERT_TRUE(s.ok()) << s.ToString();
  for (float x : r.out) EXPECT_EQ(x, 0.0f);
  for (float x : r.lse) EXPECT_EQ(x, -std::numeric_limits<float>::infinity());
}

// Block selection: with top_k covering every chunk it is the full decode (bitwise); with a needle
// planted in one chunk and top_k = 2 it reads that chunk and the last one only, and equals the
// in-RAM decode over exactly those tokens.
TEST(KVFileDecodeSelect, ReadsTheSelectedChunksOnly) {
  TempDir dir;
  const int32_t len = 1003;
  const int64_t chunk = 96, needle = 5;
  const std::vector<float> q = Normalish(kHq * kDim, 21);
  std::vector<float> k = Normalish(int64_t{len} * kHkv * kDim, 22);
  const std::vector<float> v = Normalish(int64_t{len} * kHkv * kDim, 23);
  for (float& x : k) x *= 0.1f;
  for (int64_t t = needle * chunk; t < (needle + 1) * chunk; ++t) {
    for (int64_t g = 0; g < kHkv; ++g) {
      for (int64_t d = 0; d < kDim; ++d) {
        // The mean of the group's two query heads, scaled: the highest score for both.
        const float qm = 0.5f * (q[size_t((2 * g) * kDim + d)] + q[size_t((2 * g + 1) * kDim + d)]);
        k[size_t((t * kHkv + g) * kDim + d)] += 0.5f * qm;
      }
    }
  }
  auto make = [&](const std::vector<int64_t>& tokens, RamCache* rc) {
    const int32_t n = static_cast<int32_t>(tokens.size());
    const int64_t pages = (n + kPage - 1) / kPage;
    ASSERT_TRUE(rc->cache.Allocate(KVDType::kF16, pages, kPage, kHkv, kDim).ok());
    for (int64_t i = 0; i < pages; ++i) rc->block_table.push_back(static_cast<int32_t>(i));
    std::vector<float> kk, vv;
    for (int64_t t : tokens) {
      kk.insert(kk.end(), k.begin() + t * kHkv * kDim, k.begin() + (t + 1) * kHkv * kDim);
      vv.insert(vv.end(), v.begin() + t * kHkv * kDim, v.begin() + (t + 1) * kHkv * kDim);
    }
    AppendKVParams ap;
    ap.k_new = MakeView4(kk.data(), DType::kF32, 1, n, kHkv, kDim);
    ap.v_new = MakeView4(vv.data(), DType::kF32, 1, n, kHkv, kDim);
    ap.cache = rc->cache.view();
    rc->len = 0;
    ap.batch = rc->Batch();
    ASSERT_TRUE(AppendKV(ap, Context()).ok());
    rc->len = n;
  };
  std::vector<int64_t> all(len);
  for (int32_t t = 0; t < len; ++t) all[size_t(t)] = t;
  RamCache full;
  ASSERT_NO_FATAL_FAILURE(make(all, &full));
  const std::string path = dir.File("sel.kv");
  ASSERT_TRUE(SaveKVFile(full.cache.view(), full.Batch(), 0, path).ok());
  KVFile f;
  ASSERT_TRUE(KVFile::Open(path, &f).ok());
  Options o;
  o.chunk_tokens = chunk;
  Outputs plain, sel;
  KVFileDecodeStats stats;
  ASSERT_TRUE(FileDecode(f, q, o, &plain, &stats).ok());
  EXPECT_EQ(stats.chunks, 11);
  KVFileDecodeParams p;
  p.q = MakeView4(const_cast<float*>(q.data()), DType::kF32, 1, 1, kHq, kDim);
  sel.out.assign(q.size(), 0.0f);
  sel.lse.assign(kHq, 0.0f);
  p.out = MakeView4(sel.out.data(), DType::kF32, 1, 1, kHq, kDim);
  p.lse = MakeView3(sel.lse.data(), DType::kF32, 1, kHq, 1);
  p.chunk_tokens = chunk;
  p.select_top_k = 11;
  ASSERT_TRUE(DecodeFromFile(f, p, Context(), &stats).ok());
  EXPECT_EQ(stats.chunks, 11);
  EXPECT_EQ(0, std::memcmp(sel.out.data(), plain.out.data(), plain.out.size() * 4));
  const int64_t all_bytes = stats.bytes_read;
  p.select_top_k = 2;
  Status s = DecodeFromFile(f, p, Context(), &stats);
  ASSERT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(stats.chunks_total, 11);
  ASSERT_EQ(stats.chunks_read, (std::vector<int64_t>{needle, 10}));
  EXPECT_LT(stats.bytes_read, all_bytes / 4);
  std::vector<int64_t> picked;
  for (int64_t t = needle * chunk; t < (needle + 1) * chunk; ++t) picked.push_back(t);
  for (int64_t t = 10 * chunk; t < len; ++t) picked.push_back(t);
  RamCache part;
  ASSERT_NO_FATAL_FAILURE(make(picked, &part));
  Outputs want;
  const DecodeParams rp = RamParams(&part, q, Options(), &want);
  ASSERT_TRUE(Decode(rp, Context()).ok());
  EXPECT_TRUE(test::CheckClose(D64(sel.out), D64(want.out), test::OutputCeiling(DType::kF32),
                               "selected chunks vs in-RAM decode of their tokens"));
  EXPECT_TRUE(test::CheckClose(D64(sel.lse), D64(want.lse), {1e-5, 1e-5}, "lse"));
  p.chunk_tokens = 0;  // 4 MiB of 16-token pages: a multiple of 16, fine
  EXPECT_TRUE(DecodeFromFile(f, p, Context()).ok());
  p.select_top_k = -1;
  EXPECT_EQ(DecodeFromFile(f, p, Context()).code(), StatusCode::kInvalidArgument);
}

// A contiguous in-RAM cache (capacity 300 > 256 tokens per page) saved with 256-token file pages
// and with 7-token ones.
TEST(KVFileSave, ContiguousCacheAnyFilePageSize) {
  TempDir dir;
  const int32_t len = 203;
  KVCache cache;
  ASSERT_TRUE(cache.Allocate(KVDType::kInt8, 1, 300, kHkv, kDim).ok());
  const std::vector<float> k = Normalish(int64_t{len} * kHkv * kDim, 31),
                           v = Normalish(int64_t{len} * kHkv * kDim, 32);
  int32_t zero = 0;
  AppendKVParams ap;
  ap.k_new = MakeView4(const_cast<float*>(k.data()), DType::kF32, 1, len, kHkv, kDim);
  ap.v_new = MakeView4(const_cast<float*>(v.data()), DType::kF32, 1, len, kHkv, kDim);
  ap.cache = cache.view();
  ap.batch.batch = 1;
  ap.batch.seq_lens = MakeView1(&zero, DType::kI32, 1);
  ASSERT_TRUE(AppendKV(ap, Context()).ok());
  int32_t n = len;
  KVBatchView batch;
  batch.batch = 1;
  batch.seq_lens = MakeView1(&n, DType::kI32, 1);
  const std::vector<float> q = Normalish(kHq * kDim, 33);
  std::vector<float> want(q.size()), got(q.size());
  DecodeParams rp;
  rp.q = MakeView4(const_cast<float*>(q.data()), DType::kF32, 1, 1, kHq, kDim);
  rp.cache = cache.view();
  rp.kv = batch;
  rp.out = MakeView4(want.data(), DType::kF32, 1, 1, kHq, kDim);
  ASSERT_TRUE(Decode(rp, Context()).ok());
  for (int64_t page_size : {int64_t{0}, int64_t{7}}) {
    const std::string path = dir.File("contiguous" + std::to_string(page_size) + ".kv");
    Status s = SaveKVFile(cache.view(), batch, 0, path, page_size);
    ASSERT_TRUE(s.ok()) << s.ToString();
    KVFile f;
    ASSERT_TRUE(KVFile::Open(path, &f).ok());
    EXPECT_EQ(f.info().page_size, page_size == 0 ? 256 : 7);
    KVFileDecodeParams p;
    p.q = rp.q;
    p.out = MakeView4(got.data(), DType::kF32, 1, 1, kHq, kDim);
    s = DecodeFromFile(f, p, Context());
    ASSERT_TRUE(s.ok()) << s.ToString();
    EXPECT_TRUE(test::CheckClose(D64(got), D64(want), test::OutputCeiling(DType::kF32), "out"));
  }
  EXPECT_EQ(SaveKVFile(cache.view(), batch, 1, dir.File("bad.kv")).code(),
            StatusCode::kInvalidArgument);
}

std::vector<char> ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}
void WriteBytes(const std::string& path, const std::vector<char>& b) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(b.data(), static_cast<std::streamsize>(b.size()));
}

// The streaming writer (appends across page boundaries, RoPE, the normalizers calibrated from
// the first append or set) writes the same bytes as SaveKVFile of an in-RAM cache filled by one
// AppendKV.
TEST(KVFileWriter, EqualsSaveKVFileBytewise) {
  struct Mode {
    KVDType dtype;
    std::vector<int32_t> appends;
    bool set_scales;
  };
  const std::vector<Mode> modes = {{KVDType::kF16, {37, 1, 16, 60, 36}, false},
                                   {KVDType::kInt4, {150}, false},
                                   {KVDType::kInt8, {37, 0, 1, 16, 60, 36}, true}};
  for (const Mode& m : modes) {
    SCOPED_TRACE(std::string(KVDTypeName(m.dtype)) + (m.set_scales ? " set scales" : ""));
    TempDir dir;
    const int32_t len = 150;
    RotaryParams rot;
    rot.rotary_dim = 32;
    RamCache rc;
    rc.k = Normalish(int64_t{len} * kHkv * kDim, 11);
    rc.v = Normalish(int64_t{len} * kHkv * kDim, 12);
    ASSERT_TRUE(rc.cache.Allocate(m.dtype, 10, kPage, kHkv, kDim).ok());
    for (int i = 0; i < 10; ++i) rc.block_table.push_back(9 - i);
    AppendKVParams ap;
    ap.k_new = MakeView4(rc.k.data(), DType::kF32, 1, len, kHkv, kDim);
    ap.v_new = MakeView4(rc.v.data(), DType::kF32, 1, len, kHkv, kDim);
    ap.cache = rc.cache.view();
    ap.batch = rc.Batch();
    ap.rotary = rot;
    ASSERT_TRUE(AppendKV(ap, Context()).ok());
    rc.len = len;
    const std::string saved = dir.File("saved.kv"), streamed = dir.File("streamed.kv");
    ASSERT_TRUE(SaveKVFile(rc.cache.view(), rc.Batch(), 0, saved).ok());

    KVFileWriter w;
    Status s = KVFileWriter::Create(streamed, m.dtype, kPage, kHkv, kDim, len, &w);
    ASSERT_TRUE(s.ok()) << s.ToString();
    if (m.set_scales) {
      s = w.SetChannelScales(rc.cache.view().k_channel_scales, rc.cache.view().v_channel_scales);
      ASSERT_TRUE(s.ok()) << s.ToString();
    }
    int32_t at = 0;
    for (int32_t n : m.appends) {
      const size_t off = static_cast<size_t>(at) * kHkv * kDim;
      s = w.Append(MakeView4(rc.k.data() + off, DType::kF32, 1, n, kHkv, kDim),
                   MakeView4(rc.v.data() + off, DType::kF32, 1, n, kHkv, kDim), rot, Context());
      ASSERT_TRUE(s.ok()) << s.ToString();
      at += n;
    }
    ASSERT_EQ(at, len);
    // The capacity is full.
    s = w.Append(MakeView4(rc.k.data(), DType::kF32, 1, 1, kHkv, kDim),
                 MakeView4(rc.v.data(), DType::kF32, 1, 1, kHkv, kDim), rot, Context());
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
    ASSERT_TRUE(w.Finish().ok());
    EXPECT_EQ(w.tokens(), len);
    const std::vector<char> a = ReadBytes(saved), b = ReadBytes(streamed);
    ASSERT_EQ(a.size(), b.size());
    EXPECT_TRUE(a == b) << "the two files differ";
    EXPECT_NE(::access((streamed + ".partial").c_str(), F_OK), 0) << "partial file left";
  }
}

TEST(KVFileWriter, AbandonedWriterLeavesNoFile) {
  TempDir dir;
  const std::string path = dir.File("abandoned.kv");
  {
    KVFileWriter w;
    ASSERT_TRUE(KVFileWriter::Create(path, KVDType::kF16, kPage, kHkv, kDim, 100, &w).ok());
  }
  EXPECT_NE(::access(path.c_str(), F_OK), 0);
  EXPECT_NE(::access((path + ".partial").c_str(), F_OK), 0);
  KVFileWriter w;
  Status s = KVFileWriter::Create(path, KVDType::kF16, 300, kHkv, kDim, 100, &w);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("page_size"), std::string::npos) << s.message();
}

// Bad files are clear errors naming the path, never a crash.
TEST(KVFileOpen, BadFilesAreRejected) {
  TempDir dir;
  RamCache rc;
  ASSERT_NO_FATAL_FAILURE(BuildRamCache(KVDType::kInt8, 40, 1, &rc));
  const std::string good = dir.File("good.kv");
  ASSERT_TRUE(SaveKVFile(rc.cache.view(), rc.Batch(), 0, good).ok());
  const std::vector<char> bytes = ReadBytes(good);
  ASSERT_GT(bytes.size(), 8192u);
  struct Bad {
    const char* name;
    std::vector<char> bytes;
    const char* says;
  };
  std::vector<Bad> bad;
  bad.push_back({"short.kv", std::vector<char>(bytes.begin(), bytes.begin() + 100), "short"});
  bad.push_back(
      {"truncated.kv", std::vector<char>(bytes.begin(), bytes.end() - 4096), "truncated"});
  std::vector<char> corrupt = bytes;
  corrupt[40] ^= 1;  // head_dim
  bad.push_back({"corrupt.kv", corrupt, "checksum"});
  std::vector<char> version = bytes;
  version[8] = 2;
  bad.push_back({"version.kv", version, "version"});
  std::vector<char> magic = bytes;
  magic[0] = 'X';
  bad.push_back({"magic.kv", magic, "magic"});
  bad.push_back({"empty.kv", {}, "short"});
  for (const Bad& b : bad) {
    const std::string path = dir.File(b.name);
    WriteBytes(path, b.bytes);
    KVFile f;
    const Status s = KVFile::Open(path, &f);
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << b.name;
    EXPECT_NE(s.message().find(path), std::string::npos) << s.message();
    EXPECT_NE(s.message().find(b.says), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("expected"), std::string::npos) << s.message();
    EXPECT_FALSE(f.is_open());
  }
  KVFile f;
  Status s = KVFile::Open(dir.File("missing.kv"), &f);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("missing.kv"), std::string::npos) << s.message();
  Outputs r;
  s = FileDecode(f, Normalish(kHq * kDim, 1), Options(), &r);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << "decode from a closed KVFile";
}

}  // namespace
}  // namespace tessera
