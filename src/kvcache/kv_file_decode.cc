// SPDX-License-Identifier: Apache-2.0
// DecodeFromFile: decode over a KV file, streamed in chunks through a ring of aligned buffers.
//
// Chunks are runs of whole pages (chunk_tokens / page_size of them). Chunk c's K, V (and scale)
// pages are 2 (or 4) contiguous ranges of the file, read with O_DIRECT into page-aligned
// buffers (each range widened to 4096-byte boundaries; the view starts at the range's offset
// inside). While chunk c is decoded, the reads of the next buffers - 1 chunks are in flight.
//
// Positions. RunDecode places query row i at position n - Q + i for a cache of n keys, and every
// mask and bias depends only on the distance pos - j. The last chunk ends at the file's last
// token, so decoding it as a cache of its own n keys gives every distance exactly. An earlier
// chunk [t0, t1) is decoded without causal: the plan guarantees t1 <= tokens - Q + 1 (a last
// chunk of fewer than Q - 1 tokens is joined to the one before), so every query row sees all its
// keys. ALiBi (-slope * |pos - j|) there is decoded one query row at a time (then local distances
// are never negative) and the row's true distances are the local ones plus
// shift = tokens - Q + i + 1 - t1, a constant: the softmax over the chunk is unchanged and its
// LSE moves by -slope * shift, which is added to the chunk's LSE before the merge. Softcap is
// applied before the bias, so it commutes with this. A bounded window is not supported.
//
// Merge: a running state (f32 output and LSE) merged with each chunk's state by MergeStates, in
// chunk order; q is converted to f32 once so that every chunk state is f32.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/checked_math.h"
#include "core/element.h"
#include "core/guard.h"
#include "core/huge_pages.h"
#include "kvcache/kv_file_format.h"
#include "kvcache/kv_file_io.h"
#include "tessera/decode.h"
#include "tessera/kv_file.h"
#include "tessera/mask.h"
#include "tessera/merge.h"

