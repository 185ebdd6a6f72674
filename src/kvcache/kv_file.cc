// SPDX-License-Identifier: Apache-2.0
// KV cache files: the layout and header (kv_file_format.h), KVFile::Open's validation, and the
// two ways to write a file (SaveKVFile from an in-RAM cache, KVFileWriter token by token).
//
// Writers fill "<path>.partial" (sized up front with ftruncate, so the pages can be written in
// any order) and publish it with fsync + rename once the header is written last: a reader never
// sees a half-written file under `path`, and an error removes the partial file.
#include "tessera/kv_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "core/check.h"
#include "core/checked_math.h"
#include "core/element.h"
#include "core/guard.h"
#include "kvcache/kv_file_format.h"
#include "kvcache/kv_quant.h"
#include "kvcache/kv_validate.h"

namespace tessera {
namespace kvfile {

bool ComputeLayout(KVDType dtype, int64_t page_size, int64_t num_kv_heads, int64_t head_dim,
                   int64_t num_pages, Layout* layout) {
  if (!kvquant::IsKnownDType(dtype) || page_size < 1 || page_size > kKVFileMaxPageSize ||
      num_kv_heads < 1 || head_dim < 1 || head_dim > 512 || num_pages < 1) {
    return false;
  }
  // Every product below is bounded before it is formed: a page is at most 256 * Hkv * 2 KiB.
  if (num_kv_heads > (int64_t{1} << 20) || num_pages > kMaxFileBytes) return false;
  const bool quantized = KVDTypeIsQuantized(dtype);
  Layout l;
  l.row_bytes = kvquant::RowBytes(dtype, head_dim);
  l.page_bytes = num_kv_heads * page_size * l.row_bytes;
  l.scale_page_bytes = quantized ? num_kv_heads * page_size * 8 : 0;
  l.norm_bytes = quantized ? num_kv_heads * head_dim * 4 : 0;
  l.mean_page_bytes = num_kv_heads * head_dim * 4;
  const double total = static_cast<double>(num_pages) *
                       (2.0 * static_cast<double>(l.page_bytes + l.scale_page_bytes) +
                        num_kv_heads * head_dim * 4.0);
  if (total > static_cast<double>(kMaxFileBytes)) return false;
  int64_t off = kHeaderBytes;
  auto section = [&](int64_t bytes) {
    const int64_t at = off;
    off = AlignUp(off + bytes);
    return at;
  };
  l.k_off = section(num_pages * l.page_bytes);
  l.v_off = section(num_pages * l.page_bytes);
  if (quantized) {
    l.k_scales_off = section(num_pages * l.scale_page_bytes);
    l.v_scales_off = section(num_pages * l.scale_page_bytes);
    l.k_norm_off = section(l.norm_bytes);
    l.v_norm_off = section(l.norm_bytes);
  }
  l.k_means_off = section(num_pages * l.mean_page_bytes);
  l.file_bytes = off;
  *layout = l;
  return true;
}

void PageKeyMeans(KVDType dtype, const uint8_t* k, const float* k_scales, const float* norm,
                  int64_t page_size, int64_t num_kv_heads, int64_t head_dim, int64_t tokens,
                  float* means) {
  const int64_t D = head_dim, row_bytes = kvquant::RowBytes(dtype, D);
  std::vector<double> sum(static_cast<size_t>(D));
  std::vector<float> row(static_cast<size_t>(D));
  for (int64_t h = 0; h < num_kv_heads; ++h) {
    std::fill(sum.begin(), sum.end(), 0.0);
    for (int64_t slot = 0; slot < tokens; ++slot) {
      const int64_t r = h * page_size + slot;
      const uint8_t* src = k + r * row_bytes;
      switch (dtype) {
        case KVDType::kF32:
          std::memcpy(row.data(), src, size_t(D) * sizeof(float));
          break;
        case KVDType::kBF16:
        case KVDType::kF16:
          for (int64_t c = 0; c < D; ++c) {
            uint16_t x;
            std::memcpy(&x, src + 2 * c, 2);
            row[size_t(c)] = dtype == KVDType::kBF16 ? BF16ToFloat(x) : F16ToFloat(x);
          }
          break;
        case KVDType::kInt8:
        case KVDType::kInt4:
          kvquant::DequantizeRow(src, D, norm + h * D, kvquant::Bits(dtype), k_scales[2 * r],
                                 k_scales[2 * r + 1], row.data());
          break;
      }
      for (int64_t c = 0; c < D; ++c) sum[size_t(c)] += row[size_t(c)];
    }
    for (int64_t c = 0; c < D; ++c) {
      means[h * D + c] = tokens > 0 ? static_cast<float>(sum[size_t(c)] / tokens) : 0.0f;
    }
  }
}

uint64_t Fnv1a64(const uint8_t* data, int64_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (int64_t i = 0; i < n; ++i) {
    h ^= data[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

namespace {

// Field offsets in the header.
constexpr int kOffVersion = 8, kOffHeaderBytes = 12, kOffDType = 16, kOffEndian = 20,
              kOffPageSize = 24, kOffHeads = 32, kOffDim = 40, kOffPages = 48, kOffTokens = 56,
              kOffRowBytes = 64, kOffK = 72, kOffV = 80, kOffKScales = 88, kOffVScales = 96,
              kOffKNorm = 104, kOffVNorm = 112, kOffKMeans = 120, kOffFileBytes = 128;
static_assert(kOffFileBytes + 8 == kHeaderFieldBytes, "header fields");

template <typename T>
void Put(std::vector<uint8_t>* h, int off, T x) {
  std::memcpy(h->data() + off, &x, sizeof(T));
}
template <typename T>
T Get(const uint8_t* h, int off) {
  T x;
  std::memcpy(&x, h + off, sizeof(T));
  return x;
}

}  // namespace

std::vector<uint8_t> EncodeHeader(const KVFileInfo& info, const Layout& layout) {
  std::vector<uint8_t> h(static_cast<size_t>(kHeaderBytes), 0);
  std::memcpy(h.data(), kMagic, sizeof(kMagic));
  Put<uint32_t>(&h, kOffVersion, static_cast<uint32_t>(kKVFileVersion));
  Put<uint32_t>(&h, kOffHeaderBytes, static_cast<uint32_t>(kHeaderBytes));
  Put<int32_t>(&h, kOffDType, static_cast<int32_t>(info.dtype));
  Put<uint32_t>(&h, kOffEndian, kEndianMark);
  Put<int64_t>(&h, kOffPageSize, info.page_size);
  Put<int64_t>(&h, kOffHeads, info.num_kv_heads);
  Put<int64_t>(&h, kOffDim, info.head_dim);
  Put<int64_t>(&h, kOffPages, info.num_pages);
  Put<int64_t>(&h, kOffTokens, info.tokens);
  Put<int64_t>(&h, kOffRowBytes, layout.row_bytes);
  Put<int64_t>(&h, kOffK, layout.k_off);
  Put<int64_t>(&h, kOffV, layout.v_off);
  Put<int64_t>(&h, kOffKScales, layout.k_scales_off);
  Put<int64_t>(&h, kOffVScales, layout.v_scales_off);
  Put<int64_t>(&h, kOffKNorm, layout.k_norm_off);
  Put<int64_t>(&h, kOffVNorm, layout.v_norm_off);
  Put<int64_t>(&h, kOffKMeans, layout.k_means_off);
  Put<int64_t>(&h, kOffFileBytes, layout.file_bytes);
  Put<uint64_t>(&h, kHeaderFieldBytes, Fnv1a64(h.data(), kHeaderFieldBytes));
  return h;
}

bool ReadAll(int fd, void* dst, int64_t n, int64_t off) {
  uint8_t* p = static_cast<uint8_t*>(dst);
  while (n > 0) {
    const ssize_t r = ::pread(fd, p, static_cast<size_t>(n), static_cast<off_t>(off));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= r;
    off += r;
  }
  return true;
}

}  // namespace kvfile

namespace {

using kvfile::kAlign;
using kvfile::kHeaderBytes;
using kvfile::Layout;

std::string Str(int64_t x) { return std::to_string(x); }

std::string Quoted(const std::string& path) { return "'" + path + "'"; }

std::string Errno() { return std::strerror(errno); }

Status BadFile(const std::string& path, const std::string& what, const std::string& got) {
  return Status::InvalidArgument(
      Expected("path", what, Quoted(path) + (got.empty() ? "" : " " + got)));
}

// pwrite of exactly n bytes (restarting after EINTR and short writes).
bool WriteAll(int fd, const void* src, int64_t n, int64_t off) {
  const uint8_t* p = static_cast<const uint8_t*>(src);
  while (n > 0) {
    const ssize_t r = ::pwrite(fd, p, static_cast<size_t>(n), static_cast<off_t>(off));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= r;
    off += r;
  }
  return true;
}

// "<path>.partial", published by Commit; removed when not committed.
class PartialFile {
 public:
  ~PartialFile() { Abandon(); }

  Status Create(const std::string& path, int64_t bytes) {
    path_ = path;
    tmp_ = path + ".partial";
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0) {
      return BadFile(path, "a path where a file can be created",
                     "(cannot create " + Quoted(tmp_) + ": " + Errno() + ")");
    }
    if (::ftruncate(fd_, static_cast<off_t>(bytes)) != 0) {
      return Status::Internal("KV file " + Quoted(tmp_) + ": cannot size it to " + Str(bytes) +
                              " bytes: " + Errno());
    }
    return Status::Ok();
  }

  Status Write(const void* src, int64_t n, int64_t off) {
    if (n > 0 && !WriteAll(fd_, src, n, off)) {
      return Status::Internal("KV file " + Quoted(tmp_) + ": write of " + Str(n) +
                              " bytes at offset " + Str(off) + " failed: " + Errno());
    }
    return Status::Ok();
  }

  // Writes the header, syncs, closes and renames the file to its path.
  Status Commit(const std::vector<uint8_t>& header) {
    Status s = Write(header.data(), static_cast<int64_t>(header.size()), 0);
    if (!s.ok()) return s;
    if (::fsync(fd_) != 0) {
      return Status::Internal("KV file " + Quoted(tmp_) + ": fsync failed: " + Errno());
    }
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) {
      return Status::Internal("KV file " + Quoted(tmp_) + ": close failed: " + Errno());
    }
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
      return Status::Internal("KV file: cannot rename " + Quoted(tmp_) + " to " + Quoted(path_) +
                              ": " + Errno());
    }
    tmp_.clear();
    return Status::Ok();
  }

  void Abandon() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
    if (!tmp_.empty()) ::unlink(tmp_.c_str());
    tmp_.clear();
  }

