// fp64 reference for the exact attention forward: scalar, one query row at a time, every score
// of the row materialized, softmax with max subtraction, then P.V. It reads AttentionParams
// directly rather than the validated AttentionProblem, so the oracle shares no normalization
// code (strides, defaults, window resolution) with the kernels it checks.
#include "ref/attention_ref.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace tessera {
namespace ref {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Element `offset` (in elements) of a view, upcast exactly to double.
double Load(const TensorView& t, int64_t offset) {
  const char* base = static_cast<const char*>(t.data);
  switch (t.dtype) {
    case DType::kF32: {
      float x;
      std::memcpy(&x, base + offset * 4, sizeof(x));
      return x;
    }
    case DType::kBF16: {
      uint16_t x;
      std::memcpy(&x, base + offset * 2, sizeof(x));
      return BF16ToFloat(x);
    }
    case DType::kF16: {
      uint16_t x;
      std::memcpy(&x, base + offset * 2, sizeof(x));
      return F16ToFloat(x);
    }
  }
  return kNaN;
}

// A [B, S, H, D] (rank 4) or [T, H, D] (rank 3, varlen) view seen as tokens of heads of vectors.
struct TokenView {
  const TensorView* view = nullptr;
  int64_t batch_stride = 0;
  int64_t token_stride = 0;
  int64_t head_stride = 0;
  int64_t dim_stride = 0;
  int64_t tokens = 0;
  int64_t heads = 0;
  int64_t dim = 0;

  int64_t Offset(int64_t b, int64_t t, int64_t h, int64_t d) const {
    return b * batch_stride + t * token_stride + h * head_stride + d * dim_stride;
  }
};

TokenView MakeTokenView(const TensorView& t) {
  TokenView r;
  r.view = &t;
  const int first = t.rank == 4 ? 1 : 0;
  r.batch_stride = t.rank == 4 ? t.strides[0] : 0;
  r.token_stride = t.strides[first];
  r.head_stride = t.strides[first + 1];
  r.dim_stride = t.strides[first + 2];
  r.tokens = t.shape[first];
  r.heads = t.shape[first + 1];
  r.dim = t.shape[first + 2];
  return r;
}

// NaN-sticky max: a NaN logit must poison the row rather than be skipped by a comparison.
double MaxNaN(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return kNaN;
  return std::max(a, b);
}

}  // namespace

