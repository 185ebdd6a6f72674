// SPDX-License-Identifier: Apache-2.0
#include "visible_pairs.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace tessera {
namespace cli {
namespace {

// Keys [begin, end).
struct Range {
  int64_t begin, end;
};

int64_t Overlap(Range a, Range b) {
  return std::max<int64_t>(0, std::min(a.end, b.end) - std::max(a.begin, b.begin));
}

// Reads one element of a rank <= 4 view at the given index; a dimension of extent 1 broadcasts.
class ViewReader {
 public:
  explicit ViewReader(const TensorView& t) : t_(t) {
    for (int d = 0; d < t.rank && d < 4; ++d) stride_[d] = t.shape[d] == 1 ? 0 : t.strides[d];
  }
  bool set() const { return t_.data != nullptr; }
  int64_t extent(int d) const { return t_.shape[d]; }
  int64_t Offset(int64_t i0, int64_t i1, int64_t i2 = 0, int64_t i3 = 0) const {
    return i0 * stride_[0] + i1 * stride_[1] + i2 * stride_[2] + i3 * stride_[3];
  }
  // Nonzero (bool / uint8 / int32) or not -inf (f32, an additive mask).
  bool Visible(int64_t offset) const {
    switch (t_.dtype) {
      case DType::kU8:
      case DType::kBool:
        return static_cast<const uint8_t*>(t_.data)[offset] != 0;
      case DType::kI32:
        return static_cast<const int32_t*>(t_.data)[offset] != 0;
      case DType::kF32:
        return static_cast<const float*>(t_.data)[offset] != -INFINITY;
      default:
        return true;
    }
  }
  int32_t Int(int64_t offset) const { return static_cast<const int32_t*>(t_.data)[offset]; }

 private:
  const TensorView& t_;
  int64_t stride_[4] = {0, 0, 0, 0};
};

// One grid axis of a neighborhood mask as seen from one query: key coordinates y with
// lo <= y / dilation <= hi and y mod dilation == residue (docs/algorithms.md §4.2).
struct AxisBox {
  int64_t lo, hi, residue;
};

AxisBox NeighborhoodBox(int64_t x, int64_t L, int64_t K, int64_t d, int64_t s, bool causal) {
  const int64_t g = x % d, xp = x / d;
  const int64_t lg = L / d + (g < L % d ? 1 : 0);  // the dilation group's length
  if (causal) {
    // The K keys ending at the stride leader, never past the query itself.
    const int64_t leader = std::min(xp / s * s + s - 1, lg - 1);
    return {std::max<int64_t>(0, leader - K + 1), xp, g};
  }
  // Centred on the stride leader and shifted, not shrunk, at the borders: always K keys.
  const int64_t wl = K / 2, wr = K / 2 + K % 2 - 1;
  const int64_t leader = std::min(xp / s * s + s / 2, lg - 1);
  const int64_t centre = std::clamp(leader, wl, lg - 1 - wr);
  return {centre - wl, centre + wr, g};
}

class Oracle {
 public:
  explicit Oracle(const AttentionParams& p)
      : p_(p), m_(p.mask), blocks_(m_.blocks), docs_(m_.document_ids), dense_(m_.dense) {
    batch_ = p.q.shape[0];
    sq_ = p.q.shape[1];
    hq_ = p.q.shape[2];
    sk_ = p.k.shape[1];
    wl_ = p.window_left;
    wr_ = p.window_right;
    if (p.causal) wr_ = wr_ < 0 ? 0 : std::min<int64_t>(wr_, 0);
    const NeighborhoodMask& n = m_.neighborhood;
    rank_ = n.rank;
    for (int a = rank_ - 1, stride = 1; a >= 0; --a) {
      axis_stride_[a] = stride;
      stride *= static_cast<int>(n.grid[a]);
    }
    parents_ = static_cast<const int32_t*>(m_.tree_parents.data);
    tree_size_ = parents_ != nullptr ? m_.tree_parents.shape[0] : 0;
    marks_.assign(static_cast<size_t>(tree_size_), 0);
    if (blocks_.set()) num_kb_ = blocks_.extent(3);
  }

