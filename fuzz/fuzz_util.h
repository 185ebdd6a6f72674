// SPDX-License-Identifier: Apache-2.0
// Shared by the harnesses: owned buffers sized exactly to what a view describes (so ASan flags
// any access past them), filled with a sentinel byte pattern for outputs, and the checks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "tessera/status.h"
#include "tessera/types.h"

namespace tessera {
namespace fuzz {

// The byte every output buffer starts as; an error must leave it there.
constexpr uint8_t kSentinel = 0xA5;

[[noreturn]] inline void Fail(const std::string& what) {
  std::fprintf(stderr, "fuzz check failed: %s\n", what.c_str());
  std::abort();
}

inline void Check(bool ok, const std::string& what) {
  if (!ok) Fail(what);
}

// A heap block of exactly `bytes` bytes (malloc'd, so ASan bounds it exactly).
class Buffer {
 public:
  Buffer() = default;
  // Even 0 bytes get a pointer of their own (none of its bytes readable under ASan).
  explicit Buffer(size_t bytes, uint8_t fill = kSentinel) : bytes_(bytes) {
    data_.reset(static_cast<uint8_t*>(std::malloc(bytes)));  // malloc(0): a unique pointer
    if (data_ == nullptr && bytes > 0) Fail("out of memory");
    std::memset(data_.get(), fill, bytes);
  }
  uint8_t* data() const { return data_.get(); }
  size_t bytes() const { return bytes_; }
  // Snapshot / comparison, for outputs that must stay untouched and inputs never written.
  std::vector<uint8_t> Copy() const {
    return bytes_ ? std::vector<uint8_t>(data_.get(), data_.get() + bytes_)
                  : std::vector<uint8_t>();
  }
  bool Equals(const std::vector<uint8_t>& snapshot) const {
    return snapshot.size() == bytes_ &&
           (bytes_ == 0 || !std::memcmp(data_.get(), snapshot.data(), bytes_));
  }
  bool AllSentinel() const {
    for (size_t i = 0; i < bytes_; ++i) {
      if (data_.get()[i] != kSentinel) return false;
    }
    return true;
  }

 private:
  struct Free {
    void operator()(uint8_t* p) const { std::free(p); }
  };
  std::unique_ptr<uint8_t, Free> data_;
  size_t bytes_ = 0;
};

}  // namespace fuzz
}  // namespace tessera
