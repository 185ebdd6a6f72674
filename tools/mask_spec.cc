// SPDX-License-Identifier: Apache-2.0
#include "mask_spec.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <utility>

namespace tessera {
namespace cli {
namespace {

// The fields of MaskParams (and of AttentionParams) a form sets: two forms may not set the same.
enum Slot : int {
  kBlocks = 0,
  kNeighborhood,
  kSinks,
  kWindow,
  kPrefix,
  kDocuments,
  kGroups,
  kTree,
  kDense,
  kScore,
  kNumSlots,
};
const char* const kSlotNames[kNumSlots] = {
    "the block mask", "the neighborhood", "the sink tokens", "the window",     "the prefix",
    "the documents",  "the token groups", "the tree",        "the dense mask", "the score function",
};

struct Form {
  const char* name;
  const char* usage;
  std::vector<Slot> slots;
};

const std::vector<Form>& Forms() {
  static const std::vector<Form> forms = {
      {"block", "block:FILE.npy:BQxBK", {kBlocks}},
      {"block-random", "block-random:RHO[:BQxBK]", {kBlocks}},
      {"nbhd1d", "nbhd1d:L:K[:dil=D][:stride=S][:causal=0|1]", {kNeighborhood}},
      {"nbhd2d", "nbhd2d:HxW:KHxKW[:dil=AxB][:stride=AxB][:causal=AxB]", {kNeighborhood}},
      {"nbhd3d",
       "nbhd3d:DxHxW:KDxKHxKW[:dil=AxBxC][:stride=AxBxC][:causal=AxBxC]",
       {kNeighborhood}},
      {"sink", "sink:S:W", {kSinks, kWindow}},
      {"prefix", "prefix:P", {kPrefix}},
      {"doc", "doc:L1,L2,...", {kDocuments}},
      {"shift", "shift:G", {kGroups}},
      {"group-sink", "group-sink:G:S", {kGroups, kSinks}},
      {"s2", "s2:BLOCK:LOCAL:VSTRIDE", {kBlocks}},
      {"radial", "radial:FRAMES:TOKENS_PER_FRAME[:BLOCK]", {kBlocks}},
      {"select", "select:topk=K[:BQxBK] or select:thr=T[:BQxBK]", {kBlocks}},
      {"tree", "tree:FILE.npy", {kTree}},
      {"tree-chain", "tree-chain:T", {kTree}},
      {"dense", "dense:FILE.npy", {kDense}},
      {"sigmoid", "sigmoid[:BIAS]", {kScore}},
  };
  return forms;
}

const Form* FindForm(const std::string& name) {
  for (const Form& f : Forms()) {
    if (name == f.name) return &f;
  }
  return nullptr;
}

std::vector<std::string> Split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    const size_t at = text.find(sep, start);
    parts.push_back(text.substr(start, at == std::string::npos ? std::string::npos : at - start));
    if (at == std::string::npos) return parts;
    start = at + 1;
  }
}

std::string Join(const std::vector<std::string>& parts, size_t from, size_t to, char sep) {
  std::string s;
  for (size_t i = from; i < to; ++i) s += (i > from ? std::string(1, sep) : "") + parts[i];
  return s;
}

// The components of a spec: split at '+', where a piece that does not start with a form's
// name continues the previous piece (a file name or a number such as 1e+3 may hold a '+').
std::vector<std::string> SplitComponents(const std::string& text) {
  std::vector<std::string> components;
  for (const std::string& piece : Split(text, '+')) {
    if (!components.empty() && FindForm(piece.substr(0, piece.find(':'))) == nullptr) {
      components.back() += "+" + piece;
    } else {
      components.push_back(piece);
    }
  }
  return components;
}

// The largest integer a spec may hold (sizes, counts, strides). Far above any sequence that fits
// in memory, and far enough below 2^63 that the sums and products the parser and the library
// form from a few of them cannot overflow int64.
constexpr int64_t kMaxSpecInt = int64_t{1} << 40;
constexpr const char* kMaxSpecIntText = "2^40";

// a * b, or false when it overflows int64 (the operands are non-negative).
bool CheckedMul(int64_t a, int64_t b, int64_t* product) {
  return !__builtin_mul_overflow(a, b, product);
}

bool ParseInt(const std::string& text, int64_t* value) {
  if (text.empty() || text[0] == '+' || std::isspace(static_cast<unsigned char>(text[0]))) {
    return false;
  }
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  if (errno != 0 || end != text.c_str() + text.size()) return false;
  *value = static_cast<int64_t>(v);
  return true;
}

bool ParseReal(const std::string& text, double* value) {
  if (text.empty() || std::isspace(static_cast<unsigned char>(text[0]))) return false;
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(text.c_str(), &end);
  if (errno != 0 || end != text.c_str() + text.size() || !std::isfinite(v)) return false;
  *value = v;
  return true;
}

// "AxBxC" with exactly n integers, each in [min, max].
bool ParseDims(const std::string& text, size_t n, int64_t min, int64_t max,
               std::vector<int64_t>* dims) {
  const std::vector<std::string> parts = Split(text, 'x');
  if (parts.size() != n) return false;
  dims->clear();
  for (const std::string& p : parts) {
    int64_t v = 0;
    if (!ParseInt(p, &v) || v < min || v > max) return false;
    dims->push_back(v);
  }
  return true;
}

std::string Str(int64_t v) { return std::to_string(v); }

std::string DimsString(const int64_t* dims, int n) {
  std::string s;
  for (int a = 0; a < n; ++a) s += (a ? "x" : "") + Str(dims[a]);
  return s;
}

// a / b rounded up, for a >= 0 and b >= 1, without forming a + b - 1 (which may overflow).
int64_t CeilDiv(int64_t a, int64_t b) { return a / b + (a % b != 0 ? 1 : 0); }

int64_t FloorDiv(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// "BQxBK": two multiples of 16 (the kernels' tile granularity).
bool ParseBlockSize(const std::string& form, const std::string& text, int64_t* bq, int64_t* bk,
                    std::string* error) {
  std::vector<int64_t> dims;
  if (!ParseDims(text, 2, 16, kMaxSpecInt, &dims) || dims[0] % 16 != 0 || dims[1] % 16 != 0) {
    *error = form + ": expected the block size BQxBK (positive multiples of 16 up to " +
             kMaxSpecIntText + ", e.g. 64x64), got '" + text + "'";
    return false;
  }
  *bq = dims[0];
  *bk = dims[1];
  return true;
}

// Block masks are described as [Bm, Hm, rows, cols]; a 2-D array is one shared by every batch
// and head.
bool CheckMaskShape(const std::string& what, const std::vector<int64_t>& shape, int64_t batch,
                    int64_t heads, int64_t rows, int64_t cols, const std::string& rows_cols,
                    std::vector<int64_t>* shape4, std::string* error) {
  const bool ok2 = shape.size() == 2 && shape[0] == rows && shape[1] == cols;
  const bool ok4 = shape.size() == 4 && (shape[0] == 1 || shape[0] == batch) &&
                   (shape[1] == 1 || shape[1] == heads) && shape[2] == rows && shape[3] == cols;
  if (!ok2 && !ok4) {
    auto one_or = [](int64_t n) { return n == 1 ? std::string("1") : "1|" + Str(n); };
    *error = what + ": expected shape (" + Str(rows) + ", " + Str(cols) + ") or (" + one_or(batch) +
             ", " + one_or(heads) + ", " + Str(rows) + ", " + Str(cols) + ") " + rows_cols +
             ", got " + ShapeToString(shape);
    return false;
  }
  *shape4 = ok2 ? std::vector<int64_t>{1, 1, rows, cols} : shape;
  return true;
}

}  // namespace

const char* MaskSpecHelp() {
  return R"(--mask SPEC: components joined by '+' (e.g. sigmoid+nbhd2d:32x32:7x7);
BQxBK and BLOCK are multiples of 16; forms marked (causal) turn on causal attention.
  block:FILE.npy:BQxBK       uint8/bool block mask [nqb, nkb] or [B|1, H|1, nqb, nkb]
  block-random:RHO[:BQxBK]   (bench only) per head, each query-block row keeps round(RHO*nkb)
                             random key blocks incl. the diagonal (causal: at or below it);
                             --seed; default 128x128
  nbhd1d:L:K  nbhd2d:HxW:KHxKW  nbhd3d:DxHxW:KDxKHxKW
                             neighborhood attention on a row-major grid (product = Sq = Sk);
                             options :dil=AxB :stride=AxB :causal=0x1, one value per axis
  sink:S:W                   S sink tokens + a window of W tokens incl. self (causal)
  prefix:P                   prefix-LM: keys [0, P) visible to all queries (causal)
  doc:L1,L2,...              packed documents of these lengths (sum = Sk)
  shift:G                    LongLoRA S^2-Attn: groups of G, half the heads shifted (causal)
  group-sink:G:S             SinkLoRA: unshifted groups of G + S sink tokens (causal)
  s2:BLOCK:LOCAL:VSTRIDE     S2-Attention per-head block mask (causal)
  radial:FRAMES:TPF[:BLOCK]  radial video block mask, FRAMES * TPF = Sq = Sk, BLOCK 128
  select:topk=K[:BQxBK]      SelectBlocks on the actual q, k: top-K key blocks per query block,
  select:thr=T[:BQxBK]         or the smallest set with gate mass >= T; default 64x64
  tree:FILE.npy              int32 parent array [Sq] of a draft tree (parents[t] in [-1, t))
  tree-chain:T               a chain of T = Sq nodes
  dense:FILE.npy             bool/uint8 (nonzero = visible) or float32 (additive) mask,
                             [Sq, Sk] or [B|1, H|1, Sq, Sk]
  sigmoid[:BIAS]             sigmoid scores 1/(1+exp(-(s+BIAS))), BIAS 0; no log-sum-exp)";
}

