// SPDX-License-Identifier: Apache-2.0
// Eviction policies (kv_policy.h): each turns statistics into per-token scores for every
// (sequence, KV head), then SelectKeep keeps the forced tokens (sinks, the recent window) and
// the top of the others by score. Scores are combined in double, in a fixed order, so a keep-set
// does not depend on anything but the inputs. The policies are O(B * H * S) plus a selection;
// they run on the caller's thread (they cost far less than the statistics they read).
#include "tessera/kv_policy.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/element.h"
#include "core/i32_view.h"
#include "kvpolicy/kv_policy_internal.h"

namespace tessera {
namespace kvpolicy {

std::string Str(int64_t x) { return std::to_string(x); }

Status Invalid(const std::string& name, const std::string& what, const std::string& got) {
  return Status::InvalidArgument(Expected(name.c_str(), what, got));
}

Status ValidateTarget(const EvictionTarget& t, std::vector<int32_t>* lens) {
  if (t.num_kv_heads < 1) {
    return Invalid("target.num_kv_heads", "at least 1 KV head", Str(t.num_kv_heads));
  }
  if (t.budget < 1) {
    return Invalid("target.budget", "at least 1 token per (sequence, KV head)", Str(t.budget));
  }
  if (t.seq_lens.data == nullptr) {
    return Invalid("target.seq_lens", "an i32 [B] view", "data == nullptr");
  }
  const int64_t shape[1] = {-1};
  Status s = CheckI32View("target.seq_lens", t.seq_lens, 1, shape, "shape [B]");
  if (!s.ok()) return s;
  const int64_t B = t.seq_lens.shape[0];
  lens->assign(I32Data(t.seq_lens), I32Data(t.seq_lens) + B);
  for (int64_t b = 0; b < B; ++b) {
    if ((*lens)[size_t(b)] < 0) {
      return Invalid("target.seq_lens[" + Str(b) + "]", "a non-negative length",
                     Str((*lens)[size_t(b)]));
    }
  }
  return Status::Ok();
}

Status ValidateStats(const char* name, const TensorView& t, int32_t rank, int64_t B,
                     int64_t num_kv_heads, const std::vector<int32_t>& lens) {
  if (t.data == nullptr) return Invalid(name, "an f32 view", "data == nullptr");
  if (t.dtype != DType::kF32) {
    return Invalid(name, "dtype f32", std::string("dtype ") + DTypeName(t.dtype));
  }
  if (t.rank != rank) {
    return Invalid(name, rank == 3 ? "rank 3 [B, H, S]" : "rank 4 [B, Hq, Q, S]",
                   "rank " + Str(t.rank));
  }
  Status s = CheckRankAndStrides(name, t, false);
  if (!s.ok()) return s;
  if (t.shape[0] != B) {
    return Invalid(name, "batch " + Str(B) + " (the length of target.seq_lens)", ShapeString(t));
  }
  if (t.shape[1] < 1 || t.shape[1] % num_kv_heads != 0) {
    return Invalid(
        name, "heads (dim 1) a positive multiple of target.num_kv_heads = " + Str(num_kv_heads),
        ShapeString(t));
  }
  const int64_t longest = lens.empty() ? 0 : *std::max_element(lens.begin(), lens.end());
  if (t.shape[rank - 1] < longest) {
    return Invalid(name, "at least " + Str(longest) + " keys (the longest seq_len) in the last dim",
                   ShapeString(t));
  }
  // Every entry a policy reads must be finite.
  const int64_t inner = rank == 4 ? t.shape[2] : 1;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < t.shape[1]; ++h) {
      for (int64_t q = 0; q < inner; ++q) {
        const int64_t base =
            b * t.strides[0] + h * t.strides[1] + (rank == 4 ? q * t.strides[2] : 0);
        for (int64_t j = 0; j < lens[size_t(b)]; ++j) {
          const float x = static_cast<const float*>(t.data)[base + j * t.strides[rank - 1]];
          if (!std::isfinite(x)) {
            std::string idx = "[" + Str(b) + "][" + Str(h) + "]";
            if (rank == 4) idx += "[" + Str(q) + "]";
            return Invalid(std::string(name) + idx + "[" + Str(j) + "]", "a finite value",
                           std::isnan(x) ? "nan" : (x > 0 ? "inf" : "-inf"));
          }
        }
      }
    }
  }
  return Status::Ok();
}

Status ValidatePooling(const char* name, int64_t kernel, PoolKind pool) {
  if (kernel < 1 || kernel % 2 == 0) {
    return Invalid(name, "an odd kernel size >= 1", Str(kernel));
  }
  if (pool != PoolKind::kMax && pool != PoolKind::kAvg) {
    return Invalid("pool", "PoolKind::kMax or kAvg", Str(static_cast<int32_t>(pool)));
  }
  return Status::Ok();
}

