// SPDX-License-Identifier: Apache-2.0
// Agent Attention (Han et al. 2023), non-causal.
//
// What it approximates: O = softmax(scale Q K^T) V, whose N x N score matrix is replaced by a
// product of two thin ones through n << N agent tokens A (per head):
//   stage 1, aggregation:  V_A = softmax(scale A K^T + agent_bias) V        [n, D]
//   stage 2, broadcast:    O   = softmax(scale Q A^T + query_bias) V_A      [S, D]
//   plus dwc (the depthwise-conv term, computed by the caller) added to O when given.
// The agents are Q average-pooled over n contiguous segments of the sequence: agent i averages
// query rows [floor(i S / n), floor((i + 1) S / n)), so segments differ in length by at most one
// row and every segment has at least one row (n <= S); the sum runs in double, in row order.
//
// Error: agent attention is a model of its own (trained with its biases and dwc), not an
// estimator that converges to softmax attention: even at n = S (A = Q) it computes the
// composition softmax(scale Q Q^T) softmax(scale Q K^T) V. Its distance to softmax attention on
// the same inputs is largest where attention is peaked (a query focused on a few keys is
// blurred over the agents' segments) and shrinks where attention is broad; docs/approx.md has
// the measured rel_error against n and S.
//
// How and cost: both stages are exact attentions and run through the tiled exact kernel
// (AttentionForward), stage 1 with n queries over the S keys, stage 2 with the S queries over
// n keys; the biases ride on its additive dense mask. Nothing of size S x S or S x n is
// materialized beyond the kernel's tiles; A and V_A are n x D per head (n = 64, D = 128: 32 KiB
// each), small enough to stay in cache while stage 2 streams Q. Time O(S n D) per head for each
// stage plus O(S D) for the pooling: linear in S at fixed n. GQA: stage 1 reads K/V per KV head.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "approx/approx_internal.h"
#include "core/check.h"
#include "core/parallel.h"
#include "tessera/attention.h"

