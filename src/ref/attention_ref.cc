// SPDX-License-Identifier: Apache-2.0
// fp64 reference for the exact attention forward: scalar, one query row at a time, every score
// of the row materialized, softmax with max subtraction, then P.V. It reads AttentionParams
// directly rather than the validated AttentionProblem, so the oracle shares no normalization
// code (strides, defaults, window resolution) with the kernels it checks.
//
// Masks (tessera/mask.h) are evaluated one (query, key) pair at a time, straight from the
// formulas of the header and docs/algorithms.md §4: no tile classification, no precomputed ranges,
// nothing shared with the kernels' mask policies. MaskBias is the single definition: the
// forward, the backward and MaterializeMask all call it.
#include "ref/attention_ref.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "core/element.h"
#include "core/i32_view.h"

namespace tessera {
namespace ref {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Element `offset` (in elements) of a view, upcast exactly to double.
double Load(const TensorView& t, int64_t offset) { return LoadElementF64(t.dtype, t.data, offset); }

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

// The options of a call, resolved once: what the forward and backward references both read.
struct Options {
  double scale = 1.0;
  double softcap = 0.0;
  int64_t window_left = -1;  // -1: unbounded
  int64_t window_right = -1;
  bool top_left = false;
  bool alibi = false;
  bool sigmoid = false;
  double sigmoid_bias = 0.0;
  // A dense f32 mask: its value is added to every visible logit.
  bool additive = false;
};

Options ResolveOptions(const AttentionParams& p, int64_t dim) {
  Options o;
  // The scale parameter is a float, so the default is the float nearest 1/sqrt(D): the kernels
  // can use no other, and the oracle should measure their error, not this rounding.
  o.scale = p.scale.has_value()
                ? static_cast<double>(*p.scale)
                : static_cast<double>(static_cast<float>(1.0 / std::sqrt(double(dim))));
  o.softcap = p.softcap;
  o.window_left = p.window_left;
  o.window_right = p.causal ? 0 : p.window_right;  // causal caps the right side at 0
  o.top_left = p.align == MaskAlign::kTopLeft;
  o.alibi = p.alibi_slopes.data != nullptr;
  o.sigmoid = p.mask.score == ScoreFunction::kSigmoid;
  o.sigmoid_bias = p.mask.sigmoid_bias;
  o.additive = p.mask.dense.data != nullptr && p.mask.dense.dtype == DType::kF32;
  return o;
}

// x mod m in [0, m) for any sign of x (m > 0).
int64_t Mod(int64_t x, int64_t m) { return ((x % m) + m) % m; }

// The causal / sliding-window test of query position x against key position y.
bool InWindow(const Options& o, int64_t x, int64_t y) {
  return (o.window_left < 0 || y >= x - o.window_left) &&
         (o.window_right < 0 || y <= x + o.window_right);
}

// Element [i0, i1, ...] of a mask view of rank `rank`, with every dim of extent 1 broadcast.
double LoadBroadcast(const TensorView& t, const int64_t* index) {
  int64_t offset = 0;
  for (int d = 0; d < t.rank; ++d) offset += (t.shape[d] == 1 ? 0 : index[d]) * t.strides[d];
  return Load(t, offset);
}

// base(i, j) of mask.h: the window (inside the token groups, rolled for shifted heads), or a
// sink key the window's right bound allows, or a prefix key.
bool BaseVisible(const AttentionParams& p, const Options& o, int64_t heads_q, int64_t k_len,
                 int64_t h, int64_t pos, int64_t j) {
  const MaskParams& m = p.mask;
  bool window;
  if (m.group_size > 0) {
    // LongLoRA rolls Q, K and V by -G/2 for the shifted heads: the token at original index x
    // sits at rolled index x - G/2 (mod Sk). Groups, causality and the window are all judged
    // between rolled indices; the output stays at the query's own original index.
    const int64_t g = m.group_size;
    const bool shifted = m.shift_half_heads && h >= heads_q / 2;
    const int64_t x = shifted ? Mod(pos - g / 2, k_len) : pos;
    const int64_t y = shifted ? Mod(j - g / 2, k_len) : j;
    window = x / g == y / g && InWindow(o, x, y);
  } else {
    window = InWindow(o, pos, j);
  }
  const bool sink = j < m.sink_tokens && (o.window_right < 0 || j <= pos + o.window_right);
  const bool prefix = j < m.prefix_len;
  return window || sink || prefix;
}

// One axis of neighborhood attention (docs/algorithms.md §4.2): query coordinate x, key coordinate
// y on an axis of length L with window K, dilation d, stride s.
bool NeighborhoodAxis(int64_t L, int64_t K, int64_t d, int64_t s, bool causal, int64_t x,
                      int64_t y) {
  if (x % d != y % d) return false;  // different dilation groups never interact
  const int64_t group = x % d;
  const int64_t xg = x / d, yg = y / d;  // coordinates inside the dilation group
  const int64_t group_len = L / d + (group < L % d ? 1 : 0);
  if (causal) {
    const int64_t leader = std::min(xg / s * s + s - 1, group_len - 1);
    return yg <= xg && leader - yg < K;
  }
  const int64_t wl = K / 2, wr = K / 2 + K % 2 - 1;
  const int64_t leader = std::min(xg / s * s + s / 2, group_len - 1);
  // The window shifts (never shrinks) at the borders.
  const int64_t centre = std::max(wl, std::min(leader, group_len - 1 - wr));
  return centre - wl <= yg && yg <= centre + wr;
}

// Query i against key j on the neighborhood grid (Sq == Sk, so indices are positions): AND over
// the axes of their row-major coordinates, the last axis fastest.
bool NeighborhoodVisible(const NeighborhoodMask& n, int64_t i, int64_t j) {
  for (int a = n.rank - 1; a >= 0; --a) {
    const int64_t L = n.grid[a];
    if (!NeighborhoodAxis(L, n.window[a], n.dilation[a], n.stride[a], n.causal[a], i % L, j % L)) {
      return false;
    }
    i /= L;
    j /= L;
  }
  return true;
}

// Node t of the draft tree sees key j: every prefix key, then the nodes on its path to the root.
bool TreeVisible(const MaskParams& m, int64_t k_len, int64_t t, int64_t j) {
  const int64_t prefix = k_len - m.tree_parents.shape[0];
  if (j < prefix) return true;
  const int64_t node = j - prefix;
  const int32_t* parents = I32Data(m.tree_parents);
  for (int64_t a = t; a >= 0; a = parents[a]) {
    if (a == node) return true;
  }
  return false;
}

// The mask of key j for query row i (sequence b, query head h, position i + shift), as the bias
// its logit receives: 0 (visible), -inf (hidden) or the dense f32 mask's value. Every field of
// MaskParams combines by AND, exactly as written in tessera/mask.h.
double MaskBias(const AttentionParams& p, const Options& o, int64_t heads_q, int64_t k_len,
                int64_t b, int64_t h, int64_t i, int64_t j, int64_t shift) {
  const MaskParams& m = p.mask;
  const int64_t pos = i + shift;
  if (!BaseVisible(p, o, heads_q, k_len, h, pos, j)) return -kInf;
  if (m.blocks.data != nullptr) {
    const int64_t index[4] = {b, h, i / m.block_q, j / m.block_k};
    if (LoadBroadcast(m.blocks, index) == 0.0) return -kInf;
  }
  if (m.neighborhood.rank != 0 && !NeighborhoodVisible(m.neighborhood, i, j)) return -kInf;
  if (m.document_ids.data != nullptr) {
    // A query outside [0, Sk) has no document, hence no key.
    if (pos < 0 || pos >= k_len) return -kInf;
    const TensorView& d = m.document_ids;
    const int64_t at_key[2] = {b, j}, at_query[2] = {b, pos};
    const double doc_key = d.rank == 1 ? Load(d, j * d.strides[0]) : LoadBroadcast(d, at_key);
    const double doc_query = d.rank == 1 ? Load(d, pos * d.strides[0]) : LoadBroadcast(d, at_query);
    if (doc_key != doc_query) return -kInf;
  }
  if (m.tree_parents.data != nullptr && !TreeVisible(m, k_len, i, j)) return -kInf;
  if (m.dense.data != nullptr) {
    const TensorView& t = m.dense;
    const int64_t index4[4] = {b, h, i, j}, index2[2] = {i, j};
    const double x = LoadBroadcast(t, t.rank == 4 ? index4 : index2);
    if (t.dtype != DType::kF32) return x != 0.0 ? 0.0 : -kInf;
    return x;  // additive; -inf hides the key
  }
  return 0.0;
}

// Sequence b: its token ranges along the token axes, the batch index to read it with, and the
// shift that puts query i at position i + shift.
struct Sequence {
  int64_t q_begin, q_len, k_begin, k_len, read_b, shift;
};

Sequence SequenceOf(const AttentionParams& p, const TokenView& q, const TokenView& k,
                    const Options& o, int64_t b) {
  const int32_t* cu_q = I32Data(p.cu_seqlens_q);
  const int32_t* cu_k = I32Data(p.cu_seqlens_k);
  const bool varlen = cu_q != nullptr;
  Sequence s;
  s.q_begin = varlen ? cu_q[b] : 0;
  s.q_len = varlen ? cu_q[b + 1] - cu_q[b] : q.tokens;
  s.k_begin = varlen ? cu_k[b] : 0;
  s.k_len = varlen ? cu_k[b + 1] - cu_k[b] : k.tokens;
  s.read_b = varlen ? 0 : b;
  // Bottom-right alignment puts query i at position i + Sk - Sq, per sequence.
  s.shift = o.top_left ? 0 : s.k_len - s.q_len;
  return s;
}

// ALiBi slope of (sequence b, query head h); 0 when ALiBi is off.
double AlibiSlope(const AttentionParams& p, int64_t b, int64_t h) {
  const TensorView& a = p.alibi_slopes;
  if (a.data == nullptr) return 0.0;
  return a.rank == 1 ? Load(a, h * a.strides[0]) : Load(a, b * a.strides[0] + h * a.strides[1]);
}

// K and V rows of (sequence, KV head), upcast: keys [k_len][dim], values [k_len][dim_v].
void LoadKeysValues(const AttentionParams& p, const TokenView& k, const TokenView& v,
                    const Sequence& s, int64_t kv_head, std::vector<double>* keys,
                    std::vector<double>* values) {
  keys->assign(static_cast<size_t>(s.k_len * k.dim), 0.0);
  values->assign(static_cast<size_t>(s.k_len * v.dim), 0.0);
  for (int64_t j = 0; j < s.k_len; ++j) {
    for (int64_t d = 0; d < k.dim; ++d) {
      (*keys)[static_cast<size_t>(j * k.dim + d)] =
          Load(p.k, k.Offset(s.read_b, s.k_begin + j, kv_head, d));
    }
    for (int64_t d = 0; d < v.dim; ++d) {
      (*values)[static_cast<size_t>(j * v.dim + d)] =
          Load(p.v, v.Offset(s.read_b, s.k_begin + j, kv_head, d));
    }
  }
}

// One query row's scores, the definition both references share: s_j = scale * q.k_j, then
// softcap, then ALiBi, then the dense additive mask, and a true -inf for masked keys (probability
// exactly 0). Fills scores[j], visible[j] and, when dcap is not null, dcap[j] = d(capped logit) /
// d(scaled logit). Returns the NaN-sticky max over visible keys and whether any key is visible.
struct RowMax {
  double max;
  bool any_visible;
};

struct Row {
  int64_t b, h, i, pos;
};

RowMax RowScores(const AttentionParams& p, const Options& o, int64_t heads_q, const Sequence& sq,
                 const Row& row, const double* row_q, const std::vector<double>& keys, int64_t dim,
                 double slope, double* scores, char* visible, double* dcap) {
  RowMax r{-kInf, false};
  for (int64_t j = 0; j < sq.k_len; ++j) {
    const double bias = MaskBias(p, o, heads_q, sq.k_len, row.b, row.h, row.i, j, sq.shift);
    const bool keep = bias != -kInf;
    visible[j] = keep;
    if (dcap != nullptr) dcap[j] = 1.0;
    if (!keep) {
      scores[j] = -kInf;
      continue;
    }
    r.any_visible = true;
    double dot = 0.0;
    for (int64_t d = 0; d < dim; ++d) dot += row_q[d] * keys[static_cast<size_t>(j * dim + d)];
    double s = o.scale * dot;
    if (o.softcap > 0.0) {
      const double t = std::tanh(s / o.softcap);
      s = o.softcap * t;
      if (dcap != nullptr) dcap[j] = 1.0 - t * t;
    }
    if (o.alibi) s -= slope * static_cast<double>(std::llabs(row.pos - j));
    if (o.additive) s += bias;
    scores[j] = s;
    r.max = MaxNaN(r.max, s);
  }
  return r;
}

// FlashSigmoid's weight of a visible logit s (docs/algorithms.md §2.7).
double Sigmoid(const Options& o, double s) { return 1.0 / (1.0 + std::exp(-(s + o.sigmoid_bias))); }

}  // namespace

void MaterializeMask(const AttentionParams& p, std::vector<double>* bias) {
  const TokenView q = MakeTokenView(p.q);
  const TokenView k = MakeTokenView(p.k);
  const int64_t batch = p.q.shape[0], heads_q = q.heads, q_len = q.tokens, k_len = k.tokens;
  const Options o = ResolveOptions(p, q.dim);
  const int64_t shift = o.top_left ? 0 : k_len - q_len;
  bias->assign(static_cast<size_t>(batch * heads_q * q_len * k_len), 0.0);
  size_t at = 0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads_q; ++h) {
      for (int64_t i = 0; i < q_len; ++i) {
        for (int64_t j = 0; j < k_len; ++j) {
          (*bias)[at++] = MaskBias(p, o, heads_q, k_len, b, h, i, j, shift);
        }
      }
    }
  }
}