float StatAt(const TensorView& t, int64_t b, int64_t h, int64_t j) {
  return static_cast<const float*>(
      t.data)[b * t.strides[0] + h * t.strides[1] + j * t.strides[t.rank - 1]];
}

void Pool(const double* score, int64_t n, int64_t kernel, PoolKind pool, double* out) {
  const int64_t r = kernel / 2;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t lo = std::max<int64_t>(0, j - r), hi = std::min<int64_t>(n - 1, j + r);
    double acc = pool == PoolKind::kMax ? score[lo] : 0.0;
    for (int64_t i = lo; i <= hi; ++i) {
      acc = pool == PoolKind::kMax ? std::max(acc, score[i]) : acc + score[i];
    }
    out[j] = pool == PoolKind::kMax ? acc : acc / static_cast<double>(hi - lo + 1);
  }
}

void SelectKeep(int64_t len, int64_t count, int64_t front, int64_t back, const double* score,
                std::vector<int32_t>* scratch, int32_t* out) {
  int64_t n = 0;
  if (count >= len) {
    for (int64_t j = 0; j < len; ++j) out[n++] = static_cast<int32_t>(j);
    return;
  }
  for (int64_t j = 0; j < front; ++j) out[n++] = static_cast<int32_t>(j);
  const int64_t k = count - front - back;
  if (k > 0) {
    scratch->clear();
    for (int64_t j = front; j < len - back; ++j) scratch->push_back(static_cast<int32_t>(j));
    const auto better = [score](int32_t a, int32_t b) {
      return score[a] > score[b] || (score[a] == score[b] && a > b);
    };
    std::nth_element(scratch->begin(), scratch->begin() + (k - 1), scratch->end(), better);
    std::sort(scratch->begin(), scratch->begin() + k);
    for (int64_t i = 0; i < k; ++i) out[n++] = (*scratch)[size_t(i)];
  }
  for (int64_t j = len - back; j < len; ++j) out[n++] = static_cast<int32_t>(j);
}

void InitKeep(const std::vector<int32_t>& lens, int64_t num_kv_heads, int64_t budget,
              KeepSet* keep) {
  const size_t B = lens.size();
  keep->num_kv_heads = num_kv_heads;
  keep->counts.resize(B);
  keep->offsets.assign(B + 1, 0);
  for (size_t b = 0; b < B; ++b) {
    keep->counts[b] = static_cast<int32_t>(std::min<int64_t>(budget, lens[b]));
    keep->offsets[b + 1] = keep->offsets[b] + num_kv_heads * keep->counts[b];
  }
  keep->tokens.assign(static_cast<size_t>(keep->offsets[B]), 0);
}

namespace {

// The shared skeleton: for each (b, h), score(b, h, len, double* s) fills the scores of keys
// [0, len) (only [front, len - back) are read), then the selection.
template <typename ScoreFn>
void RunPolicy(const std::vector<int32_t>& lens, const EvictionTarget& t, int64_t front_max,
               int64_t back_max, bool scored, const ScoreFn& score_fn, KeepSet* keep) {
  KeepSet out;
  InitKeep(lens, t.num_kv_heads, t.budget, &out);
  std::vector<double> score;
  std::vector<int32_t> scratch;
  for (size_t b = 0; b < lens.size(); ++b) {
    const int64_t len = lens[b], count = out.counts[b];
    const int64_t front = std::min(front_max, count);
    const int64_t back = std::min(back_max, count - front);
    for (int64_t h = 0; h < t.num_kv_heads; ++h) {
      int32_t* dst = out.tokens.data() + out.offsets[b] + h * static_cast<int64_t>(out.counts[b]);
      if (scored && count < len && count > front + back) {
        score.assign(static_cast<size_t>(len), 0.0);
        score_fn(static_cast<int64_t>(b), h, len - back, score.data());
      }
      SelectKeep(len, count, front, back, score.data(), &scratch, dst);
    }
  }
  *keep = std::move(out);
}

// Group sums of a [B, H, S] view for KV head h over keys [0, n).
void GroupSum(const TensorView& t, int64_t num_kv_heads, int64_t b, int64_t h, int64_t n,
              double* s) {
  const int64_t g = t.shape[1] / num_kv_heads;
  for (int64_t r = h * g; r < (h + 1) * g; ++r) {
    for (int64_t j = 0; j < n; ++j) s[j] += StatAt(t, b, r, j);
  }
}

}  // namespace
}  // namespace kvpolicy

