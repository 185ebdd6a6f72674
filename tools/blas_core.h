// SPDX-License-Identifier: Apache-2.0
// Which OpenBLAS core the naive baseline should run. A DYNAMIC_ARCH OpenBLAS that does not
// recognise a CPU falls back to an old SSE core ("Prescott" for Debian's 0.3.21 on Emerald
// Rapids) and runs sgemm several times slower than the CPU allows, which would make every
// `--vs naive` speedup look larger than it is. OpenBLAS reads OPENBLAS_CORETYPE once, in its
// library constructor, so the CLI re-executes itself with it set (ForceBlasCoreIfWeak) before
// main() does anything else.
//
// The choice is a pure function of the core OpenBLAS picked and the CPU's (OS-enabled) ISA,
// so it is unit-tested without either.
#pragma once

#include <string>

namespace tessera {
namespace cli {

// ISA levels, as OpenBLAS's kernels use them.
enum class IsaLevel {
  kUnknown = 0,  // a core name this table does not know: never overridden
  kSse = 1,      // SSE2/SSE3 kernels (Prescott, Core2, Nehalem, Atom, Opteron, ...)
  kAvx = 2,      // AVX without FMA (Sandybridge, Bulldozer, Piledriver)
  kAvx2 = 3,     // AVX2 + FMA (Haswell, Zen, ...)
  kAvx512 = 4,   // AVX-512 F/BW/DQ/VL (SkylakeX, Cooperlake, SapphireRapids)
};

// What the CPU can run (instruction set and OS-enabled register state).
struct CpuIsa {
  bool avx = false;
  bool avx2 = false;
  bool fma = false;
  bool avx512 = false;  // F, BW, DQ and VL, with the zmm state enabled by the OS
  bool avx512_bf16 = false;
};

// The level of an OpenBLAS core name (openblas_get_corename(), case-insensitive).
IsaLevel BlasCoreLevel(const std::string& corename);

// The highest level the CPU runs.
IsaLevel CpuIsaLevel(const CpuIsa& isa);

// The OPENBLAS_CORETYPE to force, or "" to keep OpenBLAS's choice. Only a known core without
// FMA (the SSE and AVX-only cores an unrecognised CPU falls back to) running on a CPU with more
// is replaced: AVX-512 -> "SkylakeX", AVX2 + FMA -> "Haswell", AVX -> "Sandybridge". A core with
// FMA is OpenBLAS's deliberate choice (Haswell-class kernels on Zen 4, say) and is kept, as is
// any name this table does not know. SkylakeX rather than Cooperlake for avx512_bf16 CPUs:
// OpenBLAS 0.3.21 runs the same sgemm kernel for both (measured equal on the Xeon), and older
// releases do not know Cooperlake.
std::string BlasCoreToForce(const std::string& corename, const CpuIsa& isa);

// Whether the command line (argv[1..argc), as given to main) runs a command that calls BLAS:
// `info` (it reports the core), and `bench` forward/backward with `--vs naive` or
// `--baseline-only`.
bool CommandUsesBlas(int argc, const char* const* argv);

// This CPU's ISA (CPUID and XCR0; all false off x86-64).
CpuIsa ProbeCpuIsa();

// Set in the re-executed process to the core OpenBLAS had picked (the loop guard, and what
// `tessera info` reports as "forced from").
constexpr char kBlasForcedFromEnv[] = "TESSERA_BLAS_FORCED_FROM";

// Defined in blas_env.cc (these call OpenBLAS).
// When CommandUsesBlas, OPENBLAS_CORETYPE is unset, the process is not already a re-execution,
// and BlasCoreToForce names a core: sets OPENBLAS_CORETYPE and kBlasForcedFromEnv and
// re-executes /proc/self/exe with the same argv. Returns when nothing is to be done or the exec
// failed (then the environment is restored and the weak core runs).
void ForceBlasCoreIfWeak(int argc, char** argv);

// The BLAS the baseline runs, as `info` and `bench --json` report it.
struct BlasReport {
  std::string library;      // "OpenBLAS"
  std::string config;       // openblas_get_config()
  std::string core;         // openblas_get_corename()
  std::string forced_from;  // the core OpenBLAS picked before tessera forced `core`; or ""
};
BlasReport GetBlasReport();
// One line: "OpenBLAS 0.3.21 ... core SkylakeX (forced from Prescott by tessera)".
std::string BlasLine(const BlasReport& r);

}  // namespace cli
}  // namespace tessera
