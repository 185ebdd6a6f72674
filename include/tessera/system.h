// SPDX-License-Identifier: Apache-2.0
// tessera: what the machine offers, as seen and measured by tessera itself.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "tessera/status.h"

namespace tessera {

// Name of the SIMD target that dynamic dispatch picks on this CPU ("AVX3", "AVX2", ...).
std::string SimdTargetName();

// SIMD targets. Every kernel is compiled once per Highway target (x86: avx3_dl for decode, avx3,
// avx2, sse4, ssse3, and the portable scalar fallback); each call runs the best one the CPU
// supports. Names are lower-case, best first.
// The targets this build compiled.
std::vector<std::string> CompiledSimdTargets();
// The compiled targets this CPU can run.
std::vector<std::string> SupportedSimdTargets();
// Forces every later call in this process to run the named target's kernels (kernels of a
// family that did not compile that target run the best compiled target below it); "auto" or ""
// returns to the best supported target. A name that is not compiled, or that this CPU cannot
// run, is an InvalidArgument error naming the choices. Process-wide: call it while no other
// tessera call runs (tests, benchmarks, `--target` of the CLI).
Status SetSimdTarget(const std::string& name);
// Number of hardware threads the library would use by default.
int32_t HardwareThreads();
// Measures the fp32 FMA peak in GFLOP/s with `threads` threads (one independent FMA stream
// per thread, enough accumulators to hide the FMA latency, widest vectors of the chosen
// target). Runs for about `seconds` seconds in total; returns the best of several repeats.
double MeasureFmaPeakGflops(int32_t threads, double seconds = 0.3);
// Measures the memory read bandwidth in GB/s (1e9 bytes per second) with `threads` threads, each
// summing its own slice of a 512 MiB buffer (far larger than any last-level cache; allocated and
// touched once per call, freed before returning) with the widest vectors of the chosen target.
// Runs for about `seconds` seconds plus the time to touch the buffer; returns the best of
// several repeats. This is the ceiling memory-bound ops (decode) report their fraction of.
double MeasureReadBandwidthGBps(int32_t threads, double seconds = 0.3);

// A run of bytes for TimeReadSeconds.
struct ByteRange {
  const void* data = nullptr;
  size_t bytes = 0;
};
// Reads the ranges once, their bytes split evenly over `threads` threads released together, and
// returns the wall time in seconds: a plain streaming read of exactly these bytes (whole 64-byte
// granules of each range), the floor of a memory-bound kernel over them at this moment. Timed
// in alternation with such a kernel (`tessera bench --op decode --vs stream`), it measures how
// close the kernel comes to the read it cannot avoid, on a machine whose bandwidth moves.
double TimeReadSeconds(const std::vector<ByteRange>& ranges, int32_t threads);

// The CPU as CPUID and the OS describe it (fields unknown on this platform stay empty / 0).
struct CpuDescription {
  std::string vendor;      // CPUID vendor string: "GenuineIntel", "AuthenticAMD", ...
  std::string model_name;  // CPUID brand string
  int32_t family = 0;      // display family, model and stepping (CPUID leaf 1)
  int32_t model = 0;
  int32_t stepping = 0;
  // Data / unified cache sizes of the caches CPU 0 uses, per level (sysfs, else CPUID leaf 4
  // or 0x8000001D); 0 where unknown. L3 is shared by many cores.
  int64_t l1d_bytes = 0;
  int64_t l2_bytes = 0;
  int64_t l3_bytes = 0;
  bool amx_present = false;  // CPUID reports AMX-TILE and AMX-BF16
  bool amx_usable = false;   // and tessera's AMX kernels may run now (OS, TESSERA_DISABLE_AMX,
                             // no forced SIMD target)
};
CpuDescription DescribeCpu();

// The kernel an op runs on this machine with the default path (Path::kAuto), under the current
// SetSimdTarget choice, for a typical shape (head dim 128, no mask, a dense batch): e.g.
// {"forward", "f32", "highway tiles (AVX3)"}. Decode rows name the KV cache's dtype. Computed
// from the predicates the dispatch code itself calls.
struct KernelChoice {
  std::string op;       // "forward", "backward", "decode", "linear"
  std::string dtype;    // the inputs' dtype (decode: the KV cache's)
  std::string variant;  // what runs
};
std::vector<KernelChoice> KernelReport();

}  // namespace tessera