  // Rows of different batches / heads differ only through these (everything else is shared).
  bool per_batch() const {
    return (blocks_.set() && blocks_.extent(0) > 1) || (docs_.set() && docs_.extent(0) > 1) ||
           (dense_.set() && dense_.rank4() && dense_.extent(0) > 1);
  }
  bool per_head() const {
    return (blocks_.set() && blocks_.extent(1) > 1) ||
           (dense_.set() && dense_.rank4() && dense_.extent(1) > 1);
  }
  bool shifted_heads() const { return m_.group_size > 0 && m_.shift_half_heads && hq_ > 1; }
  // Rows needing a key-by-key test; the others are unions of intervals.
  bool slow() const { return rank_ > 0 || tree_size_ > 0 || dense_.set() || m_.group_size > 0; }
  int64_t batch() const { return batch_; }
  int64_t heads() const { return hq_; }
  int64_t seq_q() const { return sq_; }
  int64_t seq_k() const { return sk_; }
  // Rough tests per row, for the budget.
  int64_t row_cost() const { return slow() ? sk_ : (blocks_.set() ? num_kb_ : 1); }

  // Visible keys of query row i of (batch b, head h).
  int64_t CountRow(int64_t b, int64_t h, int64_t i) {
    pos_ = p_.align == MaskAlign::kTopLeft ? i : i + sk_ - sq_;
    b_ = b;
    h_ = h;
    i_ = i;
    Range candidate{0, sk_};
    if (docs_.set()) {
      if (pos_ < 0 || pos_ >= sk_) return 0;
      candidate = DocumentRange();
    }
    if (rank_ > 0) {
      const Range box = StartNeighborhood();
      candidate = {std::max(candidate.begin, box.begin), std::min(candidate.end, box.end)};
    }
    if (m_.group_size > 0) {
      const int64_t g = m_.group_size;
      shifted_ = m_.shift_half_heads && h >= hq_ / 2 && hq_ > 1;
      roll_ = shifted_ ? g / 2 : 0;
      ri_ = Roll(pos_);
    }
    if (tree_size_ > 0) MarkAncestors(true);
    int64_t count = 0;
    auto count_range = [&](Range r) {
      r = {std::max(r.begin, candidate.begin), std::min(r.end, candidate.end)};
      if (r.begin >= r.end) return;
      count += slow() ? CountKeys(r) : CountIntervals(r);
    };
    if (blocks_.set()) {
      const int64_t bq = m_.block_q, bk = m_.block_k;
      const int64_t base =
          blocks_.Offset(blocks_.extent(0) > 1 ? b : 0, blocks_.extent(1) > 1 ? h : 0, i / bq);
      const int64_t kb_stride = blocks_.Offset(0, 0, 0, 1);
      for (int64_t kb = 0; kb < num_kb_; ++kb) {
        if (blocks_.Visible(base + kb * kb_stride)) {
          count_range({kb * bk, std::min((kb + 1) * bk, sk_)});
        }
      }
    } else {
      count_range({0, sk_});
    }
    if (tree_size_ > 0) MarkAncestors(false);
    return count;
  }

 private:
  // The view readers keep a reference to the view; dense also needs to know its rank.
  struct DenseReader : ViewReader {
    explicit DenseReader(const TensorView& t) : ViewReader(t), rank(t.rank) {}
    bool rank4() const { return rank == 4; }
    int rank;
  };

  int64_t Roll(int64_t x) const { return ((x - roll_) % sk_ + sk_) % sk_; }