 private:
  int fd_ = -1;
  std::string path_, tmp_;
};

// Quantized normalizers read from a file: all positive and finite (or all zero for a file with
// no tokens, which was never calibrated).
Status CheckNorms(const std::string& path, const char* which, const std::vector<float>& n,
                  int64_t tokens) {
  bool all_zero = true;
  for (float x : n) all_zero = all_zero && x == 0.0f;
  if (all_zero && tokens == 0) return Status::Ok();
  for (size_t i = 0; i < n.size(); ++i) {
    if (!(n[i] > 0.0f) || !std::isfinite(n[i])) {
      return BadFile(path, std::string("positive finite ") + which + " channel normalizers",
                     "with " + std::to_string(n[i]) + " at [" + Str(static_cast<int64_t>(i)) +
                         "] (corrupt file)");
    }
  }
  return Status::Ok();
}

Status CheckShapeArgs(KVDType dtype, int64_t page_size, int64_t num_kv_heads, int64_t head_dim) {
  if (!kvquant::IsKnownDType(dtype)) {
    return Status::InvalidArgument(Expected("dtype", "f32, bf16, f16, int8 or int4",
                                            "unknown dtype " + Str(static_cast<int32_t>(dtype))));
  }
  if (page_size < 1 || page_size > kKVFileMaxPageSize) {
    return Status::InvalidArgument(Expected(
        "page_size", "1.." + Str(kKVFileMaxPageSize) + " tokens per page", Str(page_size)));
  }
  if (num_kv_heads < 1 || num_kv_heads > (int64_t{1} << 20)) {
    return Status::InvalidArgument(Expected("num_kv_heads", "1..2^20 KV heads", Str(num_kv_heads)));
  }
  if (head_dim < 1 || head_dim > 512) {
    return Status::InvalidArgument(Expected("head_dim", "a head dim in [1, 512]", Str(head_dim)));
  }
  return Status::Ok();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// KVFile.

KVFile::KVFile() = default;
KVFile::~KVFile() = default;
KVFile::KVFile(KVFile&&) noexcept = default;
KVFile& KVFile::operator=(KVFile&&) noexcept = default;

const KVFileInfo& KVFile::info() const {
  static const KVFileInfo kEmpty;
  return impl_ ? impl_->info : kEmpty;
}
const std::string& KVFile::path() const {
  static const std::string kEmpty;
  return impl_ ? impl_->path : kEmpty;
}
const float* KVFile::k_channel_scales() const {
  return impl_ && !impl_->k_norm.empty() ? impl_->k_norm.data() : nullptr;
}
const float* KVFile::v_channel_scales() const {
  return impl_ && !impl_->v_norm.empty() ? impl_->v_norm.data() : nullptr;
}

Status KVFile::Open(const std::string& path, KVFile* file) try {
  using namespace kvfile;  // NOLINT: the format constants
  if (file == nullptr) {
    return Status::InvalidArgument(Expected("file", "a KVFile to fill", "nullptr"));
  }
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return BadFile(path, "an existing, readable tessera KV cache file", "(" + Errno() + ")");
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    return BadFile(path, "a regular file", "(not a regular file)");
  }
  const int64_t size = static_cast<int64_t>(st.st_size);
  if (size < kHeaderBytes) {
    return BadFile(
        path, "a tessera KV cache file of at least " + Str(kHeaderBytes) + " bytes (its header)",
        "of " + Str(size) + " bytes (short or truncated file)");
  }
  std::vector<uint8_t> h(static_cast<size_t>(kHeaderBytes));
  if (!kvfile::ReadAll(fd, h.data(), kHeaderBytes, 0)) {
    return BadFile(path, "a readable header", "(read failed: " + Errno() + ")");
  }
  if (std::memcmp(h.data(), kMagic, sizeof(kMagic)) != 0) {
    std::string got;
    for (size_t i = 0; i < sizeof(kMagic); ++i) {
      const char c = static_cast<char>(h[i]);
      got += (c >= 0x20 && c < 0x7f) ? std::string(1, c) : "\\x" + [&] {
        char b[4];
        std::snprintf(b, sizeof(b), "%02x", h[i]);
        return std::string(b);
      }();
    }
    return BadFile(path, "a tessera KV cache file (magic \"TSRKVFIL\")",
                   "with magic \"" + got + "\" (another file format)");
  }
  const uint32_t version = Get<uint32_t>(h.data(), kOffVersion);
  if (version != static_cast<uint32_t>(kKVFileVersion)) {
    return BadFile(path, "a KV cache file of format version " + Str(kKVFileVersion),
                   "of version " + Str(version));
  }
  const uint64_t sum = Get<uint64_t>(h.data(), kHeaderFieldBytes);
  const uint64_t want = Fnv1a64(h.data(), kHeaderFieldBytes);
  if (sum != want) {
    char buf[96];
    std::snprintf(buf, sizeof(buf), "with checksum 0x%016llx where its fields give 0x%016llx",
                  static_cast<unsigned long long>(sum), static_cast<unsigned long long>(want));
    return BadFile(path, "a header whose checksum matches", std::string(buf) + " (corrupt header)");
  }
  KVFileInfo info;
  info.dtype = static_cast<KVDType>(Get<int32_t>(h.data(), kOffDType));
  info.page_size = Get<int64_t>(h.data(), kOffPageSize);
  info.num_kv_heads = Get<int64_t>(h.data(), kOffHeads);
  info.head_dim = Get<int64_t>(h.data(), kOffDim);
  info.num_pages = Get<int64_t>(h.data(), kOffPages);
  info.tokens = Get<int64_t>(h.data(), kOffTokens);
  if (Get<uint32_t>(h.data(), kOffEndian) != kEndianMark ||
      Get<uint32_t>(h.data(), kOffHeaderBytes) != static_cast<uint32_t>(kHeaderBytes)) {
    return BadFile(path, "a little-endian header of " + Str(kHeaderBytes) + " bytes",
                   "with another byte order or header size");
  }
  Layout layout;
  if (!ComputeLayout(info.dtype, info.page_size, info.num_kv_heads, info.head_dim, info.num_pages,
                     &layout)) {
    return BadFile(path,
                   "a supported layout (dtype f32..int4, page_size 1..256, Hkv >= 1, D 1..512)",
                   "with dtype " + Str(static_cast<int32_t>(info.dtype)) + ", page_size " +
                       Str(info.page_size) + ", Hkv " + Str(info.num_kv_heads) + ", D " +
                       Str(info.head_dim) + ", " + Str(info.num_pages) + " pages");
  }
  int64_t capacity = 0;
  if (info.tokens < 0 || !CheckedMul(info.num_pages, info.page_size, &capacity) ||
      info.tokens > capacity) {
    return BadFile(path, "at most num_pages * page_size = " + Str(capacity) + " tokens",
                   "with " + Str(info.tokens));
  }
  const struct {
    int off;
    int64_t want;
    const char* name;
  } fields[] = {{kOffRowBytes, layout.row_bytes, "row bytes"},
                {kOffK, layout.k_off, "K offset"},
                {kOffV, layout.v_off, "V offset"},
                {kOffKScales, layout.k_scales_off, "K scales offset"},
                {kOffVScales, layout.v_scales_off, "V scales offset"},
                {kOffKNorm, layout.k_norm_off, "K normalizers offset"},
                {kOffVNorm, layout.v_norm_off, "V normalizers offset"},
                {kOffKMeans, layout.k_means_off, "key means offset"},
                {kOffFileBytes, layout.file_bytes, "file size"}};
  for (const auto& f : fields) {
    const int64_t got = Get<int64_t>(h.data(), f.off);
    if (got != f.want) {
      return BadFile(path, std::string("a ") + f.name + " of " + Str(f.want) + " (the layout)",
                     "with " + Str(got) + " (another layout)");
    }
  }
  if (size < layout.file_bytes) {
    return BadFile(path, Str(layout.file_bytes) + " bytes (as its header says)",
                   "of " + Str(size) + " bytes (truncated file)");
  }
  info.file_bytes = layout.file_bytes;
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->info = info;
  impl->layout = layout;
  if (KVDTypeIsQuantized(info.dtype)) {
    const size_t n = static_cast<size_t>(info.num_kv_heads * info.head_dim);
    impl->k_norm.resize(n);
    impl->v_norm.resize(n);
    if (!kvfile::ReadAll(fd, impl->k_norm.data(), layout.norm_bytes, layout.k_norm_off) ||
        !kvfile::ReadAll(fd, impl->v_norm.data(), layout.norm_bytes, layout.v_norm_off)) {
      return BadFile(path, "readable channel normalizers", "(read failed: " + Errno() + ")");
    }
    Status s = CheckNorms(path, "K", impl->k_norm, info.tokens);
    if (!s.ok()) return s;
    s = CheckNorms(path, "V", impl->v_norm, info.tokens);
    if (!s.ok()) return s;
  }
  file->impl_ = std::move(impl);
  return Status::Ok();
}
TESSERA_CATCH_ALL("KVFile::Open")

// ---------------------------------------------------------------------------------------------
// SaveKVFile.

Status SaveKVFile(const KVCacheView& cache, const KVBatchView& batch, int64_t b,
                  const std::string& path, int64_t page_size) try {
  Status s = ValidateKVCache(cache, batch, "cache", "batch");
  if (!s.ok()) return s;
  if (b < 0 || b >= batch.batch) {
    return Status::InvalidArgument(
        Expected("b", "a sequence index in [0, " + Str(batch.batch) + ") (batch.batch)", Str(b)));
  }
  if (page_size < 0 || page_size > kKVFileMaxPageSize) {
    return Status::InvalidArgument(
        Expected("page_size", "0 (the cache's) or 1.." + Str(kKVFileMaxPageSize), Str(page_size)));
  }
  const int64_t P = page_size > 0 ? page_size : std::min(cache.page_size, kKVFileMaxPageSize);
  const int64_t H = cache.num_kv_heads, D = cache.head_dim;
  const int64_t len = kvquant::SeqLens(batch)[b];
  const int64_t num_pages = std::max<int64_t>(1, CeilDiv(len, P));
  Layout layout;
  if (!kvfile::ComputeLayout(cache.dtype, P, H, D, num_pages, &layout)) {
    return Status::InvalidArgument(
        Expected("cache", "a cache whose file fits in 2^50 bytes", Str(len) + " tokens"));
  }
  const bool quantized = KVDTypeIsQuantized(cache.dtype);
  PartialFile out;
  s = out.Create(path, layout.file_bytes);
  if (!s.ok()) return s;
  const int64_t row = layout.row_bytes;
  std::vector<uint8_t> kpage(static_cast<size_t>(layout.page_bytes)), vpage(kpage.size());
  std::vector<float> kscales(static_cast<size_t>(layout.scale_page_bytes / 4)),
      vscales(kscales.size()), means(static_cast<size_t>(H * D));
  const uint8_t* k = static_cast<const uint8_t*>(cache.k);
  const uint8_t* v = static_cast<const uint8_t*>(cache.v);
  for (int64_t page = 0; page < num_pages; ++page) {
    std::fill(kpage.begin(), kpage.end(), 0);
    std::fill(vpage.begin(), vpage.end(), 0);
    std::fill(kscales.begin(), kscales.end(), 0.0f);
    std::fill(vscales.begin(), vscales.end(), 0.0f);
    for (int64_t slot = 0; slot < P && page * P + slot < len; ++slot) {
      const int64_t t = page * P + slot;
      const int64_t src_page = kvquant::PageOfToken(batch, b, t, cache.page_size);
      const int64_t src_slot = t % cache.page_size;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t src = kvquant::RowIndex(cache, src_page, src_slot, h);
        const int64_t dst = h * P + slot;
        std::memcpy(&kpage[size_t(dst * row)], k + src * row, size_t(row));
        std::memcpy(&vpage[size_t(dst * row)], v + src * row, size_t(row));
        if (quantized) {
          kscales[size_t(2 * dst)] = cache.k_scales[2 * src];
          kscales[size_t(2 * dst + 1)] = cache.k_scales[2 * src + 1];
          vscales[size_t(2 * dst)] = cache.v_scales[2 * src];
          vscales[size_t(2 * dst + 1)] = cache.v_scales[2 * src + 1];
        }
      }
    }
    kvfile::PageKeyMeans(cache.dtype, kpage.data(), kscales.data(), cache.k_channel_scales, P, H, D,
                         std::min(P, len - page * P), means.data());
    s = out.Write(means.data(), layout.mean_page_bytes,
                  layout.k_means_off + page * layout.mean_page_bytes);
    if (s.ok()) {
      s = out.Write(kpage.data(), layout.page_bytes, layout.k_off + page * layout.page_bytes);
    }
    if (s.ok()) {
      s = out.Write(vpage.data(), layout.page_bytes, layout.v_off + page * layout.page_bytes);
    }
    if (s.ok() && quantized) {
      s = out.Write(kscales.data(), layout.scale_page_bytes,
                    layout.k_scales_off + page * layout.scale_page_bytes);
      if (s.ok()) {
        s = out.Write(vscales.data(), layout.scale_page_bytes,
                      layout.v_scales_off + page * layout.scale_page_bytes);
      }
    }
    if (!s.ok()) return s;
  }
  if (quantized) {
    s = out.Write(cache.k_channel_scales, layout.norm_bytes, layout.k_norm_off);
    if (s.ok()) s = out.Write(cache.v_channel_scales, layout.norm_bytes, layout.v_norm_off);
    if (!s.ok()) return s;
  }
  KVFileInfo info;
  info.dtype = cache.dtype;
  info.page_size = P;
  info.num_kv_heads = H;
  info.head_dim = D;
  info.num_pages = num_pages;
  info.tokens = len;
  return out.Commit(kvfile::EncodeHeader(info, layout));
}
TESSERA_CATCH_ALL("SaveKVFile")

