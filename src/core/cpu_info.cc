// SPDX-License-Identifier: Apache-2.0
// What the machine offers: the SIMD target dynamic dispatch picks, the usable hardware threads,
// and a measured fp32 FMA peak (the roofline ceiling benchmarks report their fraction of).
//
// The peak probe runs `threads` std::threads at once (no OpenMP: the probe must not depend on
// the threading backend). Each runs a chain of 16 independent vector FMA accumulators, enough
// to cover the FMA latency x throughput product of current x86 and Arm cores (Zen 4: 4 cycles x
// 2 ymm pipes = 8; Skylake-X: 4 x 2 zmm = 8), with the widest vectors of the chosen target.
//
// The bandwidth probe is its memory-side twin: `threads` std::threads each sum their own slice
// of a 512 MiB f32 buffer (16x a 32 MiB L3, so every repeat streams from DRAM), four vector loads
// per iteration into four accumulators so the loop is bound by the loads alone. Each thread
// touches its own slice first, so its pages exist and sit near the core that reads them (first
// touch on NUMA machines). The buffer is allocated like KVCache's pool (AllocatePages: huge
// pages where the OS allows), so the probe measures the bandwidth the decode kernels can reach on
// tessera's own cache; 4 KiB pages read measurably slower (Zen 4 under KVM, one thread: 26 GB/s
// against 31.5 GB/s with 2 MiB pages), which is what a caller-owned malloc'd pool gets.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "core/cpu_info.cc"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <cstring>

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

// Reads the n 32-bit words at p (any alignment) and folds them into *sink, so the compiler
// cannot drop the loads; both read probes use it. Integer adds: the bytes are whatever a
// caller's buffer holds (f16 pairs, codes), which as floats could hit denormal assists.
HWY_NOINLINE void SumWordsU(const int32_t* HWY_RESTRICT p, int64_t n, float* HWY_RESTRICT sink) {
  const hn::ScalableTag<int32_t> d;
  const int64_t lanes = static_cast<int64_t>(hn::Lanes(d));
  auto s0 = hn::Zero(d), s1 = hn::Zero(d), s2 = hn::Zero(d), s3 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 4 * lanes <= n; i += 4 * lanes) {
    s0 = hn::Add(s0, hn::LoadU(d, p + i));
    s1 = hn::Add(s1, hn::LoadU(d, p + i + lanes));
    s2 = hn::Add(s2, hn::LoadU(d, p + i + 2 * lanes));
    s3 = hn::Add(s3, hn::LoadU(d, p + i + 3 * lanes));
  }
  uint32_t tail = 0;
  for (; i < n; ++i) {
    uint32_t w;  // p may be misaligned: a byte copy, not an int32 load
    std::memcpy(&w, p + i, sizeof(w));
    tail += w;
  }
  const auto total = hn::Add(hn::Add(s0, s1), hn::Add(s2, s3));
  *sink += static_cast<float>(tail + static_cast<uint32_t>(hn::GetLane(hn::SumOfLanes(d, total))));
}

}  // namespace HWY_NAMESPACE
}  // namespace tessera
HWY_AFTER_NAMESPACE();

#if HWY_ONCE

#include <sched.h>
#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "attention/flash_bwd_amx.h"
#include "attention/flash_fwd_amx.h"
#include "core/amx.h"
#include "core/attention_problem.h"
#include "core/huge_pages.h"
#include "core/parallel.h"
#include "tessera/system.h"

