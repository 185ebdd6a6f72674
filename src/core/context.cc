// SPDX-License-Identifier: Apache-2.0
#include "tessera/context.h"

#include <cstdlib>

#include "tessera/system.h"

namespace tessera {

const char* PathName(Path path) {
  switch (path) {
    case Path::kAuto:
      return "auto";
    case Path::kReference:
      return "reference";
    case Path::kGeneric:
      return "generic";
    case Path::kFast:
      return "fast";
  }
  return "unknown";
}

int32_t ResolveThreads(const Context& ctx) {
  if (ctx.num_threads > 0) return ctx.num_threads;
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  return HardwareThreads();
}

}  // namespace tessera
