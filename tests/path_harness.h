// SPDX-License-Identifier: Apache-2.0
// The harness the forward and backward tests share: a case's references computed once, then the
// entry point forced onto every path a head dim has (Context.path) and each run judged against
// them. What differs between the two entry points is an Entry type:
//
//   struct Entry {
//     using Reference = ...;  // what ComputeReference returns (fp64, naive, magnitudes)
//     using Result = ...;     // what one run writes (default-constructible)
//     static Inputs MakeInputs(const Spec& s);
//     static Reference ComputeReference(const Spec& s, const Inputs& in);
//     // Runs on `path` with `threads` threads into fresh, guarded outputs.
//     static Status Run(const Spec& s, const Inputs& in, Path path, int32_t threads, Result* r);
//     static void ExpectMatchesReference(const Spec& s, const Inputs& in, const Reference& ref,
//                                        const Result& r);
//   };
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "attention_cases.h"
#include "tessera/context.h"
#include "tessera/status.h"
#include "test_util.h"

namespace tessera {
namespace test {

// Calls fn(path) for every path a head dim can be forced through (PathsFor), each under a trace
// naming the path. A fatal failure inside fn ends that path's call only.
template <class Fn>
void ForEachPath(int64_t dim, const Fn& fn) {
  for (Path path : PathsFor(dim)) {
    SCOPED_TRACE(std::string("path ") + PathName(path));
    fn(path);
  }
}

// Every path against the references of `s` on the inputs `in`.
template <class Entry>
void CheckAllPaths(const Spec& s, const Inputs& in) {
  const typename Entry::Reference ref = Entry::ComputeReference(s, in);
  ForEachPath(s.dim, [&](Path path) {
    typename Entry::Result r;
    const Status status = Entry::Run(s, in, path, 0, &r);
    ASSERT_TRUE(status.ok()) << status.ToString();
    Entry::ExpectMatchesReference(s, in, ref, r);
  });
}

// The same on the case's own random inputs, with the repro line on failure.
template <class Entry>
void CheckAllPaths(const Spec& s) {
  SCOPED_TRACE(Repro(s.Name()));
  const Inputs in = Entry::MakeInputs(s);
  CheckAllPaths<Entry>(s, in);
}

}  // namespace test
}  // namespace tessera