namespace tessera {
namespace {

HWY_EXPORT(CompiledTarget);
HWY_EXPORT(FloatLanes);
HWY_EXPORT(FmaChain);
HWY_EXPORT(SumWordsU);

constexpr int64_t kFmasPerIter = 16;
constexpr int kRepeats = 5;

// The bandwidth probe's buffer (huge pages where the OS allows, like the KV cache's pool) and the
// granule its per-thread slices are cut in (a multiple of 4 vectors of every target, up to
// 2048-bit SVE).
constexpr size_t kBandwidthBytes = size_t{512} << 20;
constexpr int64_t kSliceGranule = 1024;  // floats
constexpr int kMinBandwidthRepeats = 3;
constexpr int kMaxBandwidthRepeats = 100;

using Clock = std::chrono::steady_clock;

// Runs fn(t, sink) on `threads` threads t released together (sink: a float of its own, one cache
// line from the others); returns the wall time in seconds from the release to the last thread's
// finish.
template <typename Fn>
double TimeTogether(int32_t threads, const Fn& fn) {
  std::atomic<int32_t> ready{0};
  std::atomic<bool> go{false};
  std::vector<float> sinks(static_cast<size_t>(threads) * 16);  // one cache line apart
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads));
  for (int32_t t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      ready.fetch_add(1, std::memory_order_acq_rel);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      fn(t, &sinks[static_cast<size_t>(t) * 16]);
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

// Runs FmaChain(iters) on `threads` threads released together; returns the wall time in seconds.
double TimeChains(int32_t threads, int64_t iters) {
  return TimeTogether(threads, [iters](int32_t, float* sink) {
    HWY_DYNAMIC_DISPATCH(FmaChain)(iters, sink);
  });
}

}  // namespace

std::string SimdTargetName() { return hwy::TargetName(HWY_DYNAMIC_DISPATCH(CompiledTarget)()); }

namespace {

// This file compiles the same targets as the widest kernel family (decode adds AVX3_DL), so its
// HWY_TARGETS is the union of what the library compiled.
constexpr int64_t kCompiledTargets = HWY_TARGETS;

std::string LowerTargetName(int64_t target) {
  std::string name = hwy::TargetName(target);
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return name;
}

// What the CPU runs, read before any SetSimdTarget mock replaces Highway's answer.
int64_t CpuTargets() {
  static const int64_t targets = hwy::SupportedTargets();
  return targets;
}

// Target bits of `mask`, best (lowest bit) first, as names.
std::vector<std::string> TargetNames(int64_t mask) {
  std::vector<std::string> names;
  for (int bit = 0; bit < 63; ++bit) {
    const int64_t target = int64_t{1} << bit;
    if (mask & target) names.push_back(LowerTargetName(target));
  }
  return names;
}

std::string JoinNames(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace

std::vector<std::string> CompiledSimdTargets() { return TargetNames(kCompiledTargets); }

std::vector<std::string> SupportedSimdTargets() {
  return TargetNames(kCompiledTargets & CpuTargets());
}

Status SetSimdTarget(const std::string& name) {
  const int64_t cpu = CpuTargets();
  if (name.empty() || name == "auto") {
    hwy::SetSupportedTargetsForTest(0);  // 0 ends the mock: dispatch sees the CPU again
    return Status::Ok();
  }
  for (int bit = 0; bit < 63; ++bit) {
    const int64_t target = int64_t{1} << bit;
    if (!(kCompiledTargets & target) || LowerTargetName(target) != name) continue;
    if (!(cpu & target)) {
      return Status::InvalidArgument("target: this CPU cannot run '" + name +
                                     "'; expected one of " + JoinNames(SupportedSimdTargets()) +
                                     " or auto");
    }
    // The target and every one below it (higher bits are weaker targets), so a kernel family
    // that did not compile this target falls back to its best one below, never to scalar.
    hwy::SetSupportedTargetsForTest(cpu & ~(target - 1));
    return Status::Ok();
  }
  return Status::InvalidArgument("target: expected one of " + JoinNames(SupportedSimdTargets()) +
                                 " or auto (compiled: " + JoinNames(CompiledSimdTargets()) +
                                 "), got '" + name + "'");
}

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

double MeasureReadBandwidthGBps(int32_t threads, double seconds) {
  threads = std::max<int32_t>(threads, 1);
  seconds = std::max(seconds, 0.01);
  const PageBytes pages = AllocatePages(kBandwidthBytes);
  if (!pages) return 0.0;
  float* const data = reinterpret_cast<float*>(pages.get());

  // Thread t owns granules [t * granules / threads, (t + 1) * granules / threads).
  const int64_t granules = static_cast<int64_t>(kBandwidthBytes / sizeof(float)) / kSliceGranule;
  auto slice = [&](int32_t t, float** begin, int64_t* n) {
    const int64_t g0 = granules * t / threads;
    const int64_t g1 = granules * (t + 1) / threads;
    *begin = data + g0 * kSliceGranule;
    *n = (g1 - g0) * kSliceGranule;
  };
  TimeTogether(threads, [&](int32_t t, float*) {
    float* begin = nullptr;
    int64_t n = 0;
    slice(t, &begin, &n);
    std::fill(begin, begin + n, 1.0f);
  });
  auto read_all = [&] {
    return TimeTogether(threads, [&](int32_t t, float* sink) {
      float* begin = nullptr;
      int64_t n = 0;
      slice(t, &begin, &n);
      HWY_DYNAMIC_DISPATCH(SumWordsU)(reinterpret_cast<const int32_t*>(begin), n, sink);
    });
  };

  // The first pass evicts the touch's dirty lines from the caches and sizes the repeats.
  const double first = read_all();
  const int repeats = static_cast<int>(std::clamp<double>(
      std::round(seconds / std::max(first, 1e-6)), kMinBandwidthRepeats, kMaxBandwidthRepeats));
  double best = 0.0;
  for (int r = 0; r < repeats; ++r) {
    best = std::max(best, static_cast<double>(kBandwidthBytes) / read_all() * 1e-9);
  }
  return best;
}

double TimeReadSeconds(const std::vector<ByteRange>& ranges, int32_t threads) {
  threads = std::max<int32_t>(threads, 1);
  // Whole cache lines of 64 bytes.
  constexpr size_t kGranule = 64;
  size_t total = 0;
  for (const ByteRange& r : ranges) total += r.bytes / kGranule;
  std::vector<float> sinks(static_cast<size_t>(threads) * 16);  // one cache line apart
  // The kernels' own thread pool (ParallelFor), so the read and a kernel it is paired with pay
  // the same fork and join, and no pool of the other kind spins on the cores meanwhile.
  const auto start = Clock::now();
  ParallelFor(threads, threads, [&](int64_t t, int32_t) {
    float* sink = &sinks[static_cast<size_t>(t) * 16];
    // Task t reads granules [g0, g1) of the ranges laid end to end.
    const size_t g0 = total * static_cast<size_t>(t) / static_cast<size_t>(threads);
    const size_t g1 = total * static_cast<size_t>(t + 1) / static_cast<size_t>(threads);
    size_t at = 0;
    for (const ByteRange& r : ranges) {
      const size_t n = r.bytes / kGranule;
      const size_t b = std::max(at, g0), e = std::min(at + n, g1);
      if (b < e) {
        const int32_t* p = static_cast<const int32_t*>(r.data) + (b - at) * (kGranule / 4);
        HWY_DYNAMIC_DISPATCH(SumWordsU)(p, static_cast<int64_t>((e - b) * (kGranule / 4)), sink);
      }
      at += n;
      if (at >= g1) break;
    }
  });
  const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  volatile float total_sum = 0.0f;
  for (float x : sinks) total_sum = total_sum + x;
  (void)total_sum;
  return elapsed;
}

namespace {

#if defined(__x86_64__) && defined(__linux__)
// XCR0, the OS-enabled state components (xgetbv with ecx = 0; only valid when CPUID reports
// OSXSAVE). Inline asm: the _xgetbv intrinsic needs -mxsave.
uint64_t ReadXcr0() {
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

bool ProbeAmx() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx = (d & (1u << 22)) && (d & (1u << 24));  // AMX-BF16, AMX-TILE
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31));  // F, BW, VL
  if (!amx || !avx512) return false;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;  // AVX512-BF16
  // SSE, AVX, the three AVX-512 components (bits 1, 2, 5-7) and XTILECFG/XTILEDATA (17, 18).
  constexpr uint64_t kNeeded = (1u << 1) | (1u << 2) | (7u << 5) | (3u << 17);
  if ((ReadXcr0() & kNeeded) != kNeeded) return false;
  // Linux hands out the tile data state per process on request.
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

bool ProbeAvx512Bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31));  // F, BW, VL
  if (!avx512) return false;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5))) return false;  // AVX512-BF16
  constexpr uint64_t kNeeded = (1u << 1) | (1u << 2) | (7u << 5);  // SSE, AVX, AVX-512 state
  return (ReadXcr0() & kNeeded) == kNeeded;
}

