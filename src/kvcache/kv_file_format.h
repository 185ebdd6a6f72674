// SPDX-License-Identifier: Apache-2.0
// Internal: the KV file's on-disk layout (kv_file.h) and the open file's state, shared by the
// writers (kv_file.cc) and the streaming decode (kv_file_decode.cc).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/kv_file.h"
#include "tessera/status.h"

namespace tessera {
namespace kvfile {

// Alignment of every section and of the file size: the O_DIRECT block size of common file
// systems (a multiple of every logical block size up to 4 KiB).
constexpr int64_t kAlign = 4096;
constexpr int64_t kHeaderBytes = kAlign;
// Encoded header fields (bytes [0, kHeaderFieldBytes)), then the 8-byte checksum.
constexpr int64_t kHeaderFieldBytes = 136;
constexpr char kMagic[8] = {'T', 'S', 'R', 'K', 'V', 'F', 'I', 'L'};
constexpr uint32_t kEndianMark = 0x01020304u;
// A file may describe at most this many bytes (guards every size computed from a header).
constexpr int64_t kMaxFileBytes = int64_t{1} << 50;

inline int64_t AlignUp(int64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
inline int64_t AlignDown(int64_t x) { return x / kAlign * kAlign; }

// Where everything lives, computed from the shape alone.
struct Layout {
  int64_t row_bytes = 0;         // KVRowBytes(dtype, D)
  int64_t page_bytes = 0;        // one page of K (or V): Hkv * page_size * row_bytes
  int64_t scale_page_bytes = 0;  // one page of K (or V) scales: Hkv * page_size * 8 (quantized)
  int64_t norm_bytes = 0;        // Hkv * D * 4 (quantized)
  int64_t mean_page_bytes = 0;   // one page's key means: Hkv * D * 4
  int64_t k_off = 0, v_off = 0, k_scales_off = 0, v_scales_off = 0, k_norm_off = 0, v_norm_off = 0,
          k_means_off = 0;
  int64_t file_bytes = 0;
};

// False when the shape is out of range or the file would exceed kMaxFileBytes.
bool ComputeLayout(KVDType dtype, int64_t page_size, int64_t num_kv_heads, int64_t head_dim,
                   int64_t num_pages, Layout* layout);

// The header bytes [0, kHeaderBytes) of a file with this info and layout.
std::vector<uint8_t> EncodeHeader(const KVFileInfo& info, const Layout& layout);

// The mean of the dequantized keys of one page in the file layout (k: its Hkv * page_size rows,
// k_scales / norm: its quantization parameters) over its first `tokens` slots, per KV head:
// means[Hkv, D] (zero for an empty page). Block selection scores chunks with these.
void PageKeyMeans(KVDType dtype, const uint8_t* k, const float* k_scales, const float* norm,
                  int64_t page_size, int64_t num_kv_heads, int64_t head_dim, int64_t tokens,
                  float* means);

// pread of exactly n bytes at offset off (restarting after EINTR and short reads); false on an
// error or end of file.
bool ReadAll(int fd, void* dst, int64_t n, int64_t off);

// FNV-1a 64 of n bytes.
uint64_t Fnv1a64(const uint8_t* data, int64_t n);

}  // namespace kvfile

struct KVFile::Impl {
  std::string path;
  KVFileInfo info;
  kvfile::Layout layout;
  std::vector<float> k_norm, v_norm;  // quantized only
};

}  // namespace tessera
