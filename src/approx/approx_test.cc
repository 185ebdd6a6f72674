// SPDX-License-Identifier: Apache-2.0
// ApproxAttention's shared checks (approx.cc): every method refuses bad shapes, dtypes, strides,
// aliasing and scales the same way, before any work and without writing the output; method names
// round-trip.
#include "tessera/approx.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace tessera {
namespace {

constexpr ApproxMethod kMethods[] = {ApproxMethod::kWersa,     ApproxMethod::kHyper,
                                     ApproxMethod::kPerformer, ApproxMethod::kAgent,
                                     ApproxMethod::kRouting,   ApproxMethod::kHiLo};

struct Case {
  int64_t B = 1, S = 32, Hq = 4, Hkv = 2, D = 16;
  std::vector<float> q, k, v, out, lse;
  Case() {
    q.assign(static_cast<size_t>(B * S * Hq * D), 0.25f);
    k.assign(static_cast<size_t>(B * S * Hkv * D), 0.5f);
    v.assign(k.size(), 1.0f);
    out.assign(q.size(), -7.0f);
    lse.assign(static_cast<size_t>(B * Hq * S), -7.0f);
  }
  ApproxParams Params(ApproxMethod method) {
    ApproxParams p;
    p.method = method;
    p.q = MakeView4(q.data(), DType::kF32, B, S, Hq, D);
    p.k = MakeView4(k.data(), DType::kF32, B, S, Hkv, D);
    p.v = MakeView4(v.data(), DType::kF32, B, S, Hkv, D);
    p.out = MakeView4(out.data(), DType::kF32, B, S, Hq, D);
    return p;
  }
  bool OutputUntouched() const {
    for (float x : out) {
      if (x != -7.0f) return false;
    }
    for (float x : lse) {
      if (x != -7.0f) return false;
    }
    return true;
  }
};

// Runs `p`, expects InvalidArgument mentioning `needle` and an untouched output.
void ExpectInvalid(Case& c, const ApproxParams& p, const std::string& needle) {
  const Status s = ApproxAttention(p, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  EXPECT_NE(s.message().find(needle), std::string::npos) << s.ToString();
  EXPECT_TRUE(c.OutputUntouched()) << ApproxMethodName(p.method);
}

TEST(ApproxAttention, MethodNamesRoundTrip) {
  for (ApproxMethod m : kMethods) {
    ApproxMethod parsed = ApproxMethod::kWersa;
    ASSERT_TRUE(ParseApproxMethod(ApproxMethodName(m), &parsed));
    EXPECT_EQ(parsed, m);
  }
  ApproxMethod unused;
  EXPECT_FALSE(ParseApproxMethod("Performer", &unused));
  EXPECT_FALSE(ParseApproxMethod("", &unused));
}

TEST(ApproxAttention, SharedChecksRefuseBadInputsForEveryMethod) {
  for (ApproxMethod m : kMethods) {
    SCOPED_TRACE(ApproxMethodName(m));
    Case c;
    ApproxParams p = c.Params(m);
    p.q.data = nullptr;
    ExpectInvalid(c, p, "q");

    p = c.Params(m);
    p.k.dtype = DType::kBF16;
    ExpectInvalid(c, p, "k: expected dtype f32");

    p = c.Params(m);
    p.v = MakeView4(c.v.data(), DType::kF32, c.B, c.S - 1, c.Hkv, c.D);
    ExpectInvalid(c, p, "v");

    p = c.Params(m);
    p.k = MakeView4(c.k.data(), DType::kF32, c.B, c.S, 3, c.D);
    ExpectInvalid(c, p, "k");

    p = c.Params(m);
    p.out = MakeView4(c.out.data(), DType::kF32, c.B, c.S, c.Hq, c.D / 2);
    ExpectInvalid(c, p, "out");

    p = c.Params(m);
    p.out.strides[2] = 0;  // heads written to one address
    ExpectInvalid(c, p, "out");

    p = c.Params(m);
    p.out = MakeView4(c.q.data(), DType::kF32, c.B, c.S, c.Hq, c.D);  // out aliases q
    {
      const Status s = ApproxAttention(p, Context());
      EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
    }

    p = c.Params(m);
    p.lse = MakeView3(c.lse.data(), DType::kF32, c.B, c.S, c.Hq);  // [B, S, H]: wrong order
    ExpectInvalid(c, p, "lse");

    p = c.Params(m);
    p.scale = std::numeric_limits<float>::infinity();
    ExpectInvalid(c, p, "scale");
  }
  Case c;
  ApproxParams p = c.Params(static_cast<ApproxMethod>(42));
  ExpectInvalid(c, p, "method");
}

TEST(ApproxAttention, BackwardChecksItsGradients) {
  Case c;
  std::vector<float> dout(c.q.size(), 1.0f), dq(c.q.size()), dk(c.k.size()), dv(c.k.size());
  ApproxBackwardParams b;
  b.forward = c.Params(ApproxMethod::kPerformer);
  b.dout = MakeView4(dout.data(), DType::kF32, c.B, c.S, c.Hq, c.D);
  b.dq = MakeView4(dq.data(), DType::kF32, c.B, c.S, c.Hq, c.D);
  b.dk = MakeView4(dk.data(), DType::kF32, c.B, c.S, c.Hkv, c.D);
  b.dv = MakeView4(dv.data(), DType::kF32, c.B, c.S, c.Hkv + 1, c.D);
  Status s = ApproxAttentionBackward(b, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("dv"), std::string::npos) << s.ToString();
  b.dv = MakeView4(dv.data(), DType::kF32, c.B, c.S, c.Hkv, c.D);
  b.dk = b.dq;  // dk overlapping dq
  b.dk.shape[2] = c.Hkv;
  s = ApproxAttentionBackward(b, Context());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.ToString();
  // The methods without a backward say so.
  b.dk = MakeView4(dk.data(), DType::kF32, c.B, c.S, c.Hkv, c.D);
  for (ApproxMethod m :
       {ApproxMethod::kHyper, ApproxMethod::kAgent, ApproxMethod::kRouting, ApproxMethod::kHiLo}) {
    b.forward.method = m;
    s = ApproxAttentionBackward(b, Context());
    EXPECT_EQ(s.code(), StatusCode::kUnimplemented) << ApproxMethodName(m);
  }
}

}  // namespace
}  // namespace tessera
