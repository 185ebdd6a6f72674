// SPDX-License-Identifier: Apache-2.0
#include "core/check.h"

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <utility>
#include <vector>

#include "core/checked_math.h"
#include "core/element.h"

namespace tessera {

std::string ShapeString(const TensorView& t) {
  std::ostringstream os;
  os << "[";
  // A view holds 4 dims: a larger rank (rejected, but worded first) shows those and "...".
  for (int i = 0; i < std::min(t.rank, 4); ++i) os << (i ? ", " : "") << t.shape[i];
  if (t.rank > 4) os << ", ...";
  os << "]";
  return os.str();
}

std::string Expected(const char* name, const std::string& what, const std::string& got) {
  return std::string(name) + ": expected " + what + ", got " + got;
}

namespace {

std::string StridesString(const TensorView& t) {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < t.rank; ++i) os << (i ? ", " : "") << t.strides[i];
  os << "]";
  return os.str();
}

int64_t ElementBytes(DType dtype) { return std::max<int64_t>(1, int64_t(DTypeSize(dtype))); }

// Offset in elements of the view's last element; false when it does not fit in int64.
bool LastOffset(const TensorView& t, int64_t* last) {
  int64_t off = 0;
  for (int i = 0; i < t.rank; ++i) {
    int64_t step;
    if (!CheckedMul(t.shape[i] - 1, t.strides[i], &step) || !CheckedAdd(off, step, &off)) {
      return false;
    }
  }
  *last = off;
  return true;
}

// Dims of extent > 1 sorted by stride: each stride must exceed the span (in elements) that the
// dims with smaller strides cover, or two elements could share an address.
bool MayOverlapItself(const TensorView& t) {
  std::vector<int> dims;
  for (int i = 0; i < t.rank; ++i) {
    if (t.shape[i] > 1) dims.push_back(i);
  }
  std::sort(dims.begin(), dims.end(), [&](int a, int b) { return t.strides[a] < t.strides[b]; });
  int64_t span = 0;  // offset of the last element of the dims so far (fits: LastOffset passed)
  for (int d : dims) {
    if (t.strides[d] <= span) return true;
    span += (t.shape[d] - 1) * t.strides[d];
  }
  return false;
}

}  // namespace

Status CheckRankAndStrides(const char* name, const TensorView& t, bool writable) {
  if (t.rank < 1 || t.rank > 4) {
    return Status::InvalidArgument(Expected(name, "rank 1..4", std::to_string(t.rank)));
  }
  for (int i = 0; i < t.rank; ++i) {
    if (t.shape[i] < 0) {
      return Status::InvalidArgument(Expected(name, "non-negative shape", ShapeString(t)));
    }
    if (t.strides[i] < 0) {
      return Status::InvalidArgument(std::string(name) + ": expected non-negative strides, got " +
                                     std::to_string(t.strides[i]) + " in dim " + std::to_string(i));
    }
  }
  for (int i = 0; i < t.rank; ++i) {
    if (t.shape[i] == 0) return Status::Ok();  // nothing is read or written through it
  }
  int64_t count = 1;
  for (int i = 0; i < t.rank; ++i) {
    if (!CheckedMul(count, t.shape[i], &count)) {
      return Status::InvalidArgument(
          Expected(name, "a shape whose element count fits in int64", ShapeString(t)));
    }
  }
  int64_t last = 0, bytes = 0;
  if (!LastOffset(t, &last) || !CheckedAdd(last, 1, &bytes) ||
      !CheckedMul(bytes, ElementBytes(t.dtype), &bytes)) {
    return Status::InvalidArgument(
        Expected(name, "shape and strides whose byte extent fits in int64",
                 "shape " + ShapeString(t) + " with strides " + StridesString(t)));
  }
  if (writable) {
    for (int i = 0; i < t.rank; ++i) {
      if (t.shape[i] > 1 && t.strides[i] == 0) {
        return Status::InvalidArgument(std::string(name) +
                                       ": expected a non-zero stride for an output dim of extent > "
                                       "1 (outputs may not alias), got stride 0 in dim " +
                                       std::to_string(i));
      }
    }
    if (MayOverlapItself(t)) {
      return Status::InvalidArgument(Expected(
          name,
          "strides that give every element its own address (an output may not alias itself; "
          "sorted by stride, each stride must exceed the span of the smaller ones)",
          "shape " + ShapeString(t) + " with strides " + StridesString(t)));
    }
  }
  if (t.data == nullptr) {
    return Status::InvalidArgument(Expected(name, "a non-null data pointer", "nullptr"));
  }
  return Status::Ok();
}

