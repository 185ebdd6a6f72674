// Internal: argument checks shared by every public op. Messages follow one pattern:
// "<argument>: expected <what>, got <value>".
#pragma once

#include <string>

#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {

// "[d0, d1, ...]".
std::string ShapeString(const TensorView& t);
// "<name>: expected <what>, got <got>".
std::string Expected(const char* name, const std::string& what, const std::string& got);
// Rank 1..4, non-negative shape and strides, a non-null pointer unless empty, and for outputs
// (`writable`) no zero stride on a dim of extent > 1 (writes would alias).
Status CheckRankAndStrides(const char* name, const TensorView& t, bool writable);
// f32, bf16 or f16.
bool IsSupportedDType(DType d);
// CheckRankAndStrides plus an exact rank and shape (`shape` has `rank` entries; a negative entry
// accepts any extent), described as `what` in the message.
Status CheckShape(const char* name, const TensorView& t, int32_t rank, const int64_t* shape,
                  const std::string& what, bool writable);

}  // namespace tessera