void AttentionForwardF64(const AttentionParams& p, double* out, double* lse) {
  const TokenView q = MakeTokenView(p.q);
  const TokenView k = MakeTokenView(p.k);
  const TokenView v = MakeTokenView(p.v);
  const bool varlen = p.cu_seqlens_q.data != nullptr;
  const int64_t num_seqs = varlen ? p.num_seqs : p.q.shape[0];
  const int64_t heads_q = q.heads;
  const int64_t dim = q.dim;
  const int64_t dim_v = v.dim;
  const int64_t group = heads_q / k.heads;  // valid params: k.heads >= 1 divides heads_q
  const int64_t total_q = q.tokens;         // rows per batch entry of the dense output
  const Options o = ResolveOptions(p, dim);

  // Scratch for one (sequence, KV head): K and V rows upcast, then one query row at a time.
  std::vector<double> keys, values, row_q(static_cast<size_t>(dim)), scores;
  std::vector<char> visible;
  std::vector<double> acc(static_cast<size_t>(dim_v));

  for (int64_t b = 0; b < num_seqs; ++b) {
    const Sequence sq = SequenceOf(p, q, k, o, b);
    scores.assign(static_cast<size_t>(sq.k_len), 0.0);
    visible.assign(static_cast<size_t>(sq.k_len), 0);
    for (int64_t kv_head = 0; kv_head < k.heads; ++kv_head) {
      LoadKeysValues(p, k, v, sq, kv_head, &keys, &values);
      // GQA: query head h reads KV head h / group, i.e. heads [kv_head*group, (kv_head+1)*group).
      for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        const double slope = AlibiSlope(p, b, h);
        for (int64_t i = 0; i < sq.q_len; ++i) {
          for (int64_t d = 0; d < dim; ++d) {
            row_q[static_cast<size_t>(d)] = Load(p.q, q.Offset(sq.read_b, sq.q_begin + i, h, d));
          }
          const RowMax row = RowScores(p, o, heads_q, sq, Row{b, h, i, i + sq.shift}, row_q.data(),
                                       keys, dim, slope, scores.data(), visible.data(), nullptr);

          double* out_row = varlen ? out + ((sq.q_begin + i) * heads_q + h) * dim_v
                                   : out + ((b * total_q + i) * heads_q + h) * dim_v;
          double* lse_elem = nullptr;
          if (lse != nullptr) {
            lse_elem =
                varlen ? lse + h * total_q + sq.q_begin + i : lse + (b * heads_q + h) * total_q + i;
          }
          if (o.sigmoid) {
            // No normalization and no LSE: out = sum_j sigmoid(s_j + b) v_j over visible keys.
            // The kernels reject an LSE output with sigmoid; the reference writes 0 there.
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t j = 0; j < sq.k_len; ++j) {
              if (!visible[static_cast<size_t>(j)]) continue;
              const double w = Sigmoid(o, scores[static_cast<size_t>(j)]);
              for (int64_t d = 0; d < dim_v; ++d) {
                acc[static_cast<size_t>(d)] += w * values[static_cast<size_t>(j * dim_v + d)];
              }
            }
            for (int64_t d = 0; d < dim_v; ++d) out_row[d] = acc[static_cast<size_t>(d)];
            if (lse_elem != nullptr) *lse_elem = 0.0;
            continue;
          }
          if (!row.any_visible) {
            std::fill(out_row, out_row + dim_v, 0.0);
            if (lse_elem != nullptr) *lse_elem = -kInf;
            continue;
          }
          double sum = 0.0;
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t j = 0; j < sq.k_len; ++j) {
            if (!visible[static_cast<size_t>(j)]) continue;
            const double w = std::exp(scores[static_cast<size_t>(j)] - row.max);
            sum += w;
            for (int64_t d = 0; d < dim_v; ++d) {
              acc[static_cast<size_t>(d)] += w * values[static_cast<size_t>(j * dim_v + d)];
            }
          }
          for (int64_t d = 0; d < dim_v; ++d) out_row[d] = acc[static_cast<size_t>(d)] / sum;
          if (lse_elem != nullptr) *lse_elem = row.max + std::log(sum);
        }
      }
    }
  }
}