namespace tessera {
namespace {

using kvfile::kAlign;
using kvfile::Layout;

constexpr int64_t kAutoChunkBytes = int64_t{4} << 20;
constexpr int64_t kMaxChunkBytes = int64_t{256} << 20;
constexpr int32_t kDefaultBuffers = 3;
constexpr int32_t kMaxBuffers = 8;
constexpr int32_t kDefaultIoThreads = 4;
constexpr int32_t kMaxIoThreads = 64;

std::string Str(int64_t x) { return std::to_string(x); }

Status Invalid(const char* name, const std::string& what, const std::string& got) {
  return Status::InvalidArgument(Expected(name, what, got));
}

struct Chunk {
  int64_t p0 = 0, p1 = 0;  // pages
  int64_t t0 = 0, t1 = 0;  // tokens
};

// One buffer of the ring: K, V, K scales, V scales regions, each read as a 4096-aligned range.
struct BufRegion {
  uint8_t* base = nullptr;
  int64_t capacity = 0;
};
struct Slot {
  PageBytes bytes;
  BufRegion part[4];
  int64_t delta[4] = {0, 0, 0, 0};  // where the chunk's data starts inside each region
};

// The aligned read of [off, off + n) into region r; records the data's start in the region.
void AddRead(Slot* slot, int r, int64_t off, int64_t n, std::vector<kvfile::ReadRequest>* reqs,
             int64_t* bytes_read) {
  if (n <= 0) return;
  const int64_t a0 = kvfile::AlignDown(off), a1 = kvfile::AlignUp(off + n);
  slot->delta[r] = off - a0;
  reqs->push_back(kvfile::ReadRequest{a0, a1 - a0, slot->part[r].base});
  *bytes_read += a1 - a0;
}

float AlibiSlope(const TensorView& s, int64_t h) {
  const float* p = static_cast<const float*>(s.data);
  return s.rank == 1 ? p[h * s.strides[0]] : p[h * s.strides[1]];
}

// Block selection (KVFileDecodeParams::select_top_k): keeps the chunks SelectBlocks picks from
// the file's per-page key means; `ids` receives the kept chunks' indices. The last chunk is kept
// by SelectBlocks' causal form (its diagonal block).
Status SelectChunks(const KVFile& file, const KVFileDecodeParams& p, const std::vector<float>& q32,
                    int64_t Q, int64_t Hq, int64_t block_tokens, std::vector<Chunk>* chunks,
                    std::vector<int64_t>* ids) {
  const KVFileInfo& info = file.info();
  const Layout& layout = file.impl()->layout;
  const int64_t L = info.tokens, P = info.page_size, Hkv = info.num_kv_heads, D = info.head_dim;
  const int64_t used_pages = CeilDiv(L, P), nkb = CeilDiv(L, block_tokens);
  std::vector<float> page_means(static_cast<size_t>(used_pages * Hkv * D));
  {
    const int fd = ::open(file.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return Invalid("file", "a readable file at " + file.path(), std::strerror(errno));
    const bool read = kvfile::ReadAll(fd, page_means.data(), used_pages * layout.mean_page_bytes,
                                      layout.k_means_off);
    ::close(fd);
    if (!read) {
      return Status::Internal("DecodeFromFile: cannot read the key means of '" + file.path() + "'");
    }
  }
  // Scores [1, Hq, 1, nkb]: scale * mean(q) . (token-weighted mean of the block's page means).
  const double scale =
      p.scale.has_value() ? static_cast<double>(*p.scale) : 1.0 / std::sqrt(static_cast<double>(D));
  std::vector<float> scores(static_cast<size_t>(Hq * nkb));
  std::vector<double> qmean(static_cast<size_t>(D)), kmean(static_cast<size_t>(D));
  const int64_t group = Hq / Hkv;
  for (int64_t h = 0; h < Hq; ++h) {
    std::fill(qmean.begin(), qmean.end(), 0.0);
    for (int64_t i = 0; i < Q; ++i) {
      for (int64_t d = 0; d < D; ++d) qmean[size_t(d)] += q32[size_t((i * Hq + h) * D + d)];
    }
    for (int64_t j = 0; j < nkb; ++j) {
      std::fill(kmean.begin(), kmean.end(), 0.0);
      const int64_t t0 = j * block_tokens, t1 = std::min(L, t0 + block_tokens);
      for (int64_t page = t0 / P; page < CeilDiv(t1, P); ++page) {
        const double n = static_cast<double>(std::min(t1, (page + 1) * P) - std::max(t0, page * P));
        const float* m = page_means.data() + size_t((page * Hkv + h / group) * D);
        for (int64_t d = 0; d < D; ++d) kmean[size_t(d)] += static_cast<double>(m[d]) * n;
      }
      double dot = 0.0;
      for (int64_t d = 0; d < D; ++d) dot += qmean[size_t(d)] * kmean[size_t(d)];
      scores[size_t(h * nkb + j)] =
          static_cast<float>(scale * dot / (static_cast<double>(Q) * static_cast<double>(t1 - t0)));
    }
  }
  std::vector<uint8_t> keep(static_cast<size_t>(Hq * nkb));
  BlockSelectParams bs;
  bs.q = MakeView4(nullptr, DType::kF32, 1, Q, Hq, D);
  bs.k = MakeView4(nullptr, DType::kF32, 1, L, Hkv, D);
  bs.scores = MakeView4(scores.data(), DType::kF32, 1, Hq, 1, nkb);
  bs.block_q = 16;
  bs.block_k = block_tokens;
  bs.top_k = p.select_top_k;
  bs.causal = true;
  bs.out = MakeView4(keep.data(), DType::kU8, 1, Hq, 1, nkb);
  Context one;
  one.num_threads = 1;
  Status s = SelectBlocks(bs, one);
  if (!s.ok()) return s;
  // Block j is chunk j, except blocks past the last chunk (a short last block joined to it).
  std::vector<Chunk> kept;
  ids->clear();
  const int64_t n = static_cast<int64_t>(chunks->size());
  for (int64_t c = 0; c < n; ++c) {
    bool any = c + 1 == n;
    for (int64_t j = c; j < (c + 1 == n ? nkb : c + 1); ++j) {
      for (int64_t h = 0; h < Hq; ++h) any = any || keep[size_t(h * nkb + j)] != 0;
    }
    if (any) {
      kept.push_back((*chunks)[size_t(c)]);
      ids->push_back(c);
    }
  }
  *chunks = std::move(kept);
  return Status::Ok();
}

}  // namespace

const char* KVFileReaderName(KVFileReader reader) {
  switch (reader) {
    case KVFileReader::kAuto:
      return "auto";
    case KVFileReader::kIoUring:
      return "io_uring";
    case KVFileReader::kThreadPool:
      return "threads";
  }
  return "unknown";
}

Status DecodeFromFile(const KVFile& file, const KVFileDecodeParams& p, const Context& ctx,
                      KVFileDecodeStats* stats) try {
  using Clock = std::chrono::steady_clock;
  if (!file.is_open()) {
    return Invalid("file", "a KVFile opened by KVFile::Open", "a closed (empty) KVFile");
  }
  const KVFileInfo& info = file.info();
  const Layout& layout = file.impl()->layout;
  const int64_t L = info.tokens, P = info.page_size, Hkv = info.num_kv_heads, D = info.head_dim;
  const bool quantized = KVDTypeIsQuantized(info.dtype);

  // --- Arguments -------------------------------------------------------------------------------
  Status s = CheckRankAndStrides("q", p.q, false);
  if (!s.ok()) return s;
  if (p.q.rank != 4 || p.q.shape[0] != 1) {
    return Invalid("q", "rank 4 [1, Q, Hq, D] (one sequence per file)", ShapeString(p.q));
  }
  if (!IsSupportedDType(p.q.dtype)) {
    return Invalid("q", "dtype f32, bf16 or f16", DTypeName(p.q.dtype));
  }
  const int64_t Q = p.q.shape[1], Hq = p.q.shape[2];
  if (Q < 1 || Q > kMaxDecodeQueries) {
    return Invalid("q", "1 to " + Str(kMaxDecodeQueries) + " queries (dim 1)", Str(Q));
  }
  if (p.q.shape[3] != D) {
    return Invalid("q", "head dim " + Str(D) + " (the file's) in dim 3", Str(p.q.shape[3]));
  }
  if (Hq < 1 || Hq % Hkv != 0) {
    return Invalid("q", "a head count that is a positive multiple of the file's Hkv = " + Str(Hkv),
                   Str(Hq));
  }
  const int64_t out_shape[4] = {1, Q, Hq, D};
  s = CheckShape("out", p.out, 4, out_shape, "shape " + ShapeString(p.q) + " (of q)", true);
  if (!s.ok()) return s;
  if (p.out.dtype != p.q.dtype) {
    return Invalid("out", std::string("dtype ") + DTypeName(p.q.dtype) + " (of q)",
                   DTypeName(p.out.dtype));
  }
  if (p.lse.data != nullptr) {
    const int64_t lse_shape[3] = {1, Hq, Q};
    s = CheckShape("lse", p.lse, 3, lse_shape,
                   "shape [1, " + Str(Hq) + ", " + Str(Q) + "] ([1, Hq, Q])", true);
    if (!s.ok()) return s;
    if (p.lse.dtype != DType::kF32) return Invalid("lse", "dtype f32", DTypeName(p.lse.dtype));
  }
  s = CheckDisjoint({ViewRegion("out", p.out), ViewRegion("lse", p.lse)},
                    {ViewRegion("q", p.q), ViewRegion("alibi_slopes", p.alibi_slopes)});
  if (!s.ok()) return s;
  if (p.window_left >= 0 && p.window_left < std::max(Q, L)) {
    return Status::Unimplemented(Expected(
        "window_left", "-1 (DecodeFromFile supports no bounded window)", Str(p.window_left)));
  }
  if (p.alibi_slopes.data != nullptr) {
    s = CheckRankAndStrides("alibi_slopes", p.alibi_slopes, false);
    if (!s.ok()) return s;
    const bool ok = p.alibi_slopes.dtype == DType::kF32 &&
                    ((p.alibi_slopes.rank == 1 && p.alibi_slopes.shape[0] == Hq) ||
                     (p.alibi_slopes.rank == 2 && p.alibi_slopes.shape[0] == 1 &&
                      p.alibi_slopes.shape[1] == Hq));
    if (!ok) {
      return Invalid(
          "alibi_slopes", "f32 [" + Str(Hq) + "] or [1, " + Str(Hq) + "]",
          std::string(DTypeName(p.alibi_slopes.dtype)) + " " + ShapeString(p.alibi_slopes));
    }
  }
  if (p.split_tokens < 0) {
    return Invalid("split_tokens", ">= 0 (0: the decode default)", Str(p.split_tokens));
  }
  if (p.reader != KVFileReader::kAuto && p.reader != KVFileReader::kIoUring &&
      p.reader != KVFileReader::kThreadPool) {
    return Invalid("reader", "kAuto, kIoUring or kThreadPool", Str(static_cast<int32_t>(p.reader)));
  }
  const int32_t buffers = p.buffers == 0 ? kDefaultBuffers : p.buffers;
  if (buffers < 2 || buffers > kMaxBuffers) {
    return Invalid("buffers", "0 (default " + Str(kDefaultBuffers) + ") or 2.." + Str(kMaxBuffers),
                   Str(p.buffers));
  }
  const int32_t io_threads = p.io_threads == 0 ? kDefaultIoThreads : p.io_threads;
  if (io_threads < 1 || io_threads > kMaxIoThreads) {
    return Invalid("io_threads",
                   "0 (default " + Str(kDefaultIoThreads) + ") or 1.." + Str(kMaxIoThreads),
                   Str(p.io_threads));
  }
  if (p.decode_threads < 0) {
    return Invalid("decode_threads", ">= 0 (0: 1)", Str(p.decode_threads));
  }
  Context decode_ctx = ctx;
  decode_ctx.num_threads = std::min(ResolveThreads(ctx), std::max(1, p.decode_threads));
  const int64_t bytes_per_page = 2 * (layout.page_bytes + layout.scale_page_bytes);
  int64_t chunk_pages = 0;
  if (p.chunk_tokens == 0) {
    chunk_pages = std::max<int64_t>(1, kAutoChunkBytes / bytes_per_page);
  } else {
    if (p.chunk_tokens < 0 || p.chunk_tokens % P != 0 ||
        p.chunk_tokens / P > kMaxChunkBytes / bytes_per_page) {
      return Invalid("chunk_tokens",
                     "0 (about 4 MiB) or a positive multiple of the page size " + Str(P) +
                         " of at most " + Str(kMaxChunkBytes >> 20) + " MiB of pages",
                     Str(p.chunk_tokens));
    }
    chunk_pages = std::max<int64_t>(1, p.chunk_tokens / P);
  }

  // --- The chunk plan ---------------------------------------------------------------------------
  std::vector<Chunk> chunks;
  const int64_t used_pages = CeilDiv(L, P);
  for (int64_t p0 = 0; p0 < used_pages; p0 += chunk_pages) {
    const int64_t p1 = std::min(used_pages, p0 + chunk_pages);
    chunks.push_back(Chunk{p0, p1, p0 * P, std::min(L, p1 * P)});
  }
  // Every chunk but the last must end at or before tokens - Q + 1 (see the file comment).
  while (chunks.size() > 1 && chunks.back().t0 > L - Q + 1) {
    Chunk last = chunks.back();
    chunks.pop_back();
    chunks.back().p1 = last.p1;
    chunks.back().t1 = last.t1;
  }
  if (p.select_top_k < 0) {
    return Invalid("select_top_k", ">= 0 (0: read every chunk)", Str(p.select_top_k));
  }
  if (p.select_top_k > 0 && (chunk_pages * P) % 16 != 0) {
    return Invalid("chunk_tokens",
                   "a multiple of 16 tokens with select_top_k (SelectBlocks' block size)",
                   Str(chunk_pages * P));
  }
  const int64_t chunks_total = static_cast<int64_t>(chunks.size());

  const size_t rows = static_cast<size_t>(Q * Hq);
  // Scratch: q in f32, the state / chunk pair of parts, the merge output.
  std::vector<float> q32(rows * size_t(D)), parts(2 * rows * size_t(D)), merged(rows * size_t(D));
  std::vector<float> lse_parts(2 * rows, -std::numeric_limits<float>::infinity()), lse_merged(rows);
  for (int64_t i = 0; i < Q; ++i) {
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t base = i * p.q.strides[1] + h * p.q.strides[2];
      for (int64_t d = 0; d < D; ++d) {
        q32[size_t((i * Hq + h) * D + d)] =
            LoadElement(p.q.dtype, p.q.data, base + d * p.q.strides[3]);
      }
    }
  }

