// SPDX-License-Identifier: Apache-2.0
// Internal: argument checks shared by every public op. Messages follow one pattern:
// "<argument>: expected <what>, got <value>".
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {

// "[d0, d1, ...]".
std::string ShapeString(const TensorView& t);
// "<name>: expected <what>, got <got>".
std::string Expected(const char* name, const std::string& what, const std::string& got);
// Rank 1..4, non-negative shape and strides, an element count and a byte extent that fit in
// int64 (so no offset computed from the view can overflow), a non-null pointer unless empty, and
// for outputs (`writable`) no two elements at the same address (a zero stride on a dim of extent
// > 1, or strides that interleave; the test is conservative: sorted by stride, each dim's stride
// must reach past the whole extent of the dims with smaller strides).
Status CheckRankAndStrides(const char* name, const TensorView& t, bool writable);
// f32, bf16 or f16.
bool IsSupportedDType(DType d);
// CheckRankAndStrides plus an exact rank and shape (`shape` has `rank` entries; a negative entry
// accepts any extent), described as `what` in the message.
Status CheckShape(const char* name, const TensorView& t, int32_t rank, const int64_t* shape,
                  const std::string& what, bool writable);

// The bytes an argument may touch: [data, data + bytes). Empty (bytes == 0) when nothing is
// read or written through it.
struct Region {
  std::string name;
  const void* data = nullptr;
  int64_t bytes = 0;
};
// A view's region: from element [0, ...] to one past its last element (strides are
// non-negative), for a view CheckRankAndStrides accepted. Empty for an empty view.
Region ViewRegion(std::string name, const TensorView& t);
// `count` elements of `elem_bytes` bytes at `data` (raw arrays: cu_seqlens, block tables, ...).
Region ArrayRegion(std::string name, const void* data, int64_t count, int64_t elem_bytes);
// Outputs may overlap neither an input nor another output: InvalidArgument naming both
// arguments. Inputs may overlap each other freely.
Status CheckDisjoint(const std::vector<Region>& outputs, const std::vector<Region>& inputs);

// Sets every element of a view (accepted by CheckRankAndStrides, dtype f32, bf16 or f16) to
// `value`: the outputs of calls with no work (no keys) are written without running a kernel.
void FillView(const TensorView& t, float value);

}  // namespace tessera
