// SPDX-License-Identifier: Apache-2.0
// The diagonal SSM (tessera/longconv.h): its kernel in fp64 and its recurrence, both vectorized
// across channels (one SIMD lane per channel, the modes looped), one copy per Highway target.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "longconv/ssm.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <algorithm>
#include <cstdint>

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Channels per group of the scan: one f32 vector.
int64_t ScanLanes() { return static_cast<int64_t>(hn::Lanes(hn::ScalableTag<float>())); }
// Channels per group of the kernel: one f64 vector.
int64_t KernelLanes() { return static_cast<int64_t>(hn::Lanes(hn::ScalableTag<double>())); }

// The recurrence over `steps` tokens for one group of ScanLanes() channels. coef: per mode m,
// six vectors [a_re, a_im, b_re, b_im, w_re, w_im] at coef + (6 m + k) lanes; state: per mode
// [x_re, x_im] at state + 2 m lanes (read and updated); u, y: [steps][lanes]; skip: [lanes].
// Modes go in pairs (two independent dependency chains per token), their contributions added to
// y in ascending mode order.
void ScanGroup(const float* coef, int64_t modes, float* state, const float* u, float* y,
               const float* skip, int64_t steps) {
  const hn::ScalableTag<float> d;
  const size_t N = hn::Lanes(d);
  const auto sk = hn::LoadU(d, skip);
  for (int64_t t = 0; t < steps; ++t) {
    hn::StoreU(hn::Mul(sk, hn::LoadU(d, u + t * N)), d, y + t * N);
  }
  int64_t m = 0;
  for (; m + 1 < modes; m += 2) {
    const float* c0 = coef + 6 * m * N;
    const float* c1 = c0 + 6 * N;
    const auto ar0 = hn::LoadU(d, c0), ai0 = hn::LoadU(d, c0 + N), br0 = hn::LoadU(d, c0 + 2 * N),
               bi0 = hn::LoadU(d, c0 + 3 * N), wr0 = hn::LoadU(d, c0 + 4 * N),
               wi0 = hn::LoadU(d, c0 + 5 * N);
    const auto ar1 = hn::LoadU(d, c1), ai1 = hn::LoadU(d, c1 + N), br1 = hn::LoadU(d, c1 + 2 * N),
               bi1 = hn::LoadU(d, c1 + 3 * N), wr1 = hn::LoadU(d, c1 + 4 * N),
               wi1 = hn::LoadU(d, c1 + 5 * N);
    float* s0 = state + 2 * m * N;
    float* s1 = s0 + 2 * N;
    auto xr0 = hn::LoadU(d, s0), xi0 = hn::LoadU(d, s0 + N);
    auto xr1 = hn::LoadU(d, s1), xi1 = hn::LoadU(d, s1 + N);
    for (int64_t t = 0; t < steps; ++t) {
      const auto ut = hn::LoadU(d, u + t * N);
      // x = a x + b u (complex a, b, x; real u).
      const auto nr0 = hn::MulAdd(ar0, xr0, hn::NegMulAdd(ai0, xi0, hn::Mul(br0, ut)));
      const auto ni0 = hn::MulAdd(ar0, xi0, hn::MulAdd(ai0, xr0, hn::Mul(bi0, ut)));
      const auto nr1 = hn::MulAdd(ar1, xr1, hn::NegMulAdd(ai1, xi1, hn::Mul(br1, ut)));
      const auto ni1 = hn::MulAdd(ar1, xi1, hn::MulAdd(ai1, xr1, hn::Mul(bi1, ut)));
      xr0 = nr0, xi0 = ni0, xr1 = nr1, xi1 = ni1;
      // y += Re(w x), mode m then m + 1.
      const auto e0 = hn::NegMulAdd(wi0, xi0, hn::Mul(wr0, xr0));
      const auto e1 = hn::NegMulAdd(wi1, xi1, hn::Mul(wr1, xr1));
      hn::StoreU(hn::Add(hn::Add(hn::LoadU(d, y + t * N), e0), e1), d, y + t * N);
    }
    hn::StoreU(xr0, d, s0), hn::StoreU(xi0, d, s0 + N);
    hn::StoreU(xr1, d, s1), hn::StoreU(xi1, d, s1 + N);
  }
  if (m < modes) {
    const float* c0 = coef + 6 * m * N;
    const auto ar = hn::LoadU(d, c0), ai = hn::LoadU(d, c0 + N), br = hn::LoadU(d, c0 + 2 * N),
               bi = hn::LoadU(d, c0 + 3 * N), wr = hn::LoadU(d, c0 + 4 * N),
               wi = hn::LoadU(d, c0 + 5 * N);
    float* s0 = state + 2 * m * N;
    auto xr = hn::LoadU(d, s0), xi = hn::LoadU(d, s0 + N);
    for (int64_t t = 0; t < steps; ++t) {
      const auto ut = hn::LoadU(d, u + t * N);
      const auto nr = hn::MulAdd(ar, xr, hn::NegMulAdd(ai, xi, hn::Mul(br, ut)));
      const auto ni = hn::MulAdd(ar, xi, hn::MulAdd(ai, xr, hn::Mul(bi, ut)));
      xr = nr, xi = ni;
      const auto e = hn::NegMulAdd(wi, xi, hn::Mul(wr, xr));
      hn::StoreU(hn::Add(hn::LoadU(d, y + t * N), e), d, y + t * N);
    }
    hn::StoreU(xr, d, s0), hn::StoreU(xi, d, s0 + N);
  }
}