// ---------------------------------------------------------------------------------------------
// KVFileWriter.

struct KVFileWriter::Impl {
  KVFileInfo info;
  Layout layout;
  PartialFile file;
  KVCache page;                      // the page being filled
  std::vector<int32_t> block_table;  // every entry 0: any token maps to the one staged page
  int64_t capacity = 0;              // tokens
  bool failed = false;
  bool finished = false;
};

KVFileWriter::KVFileWriter() = default;
KVFileWriter::~KVFileWriter() = default;
KVFileWriter::KVFileWriter(KVFileWriter&&) noexcept = default;
KVFileWriter& KVFileWriter::operator=(KVFileWriter&&) noexcept = default;

int64_t KVFileWriter::tokens() const { return impl_ ? impl_->info.tokens : 0; }

Status KVFileWriter::Create(const std::string& path, KVDType dtype, int64_t page_size,
                            int64_t num_kv_heads, int64_t head_dim, int64_t capacity_tokens,
                            KVFileWriter* writer) try {
  if (writer == nullptr) {
    return Status::InvalidArgument(Expected("writer", "a KVFileWriter to fill", "nullptr"));
  }
  Status s = CheckShapeArgs(dtype, page_size, num_kv_heads, head_dim);
  if (!s.ok()) return s;
  if (capacity_tokens < 1 || capacity_tokens > std::numeric_limits<int32_t>::max()) {
    return Status::InvalidArgument(
        Expected("capacity_tokens", "1..2^31 - 1 tokens", Str(capacity_tokens)));
  }
  auto impl = std::make_unique<Impl>();
  const int64_t num_pages = CeilDiv(capacity_tokens, page_size);
  if (!kvfile::ComputeLayout(dtype, page_size, num_kv_heads, head_dim, num_pages, &impl->layout)) {
    return Status::InvalidArgument(Expected("capacity_tokens", "a file of at most 2^50 bytes",
                                            Str(capacity_tokens) + " tokens"));
  }
  impl->capacity = capacity_tokens;
  impl->info.dtype = dtype;
  impl->info.page_size = page_size;
  impl->info.num_kv_heads = num_kv_heads;
  impl->info.head_dim = head_dim;
  impl->info.num_pages = num_pages;
  impl->info.file_bytes = impl->layout.file_bytes;
  s = impl->page.Allocate(dtype, 1, page_size, num_kv_heads, head_dim);
  if (!s.ok()) return s;
  impl->block_table.assign(static_cast<size_t>(num_pages), 0);
  s = impl->file.Create(path, impl->layout.file_bytes);
  if (!s.ok()) return s;
  writer->impl_ = std::move(impl);
  return Status::Ok();
}
TESSERA_CATCH_ALL("KVFileWriter::Create")

