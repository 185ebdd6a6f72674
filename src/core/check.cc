#include "core/check.h"

#include <sstream>

namespace tessera {

std::string ShapeString(const TensorView& t) {
  std::ostringstream os;
  os << "[";
  for (int i = 0; i < t.rank; ++i) os << (i ? ", " : "") << t.shape[i];
  os << "]";
  return os.str();
}

std::string Expected(const char* name, const std::string& what, const std::string& got) {
  return std::string(name) + ": expected " + what + ", got " + got;
}

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
    if (writable && t.shape[i] > 1 && t.strides[i] == 0 && t.numel() > 0) {
      return Status::InvalidArgument(std::string(name) +
                                     ": expected a non-zero stride for an output dim of extent > "
                                     "1 (outputs may not alias), got stride 0 in dim " +
                                     std::to_string(i));
    }
  }
  if (t.data == nullptr && t.numel() > 0) {
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

}  // namespace tessera
