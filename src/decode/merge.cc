// SPDX-License-Identifier: Apache-2.0
// MergeStates: combines attention states (O_r, LSE_r) over disjoint key sets (merge.h).
//
// Per (token, head) row: the max M of the part LSEs, then lse = M + ln sum_r exp(LSE_r - M) and
// O = sum_r exp(LSE_r - lse) O_r, parts in ascending r. Empty parts (LSE = -inf) are skipped, so
// their O is never read; a row whose parts are all empty gets (0, -inf). The op reads R*D and
// writes D elements per row: it is memory-bound, so a plain loop over D does, and rows are spread
// over the threads (each row is merged by one worker, so results do not depend on threads).
#include "tessera/merge.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/element.h"
#include "core/guard.h"
#include "core/parallel.h"
#include "decode/merge_row.h"

namespace tessera {
namespace {

Status Validate(const MergeStatesParams& p) {
  const TensorView& parts = p.out_parts;
  if (parts.rank != 4) {
    return Status::InvalidArgument(
        Expected("out_parts", "rank 4 [R, T, H, D]", "rank " + std::to_string(parts.rank)));
  }
  Status s = CheckRankAndStrides("out_parts", parts, false);
  if (!s.ok()) return s;
  if (!IsSupportedDType(parts.dtype)) {
    return Status::InvalidArgument(
        Expected("out_parts", "dtype f32, bf16 or f16", DTypeName(parts.dtype)));
  }
  const int64_t R = parts.shape[0], T = parts.shape[1], H = parts.shape[2], D = parts.shape[3];
  const int64_t lse_parts_shape[3] = {R, T, H};
  s = CheckShape("lse_parts", p.lse_parts, 3, lse_parts_shape,
                 "shape " +
                     ShapeString(MakeContiguousView(nullptr, DType::kF32, 3, lse_parts_shape)) +
                     " ([R, T, H] of out_parts)",
                 false);
  if (!s.ok()) return s;
  if (p.lse_parts.dtype != DType::kF32) {
    return Status::InvalidArgument(
        Expected("lse_parts", "dtype f32", DTypeName(p.lse_parts.dtype)));
  }
  const int64_t out_shape[3] = {T, H, D};
  s = CheckShape("out", p.out, 3, out_shape,
                 "shape " + ShapeString(MakeContiguousView(nullptr, DType::kF32, 3, out_shape)) +
                     " ([T, H, D] of out_parts)",
                 true);
  if (!s.ok()) return s;
  if (p.out.dtype != parts.dtype) {
    return Status::InvalidArgument(Expected(
        "out", std::string("dtype ") + DTypeName(parts.dtype) + " (the dtype of out_parts)",
        IsSupportedDType(p.out.dtype) ? DTypeName(p.out.dtype) : "an unknown dtype"));
  }
  if (p.lse.data != nullptr) {
    const int64_t lse_shape[2] = {T, H};
    s = CheckShape("lse", p.lse, 2, lse_shape,
                   "shape " + ShapeString(MakeContiguousView(nullptr, DType::kF32, 2, lse_shape)) +
                       " ([T, H] of out_parts)",
                   true);
    if (!s.ok()) return s;
    if (p.lse.dtype != DType::kF32) {
      return Status::InvalidArgument(Expected("lse", "dtype f32", DTypeName(p.lse.dtype)));
    }
  }
  s = CheckDisjoint({ViewRegion("out", p.out), ViewRegion("lse", p.lse)},
                    {ViewRegion("out_parts", parts), ViewRegion("lse_parts", p.lse_parts)});
  if (!s.ok()) return s;
  // A part's LSE is finite or -inf (empty). +inf or NaN would make the whole row NaN: rejected
  // here, at the cost of one read of R * T * H floats (small next to the R * T * H * D merge).
  const float* lse_parts = static_cast<const float*>(p.lse_parts.data);
  const int64_t* ls = p.lse_parts.strides;
  for (int64_t r = 0; r < (p.lse_parts.numel() > 0 ? R : 0); ++r) {
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        const float x = lse_parts[r * ls[0] + t * ls[1] + h * ls[2]];
        if (std::isnan(x) || x == std::numeric_limits<float>::infinity()) {
          return Status::InvalidArgument(
              Expected("lse_parts", "finite values or -inf (an empty part)",
                       std::string(std::isnan(x) ? "nan" : "inf") + " at [" + std::to_string(r) +
                           ", " + std::to_string(t) + ", " + std::to_string(h) + "]"));
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace

Status MergeStates(const MergeStatesParams& p, const Context& ctx) try {
  Status status = Validate(p);
  if (!status.ok()) return status;
  // No work: no row to write.
  if (p.out.numel() == 0 && (p.lse.data == nullptr || p.lse.numel() == 0)) return Status::Ok();
  const TensorView& parts = p.out_parts;
  const int64_t R = parts.shape[0], T = parts.shape[1], H = parts.shape[2], D = parts.shape[3];
  const float* lse_parts = static_cast<const float*>(p.lse_parts.data);
  const int64_t* ls = p.lse_parts.strides;
  const int64_t* ps = parts.strides;
  const int64_t* os = p.out.strides;
  // Everything stays in the LSE's own base, so merging with an empty part returns the other
  // part's LSE exactly.
  const int64_t rows = T * H;
  const int64_t chunk = 64;
  ParallelFor(ResolveThreads(ctx), (rows + chunk - 1) / chunk, [&](int64_t task, int32_t) {
    std::vector<float> acc(static_cast<size_t>(D)), part_row(static_cast<size_t>(D));
    std::vector<float> part_lse(static_cast<size_t>(R));
    for (int64_t row = task * chunk; row < std::min(rows, (task + 1) * chunk); ++row) {
      const int64_t t = row / H, h = row % H;
      for (int64_t r = 0; r < R; ++r) {
        part_lse[static_cast<size_t>(r)] = lse_parts[r * ls[0] + t * ls[1] + h * ls[2]];
      }
      const float lse = MergeStateRow(
          R, part_lse.data(), static_cast<size_t>(D),
          [&](int64_t r, float* buf) {
            for (int64_t d = 0; d < D; ++d) {
              buf[d] = LoadElement(parts.dtype, parts.data,
                                   r * ps[0] + t * ps[1] + h * ps[2] + d * ps[3]);
            }
            return static_cast<const float*>(buf);
          },
          part_row.data(), acc.data(), p.base2);
      const int64_t out_base = t * os[0] + h * os[1];
      for (int64_t d = 0; d < D; ++d) {
        StoreElement(p.out.dtype, p.out.data, out_base + d * os[2], acc[size_t(d)]);
      }
      if (p.lse.data != nullptr) {
        static_cast<float*>(p.lse.data)[t * p.lse.strides[0] + h * p.lse.strides[1]] = lse;
      }
    }
  });
  return Status::Ok();
}
TESSERA_CATCH_ALL("MergeStates")

}  // namespace tessera