bool IsSupportedDType(DType d) { return d == DType::kF32 || d == DType::kBF16 || d == DType::kF16; }

Status CheckShape(const char* name, const TensorView& t, int32_t rank, const int64_t* shape,
                  const std::string& what, bool writable) {
  bool ok = t.rank == rank;
  for (int i = 0; ok && i < rank; ++i) ok = shape[i] < 0 || t.shape[i] == shape[i];
  if (!ok) return Status::InvalidArgument(Expected(name, what, ShapeString(t)));
  return CheckRankAndStrides(name, t, writable);
}

Region ViewRegion(std::string name, const TensorView& t) {
  Region r;
  r.name = std::move(name);
  r.data = t.data;
  int64_t last = 0;
  if (t.data == nullptr || t.numel() == 0 || !LastOffset(t, &last)) return r;
  r.bytes = SaturatingMul(last + 1, ElementBytes(t.dtype));
  return r;
}

Region ArrayRegion(std::string name, const void* data, int64_t count, int64_t elem_bytes) {
  Region r;
  r.name = std::move(name);
  r.data = data;
  r.bytes = data == nullptr || count <= 0 ? 0 : SaturatingMul(count, elem_bytes);
  return r;
}

namespace {

bool Overlap(const Region& a, const Region& b) {
  if (a.bytes <= 0 || b.bytes <= 0) return false;
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(a.data);
  const uintptr_t b0 = reinterpret_cast<uintptr_t>(b.data);
  // Saturate the ends: a region never wraps past the top of the address space.
  const uintptr_t a1 = a0 + std::min<uintptr_t>(uintptr_t(a.bytes), UINTPTR_MAX - a0);
  const uintptr_t b1 = b0 + std::min<uintptr_t>(uintptr_t(b.bytes), UINTPTR_MAX - b0);
  return a0 < b1 && b0 < a1;
}

Status OverlapError(const Region& out, const Region& other, const char* kind) {
  return Status::InvalidArgument(
      Expected(out.name.c_str(),
               "memory disjoint from " + other.name + " (outputs may not alias " + kind + ")",
               std::string("overlapping byte ranges (") + std::to_string(out.bytes) + " bytes at " +
                   std::to_string(reinterpret_cast<uintptr_t>(out.data)) + ", " +
                   std::to_string(other.bytes) + " bytes at " +
                   std::to_string(reinterpret_cast<uintptr_t>(other.data)) + ")"));
}

}  // namespace

Status CheckDisjoint(const std::vector<Region>& outputs, const std::vector<Region>& inputs) {
  for (auto o = outputs.begin(); o != outputs.end(); ++o) {
    for (const Region& in : inputs) {
      if (Overlap(*o, in)) return OverlapError(*o, in, "an input");
    }
    for (auto p = outputs.begin(); p != o; ++p) {
      if (Overlap(*o, *p)) return OverlapError(*o, *p, "another output");
    }
  }
  return Status::Ok();
}

void FillView(const TensorView& t, float value) {
  if (t.numel() == 0) return;
  int64_t idx[4] = {0, 0, 0, 0};
  const int64_t n = t.numel();
  for (int64_t e = 0; e < n; ++e) {
    int64_t off = 0;
    for (int i = 0; i < t.rank; ++i) off += idx[i] * t.strides[i];
    StoreElement(t.dtype, t.data, off, value);
    for (int i = t.rank - 1; i >= 0; --i) {
      if (++idx[i] < t.shape[i]) break;
      idx[i] = 0;
    }
  }
}

}  // namespace tessera