using kvpolicy::Invalid;
using kvpolicy::Str;

Status StreamingLLMKeep(const StreamingLLMParams& p, KeepSet* keep) {
  if (keep == nullptr) return Invalid("keep", "a non-null KeepSet", "nullptr");
  std::vector<int32_t> lens;
  Status s = kvpolicy::ValidateTarget(p.target, &lens);
  if (!s.ok()) return s;
  if (p.sinks < 0) return Invalid("sinks", "a non-negative token count", Str(p.sinks));
  kvpolicy::RunPolicy(
      lens, p.target, p.sinks, p.target.budget, false, [](int64_t, int64_t, int64_t, double*) {},
      keep);
  return Status::Ok();
}

Status H2OKeep(const H2OParams& p, KeepSet* keep) {
  if (keep == nullptr) return Invalid("keep", "a non-null KeepSet", "nullptr");
  std::vector<int32_t> lens;
  Status s = kvpolicy::ValidateTarget(p.target, &lens);
  if (!s.ok()) return s;
  if (p.recent < 0) return Invalid("recent", "a non-negative token count", Str(p.recent));
  s = kvpolicy::ValidateStats("scores", p.scores, 3, static_cast<int64_t>(lens.size()),
                              p.target.num_kv_heads, lens);
  if (!s.ok()) return s;
  kvpolicy::RunPolicy(
      lens, p.target, 0, p.recent, true,
      [&](int64_t b, int64_t h, int64_t n, double* sc) {
        kvpolicy::GroupSum(p.scores, p.target.num_kv_heads, b, h, n, sc);
      },
      keep);
  return Status::Ok();
}

Status TovaKeep(const TovaParams& p, KeepSet* keep) {
  if (keep == nullptr) return Invalid("keep", "a non-null KeepSet", "nullptr");
  std::vector<int32_t> lens;
  Status s = kvpolicy::ValidateTarget(p.target, &lens);
  if (!s.ok()) return s;
  s = kvpolicy::ValidateStats("probs", p.probs, 4, static_cast<int64_t>(lens.size()),
                              p.target.num_kv_heads, lens);
  if (!s.ok()) return s;
  const TensorView& t = p.probs;
  const int64_t g = t.shape[1] / p.target.num_kv_heads, Q = t.shape[2];
  kvpolicy::RunPolicy(
      lens, p.target, 0, 0, true,
      [&](int64_t b, int64_t h, int64_t n, double* sc) {
        const float* base = static_cast<const float*>(t.data);
        for (int64_t r = h * g; r < (h + 1) * g; ++r) {
          for (int64_t q = 0; q < Q; ++q) {
            const int64_t row = b * t.strides[0] + r * t.strides[1] + q * t.strides[2];
            for (int64_t j = 0; j < n; ++j) sc[j] += base[row + j * t.strides[3]];
          }
        }
      },
      keep);
  return Status::Ok();
}

Status SnapKVKeep(const SnapKVParams& p, KeepSet* keep) {
  if (keep == nullptr) return Invalid("keep", "a non-null KeepSet", "nullptr");
  std::vector<int32_t> lens;
  Status s = kvpolicy::ValidateTarget(p.target, &lens);
  if (!s.ok()) return s;
  if (p.window < 0) return Invalid("window", "a non-negative token count", Str(p.window));
  s = kvpolicy::ValidatePooling("kernel", p.kernel, p.pool);
  if (!s.ok()) return s;
  s = kvpolicy::ValidateStats("key_mass", p.key_mass, 3, static_cast<int64_t>(lens.size()),
                              p.target.num_kv_heads, lens);
  if (!s.ok()) return s;
  std::vector<double> raw;
  kvpolicy::RunPolicy(
      lens, p.target, 0, p.window, true,
      [&](int64_t b, int64_t h, int64_t n, double* sc) {
        raw.assign(static_cast<size_t>(n), 0.0);
        kvpolicy::GroupSum(p.key_mass, p.target.num_kv_heads, b, h, n, raw.data());
        kvpolicy::Pool(raw.data(), n, p.kernel, p.pool, sc);
      },
      keep);
  return Status::Ok();
}