  std::vector<int64_t> chunk_ids(chunks.size());
  for (size_t c = 0; c < chunks.size(); ++c) chunk_ids[c] = static_cast<int64_t>(c);
  if (p.select_top_k > 0 && chunks.size() > 1) {
    s = SelectChunks(file, p, q32, Q, Hq, chunk_pages * P, &chunks, &chunk_ids);
    if (!s.ok()) return s;
  }
  int64_t max_pages = 0;
  for (const Chunk& c : chunks) max_pages = std::max(max_pages, c.p1 - c.p0);

  // The ring of buffers (allocated before the reader: the reader is destroyed first).
  std::vector<Slot> slots(chunks.empty() ? 0 : size_t(buffers));
  const int64_t region_bytes[4] = {
      kvfile::AlignUp(max_pages * layout.page_bytes) + kAlign,
      kvfile::AlignUp(max_pages * layout.page_bytes) + kAlign,
      quantized ? kvfile::AlignUp(max_pages * layout.scale_page_bytes) + kAlign : 0,
      quantized ? kvfile::AlignUp(max_pages * layout.scale_page_bytes) + kAlign : 0};
  const int64_t slot_bytes = region_bytes[0] + region_bytes[1] + region_bytes[2] + region_bytes[3];
  for (Slot& sl : slots) {
    sl.bytes = AllocatePages(static_cast<size_t>(slot_bytes));
    if (!sl.bytes) {
      return Status::Internal("DecodeFromFile: out of memory for a chunk buffer of " +
                              Str(slot_bytes) + " bytes");
    }
    uint8_t* at = sl.bytes.get();
    for (int r = 0; r < 4; ++r) {
      sl.part[r] = BufRegion{at, region_bytes[r]};
      at += region_bytes[r];
    }
  }
  std::vector<int32_t> block_table(static_cast<size_t>(std::max<int64_t>(1, max_pages)));
  for (size_t i = 0; i < block_table.size(); ++i) block_table[i] = static_cast<int32_t>(i);
  float* k_norm = const_cast<float*>(file.k_channel_scales());
  float* v_norm = const_cast<float*>(file.v_channel_scales());

