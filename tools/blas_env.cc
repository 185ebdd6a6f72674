// SPDX-License-Identifier: Apache-2.0
// The OpenBLAS side of blas_core.h: the re-execution with a stronger core, and the report.
#include <cblas.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "blas_core.h"

namespace tessera {
namespace cli {

void ForceBlasCoreIfWeak(int argc, char** argv) {
  if (!CommandUsesBlas(argc, argv)) return;
  if (std::getenv(kBlasForcedFromEnv) != nullptr) return;  // already re-executed
  const char* user = std::getenv("OPENBLAS_CORETYPE");
  if (user != nullptr && user[0] != '\0') return;  // the user's choice stands
  const char* name = openblas_get_corename();
  const std::string from = name != nullptr ? name : "";
  const std::string to = BlasCoreToForce(from, ProbeCpuIsa());
  if (to.empty()) return;
  if (setenv("OPENBLAS_CORETYPE", to.c_str(), 1) != 0 ||
      setenv(kBlasForcedFromEnv, from.c_str(), 1) != 0) {
    unsetenv("OPENBLAS_CORETYPE");
    unsetenv(kBlasForcedFromEnv);
    return;
  }
  std::fflush(nullptr);
  execv("/proc/self/exe", argv);
  // The exec failed (no /proc, say): go on with the core OpenBLAS picked.
  unsetenv("OPENBLAS_CORETYPE");
  unsetenv(kBlasForcedFromEnv);
}

BlasReport GetBlasReport() {
  BlasReport r;
  r.library = "OpenBLAS";
  const char* config = openblas_get_config();
  const char* core = openblas_get_corename();
  r.config = config != nullptr ? config : "";
  r.core = core != nullptr ? core : "";
  const char* from = std::getenv(kBlasForcedFromEnv);
  if (from != nullptr) r.forced_from = from;
  return r;
}

std::string BlasLine(const BlasReport& r) {
  std::string line = r.config.empty() ? r.library : r.config;
  line += ", core " + r.core;
  if (!r.forced_from.empty()) line += " (forced from " + r.forced_from + " by tessera)";
  return line;
}

}  // namespace cli
}  // namespace tessera