void AttentionStatsF64(const AttentionParams& p, double* key_mass, double* key_mass_sq,
                       double* row_entropy) {
  const TokenView q = MakeTokenView(p.q);
  const TokenView k = MakeTokenView(p.k);
  const TokenView v = MakeTokenView(p.v);
  const int64_t batch = p.q.shape[0], heads_q = q.heads, dim = q.dim, k_len = k.tokens;
  const int64_t group = heads_q / k.heads;
  const int64_t window = p.stats.window;
  const int64_t heads_out = p.stats.sum_gqa_group ? k.heads : heads_q;
  const Options o = ResolveOptions(p, dim);
  const size_t key_outputs = static_cast<size_t>(batch * heads_out * k_len);
  if (key_mass != nullptr) std::fill(key_mass, key_mass + key_outputs, 0.0);
  if (key_mass_sq != nullptr) std::fill(key_mass_sq, key_mass_sq + key_outputs, 0.0);

  std::vector<double> keys, values, row_q(static_cast<size_t>(dim)), scores;
  std::vector<char> visible;
  for (int64_t b = 0; b < batch; ++b) {
    const Sequence sq = SequenceOf(p, q, k, o, b);
    scores.assign(static_cast<size_t>(k_len), 0.0);
    visible.assign(static_cast<size_t>(k_len), 0);
    for (int64_t kv_head = 0; kv_head < k.heads; ++kv_head) {
      LoadKeysValues(p, k, v, sq, kv_head, &keys, &values);
      for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        const double slope = AlibiSlope(p, b, h);
        const int64_t h_out = p.stats.sum_gqa_group ? kv_head : h;
        for (int64_t w = 0; w < window; ++w) {
          const int64_t i = sq.q_len - window + w;
          for (int64_t d = 0; d < dim; ++d) {
            row_q[static_cast<size_t>(d)] = Load(p.q, q.Offset(b, i, h, d));
          }
          const RowMax row = RowScores(p, o, heads_q, sq, Row{b, h, i, i + sq.shift}, row_q.data(),
                                       keys, dim, slope, scores.data(), visible.data(), nullptr);
          double entropy = 0.0;
          if (row.any_visible) {
            double sum = 0.0;
            for (int64_t j = 0; j < k_len; ++j) {
              if (visible[static_cast<size_t>(j)]) {
                sum += std::exp(scores[static_cast<size_t>(j)] - row.max);
              }
            }
            const double lse = row.max + std::log(sum);
            for (int64_t j = 0; j < k_len; ++j) {
              if (!visible[static_cast<size_t>(j)]) continue;
              const double s = scores[static_cast<size_t>(j)];
              const double prob = std::exp(s - lse);
              const size_t at = static_cast<size_t>((b * heads_out + h_out) * k_len + j);
              if (key_mass != nullptr) key_mass[at] += prob;
              if (key_mass_sq != nullptr) key_mass_sq[at] += prob * prob;
              // -p ln p = p (lse - s).
              entropy += prob * (lse - s);
            }
          }
          if (row_entropy != nullptr) row_entropy[(b * heads_q + h) * window + w] = entropy;
        }
      }
    }
  }
}