// Rounds of 12 independent 512-bit products: vdpbf16ps (32 multiply-adds each) or f32 FMAs (16).
// The empty asm keeps the operand opaque, so the loops are not folded away.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), noinline)) float DotChains(
    int64_t rounds) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_setzero_ps();
  __m512i x = _mm512_set1_epi32(0x3F803F80);  // bf16 pairs of 1.0
  for (int64_t r = 0; r < rounds; ++r) {
    __asm__("" : "+v"(x));
    const __m512bh a = reinterpret_cast<__m512bh>(x);
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, a);
  }
  for (int i = 1; i < 12; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  return _mm512_reduce_add_ps(acc[0]);
}

__attribute__((target("avx512f,fma"), noinline)) float FmaChains(int64_t rounds) {
  __m512 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_setzero_ps();
  __m512 x = _mm512_set1_ps(1.0f);
  for (int64_t r = 0; r < rounds; ++r) {
    __asm__("" : "+v"(x));
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_fmadd_ps(x, x, acc[i]);
  }
  for (int i = 1; i < 12; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  return _mm512_reduce_add_ps(acc[0]);
}

// Multiply-adds per second of vdpbf16ps over f32 FMAs: the best of 5 interleaved pairs of short
// runs (~0.1 ms each), the least disturbed run of each.
double MeasureDotSpeedup() {
  if (!ProbeAvx512Bf16()) return 0.0;
  constexpr int64_t kRounds = 20000;
  double best_dot = 1e30, best_fma = 1e30;
  volatile float sink = 0.0f;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    sink = sink + DotChains(kRounds);
    const auto t1 = std::chrono::steady_clock::now();
    sink = sink + FmaChains(kRounds);
    const auto t2 = std::chrono::steady_clock::now();
    best_dot = std::min(best_dot, std::chrono::duration<double>(t1 - t0).count());
    best_fma = std::min(best_fma, std::chrono::duration<double>(t2 - t1).count());
  }
  return 2.0 * best_fma / best_dot;  // twice the multiply-adds per instruction
}
#else
bool ProbeAmx() { return false; }
bool ProbeAvx512Bf16() { return false; }
double MeasureDotSpeedup() { return 0.0; }
#endif

