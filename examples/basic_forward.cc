// SPDX-License-Identifier: Apache-2.0
// Causal attention over one batch of 16 tokens, 4 heads of dimension 64, with tessera's public
// API only: fill Q, K, V, describe them as [batch, seq, heads, head_dim] views, call
// AttentionForward, check the Status.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "tessera/tessera.h"

int main() {
  const int64_t batch = 1, seq = 16, heads = 4, dim = 64;
  const size_t n = static_cast<size_t>(batch * seq * heads * dim);
  std::vector<float> q(n), k(n), v(n), out(n);
  for (size_t i = 0; i < n; ++i) {
    q[i] = std::sin(0.10f * static_cast<float>(i));
    k[i] = std::cos(0.07f * static_cast<float>(i));
    v[i] = std::sin(0.03f * static_cast<float>(i) + 1.0f);
  }

  tessera::AttentionParams params;
  params.q = tessera::MakeView4(q.data(), tessera::DType::kF32, batch, seq, heads, dim);
  params.k = tessera::MakeView4(k.data(), tessera::DType::kF32, batch, seq, heads, dim);
  params.v = tessera::MakeView4(v.data(), tessera::DType::kF32, batch, seq, heads, dim);
  params.out = tessera::MakeView4(out.data(), tessera::DType::kF32, batch, seq, heads, dim);
  params.causal = true;  // scale defaults to 1/sqrt(dim)

  tessera::Context ctx;  // all hardware threads, fastest path
  const tessera::Status status = tessera::AttentionForward(params, ctx);
  if (!status.ok()) {
    std::fprintf(stderr, "AttentionForward failed: %s\n", status.ToString().c_str());
    return 1;
  }

  // Under the causal mask the first query sees only the first key, so its output is that
  // key's value row.
  std::printf("out[0, 0, 0, 0] = %.6f (v[0, 0, 0, 0] = %.6f)\n", out[0], v[0]);
  if (std::fabs(out[0] - v[0]) > 1e-6f) {
    std::fprintf(stderr, "unexpected output for the first query\n");
    return 1;
  }
  return 0;
}