Status PyramidKVBudgets(int64_t total, int64_t num_layers, double beta,
                        std::vector<int64_t>* budgets) {
  if (budgets == nullptr) return Invalid("budgets", "a non-null vector", "nullptr");
  if (num_layers < 1) return Invalid("num_layers", "at least 1 layer", Str(num_layers));
  if (total < num_layers) {
    return Invalid("total", "at least num_layers = " + Str(num_layers) + " tokens", Str(total));
  }
  if (!(beta >= 1.0) || !std::isfinite(beta)) {
    return Invalid("beta", "a finite value >= 1", std::to_string(beta));
  }
  const double L = static_cast<double>(num_layers), T = static_cast<double>(total);
  const double last = T / (beta * L), first = 2.0 * T / L - last;
  std::vector<int64_t> out(static_cast<size_t>(num_layers));
  int64_t sum = 0;
  for (int64_t l = 0; l < num_layers; ++l) {
    const double x =
        num_layers == 1 ? T : first - (first - last) * static_cast<double>(l) / (L - 1.0);
    out[size_t(l)] = std::max<int64_t>(1, static_cast<int64_t>(std::floor(x)));
    sum += out[size_t(l)];
  }
  // Rounding: hand out (or take back, from layers above 1) one token at a time from the front.
  for (int64_t l = 0; sum < total; l = (l + 1) % num_layers, ++sum) ++out[size_t(l)];
  for (int64_t l = 0; sum > total; l = (l + 1) % num_layers) {
    if (out[size_t(l)] > 1) {
      --out[size_t(l)];
      --sum;
    }
  }
  *budgets = std::move(out);
  return Status::Ok();
}

namespace {

Status ValidateCake(const CakeParams& p, const EvictionTarget& target, const CakeLayerStats& st,
                    std::vector<int32_t>* lens) {
  Status s = kvpolicy::ValidateTarget(target, lens);
  if (!s.ok()) return s;
  if (!(p.tau1 > 0.0) || !std::isfinite(p.tau1)) {
    return Invalid("params.tau1", "a finite value > 0", std::to_string(p.tau1));
  }
  if (!(p.tau2 > 0.0) || !std::isfinite(p.tau2)) {
    return Invalid("params.tau2", "a finite value > 0", std::to_string(p.tau2));
  }
  if (!(p.gamma >= 0.0) || !std::isfinite(p.gamma)) {
    return Invalid("params.gamma", "a finite value >= 0", std::to_string(p.gamma));
  }
  if (p.window < 0) return Invalid("params.window", "a non-negative token count", Str(p.window));
  s = kvpolicy::ValidatePooling("params.kernel", p.kernel, p.pool);
  if (!s.ok()) return s;
  if (st.rows < 1) return Invalid("stats.rows", "at least 1 row", Str(st.rows));
  const int64_t B = static_cast<int64_t>(lens->size());
  s = kvpolicy::ValidateStats("stats.key_mass", st.key_mass, 3, B, target.num_kv_heads, *lens);
  if (!s.ok()) return s;
  s = kvpolicy::ValidateStats("stats.key_mass_sq", st.key_mass_sq, 3, B, target.num_kv_heads,
                              *lens);
  if (!s.ok()) return s;
  if (st.key_mass_sq.shape[1] != st.key_mass.shape[1]) {
    return Invalid("stats.key_mass_sq",
                   "the heads of stats.key_mass (" + ShapeString(st.key_mass) + ")",
                   ShapeString(st.key_mass_sq));
  }
  return Status::Ok();
}

}  // namespace

Status CakeLayerPreference(const CakeParams& params, const EvictionTarget& target,
                           const CakeLayerStats& stats, double* preference, double* dispersion,
                           double* shift) {
  if (preference == nullptr) return Invalid("preference", "a non-null pointer", "nullptr");
  std::vector<int32_t> lens;
  Status s = ValidateCake(params, target, stats, &lens);
  if (!s.ok()) return s;
  const double rows = static_cast<double>(stats.rows);
  double h_sum = 0.0, v_sum = 0.0;
  int64_t n = 0;
  for (size_t b = 0; b < lens.size(); ++b) {
    if (lens[b] == 0) continue;
    for (int64_t r = 0; r < stats.key_mass.shape[1]; ++r) {
      double h = 0.0, v = 0.0;
      for (int64_t j = 0; j < lens[b]; ++j) {
        const double mean = kvpolicy::StatAt(stats.key_mass, int64_t(b), r, j) / rows;
        const double sq = kvpolicy::StatAt(stats.key_mass_sq, int64_t(b), r, j) / rows;
        if (mean > 0.0) h -= mean * std::log(mean);
        v += std::max(0.0, sq - mean * mean);
      }
      h_sum += h;
      v_sum += v;
      ++n;
    }
  }
  const double H = n > 0 ? h_sum / static_cast<double>(n) : 0.0;
  const double V = n > 0 ? v_sum / static_cast<double>(n) : 0.0;
  *preference = std::pow(std::max(H, 0.0), 1.0 / params.tau1) * std::pow(V, 1.0 / params.tau2);
  if (dispersion != nullptr) *dispersion = H;
  if (shift != nullptr) *shift = V;
  return Status::Ok();
}

