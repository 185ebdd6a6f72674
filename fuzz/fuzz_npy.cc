// SPDX-License-Identifier: Apache-2.0
// Fuzzes the .npy reader (tools/npy.cc) on arbitrary bytes: ParseNpy in memory with each set of
// dtypes the CLI accepts; a parsed array must hold exactly its shape's bytes (read in full, so
// ASan sees a short buffer), give a view of its shape, and survive SaveNpy + LoadNpy unchanged.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "npy.h"
#include "tessera/types.h"

namespace {

using tessera::DType;
using tessera::cli::NpyArray;

void Check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_npy: %s\n", what);
    std::abort();
  }
}

// Where a parsed array round-trips through a file (one per process).
const std::string& TempPath() {
  static const std::string path = [] {
    const char* dir = std::getenv("TMPDIR");
    return std::string(dir != nullptr && *dir != '\0' ? dir : "/tmp") + "/tessera_fuzz_npy." +
           std::to_string(static_cast<long>(getpid())) + ".npy";
  }();
  return path;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::vector<std::vector<DType>> kAccepted = {
      {DType::kF32, DType::kF16},
      {DType::kU8, DType::kBool},
      {DType::kI32},
      {DType::kBool, DType::kU8, DType::kF32},
  };
  for (const std::vector<DType>& accepted : kAccepted) {
    NpyArray array;
    std::string error;
    if (!tessera::cli::ParseNpy(data, size, accepted, &array, &error)) {
      Check(!error.empty(), "a failed parse left the error empty");
      continue;
    }
    Check(array.data != nullptr, "a parsed array has no data");
    const size_t nbytes = array.nbytes();
    Check(nbytes <= size, "a parsed array holds more bytes than the input");
    // Every payload byte is read, so a buffer shorter than the shape says is an ASan report.
    unsigned sum = 0;
    for (size_t i = 0; i < nbytes; ++i) sum += array.data.get()[i];
    (void)sum;
    const tessera::TensorView view = array.View();
    if (array.shape.size() <= 4 && !array.shape.empty()) {
      Check(view.numel() == array.numel(), "the view's numel differs from the array's");
    }
    // Round trip through a file: the same dtype, shape and bytes (small arrays only).
    if (nbytes > (1u << 16)) continue;
    Check(tessera::cli::SaveNpy(TempPath(), array.dtype, array.shape, array.data.get(), &error),
          "SaveNpy failed on a parsed array");
    NpyArray again;
    Check(tessera::cli::LoadNpy(TempPath(), accepted, &again, &error), "LoadNpy of SaveNpy failed");
    std::remove(TempPath().c_str());
    Check(again.dtype == array.dtype && again.shape == array.shape, "round trip changed the array");
    Check(nbytes == 0 || std::memcmp(again.data.get(), array.data.get(), nbytes) == 0,
          "round trip changed the payload");
  }
  return 0;
}