namespace {

Status WriterState(const std::unique_ptr<KVFileWriter::Impl>& w) {
  if (w == nullptr) {
    return Status::InvalidArgument(
        Expected("writer", "a writer made by KVFileWriter::Create", "an empty writer"));
  }
  if (w->finished) {
    return Status::InvalidArgument(Expected("writer", "an unfinished writer", "a finished one"));
  }
  if (w->failed) {
    return Status::InvalidArgument(
        Expected("writer", "a writer without a failed write", "one that failed earlier"));
  }
  return Status::Ok();
}

}  // namespace

Status KVFileWriter::SetChannelScales(const float* k_channel_scales,
                                      const float* v_channel_scales) try {
  Status s = WriterState(impl_);
  if (!s.ok()) return s;
  Impl& w = *impl_;
  if (!KVDTypeIsQuantized(w.info.dtype)) {
    return Status::InvalidArgument(Expected("writer", "a quantized (int8 / int4) file",
                                            std::string(KVDTypeName(w.info.dtype))));
  }
  if (w.info.tokens > 0) {
    return Status::InvalidArgument(
        Expected("writer", "no tokens appended yet", Str(w.info.tokens) + " tokens"));
  }
  const int64_t n = w.info.num_kv_heads * w.info.head_dim;
  const struct {
    const char* name;
    const float* x;
  } args[] = {{"k_channel_scales", k_channel_scales}, {"v_channel_scales", v_channel_scales}};
  for (const auto& a : args) {
    if (a.x == nullptr) return Status::InvalidArgument(Expected(a.name, "f32 [Hkv, D]", "nullptr"));
    for (int64_t i = 0; i < n; ++i) {
      if (!(a.x[i] > 0.0f) || !std::isfinite(a.x[i])) {
        return Status::InvalidArgument(Expected(a.name, "positive finite values",
                                                std::to_string(a.x[i]) + " at [" + Str(i) + "]"));
      }
    }
  }
  KVCacheView v = w.page.view();
  std::memcpy(v.k_channel_scales, k_channel_scales, size_t(n) * sizeof(float));
  std::memcpy(v.v_channel_scales, v_channel_scales, size_t(n) * sizeof(float));
  return Status::Ok();
}
TESSERA_CATCH_ALL("KVFileWriter::SetChannelScales")

