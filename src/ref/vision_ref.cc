// SPDX-License-Identifier: Apache-2.0
#include "ref/vision_ref.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/element.h"

namespace tessera {
namespace ref {
namespace {

size_t Idx(int64_t i) { return static_cast<size_t>(i); }

// Element [i0, i1, i2, i3] of a view of rank <= 4 (indices past the rank are 0), exactly as double.
double At(const TensorView& t, int64_t i0, int64_t i1, int64_t i2 = 0, int64_t i3 = 0) {
  return LoadElementF64(
      t.dtype, t.data,
      i0 * t.strides[0] + i1 * t.strides[1] + i2 * t.strides[2] + i3 * t.strides[3]);
}

// Softmax weights of `logits` in place (max subtracted first).
void SoftmaxInPlace(std::vector<double>* logits) {
  double max = -std::numeric_limits<double>::infinity();
  for (double l : *logits) max = std::max(max, l);
  double sum = 0.0;
  for (double& l : *logits) {
    l = std::exp(l - max);
    sum += l;
  }
  for (double& l : *logits) l /= sum;
}

}  // namespace

void ChannelAttentionF64(const ChannelAttentionParams& p, double* out, double* magnitude) {
  const int64_t B = p.q.shape[0], N = p.q.shape[1], H = p.q.shape[2], dh = p.q.shape[3];
  const double scale = p.scale.has_value() ? static_cast<double>(*p.scale)
                                           : 1.0 / std::sqrt(static_cast<double>(dh));
  std::vector<double> probs(Idx(dh * dh));
  std::vector<double> row(Idx(dh));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      // A[c, c'] = softmax over c' of scale * sum_n q[b, n, h, c] k[b, n, h, c'].
      for (int64_t c = 0; c < dh; ++c) {
        for (int64_t c2 = 0; c2 < dh; ++c2) {
          double dot = 0.0;
          for (int64_t n = 0; n < N; ++n) dot += At(p.q, b, n, h, c) * At(p.k, b, n, h, c2);
          row[Idx(c2)] = scale * dot;
        }
        SoftmaxInPlace(&row);
        std::copy(row.begin(), row.end(), probs.begin() + c * dh);
      }
      // out[b, n, h, c] = sum_c' A[c, c'] v[b, n, h, c'].
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = 0; c < dh; ++c) {
          double acc = 0.0, mag = 0.0;
          for (int64_t c2 = 0; c2 < dh; ++c2) {
            const double a = probs[Idx(c * dh + c2)], x = At(p.v, b, n, h, c2);
            acc += a * x;
            mag += a * std::fabs(x);
          }
          const size_t o = Idx(((b * N + n) * H + h) * dh + c);
          out[o] = acc;
          if (magnitude != nullptr) magnitude[o] = mag;
        }
      }
    }
  }
}

void BoxAttentionF64(const TensorView& q, const TensorView& k, const TensorView& v, double scale,
                     int64_t grid_w, const KeyBoxFn& box, double* out) {
  const int64_t B = q.shape[0], S = q.shape[1], H = q.shape[2], D = q.shape[3];
  std::vector<double> logits;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < S; ++i) {
      for (int64_t h = 0; h < H; ++h) {
        const KeyBox kb = box(h, i / grid_w, i % grid_w);
        std::vector<int64_t> keys;
        for (int64_t y = kb.y0; y < kb.y0 + kb.rows; ++y) {
          for (int64_t x = kb.x0; x < kb.x0 + kb.cols; ++x) keys.push_back(y * grid_w + x);
        }
        logits.assign(keys.size(), 0.0);
        for (size_t j = 0; j < keys.size(); ++j) {
          double dot = 0.0;
          for (int64_t d = 0; d < D; ++d) dot += At(q, b, i, h, d) * At(k, b, keys[j], h, d);
          logits[j] = scale * dot;
        }
        SoftmaxInPlace(&logits);
        for (int64_t d = 0; d < D; ++d) {
          double acc = 0.0;
          for (size_t j = 0; j < keys.size(); ++j) acc += logits[j] * At(v, b, keys[j], h, d);
          out[Idx(((b * S + i) * H + h) * D + d)] = acc;
        }
      }
    }
  }
}

KeyBox HaloBox(int64_t grid_h, int64_t grid_w, int64_t block, int64_t halo, int64_t y, int64_t x) {
  const int64_t window = block + 2 * halo;
  KeyBox kb;
  kb.y0 = std::clamp<int64_t>(y / block * block - halo, 0, grid_h - window);
  kb.x0 = std::clamp<int64_t>(x / block * block - halo, 0, grid_w - window);
  kb.rows = window;
  kb.cols = window;
  return kb;
}

KeyBox HorizontalStripBox(int64_t grid_h, int64_t grid_w, int64_t strip, int64_t y, int64_t x) {
  KeyBox kb;
  kb.y0 = std::min(y / strip * strip, grid_h - strip);
  kb.rows = strip;
  kb.x0 = 0;
  kb.cols = grid_w;
  (void)x;
  return kb;
}

KeyBox VerticalStripBox(int64_t grid_h, int64_t grid_w, int64_t strip, int64_t y, int64_t x) {
  KeyBox kb;
  kb.y0 = 0;
  kb.rows = grid_h;
  kb.x0 = std::min(x / strip * strip, grid_w - strip);
  kb.cols = strip;
  (void)y;
  return kb;
}

void SingleHeadAttentionF64(const TensorView& q, const TensorView& k, const TensorView& v,
                            double scale, double* out) {
  const int64_t B = q.shape[0], N = q.shape[1], Nk = k.shape[1], dqk = q.shape[2];
  const int64_t dv = v.shape[2];
  std::vector<double> logits(Idx(Nk));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < N; ++i) {
      for (int64_t j = 0; j < Nk; ++j) {
        double dot = 0.0;
        for (int64_t d = 0; d < dqk; ++d) dot += At(q, b, i, d) * At(k, b, j, d);
        logits[Idx(j)] = scale * dot;
      }
      SoftmaxInPlace(&logits);
      for (int64_t d = 0; d < dv; ++d) {
        double acc = 0.0;
        for (int64_t j = 0; j < Nk; ++j) acc += logits[Idx(j)] * At(v, b, j, d);
        out[Idx((b * N + i) * dv + d)] = acc;
      }
    }
  }
}

}  // namespace ref
}  // namespace tessera