  // The decode of chunk c from slot `sl`, for query rows [i0, i0 + nq), into the chunk part.
  int32_t chunk_len = 0;
  auto make_params = [&](const Chunk& c, const Slot& sl, bool last, int64_t i0, int64_t nq) {
    DecodeParams dp;
    KVCacheView cache;
    cache.dtype = info.dtype;
    cache.num_pages = std::max<int64_t>(1, c.p1 - c.p0);
    cache.page_size = P;
    cache.num_kv_heads = Hkv;
    cache.head_dim = D;
    cache.k = sl.part[0].base + sl.delta[0];
    cache.v = sl.part[1].base + sl.delta[1];
    if (quantized) {
      cache.k_scales = reinterpret_cast<float*>(sl.part[2].base + sl.delta[2]);
      cache.v_scales = reinterpret_cast<float*>(sl.part[3].base + sl.delta[3]);
      cache.k_channel_scales = k_norm;
      cache.v_channel_scales = v_norm;
    }
    chunk_len = static_cast<int32_t>(c.t1 - c.t0);
    dp.cache = cache;
    dp.kv.batch = 1;
    dp.kv.seq_lens = MakeView1(&chunk_len, DType::kI32, 1);
    const int64_t bt_shape[2] = {1, static_cast<int64_t>(block_table.size())};
    dp.kv.block_table = MakeContiguousView(block_table.data(), DType::kI32, 2, bt_shape);
    dp.q = MakeView4(q32.data() + size_t(i0 * Hq * D), DType::kF32, 1, nq, Hq, D);
    dp.out =
        MakeView4(parts.data() + rows * size_t(D) + size_t(i0 * Hq * D), DType::kF32, 1, nq, Hq, D);
    // The chunk's LSE [1, Hq, Q] (h-major), rows [i0, i0 + nq).
    dp.lse = MakeView3(lse_parts.data() + rows + size_t(i0), DType::kF32, 1, Hq, nq);
    dp.lse.strides[0] = Hq * Q;
    dp.lse.strides[1] = Q;
    dp.scale = p.scale;
    dp.causal = last && p.causal;
    dp.softcap = p.softcap;
    dp.alibi_slopes = p.alibi_slopes;
    dp.split_tokens = p.split_tokens;
    return dp;
  };