// h[s] = Re(sum_m z_m a_m^s) for s in [0, taps), one group of KernelLanes() channels in fp64:
// z (per mode [re, im] vectors at z + 2 m lanes, starting at w b) is advanced in place; a per mode
// [re, im] at a + 2 m lanes; h: [taps][lanes], summed over modes in ascending order.
void KernelGroup(const double* a, double* z, int64_t modes, double* h, int64_t taps) {
  const hn::ScalableTag<double> d;
  const size_t N = hn::Lanes(d);
  for (int64_t s = 0; s < taps; ++s) {
    auto sum = hn::Zero(d);
    for (int64_t m = 0; m < modes; ++m) {
      const auto ar = hn::LoadU(d, a + 2 * m * N), ai = hn::LoadU(d, a + (2 * m + 1) * N);
      const auto zr = hn::LoadU(d, z + 2 * m * N), zi = hn::LoadU(d, z + (2 * m + 1) * N);
      sum = hn::Add(sum, zr);
      hn::StoreU(hn::NegMulAdd(zi, ai, hn::Mul(zr, ar)), d, z + 2 * m * N);
      hn::StoreU(hn::MulAdd(zr, ai, hn::Mul(zi, ar)), d, z + (2 * m + 1) * N);
    }
    hn::StoreU(sum, d, h + s * N);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <cmath>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/guard.h"
#include "core/parallel.h"
#include "longconv/longconv_internal.h"
#include "tessera/longconv.h"

namespace tessera {

HWY_EXPORT(ScanLanes);
HWY_EXPORT(KernelLanes);
HWY_EXPORT(ScanGroup);
HWY_EXPORT(KernelGroup);

namespace {

using namespace longconv_detail;  // NOLINT(google-build-using-namespace): the engine's pieces

// Tokens per pass of the scan over a channel group (u and y of the pass stay in L1).
constexpr int64_t kScanSteps = 256;
// Mode-token updates (about 10 flops each) below which a second worker costs more than it saves:
// a decode step of a few channels runs on the calling thread.
constexpr int64_t kUpdatesPerWorker = int64_t{1} << 18;
// |a| may exceed 1 by this much (rounding of a discretized stable model).
constexpr double kStabilitySlack = 1e-6;

float Elem(const TensorView& t, int64_t i0, int64_t i1 = 0, int64_t i2 = 0) {
  return static_cast<const float*>(
      t.data)[i0 * t.strides[0] + i1 * t.strides[1] + (t.rank > 2 ? i2 * t.strides[2] : 0)];
}

// a, b, w [C, n, 2] f32 with finite values and |a| <= 1; skip [C]. C < 0: any (taken from a).
Status ValidateSsm(const DiagonalSsmParams& p, int64_t C, int64_t* modes) {
  const int64_t shape[3] = {C, -1, 2};
  const std::string what = C < 0 ? "shape [C, n, 2]" : "shape [" + std::to_string(C) + ", n, 2]";
  Status s = CheckF32View("a", p.a, 3, shape, what, false);
  if (!s.ok()) return s;
  const int64_t channels = p.a.shape[0], n = p.a.shape[1];
  if (n < 1) return Status::InvalidArgument(Expected("a", "n >= 1 modes", ShapeString(p.a)));
  const int64_t like_a[3] = {channels, n, 2};
  const std::string shape_a = "shape " + Dims({channels, n, 2}) + " (the shape of a)";
  s = CheckF32View("b", p.b, 3, like_a, shape_a, false);
  if (!s.ok()) return s;
  s = CheckF32View("w", p.w, 3, like_a, shape_a, false);
  if (!s.ok()) return s;
  if (p.skip.data != nullptr) {
    const int64_t skip_shape[1] = {channels};
    s = CheckF32View("skip", p.skip, 1, skip_shape, "shape " + Dims({channels}), false);
    if (!s.ok()) return s;
  }
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t m = 0; m < n; ++m) {
      const double ar = Elem(p.a, c, m, 0), ai = Elem(p.a, c, m, 1);
      const float others[4] = {Elem(p.b, c, m, 0), Elem(p.b, c, m, 1), Elem(p.w, c, m, 0),
                               Elem(p.w, c, m, 1)};
      const char* names[4] = {"b", "b", "w", "w"};
      for (int k = 0; k < 4; ++k) {
        if (!std::isfinite(others[k])) {
          return Status::InvalidArgument(Expected(names[k], "finite values",
                                                  std::to_string(others[k]) + " at channel " +
                                                      std::to_string(c) + ", mode " +
                                                      std::to_string(m)));
        }
      }
      if (!(ar * ar + ai * ai <= (1.0 + kStabilitySlack) * (1.0 + kStabilitySlack))) {
        return Status::InvalidArgument(
            Expected("a", "finite values with |a| <= 1 (a stable model)",
                     "(" + std::to_string(ar) + ", " + std::to_string(ai) + ") at channel " +
                         std::to_string(c) + ", mode " + std::to_string(m)));
      }
    }
  }
  if (p.skip.data != nullptr) {
    for (int64_t c = 0; c < channels; ++c) {
      const float v = Elem(p.skip, c);
      if (!std::isfinite(v)) {
        return Status::InvalidArgument(Expected(
            "skip", "finite values", std::to_string(v) + " at channel " + std::to_string(c)));
      }
    }
  }
  *modes = n;
  return Status::Ok();
}

std::vector<Region> SsmRegions(const DiagonalSsmParams& p) {
  return {ViewRegion("a", p.a), ViewRegion("b", p.b), ViewRegion("w", p.w),
          ViewRegion("skip", p.skip)};
}

}  // namespace

Status DiagonalSsmKernel(const DiagonalSsmParams& ssm, const TensorView& filter,
                         const Context& ctx) try {
  int64_t n = 0;
  Status s = ValidateSsm(ssm, -1, &n);
  if (!s.ok()) return s;
  const int64_t C = ssm.a.shape[0];
  const int64_t fshape[2] = {-1, C};
  s = CheckF32View("filter", filter, 2, fshape, "shape [L, " + std::to_string(C) + "]", true);
  if (!s.ok()) return s;
  const int64_t L = filter.shape[0];
  if (L < 1) return Status::InvalidArgument(Expected("filter", "L >= 1 taps", ShapeString(filter)));
  s = ValidateThreads(ctx);
  if (!s.ok()) return s;
  s = CheckDisjoint({ViewRegion("filter", filter)}, SsmRegions(ssm));
  if (!s.ok()) return s;
  if (C == 0) return Status::Ok();
  const int64_t lanes = HWY_DYNAMIC_DISPATCH(KernelLanes)();
  const int64_t groups = (C + lanes - 1) / lanes;
  // Taps per pass: h of a pass ([taps][lanes] doubles) stays in L2.
  const int64_t pass = std::min<int64_t>(L, 4096);
  float* out = static_cast<float*>(filter.data);
  ParallelFor(ResolveThreads(ctx), groups, [&](int64_t g, int32_t) {
    const int64_t c0 = g * lanes, width = std::min(lanes, C - c0);
    // Padding lanes: a = 0, z = 0.
    std::vector<double> a(static_cast<size_t>(2 * n * lanes), 0.0), z(a.size(), 0.0);
    std::vector<double> h(static_cast<size_t>(pass * lanes));
    for (int64_t m = 0; m < n; ++m) {
      for (int64_t j = 0; j < width; ++j) {
        const int64_t c = c0 + j;
        const double br = Elem(ssm.b, c, m, 0), bi = Elem(ssm.b, c, m, 1);
        const double wr = Elem(ssm.w, c, m, 0), wi = Elem(ssm.w, c, m, 1);
        a[(2 * m) * lanes + j] = Elem(ssm.a, c, m, 0);
        a[(2 * m + 1) * lanes + j] = Elem(ssm.a, c, m, 1);
        z[(2 * m) * lanes + j] = wr * br - wi * bi;
        z[(2 * m + 1) * lanes + j] = wr * bi + wi * br;
      }
    }
    for (int64_t s0 = 0; s0 < L; s0 += pass) {
      const int64_t taps = std::min(pass, L - s0);
      HWY_DYNAMIC_DISPATCH(KernelGroup)(a.data(), z.data(), n, h.data(), taps);
      for (int64_t t = 0; t < taps; ++t) {
        for (int64_t j = 0; j < width; ++j) {
          out[(s0 + t) * filter.strides[0] + (c0 + j) * filter.strides[1]] =
              static_cast<float>(h[t * lanes + j]);
        }
      }
    }
  });
  return Status::Ok();
}
TESSERA_CATCH_ALL("DiagonalSsmKernel")

Status DiagonalSsmScan(const DiagonalSsmScanParams& p, const Context& ctx) try {
  const int64_t any3[3] = {-1, -1, -1};
  Status s = CheckF32View("u", p.u, 3, any3, "rank 3 [B, T, C]", false);
  if (!s.ok()) return s;
  const int64_t B = p.u.shape[0], T = p.u.shape[1], C = p.u.shape[2];
  if (T < 1) return Status::InvalidArgument(Expected("u", "T >= 1 tokens", ShapeString(p.u)));
  int64_t n = 0;
  s = ValidateSsm(p.ssm, C, &n);
  if (!s.ok()) return s;
  const int64_t yshape[3] = {B, T, C};
  s = CheckF32View("y", p.y, 3, yshape, "shape " + Dims({B, T, C}) + " (the shape of u)", true);
  if (!s.ok()) return s;
  const bool has_state = p.state.data != nullptr;
  if (has_state) {
    const int64_t sshape[4] = {B, C, n, 2};
    s = CheckF32View("state", p.state, 4, sshape, "shape " + Dims({B, C, n, 2}), true);
    if (!s.ok()) return s;
  }
  s = ValidateThreads(ctx);
  if (!s.ok()) return s;
  std::vector<Region> inputs = SsmRegions(p.ssm);
  inputs.push_back(ViewRegion("u", p.u));
  s = CheckDisjoint({ViewRegion("y", p.y), ViewRegion("state", p.state)}, inputs);
  if (!s.ok()) return s;
  if (B == 0 || C == 0) return Status::Ok();

  const int64_t lanes = HWY_DYNAMIC_DISPATCH(ScanLanes)();
  const int64_t groups = (C + lanes - 1) / lanes;
  // The coefficients packed per group: [group][mode][6][lanes] (padding lanes zero), and skip.
  std::vector<float> coef(static_cast<size_t>(groups * n * 6 * lanes), 0.0f);
  std::vector<float> skip(static_cast<size_t>(groups * lanes), 0.0f);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t g = c / lanes, j = c % lanes;
    for (int64_t m = 0; m < n; ++m) {
      float* dst = coef.data() + ((g * n + m) * 6) * lanes + j;
      const TensorView* views[3] = {&p.ssm.a, &p.ssm.b, &p.ssm.w};
      for (int k = 0; k < 3; ++k) {
        dst[(2 * k) * lanes] = Elem(*views[k], c, m, 0);
        dst[(2 * k + 1) * lanes] = Elem(*views[k], c, m, 1);
      }
    }
    if (p.ssm.skip.data != nullptr) skip[static_cast<size_t>(c)] = Elem(p.ssm.skip, c);
  }
  const float* up = static_cast<const float*>(p.u.data);
  float* yp = static_cast<float*>(p.y.data);
  float* sp = static_cast<float*>(p.state.data);
  const double updates = static_cast<double>(B) * static_cast<double>(T) * static_cast<double>(C) *
                         static_cast<double>(n);
  const int32_t threads = static_cast<int32_t>(std::clamp<double>(
      std::floor(updates / kUpdatesPerWorker), 1.0, static_cast<double>(ResolveThreads(ctx))));
  struct Scratch {
    std::vector<float> state, u, y;
  };
  std::vector<Scratch> scratch(static_cast<size_t>(threads));
  ParallelFor(threads, B * groups, [&](int64_t task, int32_t worker) {
    Scratch& sc = scratch[static_cast<size_t>(worker)];
    if (sc.u.empty()) {
      sc.state.resize(static_cast<size_t>(2 * n * lanes));
      sc.u.resize(static_cast<size_t>(kScanSteps * lanes));
      sc.y.resize(static_cast<size_t>(kScanSteps * lanes));
    }
    const int64_t b = task / groups, g = task % groups;
    const int64_t c0 = g * lanes, width = std::min(lanes, C - c0);
    std::fill(sc.state.begin(), sc.state.end(), 0.0f);
    std::fill(sc.u.begin(), sc.u.end(), 0.0f);  // padding lanes stay zero
    const auto state_at = [&](int64_t c, int64_t m, int64_t k) -> float& {
      return sp[b * p.state.strides[0] + c * p.state.strides[1] + m * p.state.strides[2] +
                k * p.state.strides[3]];
    };
    if (has_state) {
      for (int64_t m = 0; m < n; ++m) {
        for (int64_t j = 0; j < width; ++j) {
          sc.state[(2 * m) * lanes + j] = state_at(c0 + j, m, 0);
          sc.state[(2 * m + 1) * lanes + j] = state_at(c0 + j, m, 1);
        }
      }
    }
    const float* group_coef = coef.data() + g * n * 6 * lanes;
    for (int64_t t0 = 0; t0 < T; t0 += kScanSteps) {
      const int64_t steps = std::min(kScanSteps, T - t0);
      for (int64_t t = 0; t < steps; ++t) {
        const float* row = up + b * p.u.strides[0] + (t0 + t) * p.u.strides[1];
        for (int64_t j = 0; j < width; ++j) sc.u[t * lanes + j] = row[(c0 + j) * p.u.strides[2]];
      }
      HWY_DYNAMIC_DISPATCH(ScanGroup)
      (group_coef, n, sc.state.data(), sc.u.data(), sc.y.data(), skip.data() + g * lanes, steps);
      for (int64_t t = 0; t < steps; ++t) {
        float* row = yp + b * p.y.strides[0] + (t0 + t) * p.y.strides[1];
        for (int64_t j = 0; j < width; ++j) row[(c0 + j) * p.y.strides[2]] = sc.y[t * lanes + j];
      }
    }
    if (has_state) {
      for (int64_t m = 0; m < n; ++m) {
        for (int64_t j = 0; j < width; ++j) {
          state_at(c0 + j, m, 0) = sc.state[(2 * m) * lanes + j];
          state_at(c0 + j, m, 1) = sc.state[(2 * m + 1) * lanes + j];
        }
      }
    }
  });
  return Status::Ok();
}
TESSERA_CATCH_ALL("DiagonalSsmScan")

}  // namespace tessera
#endif  // HWY_ONCE
