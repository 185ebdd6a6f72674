// SPDX-License-Identifier: Apache-2.0
// The OpenBLAS core choice (blas_core.h): pure functions, and the CPUID probe they are fed.
#include "blas_core.h"

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstring>
#include <string>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace tessera {
namespace cli {

IsaLevel BlasCoreLevel(const std::string& corename) {
  std::string name = corename;
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  // OpenBLAS's x86-64 DYNAMIC_ARCH core names (driver/others/dynamic.c).
  static const char* const kSse[] = {
      "katmai",        "coppermine", "northwood",  "prescott", "banias",  "atom",
      "core2",         "penryn",     "dunnington", "nehalem",  "athlon",  "opteron",
      "opteron(sse3)", "barcelona",  "nano",       "bobcat",   "generic", "unknown"};
  static const char* const kAvx[] = {"sandybridge", "bulldozer", "piledriver"};
  static const char* const kAvx2[] = {"haswell", "zen", "steamroller", "excavator"};
  static const char* const kAvx512[] = {"skylakex", "cooperlake", "sapphirerapids"};
  const auto in = [&](const auto& names) {
    return std::any_of(std::begin(names), std::end(names),
                       [&](const char* n) { return name == n; });
  };
  if (in(kSse)) return IsaLevel::kSse;
  if (in(kAvx)) return IsaLevel::kAvx;
  if (in(kAvx2)) return IsaLevel::kAvx2;
  if (in(kAvx512)) return IsaLevel::kAvx512;
  return IsaLevel::kUnknown;
}

IsaLevel CpuIsaLevel(const CpuIsa& isa) {
  if (isa.avx512 && isa.avx2 && isa.fma) return IsaLevel::kAvx512;
  if (isa.avx2 && isa.fma) return IsaLevel::kAvx2;
  if (isa.avx) return IsaLevel::kAvx;
  return IsaLevel::kSse;
}

std::string BlasCoreToForce(const std::string& corename, const CpuIsa& isa) {
  const IsaLevel core = BlasCoreLevel(corename);
  const IsaLevel cpu = CpuIsaLevel(isa);
  if (core == IsaLevel::kUnknown || core >= IsaLevel::kAvx2 || core >= cpu) return "";
  switch (cpu) {
    case IsaLevel::kAvx512:
      return "SkylakeX";
    case IsaLevel::kAvx2:
      return "Haswell";
    case IsaLevel::kAvx:
      return "Sandybridge";
    default:
      return "";
  }
}

bool CommandUsesBlas(int argc, const char* const* argv) {
  // The subcommand is the first argument that is not an option (the tool has no option that
  // takes a value before it).
  int sub = 1;
  while (sub < argc && argv[sub][0] == '-') ++sub;
  if (sub >= argc) return false;
  const std::string command = argv[sub];
  if (command == "info") return true;
  if (command != "bench") return false;
  std::string op = "forward", vs;
  bool baseline_only = false;
  for (int i = sub + 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&](const char* name, std::string* out) {
      const std::string flag = name;
      if (arg == flag && i + 1 < argc) {
        *out = argv[i + 1];
      } else if (arg.rfind(flag + "=", 0) == 0) {
        *out = arg.substr(flag.size() + 1);
      }
    };
    value("--op", &op);
    value("--vs", &vs);
    if (arg == "--baseline-only") baseline_only = true;
  }
  return (op == "forward" || op == "backward") && (vs == "naive" || baseline_only);
}

CpuIsa ProbeCpuIsa() {
  CpuIsa isa;
#if defined(__x86_64__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return isa;
  const bool osxsave = c & (1u << 27);
  const bool fma = c & (1u << 12);
  const bool avx = c & (1u << 28);
  if (!osxsave) return isa;
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const bool ymm_state = (lo & 0x6u) == 0x6u;    // SSE and AVX state
  const bool zmm_state = (lo & 0xE6u) == 0xE6u;  // and opmask, ZMM_Hi256, Hi16_ZMM
  isa.avx = avx && ymm_state;
  isa.fma = fma && isa.avx;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return isa;
  isa.avx2 = (b & (1u << 5)) && isa.avx;
  const uint32_t avx512_bits = (1u << 16) | (1u << 17) | (1u << 30) | (1u << 31);  // F DQ BW VL
  isa.avx512 = (b & avx512_bits) == avx512_bits && zmm_state;
  if (isa.avx512 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) isa.avx512_bf16 = a & (1u << 5);
#endif
  return isa;
}

}  // namespace cli
}  // namespace tessera
