// TEMPORARY shell: validation + reference path; the SIMD kernel lands next.
#include <vector>
#include <cmath>
#include <limits>

#include "attention/attention_problem.h"
#include "ref/attention_ref.h"

namespace tessera {

Status AttentionForward(const AttentionParams& params, const Context& ctx) {
  AttentionProblem prob;
  Status s = ValidateAttention(params, &prob);
  if (!s.ok()) return s;
  (void)ctx;
  return Status::Unimplemented("kernel not yet written");
}

}  // namespace tessera
