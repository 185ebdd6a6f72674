// SPDX-License-Identifier: Apache-2.0
// Internal: the small int32 arrays of the public API (cu_seqlens, seq_lens, block tables, tree
// parents, rotary positions) are TensorViews of dtype i32. Validation checks each one once and
// hands the kernels the raw pointer they read (the views are read in place, never copied).
#pragma once

#include <cstdint>
#include <string>

#include "core/check.h"
#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {

// A set i32 array argument: dtype i32, exactly `rank` dims of the extents in `shape` (a negative
// entry accepts any extent; `what` describes the shape in the message), non-negative strides and
// unit stride in the last dim (so a row is a plain int32_t array).
inline Status CheckI32View(const char* name, const TensorView& t, int32_t rank,
                           const int64_t* shape, const std::string& what) {
  if (t.dtype != DType::kI32) {
    return Status::InvalidArgument(Expected(name, "dtype i32", DTypeName(t.dtype)));
  }
  Status s = CheckShape(name, t, rank, shape, what, false);
  if (!s.ok()) return s;
  if (t.shape[rank - 1] > 1 && t.strides[rank - 1] != 1) {
    return Status::InvalidArgument(Expected(name, "unit stride in the last dim",
                                            "stride " + std::to_string(t.strides[rank - 1])));
  }
  return Status::Ok();
}

// The elements of an i32 view (nullptr when off).
inline const int32_t* I32Data(const TensorView& t) { return static_cast<const int32_t*>(t.data); }

}  // namespace tessera
