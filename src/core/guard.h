// SPDX-License-Identifier: Apache-2.0
// Internal: no exception crosses the public API. Every public function that returns a Status is
// written as a function-try-block ending in TESSERA_CATCH_ALL("<name>"):
//
//   Status AttentionForward(const AttentionParams& params, const Context& ctx) try {
//     ...
//   }
//   TESSERA_CATCH_ALL("AttentionForward")
//
// std::bad_alloc (a std::vector or std::string that could not grow) becomes
// Status::Internal("<name>: out of memory: ..."), any other exception Status::Internal naming it.
// ParallelFor carries an exception thrown on a worker back to the calling thread.
#pragma once

#include <exception>
#include <new>
#include <string>

#include "tessera/status.h"

namespace tessera {
namespace internal {

// The Status for the exception being handled; call it only inside a catch block.
inline Status ExceptionStatus(const char* op) noexcept {
  try {
    try {
      throw;
    } catch (const std::bad_alloc& e) {
      return Status::Internal(std::string(op) + ": out of memory: " + e.what());
    } catch (const std::exception& e) {
      return Status::Internal(std::string(op) + ": unexpected exception: " + e.what());
    } catch (...) {
      return Status::Internal(std::string(op) + ": unexpected exception of unknown type");
    }
  } catch (...) {
    // Building the message itself failed: a short literal needs no allocation.
    return Status::Internal("out of memory");
  }
}

}  // namespace internal
}  // namespace tessera

#define TESSERA_CATCH_ALL(op)                        \
  catch (...) {                                      \
    return ::tessera::internal::ExceptionStatus(op); \
  }

namespace tessera {
namespace internal {

// fn() with every exception turned into a Status (for lambdas; functions use TESSERA_CATCH_ALL).
template <class Fn>
Status StatusFromCall(const char* op, Fn&& fn) noexcept {
  try {
    return fn();
  }
  TESSERA_CATCH_ALL(op)
}

}  // namespace internal
}  // namespace tessera