void AttentionForwardF64(const AttentionParams& p, double* out, double* lse) {
  const TokenView q = MakeTokenView(p.q);
  const TokenView k = MakeTokenView(p.k);
  const TokenView v = MakeTokenView(p.v);
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t num_seqs = varlen ? p.num_seqs : p.q.shape[0];
  const int64_t heads_q = q.heads;
  const int64_t dim = q.dim;
  const int64_t dim_v = v.dim;
  const int64_t group = heads_q / k.heads;  // valid params: k.heads >= 1 divides heads_q
  const int64_t total_q = q.tokens;         // rows per batch entry of the dense output

  // The scale parameter is a float, so the default is the float nearest 1/sqrt(D): the kernels
  // can use no other, and the oracle should measure their error, not this rounding.
  const double scale = p.scale.has_value()
                           ? static_cast<double>(*p.scale)
                           : static_cast<double>(static_cast<float>(1.0 / std::sqrt(double(dim))));
  const double softcap = p.softcap;
  const int64_t window_left = p.window_left;                   // -1: unbounded
  const int64_t window_right = p.causal ? 0 : p.window_right;  // causal caps the right side at 0
  const bool top_left = p.align == MaskAlign::kTopLeft;
  const bool alibi = p.alibi_slopes.data != nullptr;

  // Scratch for one (sequence, KV head): K and V rows upcast, then one query row at a time.
  std::vector<double> keys_buf, values_buf, row_q_buf, scores_buf;
  std::vector<char> visible_buf;
  std::vector<double> acc_buf(static_cast<size_t>(dim_v));
  double* acc = acc_buf.data();

  for (int64_t b = 0; b < num_seqs; ++b) {
    // Token ranges of this sequence along the token axis, and the batch index used to read it.
    const int64_t q_begin = varlen ? p.cu_seqlens_q[b] : 0;
    const int64_t q_len = varlen ? p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b] : q.tokens;
    const int64_t k_begin = varlen ? p.cu_seqlens_k[b] : 0;
    const int64_t k_len = varlen ? p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] : k.tokens;
    const int64_t read_b = varlen ? 0 : b;
    // Bottom-right alignment puts query i at position i + Sk - Sq, per sequence.
    const int64_t shift = top_left ? 0 : k_len - q_len;

    keys_buf.assign(static_cast<size_t>(k_len * dim), 0.0);
    values_buf.assign(static_cast<size_t>(k_len * dim_v), 0.0);
    scores_buf.assign(static_cast<size_t>(k_len), 0.0);
    visible_buf.assign(static_cast<size_t>(k_len), 0);
    row_q_buf.assign(static_cast<size_t>(dim), 0.0);
    double* keys = keys_buf.data();
    double* values = values_buf.data();
    double* scores = scores_buf.data();
    char* visible = visible_buf.data();
    double* row_q = row_q_buf.data();

    for (int64_t kv_head = 0; kv_head < k.heads; ++kv_head) {
      for (int64_t j = 0; j < k_len; ++j) {
        for (int64_t d = 0; d < dim; ++d) {
          keys[j * dim + d] = Load(p.k, k.Offset(read_b, k_begin + j, kv_head, d));
        }
        for (int64_t d = 0; d < dim_v; ++d) {
          values[j * dim_v + d] = Load(p.v, v.Offset(read_b, k_begin + j, kv_head, d));
        }
      }
      // GQA: query head h reads KV head h / group, i.e. heads [kv_head*group, (kv_head+1)*group).
      for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        double slope = 0.0;
        if (alibi) {
          const TensorView& a = p.alibi_slopes;
          slope = a.rank == 1 ? Load(a, h * a.strides[0])
                              : Load(a, b * a.strides[0] + h * a.strides[1]);
        }
        for (int64_t i = 0; i < q_len; ++i) {
          for (int64_t d = 0; d < dim; ++d) {
            row_q[d] = Load(p.q, q.Offset(read_b, q_begin + i, h, d));
          }
          const int64_t pos = i + shift;
          double row_max = -kInf;
          bool any_visible = false;
          for (int64_t j = 0; j < k_len; ++j) {
            const bool keep = (window_left < 0 || j >= pos - window_left) &&
                              (window_right < 0 || j <= pos + window_right);
            visible[j] = keep;
            if (!keep) {
              scores[j] = -kInf;  // a true -inf: a masked key gets probability exactly 0
              continue;
            }
            any_visible = true;
            double dot = 0.0;
            for (int64_t d = 0; d < dim; ++d) dot += row_q[d] * keys[j * dim + d];
            double s = scale * dot;
            if (softcap > 0.0) s = softcap * std::tanh(s / softcap);
            if (alibi) s -= slope * static_cast<double>(std::llabs(pos - j));
            scores[j] = s;
            row_max = MaxNaN(row_max, s);
          }

          double* out_row = varlen ? out + ((q_begin + i) * heads_q + h) * dim_v
                                   : out + ((b * total_q + i) * heads_q + h) * dim_v;
          double* lse_elem = nullptr;
          if (lse != nullptr) {
            lse_elem =
                varlen ? lse + h * total_q + q_begin + i : lse + (b * heads_q + h) * total_q + i;
          }
          if (!any_visible) {
            std::fill(out_row, out_row + dim_v, 0.0);
            if (lse_elem != nullptr) *lse_elem = -kInf;
            continue;
          }
          double sum = 0.0;
          std::fill(acc, acc + dim_v, 0.0);
          for (int64_t j = 0; j < k_len; ++j) {
            if (!visible[j]) continue;
            const double w = std::exp(scores[j] - row_max);
            sum += w;
            for (int64_t d = 0; d < dim_v; ++d) acc[d] += w * values[j * dim_v + d];
          }
          for (int64_t d = 0; d < dim_v; ++d) out_row[d] = acc[d] / sum;
          if (lse_elem != nullptr) *lse_elem = row_max + std::log(sum);
        }
      }
    }
  }
}