bool MaskSpec::Parse(const std::string& text, const MaskProblem& problem, std::string* error) {
  text_ = text;
  problem_ = problem;
  std::string err;
  auto fail = [&](const std::string& what) {
    *error = "--mask '" + text + "': " + what;
    return false;
  };
  if (text.empty()) return fail("expected a mask spec (e.g. nbhd2d:16x16:7x7), got ''");

  std::string names;
  for (const Form& f : Forms()) names += (names.empty() ? "" : ", ") + std::string(f.name);
  const char* owner[kNumSlots] = {};
  for (const std::string& component : SplitComponents(text)) {
    const std::vector<std::string> fields = Split(component, ':');
    const std::string& name = fields[0];
    const Form* form = FindForm(name);
    if (form == nullptr) {
      return fail("unknown mask form '" + name + "' in '" + component + "' (expected one of " +
                  names + ", joined by '+')");
    }
    for (Slot slot : form->slots) {
      if (owner[slot] != nullptr) {
        return fail("'" + std::string(owner[slot]) + "' and '" + name + "' both set " +
                    kSlotNames[slot] + "; combine at most one of them");
      }
      owner[slot] = form->name;
    }
    const size_t n = fields.size();
    const std::string usage = name + ": expected '" + form->usage + "', got '" + component + "'";
    // Integer field k of the component, in [min, kMaxSpecInt].
    auto field_int = [&](size_t k, int64_t min, const char* what, int64_t* value) {
      if (k >= n || !ParseInt(fields[k], value) || *value < min || *value > kMaxSpecInt) {
        err = name + ": expected " + what + " (an integer from " + Str(min) + " to " +
              kMaxSpecIntText + ") in '" + form->usage + "', got '" +
              (k < n ? fields[k] : std::string()) + "'";
        return false;
      }
      return true;
    };

    bool ok = true;
    if (name == "block") {
      ok = n >= 3 ? ParseBlockFile(fields, &err) : (err = usage, false);
    } else if (name == "block-random") {
      ok = (n == 2 || n == 3) ? ParseBlockRandom(fields, &err) : (err = usage, false);
    } else if (name == "nbhd1d" || name == "nbhd2d" || name == "nbhd3d") {
      ok = n >= 3 ? ParseNeighborhood(fields, name[4] - '0', &err) : (err = usage, false);
    } else if (name == "sink") {
      int64_t sinks = 0, window = 0;
      ok = n == 3 ? field_int(1, 0, "the sink tokens S", &sinks) &&
                        field_int(2, 1, "the window W (tokens, the query included)", &window)
                  : (err = usage, false);
      mask_.sink_tokens = sinks;
      window_left_ = window - 1;
      causal_ = true;
    } else if (name == "prefix") {
      int64_t prefix = 0;
      ok = n == 2 ? field_int(1, 0, "the prefix length P", &prefix) : (err = usage, false);
      if (ok && prefix > problem.seq_k) {
        err = name + ": expected a prefix length P <= Sk = " + Str(problem.seq_k) + ", got " +
              Str(prefix);
        ok = false;
      }
      mask_.prefix_len = prefix;
      causal_ = true;
    } else if (name == "doc") {
      if (n != 2) {
        err = usage;
        ok = false;
      } else {
        int64_t total = 0;
        std::vector<int64_t> lens;
        for (const std::string& item : Split(fields[1], ',')) {
          int64_t len = 0;
          if (!ParseInt(item, &len) || len < 1 || len > problem.seq_k) {
            err = name + ": expected document lengths 'L1,L2,...' (integers in 1..Sk), got '" +
                  fields[1] + "'";
            ok = false;
            break;
          }
          lens.push_back(len);
          // Saturates: a sum past int64 is reported as too large like any other.
          if (__builtin_add_overflow(total, len, &total))
            total = std::numeric_limits<int64_t>::max();
        }
        if (ok && total != problem.seq_k) {
          err = name + ": expected document lengths summing to Sk = " + Str(problem.seq_k) +
                ", got a sum of " + Str(total) + " ('" + fields[1] + "')";
          ok = false;
        }
        if (ok) {
          document_ids_.clear();
          for (size_t d = 0; d < lens.size(); ++d) {
            document_ids_.insert(document_ids_.end(), static_cast<size_t>(lens[d]),
                                 static_cast<int32_t>(d));
          }
          mask_.document_ids = MakeContiguousView(document_ids_.data(), DType::kI32, 2,
                                                  std::vector<int64_t>{1, problem.seq_k}.data());
        }
      }
    } else if (name == "shift" || name == "group-sink") {
      const bool shift = name == "shift";
      int64_t group = 0, sinks = 0;
      ok = (n == (shift ? 2u : 3u)) ? field_int(1, 1, "the group size G", &group) &&
                                          (shift || field_int(2, 0, "the sink tokens S", &sinks))
                                    : (err = usage, false);
      if (ok && (problem.seq_q != problem.seq_k || problem.seq_k % group != 0 ||
                 (shift && group % 2 != 0))) {
        err = name + ": expected " + (shift ? "an even " : "a ") +
              "group size G dividing Sq == Sk, got G = " + Str(group) +
              " with Sq = " + Str(problem.seq_q) + ", Sk = " + Str(problem.seq_k);
        ok = false;
      }
      mask_.group_size = group;
      mask_.shift_half_heads = shift;
      mask_.sink_tokens = sinks;
      causal_ = true;
    } else if (name == "s2") {
      int64_t block = 0, local = 0, stride = 0;
      ok = n == 4 ? field_int(1, 16, "the block size BLOCK", &block) &&
                        field_int(2, 1, "the local blocks LOCAL", &local) &&
                        field_int(3, 1, "the vertical stride VSTRIDE", &stride)
                  : (err = usage, false);
      if (ok && block % 16 != 0) {
        err = name + ": expected the block size BLOCK to be a multiple of 16, got " + Str(block);
        ok = false;
      }
      if (ok) {
        AllocateBlocks(1, problem.heads_q, block, block);
        S2MaskParams s2;
        s2.heads = problem.heads_q;
        s2.num_q_blocks = CeilDiv(problem.seq_q, block);
        s2.num_k_blocks = CeilDiv(problem.seq_k, block);
        s2.local_blocks = local;
        s2.vert_stride = stride;
        s2.causal = true;
        s2.out = mask_.blocks;
        const Status st = BuildS2BlockMask(s2, Context());
        if (!st.ok()) {
          err = name + ": " + st.message();
          ok = false;
        }
      }
      causal_ = true;
    } else if (name == "radial") {
      int64_t frames = 0, tokens = 0, block = 128;
      ok = (n == 3 || n == 4) ? field_int(1, 1, "the frames FRAMES", &frames) &&
                                    field_int(2, 1, "the tokens per frame", &tokens) &&
                                    (n == 3 || field_int(3, 16, "the block size BLOCK", &block))
                              : (err = usage, false);
      if (ok && block % 16 != 0) {
        err = name + ": expected the block size BLOCK to be a multiple of 16, got " + Str(block);
        ok = false;
      }
      int64_t product = 0;
      const bool overflow = !CheckedMul(frames, tokens, &product);
      if (ok && (overflow || product != problem.seq_q || product != problem.seq_k)) {
        err = name + ": expected FRAMES x TOKENS_PER_FRAME = Sq = Sk, got " + Str(frames) + " x " +
              Str(tokens) + " = " + (overflow ? "more than 2^63" : Str(product)) +
              " with Sq = " + Str(problem.seq_q) + ", Sk = " + Str(problem.seq_k);
        ok = false;
      }
      if (ok) {
        AllocateBlocks(1, 1, block, block);
        RadialMaskParams radial;
        radial.frames = frames;
        radial.tokens_per_frame = tokens;
        radial.block = block;
        radial.out = mask_.blocks;
        const Status st = BuildRadialBlockMask(radial, Context());
        if (!st.ok()) {
          err = name + ": " + st.message();
          ok = false;
        }
      }
    } else if (name == "select") {
      ok = (n == 2 || n == 3) ? ParseSelect(fields, &err) : (err = usage, false);
    } else if (name == "tree") {
      ok = n >= 2 ? ParseTreeFile(Join(fields, 1, n, ':'), &err) : (err = usage, false);
    } else if (name == "tree-chain") {
      int64_t nodes = 0;
      ok = n == 2 ? field_int(1, 1, "the tree size T", &nodes) : (err = usage, false);
      if (ok && (nodes != problem.seq_q || nodes > problem.seq_k)) {
        err = name +
              ": expected T = Sq <= Sk (the queries are the tree's nodes), got T = " + Str(nodes) +
              " with Sq = " + Str(problem.seq_q) + ", Sk = " + Str(problem.seq_k);
        ok = false;
      }
      if (ok) {
        tree_parents_.resize(static_cast<size_t>(nodes));
        for (int64_t t = 0; t < nodes; ++t) tree_parents_[t] = static_cast<int32_t>(t - 1);
        mask_.tree_parents = MakeView1(tree_parents_.data(), DType::kI32, nodes);
      }
    } else if (name == "dense") {
      ok = n >= 2 ? ParseDenseFile(Join(fields, 1, n, ':'), &err) : (err = usage, false);
    } else if (name == "sigmoid") {
      double bias = 0.0;
      // The bias is a float: a larger magnitude would be an undefined conversion.
      if (n > 2 || (n == 2 && (!ParseReal(fields[1], &bias) ||
                               std::fabs(bias) > std::numeric_limits<float>::max()))) {
        err = name + ": expected 'sigmoid' or 'sigmoid:BIAS' with a finite float32 BIAS, got '" +
              component + "'";
        ok = false;
      }
      mask_.score = ScoreFunction::kSigmoid;
      mask_.sigmoid_bias = static_cast<float>(bias);
    }
    if (!ok) return fail(err);
  }
  if (random_blocks_ && !BuildRandomBlocks(problem.causal || causal_, &err)) return fail(err);
  return true;
}