namespace {

// Writes the staged page (its first `tokens` slots filled) as file page `page` and clears it.
Status FlushPage(KVFileWriter::Impl* w, int64_t page, int64_t tokens) {
  const Layout& l = w->layout;
  KVCacheView v = w->page.view();
  const int64_t H = v.num_kv_heads, D = v.head_dim;
  std::vector<float> means(static_cast<size_t>(H * D));
  kvfile::PageKeyMeans(v.dtype, static_cast<const uint8_t*>(v.k), v.k_scales, v.k_channel_scales,
                       v.page_size, H, D, tokens, means.data());
  Status s =
      w->file.Write(means.data(), l.mean_page_bytes, l.k_means_off + page * l.mean_page_bytes);
  if (s.ok()) s = w->file.Write(v.k, l.page_bytes, l.k_off + page * l.page_bytes);
  if (s.ok()) s = w->file.Write(v.v, l.page_bytes, l.v_off + page * l.page_bytes);
  if (s.ok() && KVDTypeIsQuantized(v.dtype)) {
    s = w->file.Write(v.k_scales, l.scale_page_bytes, l.k_scales_off + page * l.scale_page_bytes);
    if (s.ok()) {
      s = w->file.Write(v.v_scales, l.scale_page_bytes, l.v_scales_off + page * l.scale_page_bytes);
    }
  }
  if (!s.ok()) return s;
  std::memset(v.k, 0, size_t(l.page_bytes));
  std::memset(v.v, 0, size_t(l.page_bytes));
  if (KVDTypeIsQuantized(v.dtype)) {
    std::memset(v.k_scales, 0, size_t(l.scale_page_bytes));
    std::memset(v.v_scales, 0, size_t(l.scale_page_bytes));
  }
  return Status::Ok();
}

// Tokens [i0, i0 + n) of a [1, n_all, Hkv, D] view.
TensorView TokenSlice(const TensorView& t, int64_t i0, int64_t n) {
  TensorView s = t;
  s.data =
      static_cast<uint8_t*>(t.data) + static_cast<size_t>(i0 * t.strides[1]) * DTypeSize(t.dtype);
  s.shape[1] = n;
  return s;
}

}  // namespace