  // Validate every decode option on the shape of the last chunk before any I/O (no tokens: on a
  // stand-in cache of one page that no row reads).
  {
    DecodePlan plan;
    if (!chunks.empty()) {
      s = PlanDecode(make_params(chunks.back(), slots[0], true, 0, Q), ctx, &plan);
    } else {
      KVCache stand_in;
      s = stand_in.Allocate(info.dtype, 1, P, Hkv, D);
      if (s.ok()) {
        Slot sl;
        sl.part[0].base = static_cast<uint8_t*>(stand_in.view().k);
        sl.part[1].base = static_cast<uint8_t*>(stand_in.view().v);
        sl.part[2].base = reinterpret_cast<uint8_t*>(stand_in.view().k_scales);
        sl.part[3].base = reinterpret_cast<uint8_t*>(stand_in.view().v_scales);
        DecodeParams dp = make_params(Chunk{}, sl, true, 0, Q);
        if (quantized) {
          dp.cache.k_channel_scales = stand_in.view().k_channel_scales;
          dp.cache.v_channel_scales = stand_in.view().v_channel_scales;
        }
        s = PlanDecode(dp, ctx, &plan);
      }
    }
    if (!s.ok()) return s;
  }
  if (p.alibi_slopes.data != nullptr) {
    for (int64_t h = 0; h < Hq; ++h) {
      const float slope = AlibiSlope(p.alibi_slopes, h);
      if (!std::isfinite(slope)) {
        return Invalid("alibi_slopes", "finite values",
                       std::to_string(slope) + " at [" + Str(h) + "]");
      }
    }
  }