void MaskSpec::AllocateBlocks(int64_t b, int64_t h, int64_t bq, int64_t bk) {
  const int64_t shape[4] = {b, h, CeilDiv(problem_.seq_q, bq), CeilDiv(problem_.seq_k, bk)};
  blocks_.assign(static_cast<size_t>(shape[0] * shape[1] * shape[2] * shape[3]), 0);
  mask_.blocks = MakeContiguousView(blocks_.data(), DType::kU8, 4, shape);
  mask_.block_q = bq;
  mask_.block_k = bk;
}

bool MaskSpec::ParseBlockFile(const std::vector<std::string>& fields, std::string* error) {
  const std::string file = Join(fields, 1, fields.size() - 1, ':');
  int64_t bq = 0, bk = 0;
  if (!ParseBlockSize("block", fields.back(), &bq, &bk, error)) return false;
  std::string err;
  if (!LoadNpy(file, {DType::kU8, DType::kBool}, &block_file_, &err)) {
    *error = "block: " + err;
    return false;
  }
  const int64_t nqb = CeilDiv(problem_.seq_q, bq), nkb = CeilDiv(problem_.seq_k, bk);
  std::vector<int64_t> shape4;
  if (!CheckMaskShape("block: " + file, block_file_.shape, problem_.batch, problem_.heads_q, nqb,
                      nkb,
                      "= (ceil(Sq / " + Str(bq) + "), ceil(Sk / " + Str(bk) +
                          ")) for Sq = " + Str(problem_.seq_q) + ", Sk = " + Str(problem_.seq_k),
                      &shape4, error)) {
    return false;
  }
  block_file_.shape = shape4;
  mask_.blocks = block_file_.View();
  mask_.block_q = bq;
  mask_.block_k = bk;
  return true;
}

