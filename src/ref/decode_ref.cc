// SPDX-License-Identifier: Apache-2.0
// fp64 reference for decode: one (sequence, head, query row) at a time, every score of the row
// materialized, softmax with max subtraction, then P.V. The K/V of a sequence come from ReadKV
// (f32, exactly the values the cache holds after dequantization); the arithmetic, operation
// order included, mirrors ref::AttentionForwardF64, so both references agree bitwise on the same
// keys and the decode tests can cross-check the two oracles.
#include "ref/decode_ref.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "core/element.h"
#include "kvcache/kv_quant.h"
#include "tessera/kv_cache.h"

namespace tessera {
namespace ref {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Element `offset` (in elements) of a view, upcast exactly.
float Load(const TensorView& t, int64_t offset) { return LoadElement(t.dtype, t.data, offset); }

// NaN-sticky max: a NaN logit must poison the row rather than be skipped by a comparison.
double MaxNaN(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return kNaN;
  return std::max(a, b);
}

// ALiBi slope of (sequence b, query head h); 0 when ALiBi is off.
double AlibiSlope(const TensorView& a, int64_t b, int64_t h) {
  if (a.data == nullptr) return 0.0;
  return a.rank == 1 ? Load(a, h * a.strides[0]) : Load(a, b * a.strides[0] + h * a.strides[1]);
}

// The query the int8 / int4 kernels use in place of `row` (DecodeRefOptions::quantize_query):
// quantized to int8 in the channel-normalized space of the keys, then mapped back.
void QuantizeQuery(const float* row, const float* norm, int64_t dim, double* out) {
  std::vector<float> scaled(static_cast<size_t>(dim));
  float max_abs = 0.0f;
  for (int64_t c = 0; c < dim; ++c) {
    scaled[static_cast<size_t>(c)] = row[c] * norm[c];
    max_abs = std::max(max_abs, std::fabs(scaled[static_cast<size_t>(c)]));
  }
  const float sigma = max_abs / 127.0f;
  for (int64_t c = 0; c < dim; ++c) {
    const float q8 = sigma == 0.0f ? 0.0f : std::nearbyint(scaled[static_cast<size_t>(c)] / sigma);
    out[c] = q8 == 0.0f ? 0.0
                        : static_cast<double>(sigma) * static_cast<double>(q8) /
                              static_cast<double>(norm[c]);
  }
}

}  // namespace

void DecodeF64WithOptions(const DecodeParams& p, const DecodeRefOptions& options, double* out,
                          double* lse, double* magnitude) {
  const TensorView& q = p.q;
  const int64_t batch = q.shape[0], num_q = q.shape[1], heads_q = q.shape[2], dim = q.shape[3];
  const int64_t heads_kv = p.cache.num_kv_heads;
  const int64_t group = heads_q / heads_kv;  // valid params: heads_kv >= 1 divides heads_q
  // The scale parameter is a float, so the default is the float nearest 1/sqrt(D): the kernels
  // can use no other, and the oracle should measure their error, not this rounding.
  const double scale = p.scale.has_value()
                           ? static_cast<double>(*p.scale)
                           : static_cast<double>(static_cast<float>(1.0 / std::sqrt(double(dim))));
  const double softcap = p.softcap;
  const bool alibi = p.alibi_slopes.data != nullptr;
  const bool quantize = options.quantize_query && KVDTypeIsQuantized(p.cache.dtype);
  const bool quant_kv = KVDTypeIsQuantized(p.cache.dtype);

  std::vector<float> keys, values, qrow(static_cast<size_t>(dim));
  std::vector<double> row_q(static_cast<size_t>(dim)), scores, acc(static_cast<size_t>(dim)),
      acc_abs(static_cast<size_t>(dim));
  std::vector<char> visible;

  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = kvquant::SeqLens(p.kv)[b];
    keys.assign(static_cast<size_t>(len * heads_kv * dim), 0.0f);
    values.assign(keys.size(), 0.0f);
    bool read_ok = true;
    if (len > 0) {
      ReadKVParams read;
      read.cache = p.cache;
      read.batch = p.kv;
      read.b = b;
      read.k_out = MakeView3(keys.data(), DType::kF32, len, heads_kv, dim);
      read.v_out = MakeView3(values.data(), DType::kF32, len, heads_kv, dim);
      const Status st = ReadKV(read, Context());
      read_ok = st.ok();
    }
    scores.assign(static_cast<size_t>(len), 0.0);
    visible.assign(static_cast<size_t>(len), 0);

    for (int64_t h = 0; h < heads_q; ++h) {
      const int64_t kv_head = h / group;
      const double slope = AlibiSlope(p.alibi_slopes, b, h);
      for (int64_t i = 0; i < num_q; ++i) {
        const int64_t pos = len - num_q + i;
        double* out_row = out + ((b * num_q + i) * heads_q + h) * dim;
        double* lse_elem = lse != nullptr ? lse + (b * heads_q + h) * num_q + i : nullptr;
        double* mag_row =
            magnitude != nullptr ? magnitude + ((b * num_q + i) * heads_q + h) * dim : nullptr;
        if (!read_ok) {
          std::fill(out_row, out_row + dim, kNaN);
          if (mag_row != nullptr) std::fill(mag_row, mag_row + dim, kNaN);
          if (lse_elem != nullptr) *lse_elem = kNaN;
          continue;
        }
        for (int64_t d = 0; d < dim; ++d) {
          qrow[static_cast<size_t>(d)] =
              Load(q, b * q.strides[0] + i * q.strides[1] + h * q.strides[2] + d * q.strides[3]);
          row_q[static_cast<size_t>(d)] = qrow[static_cast<size_t>(d)];
        }
        if (quantize) {
          QuantizeQuery(qrow.data(), p.cache.k_channel_scales + kv_head * dim, dim, row_q.data());
        }

        // Scores: scale * q.k, softcap, ALiBi, then a true -inf for masked keys.
        double max = -kInf;
        bool any_visible = false;
        for (int64_t j = 0; j < len; ++j) {
          const bool keep =
              (!p.causal || j <= pos) && (p.window_left < 0 || j >= pos - p.window_left);
          visible[static_cast<size_t>(j)] = keep;
          if (!keep) {
            scores[static_cast<size_t>(j)] = -kInf;
            continue;
          }
          any_visible = true;
          const float* key = keys.data() + (j * heads_kv + kv_head) * dim;
          double dot = 0.0;
          for (int64_t d = 0; d < dim; ++d) dot += row_q[static_cast<size_t>(d)] * key[d];
          double s = scale * dot;
          if (softcap > 0.0) s = softcap * std::tanh(s / softcap);
          if (alibi) s -= slope * static_cast<double>(std::llabs(pos - j));
          scores[static_cast<size_t>(j)] = s;
          max = MaxNaN(max, s);
        }
        if (!any_visible) {
          std::fill(out_row, out_row + dim, 0.0);
          if (options.probs != nullptr) {
            double* prob_row = options.probs + ((b * heads_q + h) * num_q + i) * options.probs_keys;
            std::fill(prob_row, prob_row + len, 0.0);
          }
          if (mag_row != nullptr) std::fill(mag_row, mag_row + dim, 0.0);
          if (lse_elem != nullptr) *lse_elem = -kInf;
          continue;
        }
        double sum = 0.0;
        std::fill(acc.begin(), acc.end(), 0.0);
        std::fill(acc_abs.begin(), acc_abs.end(), 0.0);
        for (int64_t j = 0; j < len; ++j) {
          if (!visible[static_cast<size_t>(j)]) continue;
          const double w = std::exp(scores[static_cast<size_t>(j)] - max);
          sum += w;
          const float* value = values.data() + (j * heads_kv + kv_head) * dim;
          for (int64_t d = 0; d < dim; ++d) acc[static_cast<size_t>(d)] += w * value[d];
          if (mag_row != nullptr) {
            // A quantized value is n * (min + step * code); the size of its terms (n * |min|
            // among them) sets the fp32 rounding of any computation of it.
            double min_term = 0.0;
            if (quant_kv) {
              const int64_t page = kvquant::PageOfToken(p.kv, b, j, p.cache.page_size);
              const int64_t row = kvquant::RowIndex(p.cache, page, j % p.cache.page_size, kv_head);
              min_term = std::fabs(static_cast<double>(p.cache.v_scales[2 * row + 1]));
            }
            const float* norm = quant_kv ? p.cache.v_channel_scales + kv_head * dim : nullptr;
            for (int64_t d = 0; d < dim; ++d) {
              acc_abs[static_cast<size_t>(d)] +=
                  w * (std::fabs(value[d]) + (quant_kv ? norm[d] * min_term : 0.0));
            }
          }
        }
        for (int64_t d = 0; d < dim; ++d) out_row[d] = acc[static_cast<size_t>(d)] / sum;
        if (options.probs != nullptr) {
          double* prob_row = options.probs + ((b * heads_q + h) * num_q + i) * options.probs_keys;
          for (int64_t j = 0; j < len; ++j) {
            prob_row[j] = visible[static_cast<size_t>(j)]
                              ? std::exp(scores[static_cast<size_t>(j)] - max) / sum
                              : 0.0;
          }
        }
        if (mag_row != nullptr) {
          for (int64_t d = 0; d < dim; ++d) mag_row[d] = acc_abs[static_cast<size_t>(d)] / sum;
        }
        if (lse_elem != nullptr) *lse_elem = max + std::log(sum);
      }
    }
  }
}

void DecodeF64(const DecodeParams& params, double* out, double* lse) {
  DecodeF64WithOptions(params, DecodeRefOptions{}, out, lse);
}

void DecodeF64QuantizedQuery(const DecodeParams& params, double* out, double* lse) {
  DecodeRefOptions options;
  options.quantize_query = true;
  DecodeF64WithOptions(params, options, out, lse);
}

}  // namespace ref
}  // namespace tessera
