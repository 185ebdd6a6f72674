// What the machine offers: the SIMD target dynamic dispatch picks, the usable hardware threads,
// and a measured fp32 FMA peak (the roofline ceiling benchmarks report their fraction of).
//
// The peak probe runs `threads` std::threads at once (no OpenMP: the probe must not depend on
// the threading backend). Each runs a chain of 16 independent vector FMA accumulators, enough
// to cover the FMA latency x throughput product of current x86 and Arm cores (Zen 4: 4 cycles x
// 2 ymm pipes = 8; Skylake-X: 4 x 2 zmm = 8), with the widest vectors of the chosen target.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "core/cpu_info.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep

#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace tessera {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// The target this translation unit was compiled for; dispatched, it names the chosen target.
int64_t CompiledTarget() { return HWY_TARGET; }

// f32 lanes per vector of this target.
size_t FloatLanes() { return hn::Lanes(hn::ScalableTag<float>()); }

// Runs `iters` iterations of 16 independent FMAs (a = a * m + c) and stores a reduction to
// `sink` so the compiler cannot drop the loop. a converges to c / (1 - m): finite, no denormals.
HWY_NOINLINE void FmaChain(int64_t iters, float* HWY_RESTRICT sink) {
  const hn::ScalableTag<float> d;
  const auto m = hn::Set(d, 0.999f);
  const auto c = hn::Set(d, 0.001f);
  // Named variables rather than an array: keeps every accumulator in a register at -O2.
  auto a0 = hn::Set(d, 0.10f), a1 = hn::Set(d, 0.11f), a2 = hn::Set(d, 0.12f);
  auto a3 = hn::Set(d, 0.13f), a4 = hn::Set(d, 0.14f), a5 = hn::Set(d, 0.15f);
  auto a6 = hn::Set(d, 0.16f), a7 = hn::Set(d, 0.17f), a8 = hn::Set(d, 0.18f);
  auto a9 = hn::Set(d, 0.19f), a10 = hn::Set(d, 0.20f), a11 = hn::Set(d, 0.21f);
  auto a12 = hn::Set(d, 0.22f), a13 = hn::Set(d, 0.23f), a14 = hn::Set(d, 0.24f);
  auto a15 = hn::Set(d, 0.25f);
  for (int64_t i = 0; i < iters; ++i) {
    a0 = hn::MulAdd(a0, m, c);
    a1 = hn::MulAdd(a1, m, c);
    a2 = hn::MulAdd(a2, m, c);
    a3 = hn::MulAdd(a3, m, c);
    a4 = hn::MulAdd(a4, m, c);
    a5 = hn::MulAdd(a5, m, c);
    a6 = hn::MulAdd(a6, m, c);
    a7 = hn::MulAdd(a7, m, c);
    a8 = hn::MulAdd(a8, m, c);
    a9 = hn::MulAdd(a9, m, c);
    a10 = hn::MulAdd(a10, m, c);
    a11 = hn::MulAdd(a11, m, c);
    a12 = hn::MulAdd(a12, m, c);
    a13 = hn::MulAdd(a13, m, c);
    a14 = hn::MulAdd(a14, m, c);
    a15 = hn::MulAdd(a15, m, c);
  }
  auto s =
      hn::Add(hn::Add(hn::Add(a0, a1), hn::Add(a2, a3)), hn::Add(hn::Add(a4, a5), hn::Add(a6, a7)));
  s = hn::Add(s, hn::Add(hn::Add(hn::Add(a8, a9), hn::Add(a10, a11)),
                         hn::Add(hn::Add(a12, a13), hn::Add(a14, a15))));
  *sink = hn::GetLane(hn::SumOfLanes(d, s));
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#if HWY_ONCE

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include "tessera/system.h"

namespace tessera {
namespace {

HWY_EXPORT(CompiledTarget);
HWY_EXPORT(FloatLanes);
HWY_EXPORT(FmaChain);

constexpr int64_t kFmasPerIter = 16;
constexpr int kRepeats = 5;

using Clock = std::chrono::steady_clock;

// Runs FmaChain(iters) on `threads` threads released together; returns the wall time in seconds
// from the release to the last thread's finish.
double TimeChains(int32_t threads, int64_t iters) {
  std::atomic<int32_t> ready{0};
  std::atomic<bool> go{false};
  std::vector<float> sinks(static_cast<size_t>(threads) * 16);  // one cache line apart
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads));
  for (int32_t t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ready.fetch_add(1, std::memory_order_acq_rel);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      HWY_DYNAMIC_DISPATCH(FmaChain)(iters, &sinks[static_cast<size_t>(t) * 16]);
    });
  }
  while (ready.load(std::memory_order_acquire) < threads) std::this_thread::yield();
  const auto start = Clock::now();
  go.store(true, std::memory_order_release);
  for (auto& th : pool) th.join();
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  // Consume the sinks so the stores (and thus the loops) are observable.
  volatile float total = 0.0f;
  for (float s : sinks) total = total + s;
  (void)total;
  return elapsed;
}

}  // namespace

std::string SimdTargetName() { return hwy::TargetName(HWY_DYNAMIC_DISPATCH(CompiledTarget)()); }

int32_t HardwareThreads() {
  // The affinity mask, not the host's CPU count: containers and taskset restrict it.
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? static_cast<int32_t>(hw) : 1;
}

double MeasureFmaPeakGflops(int32_t threads, double seconds) {
  threads = std::max<int32_t>(threads, 1);
  seconds = std::max(seconds, 0.01);
  const double flops_per_iter =
      2.0 * kFmasPerIter * static_cast<double>(HWY_DYNAMIC_DISPATCH(FloatLanes)());

  // Calibrate the iteration count so each repeat lasts about seconds / kRepeats; the
  // calibration run also wakes the cores up to their sustained clock.
  int64_t iters = 1 << 16;
  double t = TimeChains(threads, iters);
  while (t < 0.01) {
    iters *= 4;
    t = TimeChains(threads, iters);
  }
  const double target = seconds / kRepeats;
  iters = std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(iters) * target / t));

  double best = 0.0;
  for (int r = 0; r < kRepeats; ++r) {
    const double elapsed = TimeChains(threads, iters);
    const double gflops = flops_per_iter * static_cast<double>(iters) * threads / elapsed * 1e-9;
    best = std::max(best, gflops);
  }
  return best;
}

}  // namespace tessera

#endif  // HWY_ONCE