bool MaskSpec::ParseBlockRandom(const std::vector<std::string>& fields, std::string* error) {
  if (!problem_.allow_random) {
    *error =
        "block-random: a random block mask is a benchmark input (tessera bench); for run, save "
        "the mask and pass block:FILE.npy:BQxBK";
    return false;
  }
  double rho = 0.0;
  if (!ParseReal(fields[1], &rho) || !(rho > 0.0 && rho <= 1.0)) {
    *error = "block-random: expected the density RHO in (0, 1], got '" + fields[1] + "'";
    return false;
  }
  int64_t bq = 128, bk = 128;
  if (fields.size() == 3 && !ParseBlockSize("block-random", fields[2], &bq, &bk, error)) {
    return false;
  }
  random_blocks_ = true;
  random_density_ = rho;
  AllocateBlocks(1, problem_.heads_q, bq, bk);
  return true;  // drawn once every form is known: causal changes which blocks are eligible
}

bool MaskSpec::BuildRandomBlocks(bool causal, std::string* /*error*/) {
  const int64_t heads = mask_.blocks.shape[1], nqb = mask_.blocks.shape[2];
  const int64_t nkb = mask_.blocks.shape[3];
  const int64_t bq = mask_.block_q, bk = mask_.block_k;
  if (nkb == 0) return true;  // Sk = 0: no key block to draw (nor a diagonal one)
  const int64_t keep = std::max<int64_t>(1, std::llround(random_density_ * nkb));
  uint64_t state = problem_.seed ^ 0x6d61736b626c6bull;  // its own stream, apart from q, k, v
  auto next = [&state] {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  std::vector<int64_t> others;
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t qb = 0; qb < nqb; ++qb) {
      // The diagonal block holds the key position of the block's last query (bottom-right).
      const int64_t last = std::min(qb * bq + bq - 1, problem_.seq_q - 1);
      const int64_t diag =
          std::clamp<int64_t>(FloorDiv(last + problem_.seq_k - problem_.seq_q, bk), 0, nkb - 1);
      const int64_t eligible = causal ? diag + 1 : nkb;
      uint8_t* row = &blocks_[static_cast<size_t>((h * nqb + qb) * nkb)];
      row[diag] = 1;
      others.clear();
      for (int64_t kb = 0; kb < eligible; ++kb) {
        if (kb != diag) others.push_back(kb);
      }
      // A partial Fisher-Yates shuffle draws keep - 1 distinct other blocks.
      const int64_t draw = std::min<int64_t>(keep - 1, static_cast<int64_t>(others.size()));
      for (int64_t d = 0; d < draw; ++d) {
        const int64_t pick =
            d + static_cast<int64_t>(next() % static_cast<uint64_t>(others.size() - d));
        std::swap(others[d], others[pick]);
        row[others[d]] = 1;
      }
    }
  }
  return true;
}