Status KVFileWriter::Append(const TensorView& k_new, const TensorView& v_new,
                            const RotaryParams& rotary, const Context& ctx) try {
  Status s = WriterState(impl_);
  if (!s.ok()) return s;
  Impl& w = *impl_;
  const int64_t P = w.info.page_size, H = w.info.num_kv_heads, D = w.info.head_dim;
  const struct {
    const char* name;
    const TensorView* t;
  } args[] = {{"k_new", &k_new}, {"v_new", &v_new}};
  for (const auto& a : args) {
    s = CheckRankAndStrides(a.name, *a.t, false);
    if (!s.ok()) return s;
    if (a.t->rank != 4 || a.t->shape[0] != 1 || a.t->shape[2] != H || a.t->shape[3] != D) {
      return Status::InvalidArgument(Expected(
          a.name, "shape [1, n, " + Str(H) + ", " + Str(D) + "] (one sequence, the file's Hkv, D)",
          ShapeString(*a.t)));
    }
  }
  const int64_t n = k_new.shape[1];
  if (v_new.shape[1] != n) {
    return Status::InvalidArgument(
        Expected("v_new", "shape " + ShapeString(k_new) + " (of k_new)", ShapeString(v_new)));
  }
  const int64_t room = w.capacity - w.info.tokens;
  if (n > room) {
    return Status::InvalidArgument(
        Expected("k_new", "at most " + Str(room) + " tokens (the writer's capacity left)", Str(n)));
  }
  if (n == 0) return Status::Ok();
  KVCacheView view = w.page.view();
  const bool quantized = KVDTypeIsQuantized(w.info.dtype);
  if (quantized) {
    bool all_zero = true;
    for (int64_t i = 0; i < H * D; ++i) all_zero = all_zero && view.k_channel_scales[i] == 0.0f;
    for (int64_t i = 0; i < H * D; ++i) all_zero = all_zero && view.v_channel_scales[i] == 0.0f;
    if (all_zero) {
      // Calibrate from the whole first append, as one AppendKV of it would: a throwaway
      // contiguous cache of exactly these tokens (at positions 0..n-1, where they go).
      KVCache probe;
      s = probe.Allocate(w.info.dtype, 1, n, H, D);
      if (!s.ok()) return s;
      int32_t zero = 0;
      AppendKVParams ap;
      ap.k_new = k_new;
      ap.v_new = v_new;
      ap.cache = probe.view();
      ap.batch.batch = 1;
      ap.batch.seq_lens = MakeView1(&zero, DType::kI32, 1);
      ap.rotary = rotary;
      s = AppendKV(ap, ctx);
      if (!s.ok()) return s;
      const KVCacheView pv = probe.view();
      std::memcpy(view.k_channel_scales, pv.k_channel_scales, size_t(H * D) * sizeof(float));
      std::memcpy(view.v_channel_scales, pv.v_channel_scales, size_t(H * D) * sizeof(float));
    }
  }
  KVBatchView batch;
  batch.batch = 1;
  const int64_t bt_shape[2] = {1, w.info.num_pages};
  batch.block_table = MakeContiguousView(w.block_table.data(), DType::kI32, 2, bt_shape);
  for (int64_t done = 0; done < n;) {
    const int64_t pos = w.info.tokens;
    const int64_t m = std::min(n - done, P - pos % P);
    int32_t len = static_cast<int32_t>(pos);
    batch.seq_lens = MakeView1(&len, DType::kI32, 1);
    AppendKVParams ap;
    ap.k_new = TokenSlice(k_new, done, m);
    ap.v_new = TokenSlice(v_new, done, m);
    ap.cache = view;
    ap.batch = batch;
    ap.rotary = rotary;
    s = AppendKV(ap, ctx);
    // A value rejected after earlier pages were staged leaves the file incomplete.
    if (!s.ok()) {
      if (done > 0) w.failed = true;
      return s;
    }
    w.info.tokens += m;
    done += m;
    if (w.info.tokens % P == 0) {
      s = FlushPage(&w, w.info.tokens / P - 1, P);
      if (!s.ok()) {
        w.failed = true;
        return s;
      }
    }
  }
  return Status::Ok();
}
TESSERA_CATCH_ALL("KVFileWriter::Append")

Status KVFileWriter::Finish() try {
  Status s = WriterState(impl_);
  if (!s.ok()) return s;
  Impl& w = *impl_;
  const int64_t P = w.info.page_size;
  if (w.info.tokens % P != 0) {
    s = FlushPage(&w, w.info.tokens / P, w.info.tokens % P);
    if (!s.ok()) {
      w.failed = true;
      return s;
    }
  }
  if (KVDTypeIsQuantized(w.info.dtype)) {
    const KVCacheView v = w.page.view();
    s = w.file.Write(v.k_channel_scales, w.layout.norm_bytes, w.layout.k_norm_off);
    if (s.ok()) s = w.file.Write(v.v_channel_scales, w.layout.norm_bytes, w.layout.v_norm_off);
    if (!s.ok()) {
      w.failed = true;
      return s;
    }
  }
  s = w.file.Commit(kvfile::EncodeHeader(w.info, w.layout));
  if (!s.ok()) {
    w.failed = true;
    return s;
  }
  w.finished = true;
  return Status::Ok();
}
TESSERA_CATCH_ALL("KVFileWriter::Finish")

}  // namespace tessera