Status CakeKeep(const CakeParams& params, const EvictionTarget& target, const CakeLayerStats& st,
                KeepSet* keep) {
  if (keep == nullptr) return Invalid("keep", "a non-null KeepSet", "nullptr");
  std::vector<int32_t> lens;
  Status s = ValidateCake(params, target, st, &lens);
  if (!s.ok()) return s;
  const double rows = static_cast<double>(st.rows);
  const int64_t g = st.key_mass.shape[1] / target.num_kv_heads;
  std::vector<double> raw;
  kvpolicy::RunPolicy(
      lens, target, 0, params.window, true,
      [&](int64_t b, int64_t h, int64_t n, double* sc) {
        raw.assign(static_cast<size_t>(n), 0.0);
        for (int64_t r = h * g; r < (h + 1) * g; ++r) {
          for (int64_t j = 0; j < n; ++j) {
            const double mean = kvpolicy::StatAt(st.key_mass, b, r, j) / rows;
            const double sq = kvpolicy::StatAt(st.key_mass_sq, b, r, j) / rows;
            raw[size_t(j)] += mean + params.gamma * std::max(0.0, sq - mean * mean);
          }
        }
        for (int64_t j = 0; j < n; ++j) raw[size_t(j)] /= static_cast<double>(g);
        kvpolicy::Pool(raw.data(), n, params.kernel, params.pool, sc);
      },
      keep);
  return Status::Ok();
}

Status CakeAllocator::Init(int64_t num_layers, int64_t total, int64_t reserved) {
  if (num_layers < 1) return Invalid("num_layers", "at least 1 layer", Str(num_layers));
  if (total < num_layers) {
    return Invalid("total", "at least num_layers = " + Str(num_layers) + " tokens", Str(total));
  }
  if (reserved < 0 || reserved > total / num_layers) {
    return Invalid("reserved",
                   "0..total / num_layers = " + Str(total / num_layers) + " tokens per layer",
                   Str(reserved));
  }
  num_layers_ = num_layers;
  total_ = total;
  reserved_ = reserved;
  preferences_.clear();
  budgets_.clear();
  return Status::Ok();
}

Status CakeAllocator::AddLayer(double preference) {
  if (num_layers_ == 0) {
    return Status::InvalidArgument("CakeAllocator: expected Init before AddLayer, got no Init");
  }
  if (!(preference >= 0.0) || !std::isfinite(preference)) {
    return Invalid("preference", "a finite value >= 0", std::to_string(preference));
  }
  if (layers_seen() >= num_layers_) {
    return Invalid("AddLayer", "at most num_layers = " + Str(num_layers_) + " layers",
                   "layer " + Str(layers_seen() + 1));
  }
  preferences_.push_back(preference);
  const std::vector<int64_t> previous = budgets_;
  const size_t n = preferences_.size();
  double sum = 0.0;
  for (double x : preferences_) sum += x;
  // Every layer that will arrive keeps its reserve; the layers seen so far share the rest.
  const int64_t shared = total_ - num_layers_ * reserved_;
  const int64_t pool = shared + static_cast<int64_t>(n) * reserved_;
  std::vector<double> share(n);
  for (size_t l = 0; l < n; ++l) {
    share[l] = sum > 0.0 ? static_cast<double>(shared) * preferences_[l] / sum
                         : static_cast<double>(shared) / static_cast<double>(n);
  }
  budgets_.assign(n, 0);
  int64_t given = 0;
  for (size_t l = 0; l < n; ++l) {
    budgets_[l] = reserved_ + std::min<int64_t>(shared, static_cast<int64_t>(std::floor(share[l])));
    given += budgets_[l];
  }
  // Largest remainder first; ties to the earlier layer.
  std::vector<size_t> order(n);
  for (size_t l = 0; l < n; ++l) order[l] = l;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return share[a] - std::floor(share[a]) > share[b] - std::floor(share[b]);
  });
  for (size_t i = 0; given < pool; i = (i + 1) % n, ++given) ++budgets_[order[i]];
  // Evicted tokens are gone: a layer seen before never grows back (rounding could add one
  // token); what that frees goes to the newest layer, so the sum stays `total`.
  if (n > 1) {
    int64_t earlier = 0;
    for (size_t l = 0; l + 1 < n; ++l) {
      budgets_[l] = std::min(budgets_[l], previous[l]);
      earlier += budgets_[l];
    }
    budgets_[n - 1] = pool - earlier;
  }
  return Status::Ok();
}

}  // namespace tessera