  KVFileDecodeStats st;
  st.direct = false;
  st.chunks_total = chunks_total;
  if (!chunks.empty()) {
    // --- Open the file for reading and check it is still the one KVFile::Open validated --------
    int fd = -1;
    if (p.direct) {
      fd = ::open(file.path().c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
      st.direct = fd >= 0;
    }
    if (fd < 0) fd = ::open(file.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      return Invalid("file", "a readable file at " + file.path(), std::strerror(errno));
    }
    struct Closer {
      int fd;
      ~Closer() { ::close(fd); }
    } closer{fd};
    {
      PageBytes head = AllocatePages(static_cast<size_t>(kvfile::kHeaderBytes));
      struct stat stt;
      const std::vector<uint8_t> want = kvfile::EncodeHeader(info, layout);
      bool same = head && ::fstat(fd, &stt) == 0 && stt.st_size >= layout.file_bytes &&
                  ::pread(fd, head.get(), size_t(kvfile::kHeaderBytes), 0) ==
                      static_cast<ssize_t>(kvfile::kHeaderBytes);
      same = same && std::memcmp(head.get(), want.data(), want.size()) == 0;
      if (!same) {
        return Invalid("file", "the file KVFile::Open validated at '" + file.path() + "'",
                       "a file changed since (open it again)");
      }
    }
    std::unique_ptr<kvfile::Reader> reader;
    s = kvfile::MakeReader(p.reader, fd, file.path(), buffers, io_threads, &reader);
    if (!s.ok()) return s;
    st.reader = reader->kind();

    auto submit = [&](size_t c) {
      Slot& sl = slots[c % slots.size()];
      const Chunk& ch = chunks[c];
      const int64_t np = ch.p1 - ch.p0;
      std::vector<kvfile::ReadRequest> reqs;
      AddRead(&sl, 0, layout.k_off + ch.p0 * layout.page_bytes, np * layout.page_bytes, &reqs,
              &st.bytes_read);
      AddRead(&sl, 1, layout.v_off + ch.p0 * layout.page_bytes, np * layout.page_bytes, &reqs,
              &st.bytes_read);
      if (quantized) {
        AddRead(&sl, 2, layout.k_scales_off + ch.p0 * layout.scale_page_bytes,
                np * layout.scale_page_bytes, &reqs, &st.bytes_read);
        AddRead(&sl, 3, layout.v_scales_off + ch.p0 * layout.scale_page_bytes,
                np * layout.scale_page_bytes, &reqs, &st.bytes_read);
      }
      return reader->Submit(static_cast<int>(c % slots.size()), reqs);
    };

    const size_t n = chunks.size();
    for (size_t c = 0; c + 1 < slots.size() && c < n; ++c) {
      s = submit(c);
      if (!s.ok()) return s;
    }
    const bool per_row_alibi = p.alibi_slopes.data != nullptr;
    for (size_t c = 0; c < n; ++c) {
      const auto w0 = Clock::now();
      s = reader->Wait(static_cast<int>(c % slots.size()));
      if (!s.ok()) return s;
      if (c + slots.size() - 1 < n) {
        s = submit(c + slots.size() - 1);
        if (!s.ok()) return s;
      }
      const auto d0 = Clock::now();
      st.wait_ms += std::chrono::duration<double, std::milli>(d0 - w0).count();
      const Chunk& ch = chunks[c];
      const Slot& sl = slots[c % slots.size()];
      const bool last = c + 1 == n;
      if (last || !per_row_alibi) {
        s = Decode(make_params(ch, sl, last, 0, Q), decode_ctx);
        if (!s.ok()) return s;
      } else {
        for (int64_t i = 0; i < Q; ++i) {
          s = Decode(make_params(ch, sl, false, i, 1), decode_ctx);
          if (!s.ok()) return s;
          const double shift = static_cast<double>(L - Q + i + 1 - ch.t1);
          for (int64_t h = 0; h < Hq; ++h) {
            float& lse = lse_parts[rows + size_t(h * Q + i)];
            lse = static_cast<float>(static_cast<double>(lse) -
                                     static_cast<double>(AlibiSlope(p.alibi_slopes, h)) * shift);
          }
        }
      }
      if (c == 0) {
        std::copy(parts.begin() + ptrdiff_t(rows * size_t(D)), parts.end(), parts.begin());
        std::copy(lse_parts.begin() + ptrdiff_t(rows), lse_parts.end(), lse_parts.begin());
      } else {
        MergeStatesParams mp;
        mp.out_parts = MakeView4(parts.data(), DType::kF32, 2, Q, Hq, D);
        mp.lse_parts = MakeView3(lse_parts.data(), DType::kF32, 2, Q, Hq);
        mp.lse_parts.strides[1] = 1;
        mp.lse_parts.strides[2] = Q;
        mp.out = MakeView3(merged.data(), DType::kF32, Q, Hq, D);
        mp.lse.data = lse_merged.data();  // [Q, Hq] over the h-major [Hq, Q] array
        mp.lse.dtype = DType::kF32;
        mp.lse.rank = 2;
        mp.lse.shape[0] = Q;
        mp.lse.shape[1] = Hq;
        mp.lse.strides[0] = 1;
        mp.lse.strides[1] = Q;
        s = MergeStates(mp, decode_ctx);
        if (!s.ok()) return s;
        std::copy(merged.begin(), merged.end(), parts.begin());
        std::copy(lse_merged.begin(), lse_merged.end(), lse_parts.begin());
      }
      st.decode_ms += std::chrono::duration<double, std::milli>(Clock::now() - d0).count();
    }
    st.chunks = static_cast<int64_t>(n);
    st.chunks_read = chunk_ids;
  }

  // --- The result
  // ---------------------------------------------------------------------------------
  for (int64_t i = 0; i < Q; ++i) {
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t base = i * p.out.strides[1] + h * p.out.strides[2];
      const float* src = parts.data() + size_t((i * Hq + h) * D);
      for (int64_t d = 0; d < D; ++d) {
        StoreElement(p.out.dtype, p.out.data, base + d * p.out.strides[3],
                     chunks.empty() ? 0.0f : src[d]);
      }
      if (p.lse.data != nullptr) {
        static_cast<float*>(p.lse.data)[h * p.lse.strides[1] + i * p.lse.strides[2]] =
            lse_parts[size_t(h * Q + i)];
      }
    }
  }
  if (stats != nullptr) *stats = st;
  return Status::Ok();
}
TESSERA_CATCH_ALL("DecodeFromFile")

}  // namespace tessera