// The gradients of the materialized forward above, one query row at a time: recompute the row's
// scores exactly as the forward does, then with P = softmax(S):
//   dV_j += P_j dO,  dP_j = dO . v_j,  D = sum_j P_j dP_j,  dS_j = P_j (dP_j - D),
// or with P = sigmoid(S + b) (FlashSigmoid, no normalization hence no D):
//   dV_j += P_j dO,  dP_j = dO . v_j,  dS_j = dP_j P_j (1 - P_j),
// then for both
//   softcap: dS_j *= 1 - tanh^2(u_j / c)  (u_j the pre-cap logit),
//   dq = scale * sum_j dS_j k_j,  dK_j += scale * dS_j q.
// ALiBi, the sigmoid bias and a dense additive mask are constants added to the logit: they change
// P but have no derivative of their own. Masked keys are never read and contribute nothing; dK /
// dV of a KV head sum its query heads.
void AttentionBackwardF64(const AttentionBackwardParams& bp, double* dq, double* dk, double* dv) {
  const AttentionParams& p = bp.forward;
  const TokenView q = MakeTokenView(p.q);
  const TokenView k = MakeTokenView(p.k);
  const TokenView v = MakeTokenView(p.v);
  const TokenView dout = MakeTokenView(bp.dout);
  const bool varlen = p.cu_seqlens_q.data != nullptr;
  const int64_t num_seqs = varlen ? p.num_seqs : p.q.shape[0];
  const int64_t heads_q = q.heads;
  const int64_t heads_kv = k.heads;
  const int64_t dim = q.dim;
  const int64_t dim_v = v.dim;
  const int64_t group = heads_q / heads_kv;
  const int64_t total_q = q.tokens;
  const int64_t total_k = k.tokens;
  const Options o = ResolveOptions(p, dim);
  const double scale = o.scale;

  std::vector<double> keys, values, row_q(static_cast<size_t>(dim)),
      row_do(static_cast<size_t>(dim_v)), probs, dcap, dscore;
  std::vector<char> visible;
  std::vector<double> grad_k, grad_v;  // [k_len, dim] / [k_len, dim_v] of one (sequence, KV head)

  for (int64_t b = 0; b < num_seqs; ++b) {
    const Sequence sq = SequenceOf(p, q, k, o, b);
    const int64_t k_len = sq.k_len, k_begin = sq.k_begin;
    const size_t nk = static_cast<size_t>(k_len);
    probs.assign(nk, 0.0);
    dcap.assign(nk, 1.0);
    visible.assign(nk, 0);

    for (int64_t kv_head = 0; kv_head < heads_kv; ++kv_head) {
      LoadKeysValues(p, k, v, sq, kv_head, &keys, &values);
      grad_k.assign(keys.size(), 0.0);
      grad_v.assign(values.size(), 0.0);

      for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        const double slope = AlibiSlope(p, b, h);
        for (int64_t i = 0; i < sq.q_len; ++i) {
          for (int64_t d = 0; d < dim; ++d) {
            row_q[static_cast<size_t>(d)] = Load(p.q, q.Offset(sq.read_b, sq.q_begin + i, h, d));
          }
          for (int64_t d = 0; d < dim_v; ++d) {
            row_do[static_cast<size_t>(d)] =
                Load(bp.dout, dout.Offset(sq.read_b, sq.q_begin + i, h, d));
          }
          double* dq_row = varlen ? dq + ((sq.q_begin + i) * heads_q + h) * dim
                                  : dq + ((b * total_q + i) * heads_q + h) * dim;
          std::fill(dq_row, dq_row + dim, 0.0);

          // Scores exactly as the forward (softcap, ALiBi, masks), with the softcap derivative.
          const RowMax row = RowScores(p, o, heads_q, sq, Row{b, h, i, i + sq.shift}, row_q.data(),
                                       keys, dim, slope, probs.data(), visible.data(), dcap.data());
          if (!row.any_visible) continue;  // dq row stays 0, nothing reaches dK / dV

          if (o.sigmoid) {
            for (int64_t j = 0; j < k_len; ++j) {
              const size_t js = static_cast<size_t>(j);
              if (visible[js]) probs[js] = Sigmoid(o, probs[js]);
            }
          } else {
            // P = softmax over the visible keys.
            double sum = 0.0;
            for (int64_t j = 0; j < k_len; ++j) {
              if (!visible[static_cast<size_t>(j)]) continue;
              const double w = std::exp(probs[static_cast<size_t>(j)] - row.max);
              probs[static_cast<size_t>(j)] = w;
              sum += w;
            }
            for (int64_t j = 0; j < k_len; ++j) {
              if (visible[static_cast<size_t>(j)]) probs[static_cast<size_t>(j)] /= sum;
            }
          }

          // dP_j = dO . v_j and, for softmax, D = sum_j P_j dP_j (= dO . O).
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
            const double ds = o.sigmoid ? dscore[js] * pj * (1.0 - pj) * dcap[js]
                                        : pj * (dscore[js] - delta) * dcap[js];
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