  // The keys of the query's document: doc ids are non-decreasing along the keys.
  Range DocumentRange() const {
    const int64_t bm = docs_.extent(0) > 1 ? b_ : 0;
    auto id = [&](int64_t j) { return docs_.Int(docs_.Offset(bm, j)); };
    const int32_t mine = id(pos_);
    int64_t lo = 0, hi = pos_;  // first key with id == mine
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (id(mid) < mine)
        lo = mid + 1;
      else
        hi = mid;
    }
    int64_t lo2 = pos_ + 1, hi2 = sk_;  // first key with id > mine
    while (lo2 < hi2) {
      const int64_t mid = (lo2 + hi2) / 2;
      if (id(mid) <= mine)
        lo2 = mid + 1;
      else
        hi2 = mid;
    }
    return {lo, lo2};
  }

  // The query's box on every axis; returns the flat key range that bounds it.
  Range StartNeighborhood() {
    const NeighborhoodMask& n = m_.neighborhood;
    int64_t lo = 0, hi = 0;
    for (int a = 0; a < rank_; ++a) {
      const int64_t x = (i_ / axis_stride_[a]) % n.grid[a];
      box_[a] = NeighborhoodBox(x, n.grid[a], n.window[a], n.dilation[a], n.stride[a], n.causal[a]);
      lo += (box_[a].lo * n.dilation[a] + box_[a].residue) * axis_stride_[a];
      hi += (box_[a].hi * n.dilation[a] + box_[a].residue) * axis_stride_[a];
    }
    return {lo, hi + 1};
  }

  void MarkAncestors(bool on) {
    for (int64_t t = i_; t >= 0 && t < tree_size_; t = parents_[t]) marks_[t] = on;
  }

  // Keys of r visible through the window, sinks and prefix (the only tests left on fast rows):
  // [0, e1) U [w_lo, w_hi) with e1 the end of the sinks / prefix.
  int64_t CountIntervals(Range r) const {
    const int64_t w_lo = wl_ < 0 ? 0 : pos_ - wl_;
    const int64_t w_hi = wr_ < 0 ? sk_ : pos_ + wr_ + 1;
    const int64_t sink_end =
        m_.sink_tokens > 0 ? std::min(m_.sink_tokens, wr_ < 0 ? sk_ : pos_ + wr_ + 1) : 0;
    const Range front{0, std::max(sink_end, m_.prefix_len)};
    const Range window{w_lo, w_hi};
    const Range both{std::max(front.begin, window.begin), std::min(front.end, window.end)};
    return Overlap(r, front) + Overlap(r, window) - Overlap(r, both);
  }

  int64_t CountKeys(Range r) const {
    int64_t count = 0;
    for (int64_t j = r.begin; j < r.end; ++j) count += Visible(j) ? 1 : 0;
    return count;
  }

  // visible(i, j) of tessera/mask.h, for keys already inside the kept blocks and the document.
  bool Visible(int64_t j) const {
    bool window;
    if (m_.group_size > 0) {
      // Causal and the window are evaluated inside the groups, in rolled order for the shifted
      // heads (LongLoRA rolls q, k, v by -G/2 so the last half group wraps to the first).
      const int64_t rj = Roll(j), g = m_.group_size;
      window = ri_ / g == rj / g && (wl_ < 0 || rj >= ri_ - wl_) && (wr_ < 0 || rj <= ri_ + wr_);
    } else {
      window = (wl_ < 0 || j >= pos_ - wl_) && (wr_ < 0 || j <= pos_ + wr_);
    }
    const bool base =
        window || (j < m_.sink_tokens && (wr_ < 0 || j <= pos_ + wr_)) || j < m_.prefix_len;
    if (!base) return false;
    if (rank_ > 0) {
      const NeighborhoodMask& n = m_.neighborhood;
      for (int a = 0; a < rank_; ++a) {
        const int64_t y = (j / axis_stride_[a]) % n.grid[a];
        const int64_t yp = y / n.dilation[a];
        if (y % n.dilation[a] != box_[a].residue || yp < box_[a].lo || yp > box_[a].hi) {
          return false;
        }
      }
    }
    if (tree_size_ > 0) {
      const int64_t prefix = sk_ - tree_size_;
      if (j >= prefix && !marks_[j - prefix]) return false;
    }
    if (dense_.set()) {
      const int64_t offset = dense_.rank4() ? dense_.Offset(dense_.extent(0) > 1 ? b_ : 0,
                                                            dense_.extent(1) > 1 ? h_ : 0, i_, j)
                                            : dense_.Offset(i_, j);
      if (!dense_.Visible(offset)) return false;
    }
    return true;
  }

