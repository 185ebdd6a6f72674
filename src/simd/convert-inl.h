// SPDX-License-Identifier: Apache-2.0
// Loading and storing rows of f32 / bf16 / f16 tensors as f32, with any element stride.
// Contiguous rows take a SIMD path; strided rows a scalar one.

#if defined(TESSERA_SIMD_CONVERT_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TESSERA_SIMD_CONVERT_INL_H_
#undef TESSERA_SIMD_CONVERT_INL_H_
#else
#define TESSERA_SIMD_CONVERT_INL_H_
#endif

#include <hwy/highway.h>

#include <cstdint>
#include <cstring>

#include "core/element.h"
#include "tessera/types.h"

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// dst[0..n) = row elements base[off + d*stride] as f32 (dst contiguous).
HWY_INLINE void LoadRow(DType dtype, const void* base, int64_t off, int64_t stride, size_t n,
                        float* HWY_RESTRICT dst) {
  if (stride == 1) {
    if (dtype == DType::kF32) {
      std::memcpy(dst, static_cast<const float*>(base) + off, n * sizeof(float));
      return;
    }
    const hn::ScalableTag<float> df;
    const size_t lanes = hn::Lanes(df);
    const size_t vector_end = n - n % lanes;
    if (dtype == DType::kF16) {
      const hn::Rebind<hwy::float16_t, decltype(df)> dh;
      const auto* src = static_cast<const hwy::float16_t*>(base) + off;
      for (size_t d = 0; d < vector_end; d += lanes) {
        hn::StoreU(hn::PromoteTo(df, hn::LoadU(dh, src + d)), df, dst + d);
      }
    } else {
      const hn::Rebind<hwy::bfloat16_t, decltype(df)> db;
      const auto* src = static_cast<const hwy::bfloat16_t*>(base) + off;
      for (size_t d = 0; d < vector_end; d += lanes) {
        hn::StoreU(hn::PromoteTo(df, hn::LoadU(db, src + d)), df, dst + d);
      }
    }
    for (size_t d = vector_end; d < n; ++d) {
      dst[d] = LoadElement(dtype, base, off + static_cast<int64_t>(d));
    }
    return;
  }
  for (size_t d = 0; d < n; ++d) {
    dst[d] = LoadElement(dtype, base, off + static_cast<int64_t>(d) * stride);
  }
}

// base[off + d*stride] = scale * src[d * src_stride] for d < n, rounded to `dtype`.
HWY_INLINE void StoreStridedScaled(DType dtype, const float* HWY_RESTRICT src, size_t src_stride,
                                   size_t n, float scale, void* base, int64_t off, int64_t stride) {
  for (size_t d = 0; d < n; ++d) {
    StoreElement(dtype, base, off + static_cast<int64_t>(d) * stride, scale * src[d * src_stride]);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#endif  // TESSERA_SIMD_CONVERT_INL_H_