bool MaskSpec::ParseNeighborhood(const std::vector<std::string>& fields, int rank,
                                 std::string* error) {
  const std::string name = fields[0];
  NeighborhoodMask& n = mask_.neighborhood;
  const std::string axes = rank == 1 ? "one value" : Str(rank) + " values joined by 'x'";
  std::vector<int64_t> v;
  const std::string range = std::string("each from 1 to ") + kMaxSpecIntText;
  if (!ParseDims(fields[1], rank, 1, kMaxSpecInt, &v)) {
    *error = name + ": expected the grid (" + axes + ", " + range + "), got '" + fields[1] + "'";
    return false;
  }
  int64_t tokens = 1;
  bool tokens_overflow = false;
  for (int a = 0; a < rank; ++a) {
    n.grid[a] = v[a];
    tokens_overflow = tokens_overflow || !CheckedMul(tokens, v[a], &tokens);
  }
  if (!ParseDims(fields[2], rank, 1, kMaxSpecInt, &v)) {
    *error = name + ": expected the window (" + axes + ", " + range + "), got '" + fields[2] + "'";
    return false;
  }
  std::copy(v.begin(), v.end(), n.window);
  bool seen[3] = {false, false, false};
  const char* const options[3] = {"dil", "stride", "causal"};
  for (size_t f = 3; f < fields.size(); ++f) {
    const size_t eq = fields[f].find('=');
    const std::string key = fields[f].substr(0, eq);
    const int k = key == "dil" ? 0 : key == "stride" ? 1 : key == "causal" ? 2 : -1;
    if (eq == std::string::npos || k < 0 || seen[k]) {
      *error = name + ": expected options dil=..., stride=... or causal=... (each at most once), " +
               "got '" + fields[f] + "'";
      return false;
    }
    seen[k] = true;
    const std::string value = fields[f].substr(eq + 1);
    if (!ParseDims(value, rank, k == 2 ? 0 : 1, kMaxSpecInt, &v) ||
        (k == 2 && std::any_of(v.begin(), v.end(), [](int64_t c) { return c > 1; }))) {
      *error = name + ": expected " + options[k] + "= with " + axes + " (" +
               (k == 2 ? std::string("0 or 1") : range) + "), got '" + fields[f] + "'";
      return false;
    }
    for (int a = 0; a < rank; ++a) {
      if (k == 0) n.dilation[a] = v[a];
      if (k == 1) n.stride[a] = v[a];
      if (k == 2) n.causal[a] = v[a] != 0;
    }
  }
  for (int a = 0; a < rank; ++a) {
    if (n.window[a] > n.grid[a] / n.dilation[a]) {  // window * dilation > grid, without overflow
      *error = name + ": expected window x dilation <= grid on every axis, got window " +
               DimsString(n.window, rank) + ", dilation " + DimsString(n.dilation, rank) +
               ", grid " + DimsString(n.grid, rank);
      return false;
    }
    if (n.stride[a] > n.window[a]) {
      *error = name + ": expected stride <= window on every axis, got stride " +
               DimsString(n.stride, rank) + ", window " + DimsString(n.window, rank);
      return false;
    }
  }
  if (tokens_overflow || tokens != problem_.seq_q || tokens != problem_.seq_k) {
    *error = name + ": expected the grid's product to equal the sequence length (Sq = Sk), got " +
             DimsString(n.grid, rank) + " = " + (tokens_overflow ? "more than 2^63" : Str(tokens)) +
             " tokens with Sq = " + Str(problem_.seq_q) + ", Sk = " + Str(problem_.seq_k);
    return false;
  }
  n.rank = rank;
  return true;
}