  const AttentionParams& p_;
  const MaskParams& m_;
  ViewReader blocks_;
  ViewReader docs_;
  DenseReader dense_;
  int64_t batch_ = 1, sq_ = 0, hq_ = 1, sk_ = 0;
  int64_t wl_ = -1, wr_ = -1;
  int rank_ = 0;
  int64_t axis_stride_[3] = {1, 1, 1};
  const int32_t* parents_ = nullptr;  // the tree mask's parents (validated: i32, unit stride)
  int64_t tree_size_ = 0;
  int64_t num_kb_ = 0;
  std::vector<uint8_t> marks_;  // the current row's tree ancestors (and itself)

  // The current row.
  int64_t b_ = 0, h_ = 0, i_ = 0, pos_ = 0;
  AxisBox box_[3] = {};
  bool shifted_ = false;
  int64_t roll_ = 0, ri_ = 0;
};

// Uniform in [0, 1) from an index (splitmix64), for the jitter of the sampled rows.
double Jitter(uint64_t x) {
  uint64_t z = x * 0x9e3779b97f4a7c15ull + 0x632be59bd9b4e019ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * (1.0 / 9007199254740992.0);
}

}  // namespace

VisiblePairs CountVisiblePairs(const AttentionParams& params, int64_t budget) {
  Oracle oracle(params);
  VisiblePairs result;
  const int64_t B = oracle.batch(), H = oracle.heads(), Sq = oracle.seq_q(), Sk = oracle.seq_k();
  result.total = static_cast<double>(B) * H * Sq * Sk;
  if (result.total == 0.0) return result;

  // (index, weight): one representative per class of batches / heads that see the same mask.
  std::vector<std::pair<int64_t, double>> batches, heads;
  if (oracle.per_batch()) {
    for (int64_t b = 0; b < B; ++b) batches.push_back({b, 1.0});
  } else {
    batches.push_back({0, static_cast<double>(B)});
  }
  if (oracle.per_head()) {
    for (int64_t h = 0; h < H; ++h) heads.push_back({h, 1.0});
  } else if (oracle.shifted_heads()) {
    heads.push_back({0, static_cast<double>(H / 2)});
    heads.push_back({H / 2, static_cast<double>(H - H / 2)});
  } else {
    heads.push_back({0, static_cast<double>(H)});
  }

  const double classes = static_cast<double>(batches.size() * heads.size());
  const double cost = classes * static_cast<double>(Sq) * static_cast<double>(oracle.row_cost());
  int64_t rows = Sq;
  if (cost > static_cast<double>(budget)) {
    rows = std::max<int64_t>(
        1, static_cast<int64_t>(static_cast<double>(budget) /
                                (classes * static_cast<double>(oracle.row_cost()))));
    rows = std::min(rows, Sq);
    result.exact = rows == Sq;
  }
  double visible = 0.0;
  for (const auto& [b, bw] : batches) {
    for (const auto& [h, hw] : heads) {
      double sum = 0.0;
      for (int64_t r = 0; r < rows; ++r) {
        // Row r of `rows` strata over [0, Sq), at a jittered place inside its stratum.
        const int64_t i =
            rows == Sq
                ? r
                : std::min<int64_t>(
                      Sq - 1, static_cast<int64_t>(
                                  (static_cast<double>(r) + Jitter(static_cast<uint64_t>(r))) *
                                  static_cast<double>(Sq) / static_cast<double>(rows)));
        sum += static_cast<double>(oracle.CountRow(b, h, i));
      }
      visible += bw * hw * sum * static_cast<double>(Sq) / static_cast<double>(rows);
    }
  }
  result.visible = visible;
  return result;
}

}  // namespace cli
}  // namespace tessera