// Whether the environment variable `name` is set to anything but "" or "0".
bool EnvFlag(const char* name) {
  const char* env = std::getenv(name);
  return env != nullptr && env[0] != '\0' && std::string(env) != "0";
}

// A Bf16Dot as an int, or -1: no override.
std::atomic<int> bf16_dot_override{-1};

}  // namespace

bool AmxSupported() {
  static const bool supported = ProbeAmx();  // thread-safe, once per process
  return supported;
}

bool AmxEnabled() {
  static const bool disabled = EnvFlag("TESSERA_DISABLE_AMX");
  // A SetSimdTarget mock replaces Highway's answer with a subset of the CPU's targets.
  return !disabled && AmxSupported() && hwy::SupportedTargets() == CpuTargets();
}

bool Avx512Bf16Supported() {
  static const bool supported = ProbeAvx512Bf16();
  return supported;
}

bool Avx512Bf16Usable() {
  static const bool disabled = EnvFlag("TESSERA_DISABLE_AVX512BF16");
  return !disabled && Avx512Bf16Supported() && hwy::SupportedTargets() == CpuTargets();
}

double Avx512Bf16SpeedupOverFma() {
  static const double speedup = MeasureDotSpeedup();
  return speedup;
}

Bf16Dot Bf16DotEngine() {
  const int forced = bf16_dot_override.load(std::memory_order_relaxed);
  if (forced == static_cast<int>(Bf16Dot::kNone)) return Bf16Dot::kNone;
  if (forced == static_cast<int>(Bf16Dot::kAvx512Bf16)) {
    return Avx512Bf16Usable() ? Bf16Dot::kAvx512Bf16 : Bf16Dot::kNone;
  }
  if (AmxEnabled()) return Bf16Dot::kAmx;
  if (forced < 0 && Avx512Bf16Usable() && Avx512Bf16SpeedupOverFma() >= 1.3) {
    return Bf16Dot::kAvx512Bf16;
  }
  return Bf16Dot::kNone;
}

void SetBf16DotOverrideForTesting(Bf16Dot engine) {
  bf16_dot_override.store(static_cast<int>(engine), std::memory_order_relaxed);
}

void ClearBf16DotOverrideForTesting() { bf16_dot_override.store(-1, std::memory_order_relaxed); }