bool MaskSpec::ParseSelect(const std::vector<std::string>& fields, std::string* error) {
  const std::string& how = fields[1];
  double value = 0.0;
  int64_t top_k = 0;
  if (how.compare(0, 5, "topk=") == 0 && ParseInt(how.substr(5), &top_k) && top_k >= 1 &&
      top_k <= kMaxSpecInt) {
    select_top_k_ = top_k;
  } else if (how.compare(0, 4, "thr=") == 0 && ParseReal(how.substr(4), &value) && value > 0 &&
             value <= 1) {
    select_threshold_ = static_cast<float>(value);
  } else {
    *error = std::string("select: expected topk=K (an integer from 1 to ") + kMaxSpecIntText +
             ") or thr=T (a mass in (0, 1]), got '" + how + "'";
    return false;
  }
  int64_t bq = 64, bk = 64;
  if (fields.size() == 3 && !ParseBlockSize("select", fields[2], &bq, &bk, error)) return false;
  AllocateBlocks(problem_.batch, problem_.heads_q, bq, bk);
  select_ = true;
  return true;
}

bool MaskSpec::ParseTreeFile(const std::string& file, std::string* error) {
  std::string err;
  if (!LoadNpy(file, {DType::kI32}, &tree_file_, &err)) {
    *error = "tree: " + err;
    return false;
  }
  const std::vector<int64_t>& shape = tree_file_.shape;
  if (shape.size() != 1 || shape[0] != problem_.seq_q || shape[0] > problem_.seq_k) {
    *error = "tree: " + file + ": expected a parent array of shape (" + Str(problem_.seq_q) +
             ",) (one node per query, Sq <= Sk = " + Str(problem_.seq_k) + "), got " +
             ShapeToString(shape);
    return false;
  }
  const int32_t* parents = reinterpret_cast<const int32_t*>(tree_file_.data.get());
  for (int64_t t = 0; t < shape[0]; ++t) {
    if (parents[t] < -1 || parents[t] >= t) {
      *error = "tree: " + file + ": expected parents[t] in [-1, t) (parents before children), " +
               "got " + Str(parents[t]) + " at t = " + Str(t);
      return false;
    }
  }
  mask_.tree_parents = MakeView1(const_cast<int32_t*>(parents), DType::kI32, shape[0]);
  return true;
}

