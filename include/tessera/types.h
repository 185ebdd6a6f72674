// SPDX-License-Identifier: Apache-2.0
// tessera: element types and strided tensor views.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tessera {

// Attention inputs are f32, bf16 or f16; masks also take u8 / bool (nonzero = true) and i32
// (document ids).
enum class DType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2, kU8 = 3, kBool = 4, kI32 = 5 };

// Size of one element in bytes.
size_t DTypeSize(DType dtype);
// "f32", "bf16", "f16", "u8", "bool", "i32".
const char* DTypeName(DType dtype);

// A non-owning view of a tensor of rank <= 4. Strides are in elements (not bytes) and may be
// any non-negative value, including 0 for broadcasting along a dimension. Unused trailing
// dimensions have shape 1. `data` is const-casted for inputs: tessera never writes an input.
// Every op checks that the element count and the byte extent (last element's offset) fit in
// int64, and that an output gives each element its own address and overlaps no input and no
// other output (a conservative test on byte ranges: InvalidArgument naming both arguments).
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  int32_t rank = 0;
  int64_t shape[4] = {1, 1, 1, 1};
  int64_t strides[4] = {0, 0, 0, 0};

  // Product of the shape; INT64_MAX when it overflows (every op rejects such a view).
  int64_t numel() const;
  // True when strides are the row-major (C order) strides of `shape`.
  bool is_contiguous() const;
};

// A contiguous row-major view of `rank` dimensions (1..4).
TensorView MakeContiguousView(void* data, DType dtype, int32_t rank, const int64_t* shape);
// Shorthand for a contiguous rank-4 view [d0, d1, d2, d3].
TensorView MakeView4(void* data, DType dtype, int64_t d0, int64_t d1, int64_t d2, int64_t d3);
// Shorthand for a contiguous rank-3 view [d0, d1, d2].
TensorView MakeView3(void* data, DType dtype, int64_t d0, int64_t d1, int64_t d2);
// Shorthand for a contiguous rank-1 view [d0].
TensorView MakeView1(void* data, DType dtype, int64_t d0);

// Conversions between float and the 16-bit types (round to nearest even; NaN stays NaN).
uint16_t FloatToBF16(float x);
float BF16ToFloat(uint16_t x);
uint16_t FloatToF16(float x);
float F16ToFloat(uint16_t x);

}  // namespace tessera
