// SPDX-License-Identifier: Apache-2.0
// The unit tests' main: GoogleTest's, plus a choice of SIMD target, so that the kernels compiled
// for targets below the CPU's best (what users of other CPUs run, with their own tile constants)
// are executed too.
//
//   TESSERA_TEST_TARGET=<name>  runs every kernel on that target (tessera/system.h names:
//                               avx3_dl, avx3, avx2, sse4, ssse3, scalar; "" or auto: the best).
//                               A name the build did not compile fails; a compiled target this
//                               CPU cannot run skips the whole run (exit 0, "SKIPPED" printed).
//   --tessera_list_simd_targets prints "compiled <names>" and "default <name>" and exits: the
//                               ctest entries per target (tests/simd_targets.cmake) read it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "tessera/status.h"
#include "tessera/system.h"

namespace {

std::string Join(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : " ") + n;
  return out;
}

bool Contains(const std::vector<std::string>& names, const std::string& name) {
  return std::find(names.begin(), names.end(), name) != names.end();
}

// Prints the target in use when the tests run (not while gtest_discover_tests lists them: it
// would read the line as a test suite).
class TargetLogger : public ::testing::Environment {
 public:
  explicit TargetLogger(bool forced) : forced_(forced) {}
  void SetUp() override {
    std::printf("tessera tests: SIMD target %s%s\n", tessera::SimdTargetName().c_str(),
                forced_ ? " (TESSERA_TEST_TARGET)" : " (the CPU's best)");
  }

 private:
  bool forced_;
};

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--tessera_list_simd_targets") == 0) {
      const std::vector<std::string> supported = tessera::SupportedSimdTargets();
      std::printf("compiled %s\n", Join(tessera::CompiledSimdTargets()).c_str());
      std::printf("default %s\n", supported.empty() ? "" : supported.front().c_str());
      return 0;
    }
  }
  ::testing::InitGoogleTest(&argc, argv);

  const char* env = std::getenv("TESSERA_TEST_TARGET");
  const std::string target = env != nullptr ? env : "";
  if (!target.empty() && target != "auto") {
    const std::vector<std::string> compiled = tessera::CompiledSimdTargets();
    if (!Contains(compiled, target)) {
      std::fprintf(stderr,
                   "TESSERA_TEST_TARGET: expected one of %s or auto (the targets this build "
                   "compiled), got '%s'\n",
                   Join(compiled).c_str(), target.c_str());
      return 2;
    }
    if (!Contains(tessera::SupportedSimdTargets(), target)) {
      // CI on a CPU without this target stays green; the message says what did not run.
      std::printf("SKIPPED: TESSERA_TEST_TARGET=%s: this CPU cannot run it (supported: %s)\n",
                  target.c_str(), Join(tessera::SupportedSimdTargets()).c_str());
      return 0;
    }
    const tessera::Status status = tessera::SetSimdTarget(target);
    if (!status.ok()) {
      std::fprintf(stderr, "TESSERA_TEST_TARGET: %s\n", status.ToString().c_str());
      return 2;
    }
  }
  ::testing::AddGlobalTestEnvironment(new TargetLogger(!target.empty() && target != "auto"));
  return RUN_ALL_TESTS();
}