bool MaskSpec::ParseDenseFile(const std::string& file, std::string* error) {
  std::string err;
  if (!LoadNpy(file, {DType::kBool, DType::kU8, DType::kF32}, &dense_file_, &err)) {
    *error = "dense: " + err;
    return false;
  }
  std::vector<int64_t> shape4;
  if (!CheckMaskShape("dense: " + file, dense_file_.shape, problem_.batch, problem_.heads_q,
                      problem_.seq_q, problem_.seq_k, "= (Sq, Sk)", &shape4, error)) {
    return false;
  }
  dense_file_.shape = shape4;
  mask_.dense = dense_file_.View();
  return true;
}

bool MaskSpec::Apply(AttentionParams* params, std::string* error) const {
  if (window_left_ >= 0) {
    if (params->window_left != -1 || params->window_right != -1) {
      *error = "--mask '" + text_ + "': sink:S:W sets the sliding window (W tokens); expected " +
               "no --window with it";
      return false;
    }
    params->window_left = window_left_;
  }
  if (causal_) params->causal = true;
  params->mask = mask_;
  return true;
}

Status MaskSpec::Select(const AttentionParams& params, const Context& ctx) {
  BlockSelectParams sp;
  sp.q = params.q;
  sp.k = params.k;
  sp.block_q = mask_.block_q;
  sp.block_k = mask_.block_k;
  sp.top_k = select_top_k_;
  sp.threshold = select_threshold_;
  sp.scale = params.scale;
  sp.causal = params.causal;
  sp.align = params.align;
  sp.out = mask_.blocks;
  return SelectBlocks(sp, ctx);
}

}  // namespace cli
}  // namespace tessera