namespace tessera {
namespace approx {
namespace {

std::string Str(int64_t x) { return std::to_string(x); }

Status Invalid(const char* name, const std::string& what, const std::string& got) {
  return Status::InvalidArgument(Expected(name, what, got));
}

// An optional bias [1 or Hq, rows, cols] f32; on success *dense is the kernel's additive dense
// mask [1, 1 or Hq, rows, cols] over the same memory (unset when the bias is unset).
Status CheckBias(const char* name, const TensorView& t, int64_t hq, int64_t rows, int64_t cols,
                 TensorView* dense) {
  *dense = TensorView();
  if (t.data == nullptr) return Status::Ok();
  if (t.dtype != DType::kF32) return Invalid(name, "dtype f32", DTypeName(t.dtype));
  const int64_t shape[3] = {-1, rows, cols};
  const std::string what = "[1 or " + Str(hq) + ", " + Str(rows) + ", " + Str(cols) + "]";
  Status s = CheckShape(name, t, 3, shape, what, false);
  if (!s.ok()) return s;
  if (t.shape[0] != 1 && t.shape[0] != hq) return Invalid(name, "shape " + what, ShapeString(t));
  *dense = t;
  dense->rank = 4;
  dense->shape[0] = 1;
  dense->strides[0] = 0;
  for (int i = 1; i < 4; ++i) {
    dense->shape[i] = t.shape[i - 1];
    dense->strides[i] = t.strides[i - 1];
  }
  return Status::Ok();
}

}  // namespace

Status AgentForward(const ApproxParams& params, const ApproxShape& shape, const Context& ctx) {
  const AgentOptions& o = params.agent;
  const int64_t B = shape.batch, S = shape.seq, Hq = shape.heads_q, D = shape.dim;
  const int64_t n = o.agents;
  if (params.causal) {
    return Invalid("causal",
                   "false (agent attention is non-causal: each agent pools queries "
                   "from its whole segment)",
                   "true");
  }
  if (params.lse.data != nullptr) {
    return Invalid("lse", "unset (agent attention composes two softmaxes and has no single LSE)",
                   "a view");
  }
  if (n < 1 || n > S) return Invalid("agent.agents", "1..S = 1.." + Str(S), Str(n));
  TensorView agent_bias, query_bias;
  Status s = CheckBias("agent.agent_bias", o.agent_bias, Hq, n, S, &agent_bias);
  if (s.ok()) s = CheckBias("agent.query_bias", o.query_bias, Hq, S, n, &query_bias);
  if (!s.ok()) return s;
  if (o.dwc.data != nullptr) {
    if (o.dwc.dtype != DType::kF32)
      return Invalid("agent.dwc", "dtype f32", DTypeName(o.dwc.dtype));
    const int64_t dwc_shape[4] = {B, S, Hq, D};
    s = CheckShape("agent.dwc", o.dwc, 4, dwc_shape, "[B, S, Hq, D]", false);
    if (!s.ok()) return s;
  }
  s = CheckDisjoint({ViewRegion("out", params.out)},
                    {ViewRegion("agent.agent_bias", o.agent_bias),
                     ViewRegion("agent.query_bias", o.query_bias), ViewRegion("agent.dwc", o.dwc)});
  if (!s.ok()) return s;

  const int32_t threads = ResolveThreads(ctx);
  const int64_t row = Hq * D;  // one agent token, every head, contiguous
  std::vector<float> agents(static_cast<size_t>(B * n * row));
  std::vector<float> agent_out(agents.size());

  // A: the mean of each segment's query rows, summed in double in row order (one task per agent).
  const TensorView& q = params.q;
  const float* qd = static_cast<const float*>(q.data);
  ParallelFor(threads, B * n, [&](int64_t task, int32_t) {
    const int64_t b = task / n, i = task % n;
    const int64_t lo = i * S / n, hi = (i + 1) * S / n;
    std::vector<double> acc(static_cast<size_t>(row), 0.0);
    for (int64_t t = lo; t < hi; ++t) {
      for (int64_t h = 0; h < Hq; ++h) {
        const float* src = qd + b * q.strides[0] + t * q.strides[1] + h * q.strides[2];
        double* dst = acc.data() + h * D;
        for (int64_t d = 0; d < D; ++d) dst[d] += src[d * q.strides[3]];
      }
    }
    const double inv = 1.0 / static_cast<double>(hi - lo);
    float* a = agents.data() + task * row;
    for (int64_t c = 0; c < row; ++c) a[c] = static_cast<float>(acc[static_cast<size_t>(c)] * inv);
  });

  const TensorView agents_view = MakeView4(agents.data(), DType::kF32, B, n, Hq, D);
  const TensorView agent_out_view = MakeView4(agent_out.data(), DType::kF32, B, n, Hq, D);

  // Stage 1: the agents attend to every key (GQA: K/V per KV head).
  AttentionParams a1;
  a1.q = agents_view;
  a1.k = params.k;
  a1.v = params.v;
  a1.out = agent_out_view;
  a1.scale = shape.scale;
  a1.mask.dense = agent_bias;
  s = AttentionForward(a1, ctx);
  if (!s.ok()) return s;

  // Stage 2: every query attends to the n agents of its head.
  AttentionParams a2;
  a2.q = params.q;
  a2.k = agents_view;
  a2.v = agent_out_view;
  a2.out = params.out;
  a2.scale = shape.scale;
  a2.mask.dense = query_bias;
  s = AttentionForward(a2, ctx);
  if (!s.ok()) return s;

  if (o.dwc.data != nullptr) {
    const TensorView& w = o.dwc;
    const TensorView& out = params.out;
    const float* wd = static_cast<const float*>(w.data);
    float* od = static_cast<float*>(out.data);
    ParallelFor(threads, B * S, [&](int64_t task, int32_t) {
      const int64_t b = task / S, t = task % S;
      for (int64_t h = 0; h < Hq; ++h) {
        const float* src = wd + b * w.strides[0] + t * w.strides[1] + h * w.strides[2];
        float* dst = od + b * out.strides[0] + t * out.strides[1] + h * out.strides[2];
        for (int64_t d = 0; d < D; ++d) dst[d * out.strides[3]] += src[d * w.strides[3]];
      }
    });
  }
  return Status::Ok();
}

}  // namespace approx
}  // namespace tessera
