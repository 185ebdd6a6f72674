// SPDX-License-Identifier: Apache-2.0
// Running the exact backward in tests (flash_bwd_test.cc, flash_bwd_amx_test.cc): fresh,
// NaN-prefilled and guarded gradient tensors, the forward that feeds the backward, and a bitwise
// comparison of two runs' gradients.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>

#include "attention_cases.h"
#include "tessera/attention.h"
#include "tessera/context.h"
#include "test_util.h"

namespace tessera {
namespace test {

struct Grads {
  Tensor dq, dk, dv;
};

inline Grads MakeGrads(const Spec& s, const Inputs& in) {
  Grads g;
  g.dq = MakeTensor(s.dtype, TokenShape(s, in.tokens_q, s.heads_q), s.grad_layout, s.misalign);
  g.dk = MakeTensor(s.dtype, TokenShape(s, in.tokens_k, s.heads_kv), s.grad_layout, s.misalign);
  g.dv = MakeTensor(s.dtype, TokenShape(s, in.tokens_k, s.heads_kv), s.grad_layout, s.misalign);
  return g;
}

inline AttentionBackwardParams MakeBackwardParams(const Spec& s, const Inputs& in, Outputs* fwd,
                                                  Grads* g) {
  AttentionBackwardParams bp;
  bp.forward = MakeParams(s, in, fwd);
  bp.dout = in.dout.view();
  if (g != nullptr) {
    bp.dq = g->dq.view();
    bp.dk = g->dk.view();
    bp.dv = g->dv.view();
  }
  return bp;
}

// The forward path that feeds a backward forced onto `path`: the same path, except that a head
// dim without a fast instantiation runs the forward on kGeneric (so a kFast backward is tested,
// not the forward's rejection).
inline Path ForwardPathFor(Path path, int64_t dim) {
  return path == Path::kFast && !HasFastPath(dim) ? Path::kGeneric : path;
}

// Runs the forward that feeds a backward on `path` (ForwardPathFor), with out and lse as the
// backward will read them.
inline Status RunForwardFor(const Spec& s, const Inputs& in, Path path, Outputs* fwd) {
  return RunForward(s, in, ForwardPathFor(path, s.dim), 0, fwd);
}

// Runs the backward on `path` with fresh NaN-prefilled, guarded gradients. Guards and gaps are
// checked here, on every call.
inline Status RunBackwardOnly(const Spec& s, const Inputs& in, Outputs* fwd, Path path,
                              int32_t threads, Grads* g) {
  *g = MakeGrads(s, in);
  Context ctx;
  ctx.path = path;
  ctx.num_threads = threads;
  const Status status = AttentionBackward(MakeBackwardParams(s, in, fwd, g), ctx);
  EXPECT_TRUE(g->dq.OutsideViewUntouched()) << "dq";
  EXPECT_TRUE(g->dk.OutsideViewUntouched()) << "dk";
  EXPECT_TRUE(g->dv.OutsideViewUntouched()) << "dv";
  return status;
}

// Forward then backward, both on `path`.
inline Status RunBackward(const Spec& s, const Inputs& in, Path path, int32_t threads, Grads* g) {
  Outputs fwd;
  const Status st = RunForwardFor(s, in, path, &fwd);
  if (!st.ok()) {
    return Status::Internal("the forward feeding the backward failed: " + st.ToString());
  }
  return RunBackwardOnly(s, in, &fwd, path, threads, g);
}

inline ::testing::AssertionResult SameBits(const Grads& a, const Grads& b) {
  ::testing::AssertionResult r = a.dq.BitwiseEqual(b.dq);
  if (!r) return r << " (dq)";
  r = a.dk.BitwiseEqual(b.dk);
  if (!r) return r << " (dk)";
  r = a.dv.BitwiseEqual(b.dv);
  if (!r) return r << " (dv)";
  return ::testing::AssertionSuccess();
}

}  // namespace test
}  // namespace tessera