// The gradients of the materialized forward above, one query row at a time: recompute the row's
// scores exactly as the forward does, P = softmax, then
//   dV_j += P_j dO,  dP_j = dO . v_j,  D = sum_j P_j dP_j,  dS_j = P_j (dP_j - D),
//   softcap: dS_j *= 1 - tanh^2(u_j / c)  (u_j the pre-cap logit),
//   dq = scale * sum_j dS_j k_j,  dK_j += scale * dS_j q.
// Masked keys are never read and contribute nothing; dK / dV of a KV head sum its query heads.
void AttentionBackwardF64(const AttentionBackwardParams& bp, double* dq, double* dk, double* dv) {
  const AttentionParams& p = bp.forward;
  const TokenView q = MakeTokenView(p.q);
  const TokenView k = MakeTokenView(p.k);
  const TokenView v = MakeTokenView(p.v);
  const TokenView dout = MakeTokenView(bp.dout);
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t num_seqs = varlen ? p.num_seqs : p.q.shape[0];
  const int64_t heads_q = q.heads;
  const int64_t heads_kv = k.heads;
  const int64_t dim = q.dim;
  const int64_t dim_v = v.dim;
  const int64_t group = heads_q / heads_kv;
  const int64_t total_q = q.tokens;
  const int64_t total_k = k.tokens;

  const double scale = p.scale.has_value()
                           ? static_cast<double>(*p.scale)
                           : static_cast<double>(static_cast<float>(1.0 / std::sqrt(double(dim))));
  const double softcap = p.softcap;
  const int64_t window_left = p.window_left;
  const int64_t window_right = p.causal ? 0 : p.window_right;
  const bool top_left = p.align == MaskAlign::kTopLeft;
  const bool alibi = p.alibi_slopes.data != nullptr;

  std::vector<double> keys, values, row_q, row_do, probs, dcap, dscore;
  std::vector<char> visible;
  std::vector<double> grad_k, grad_v;  // [k_len, dim] / [k_len, dim_v] of one (sequence, KV head)

  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q_begin = varlen ? p.cu_seqlens_q[b] : 0;
    const int64_t q_len = varlen ? p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b] : q.tokens;
    const int64_t k_begin = varlen ? p.cu_seqlens_k[b] : 0;
    const int64_t k_len = varlen ? p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] : k.tokens;
    const int64_t read_b = varlen ? 0 : b;
    const int64_t shift = top_left ? 0 : k_len - q_len;
    const size_t nk = static_cast<size_t>(k_len);

    for (int64_t kv_head = 0; kv_head < heads_kv; ++kv_head) {
      keys.assign(nk * static_cast<size_t>(dim), 0.0);
      values.assign(nk * static_cast<size_t>(dim_v), 0.0);
      grad_k.assign(keys.size(), 0.0);
      grad_v.assign(values.size(), 0.0);
      for (int64_t j = 0; j < k_len; ++j) {
        for (int64_t d = 0; d < dim; ++d) {
          keys[static_cast<size_t>(j * dim + d)] =
              Load(p.k, k.Offset(read_b, k_begin + j, kv_head, d));
        }
        for (int64_t d = 0; d < dim_v; ++d) {
          values[static_cast<size_t>(j * dim_v + d)] =
              Load(p.v, v.Offset(read_b, k_begin + j, kv_head, d));
        }
      }

      for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        double slope = 0.0;
        if (alibi) {
          const TensorView& a = p.alibi_slopes;
          slope = a.rank == 1 ? Load(a, h * a.strides[0])
                              : Load(a, b * a.strides[0] + h * a.strides[1]);
        }
        for (int64_t i = 0; i < q_len; ++i) {
          row_q.assign(static_cast<size_t>(dim), 0.0);
          row_do.assign(static_cast<size_t>(dim_v), 0.0);
          for (int64_t d = 0; d < dim; ++d) {
            row_q[static_cast<size_t>(d)] = Load(p.q, q.Offset(read_b, q_begin + i, h, d));
          }
          for (int64_t d = 0; d < dim_v; ++d) {
            row_do[static_cast<size_t>(d)] = Load(bp.dout, dout.Offset(read_b, q_begin + i, h, d));
          }
          double* dq_row = varlen ? dq + ((q_begin + i) * heads_q + h) * dim
                                  : dq + ((b * total_q + i) * heads_q + h) * dim;
          std::fill(dq_row, dq_row + dim, 0.0);

          // Scores, exactly as the forward: softcap, ALiBi, mask (a true -inf).
          const int64_t pos = i + shift;
          probs.assign(nk, 0.0);
          dcap.assign(nk, 1.0);  // d(capped logit) / d(scaled logit)
          visible.assign(nk, 0);
          double row_max = -kInf;
          bool any_visible = false;
          for (int64_t j = 0; j < k_len; ++j) {
            const bool keep = (window_left < 0 || j >= pos - window_left) &&
                              (window_right < 0 || j <= pos + window_right);
            if (!keep) continue;
            visible[static_cast<size_t>(j)] = 1;
            any_visible = true;
            double dot = 0.0;
            for (int64_t d = 0; d < dim; ++d) {
              dot += row_q[static_cast<size_t>(d)] * keys[static_cast<size_t>(j * dim + d)];
            }
            double s = scale * dot;
            if (softcap > 0.0) {
              const double t = std::tanh(s / softcap);
              s = softcap * t;
              dcap[static_cast<size_t>(j)] = 1.0 - t * t;
            }
            if (alibi) s -= slope * static_cast<double>(std::llabs(pos - j));
            probs[static_cast<size_t>(j)] = s;
            row_max = MaxNaN(row_max, s);
          }
          if (!any_visible) continue;  // dq row stays 0, nothing reaches dK / dV

          // P = softmax over the visible keys.
          double sum = 0.0;
          for (int64_t j = 0; j < k_len; ++j) {
            if (!visible[static_cast<size_t>(j)]) continue;
            const double w = std::exp(probs[static_cast<size_t>(j)] - row_max);
            probs[static_cast<size_t>(j)] = w;
            sum += w;
          }
          for (int64_t j = 0; j < k_len; ++j) {
            if (visible[static_cast<size_t>(j)]) probs[static_cast<size_t>(j)] /= sum;
          }

          // dP_j = dO . v_j and D = sum_j P_j dP_j (= dO . O).
          dscore.assign(nk, 0.0);
          double delta = 0.0;
          for (int64_t j = 0; j < k_len; ++j) {
            if (!visible[static_cast<size_t>(j)]) continue;
            double dp = 0.0;
            for (int64_t d = 0; d < dim_v; ++d) {
              dp += row_do[static_cast<size_t>(d)] * values[static_cast<size_t>(j * dim_v + d)];
            }
            dscore[static_cast<size_t>(j)] = dp;
            delta += probs[static_cast<size_t>(j)] * dp;
          }

          for (int64_t j = 0; j < k_len; ++j) {
            const size_t js = static_cast<size_t>(j);
            if (!visible[js]) continue;
            const double pj = probs[js];
            // dS with respect to the scaled logit u = scale * q.k (softcap chain rule).
            const double ds = pj * (dscore[js] - delta) * dcap[js];
            for (int64_t d = 0; d < dim_v; ++d) {
              grad_v[static_cast<size_t>(j * dim_v + d)] += pj * row_do[static_cast<size_t>(d)];
            }
            for (int64_t d = 0; d < dim; ++d) {
              const size_t jd = static_cast<size_t>(j * dim + d);
              dq_row[d] += scale * ds * keys[jd];
              grad_k[jd] += scale * ds * row_q[static_cast<size_t>(d)];
            }
          }
        }
      }

      for (int64_t j = 0; j < k_len; ++j) {
        const int64_t row = varlen ? k_begin + j : b * total_k + j;
        double* dk_row = dk + (row * heads_kv + kv_head) * dim;
        double* dv_row = dv + (row * heads_kv + kv_head) * dim_v;
        for (int64_t d = 0; d < dim; ++d) dk_row[d] = grad_k[static_cast<size_t>(j * dim + d)];
        for (int64_t d = 0; d < dim_v; ++d) {
          dv_row[d] = grad_v[static_cast<size_t>(j * dim_v + d)];
        }
      }
    }
  }
}

}  // namespace ref
}  // namespace tessera