namespace {

#if defined(__x86_64__)
std::string CpuidString(const unsigned* regs, int n) {
  std::string s(reinterpret_cast<const char*>(regs), static_cast<size_t>(n) * 4);
  s = s.substr(0, s.find('\0'));
  const size_t first = s.find_first_not_of(' ');
  const size_t last = s.find_last_not_of(' ');
  return first == std::string::npos ? "" : s.substr(first, last - first + 1);
}

// Cache sizes from the deterministic cache parameters leaf (Intel 4, AMD 0x8000001D).
void CpuidCaches(unsigned leaf, CpuDescription* c) {
  for (unsigned i = 0; i < 16; ++i) {
    unsigned a = 0, b = 0, cx = 0, d = 0;
    __cpuid_count(leaf, i, a, b, cx, d);
    const unsigned type = a & 0x1f;  // 0: no more caches, 1: data, 2: instruction, 3: unified
    if (type == 0) break;
    if (type == 2) continue;
    const int64_t bytes = int64_t{((b >> 22) & 0x3ff) + 1} * (((b >> 12) & 0x3ff) + 1) *
                          ((b & 0xfff) + 1) * (int64_t{cx} + 1);
    const unsigned level = (a >> 5) & 0x7;
    if (level == 1) c->l1d_bytes = bytes;
    if (level == 2) c->l2_bytes = bytes;
    if (level == 3) c->l3_bytes = bytes;
  }
}
#endif

// Cache sizes from Linux's sysfs (exact for the caches CPU 0 uses, including virtual machines
// whose CPUID cache leaves are synthetic). Returns false when not available.
bool SysfsCaches(CpuDescription* c) {
  bool any = false;
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    const auto read = [&](const char* name) {
      std::string value;
      if (FILE* f = std::fopen((dir + name).c_str(), "r")) {
        char buf[64] = {};
        if (std::fgets(buf, sizeof(buf), f) != nullptr) value = buf;
        std::fclose(f);
      }
      while (!value.empty() && std::isspace(static_cast<unsigned char>(value.back()))) {
        value.pop_back();
      }
      return value;
    };
    const std::string level = read("level");
    if (level.empty()) break;
    const std::string type = read("type");
    const std::string size = read("size");  // "48K", "2048K", "32M"
    if (type == "Instruction" || size.empty()) continue;
    int64_t bytes = std::atoll(size.c_str());
    if (size.back() == 'K') bytes <<= 10;
    if (size.back() == 'M') bytes <<= 20;
    if (level == "1") c->l1d_bytes = bytes;
    if (level == "2") c->l2_bytes = bytes;
    if (level == "3") c->l3_bytes = bytes;
    any = true;
  }
  return any;
}

// The best target a kernel family compiled with `family` runs now (the lowest bit Highway
// supports, SetSimdTarget mocks included), by name.
std::string FamilyTarget(int64_t family) {
  const int64_t usable = family & hwy::SupportedTargets();
  return usable == 0 ? "none" : hwy::TargetName(usable & -usable);
}

}  // namespace

CpuDescription DescribeCpu() {
  CpuDescription c;
#if defined(__x86_64__)
  unsigned a = 0, b = 0, cx = 0, d = 0;
  unsigned max_leaf = 0;
  if (__get_cpuid(0, &max_leaf, &b, &cx, &d)) {
    const unsigned vendor[3] = {b, d, cx};
    c.vendor = CpuidString(vendor, 3);
  }
  if (max_leaf >= 1 && __get_cpuid(1, &a, &b, &cx, &d)) {
    const int32_t base_family = static_cast<int32_t>((a >> 8) & 0xf);
    const int32_t base_model = static_cast<int32_t>((a >> 4) & 0xf);
    c.stepping = static_cast<int32_t>(a & 0xf);
    c.family =
        base_family == 0xf ? base_family + static_cast<int32_t>((a >> 20) & 0xff) : base_family;
    c.model = (base_family == 0x6 || base_family == 0xf)
                  ? (static_cast<int32_t>((a >> 16) & 0xf) << 4) + base_model
                  : base_model;
  }
  unsigned max_ext = __get_cpuid_max(0x80000000u, nullptr);
  if (max_ext >= 0x80000004u) {
    unsigned brand[12] = {};
    for (unsigned i = 0; i < 3; ++i) {
      __get_cpuid(0x80000002u + i, &brand[4 * i], &brand[4 * i + 1], &brand[4 * i + 2],
                  &brand[4 * i + 3]);
    }
    c.model_name = CpuidString(brand, 12);
  }
  if (max_leaf >= 7 && __get_cpuid_count(7, 0, &a, &b, &cx, &d)) {
    c.amx_present = (d & (1u << 22)) && (d & (1u << 24));  // AMX-BF16, AMX-TILE
  }
  if (!SysfsCaches(&c)) {
    if (c.vendor == "AuthenticAMD" && max_ext >= 0x8000001Du) {
      CpuidCaches(0x8000001Du, &c);
    } else if (max_leaf >= 4) {
      CpuidCaches(4, &c);
    }
  }
#else
  SysfsCaches(&c);
#endif
  c.amx_usable = AmxEnabled();
  return c;
}

