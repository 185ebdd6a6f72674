// SPDX-License-Identifier: Apache-2.0
// tessera: per-call execution context (threads, forced paths).
#pragma once

#include <cstdint>

namespace tessera {

// Which implementation a call uses. kAuto picks the fastest path for the shape (for bf16 forwards
// on CPUs with Intel AMX, the AMX tile kernel: docs/architecture.md); the others force a path, for
// tests (every path is compared against the others) and benchmarks.
enum class Path : int32_t {
  kAuto = 0,
  kReference,  // scalar fp64 reference (src/ref): slow, materializes scores, obviously right
  kGeneric,    // the SIMD tiled kernel with a run-time head dim
  kFast,       // the SIMD tiled kernel with a compile-time head dim (64, 128, 256); error if the
               // head dim has no fast instantiation
};

const char* PathName(Path path);

struct Context {
  // Worker threads; 0 = all hardware threads (or OMP_NUM_THREADS when set).
  int32_t num_threads = 0;
  // Forced implementation path (tests and benchmarks).
  Path path = Path::kAuto;
  // There is no determinism switch: every op is always deterministic (bitwise-identical results
  // across runs and thread counts; each output is reduced in an order fixed by the shape).
};

// Number of threads a call with this context will use (>= 1).
int32_t ResolveThreads(const Context& ctx);

}  // namespace tessera
