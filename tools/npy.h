// SPDX-License-Identifier: Apache-2.0
// Reading and writing NumPy .npy files (format versions 1.0, 2.0 and 3.0), restricted to what
// the CLI needs: C order, little-endian float32 ('<f4') and float16 ('<f2') tensors, and for
// masks and index arrays uint8 ('|u1'), bool ('|b1') and int32 ('<i4').
//
// Loading reads the payload straight into one 64-byte-aligned buffer of the file's dtype, so a
// large input costs exactly its own size in memory (no staging copy, no conversion).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tessera/types.h"

namespace tessera {
namespace cli {

// A 64-byte-aligned, uninitialized byte buffer (pages are touched only when written).
struct AlignedFree {
  void operator()(void* p) const;
};
using AlignedBytes = std::unique_ptr<uint8_t, AlignedFree>;
// Allocates `bytes` (0 allowed) or returns nullptr on failure.
AlignedBytes AllocateAligned(size_t bytes);

// An owned, C-order array of one of the dtypes above.
struct NpyArray {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  AlignedBytes data;

  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype); }
  // A contiguous view of rank shape.size() (1..4); a rank-0 array is viewed as [1]; rank > 4
  // gives a view with that rank and no shape, which tessera's validation rejects.
  TensorView View();
};

// Loads `path`, a float32 or float16 array. On error returns false and sets *error to a message
// naming the file and the problem (missing file, bad magic or header, unsupported dtype, Fortran
// order, truncation).
bool LoadNpy(const std::string& path, NpyArray* array, std::string* error);
// The same for an array of one of the `accepted` dtypes (the error lists them in that order).
bool LoadNpy(const std::string& path, const std::vector<DType>& accepted, NpyArray* array,
             std::string* error);

// Parses a whole .npy file held in memory (`size` bytes at `bytes`), as LoadNpy does a file;
// trailing bytes after the payload are ignored, as LoadNpy ignores them. The error names no file.
bool ParseNpy(const void* bytes, size_t size, const std::vector<DType>& accepted, NpyArray* array,
              std::string* error);

// The bytes a .npy file of `dtype` and `shape` starts with (magic, version, header length and
// the header dict, padded so the payload that follows starts on a 64-byte boundary); false
// with *error for a dtype NumPy lacks (bf16).
bool NpyHeader(DType dtype, const std::vector<int64_t>& shape, std::string* head,
               std::string* error);

// Writes `numel(shape)` elements of `dtype` from `data` as a C-order .npy file (version 1.0, or
// 2.0 when the header needs it). bf16 has no NumPy dtype and is rejected.
bool SaveNpy(const std::string& path, DType dtype, const std::vector<int64_t>& shape,
             const void* data, std::string* error);

// "(2, 3)"-style shape string, as NumPy prints it.
std::string ShapeToString(const std::vector<int64_t>& shape);

}  // namespace cli
}  // namespace tessera