// One row per (op, dtype). Each row asks the predicate its op's dispatch asks, so a new variant
// reports itself by changing its row here, next to nothing else: the forward's bf16 row calls
// AmxForwardHandles / Bf16DotEngine as flash_fwd.cc does, the backward's AmxBackwardHandles as
// flash_bwd.cc does.
std::vector<KernelChoice> KernelReport() {
  // Decode (and this file) also compile AVX3_DL (CMakeLists.txt); the other families do not.
  constexpr int64_t kDecodeTargets = kCompiledTargets;
  constexpr int64_t kKernelTargets = kCompiledTargets & ~int64_t{HWY_AVX3_DL};
  const std::string tiles = FamilyTarget(kKernelTargets);
  const std::string decode = FamilyTarget(kDecodeTargets);
  const bool vnni = (hwy::SupportedTargets() & kDecodeTargets & int64_t{HWY_AVX3_DL}) != 0 &&
                    decode == hwy::TargetName(HWY_AVX3_DL);

  AttentionProblem typical;  // B=1, H=8, N=4096, D=128: what the AMX predicate decides on
  typical.batch = 1;
  typical.seq_q = typical.seq_k = 4096;
  typical.heads_q = typical.heads_kv = 8;
  typical.dim = 128;
  typical.dtype = DType::kBF16;
  const Bf16Dot bf16_engine = AmxForwardHandles(typical) ? Bf16DotEngine() : Bf16Dot::kNone;
  float lse = 0.0f;  // the backward reads the forward's LSE
  AttentionBackwardProblem typical_backward;
  typical_backward.fwd = typical;
  typical_backward.fwd.lse = &lse;
  const bool amx_backward =
      AmxBackwardHandles(typical_backward) && Bf16DotEngine() == Bf16Dot::kAmx;

  std::vector<KernelChoice> rows;
  rows.push_back({"forward", "f32", "highway tiles (" + tiles + ")"});
  rows.push_back({"forward", "bf16",
                  bf16_engine == Bf16Dot::kAmx ? std::string("AMX bf16 tiles")
                  : bf16_engine == Bf16Dot::kAvx512Bf16
                      ? std::string("AVX512-BF16 vdpbf16ps")
                      : "highway tiles, bf16 converted to f32 (" + tiles + ")"});
  rows.push_back({"forward", "f16", "highway tiles, f16 converted to f32 (" + tiles + ")"});
  rows.push_back({"backward", "f32", "highway tiles (" + tiles + ")"});
  rows.push_back({"backward", "bf16",
                  amx_backward ? std::string("AMX bf16 tiles")
                               : "highway tiles, bf16 converted to f32 (" + tiles + ")"});
  rows.push_back({"backward", "f16", "highway tiles, f16 converted to f32 (" + tiles + ")"});
  for (const char* kv : {"f32", "bf16", "f16"}) {
    rows.push_back({"decode", kv,
                    std::string("highway decode") +
                        (std::string(kv) == "f32" ? "" : ", KV converted to f32") + " (" + decode +
                        ")"});
  }
  for (const char* kv : {"int8", "int4"}) {
    rows.push_back({"decode", kv,
                    std::string("highway decode, ") +
                        (vnni ? "VNNI integer dot products" : "codes converted to f32") + " (" +
                        decode + ")"});
  }
  rows.push_back({"linear", "f32", "highway chunked (" + tiles + ")"});
  return rows;
}

}  // namespace tessera

#endif  // HWY_ONCE
