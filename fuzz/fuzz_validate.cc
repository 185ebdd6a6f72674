// SPDX-License-Identifier: Apache-2.0
// Fuzzes the argument validation of every public entry point. The bytes pick an entry point and
// describe a problem: small sizes with real buffers sized exactly to what each view describes,
// mutated toward mismatched shapes, dtypes, ranks and strides, nasty scalars (negative, near
// INT64_MAX), and views whose extents are negative or overflow, handed a null or a one-element
// buffer (the library must reject those from the sizes alone). A view that is valid but too big
// to allocate gets a null pointer, never a short buffer, so every report is the library's.
// Requires: no crash, no sanitizer report, inputs never written, and on error every output (and
// in-place argument) byte-for-byte untouched.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "tessera/tessera.h"

namespace {

using namespace tessera;  // NOLINT: a harness, not library code
using fuzz::Buffer;
using fuzz::Check;

constexpr int64_t kMaxElems = int64_t{1} << 16;  // elements of one real buffer
constexpr int64_t kMaxWork = int64_t{1} << 16;   // product of a view's dims (0 counted as 1)
constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max();
constexpr int64_t kI64Min = std::numeric_limits<int64_t>::min();

enum class Role { kInput, kOptionalInput, kOutput, kOptionalOutput, kInOut };

class Harness {
 public:
  explicit Harness(FuzzedDataProvider* fdp) : f_(*fdp) {}

  // ---- scalars ----
  int64_t Nasty() {
    static const int64_t kValues[] = {0,
                                      1,
                                      -1,
                                      2,
                                      16,
                                      17,
                                      64,
                                      255,
                                      256,
                                      int64_t{1} << 20,
                                      std::numeric_limits<int32_t>::max(),
                                      int64_t{1} << 31,
                                      int64_t{1} << 32,
                                      int64_t{1} << 40,
                                      int64_t{1} << 62,
                                      kI64Max - 1,
                                      kI64Max,
                                      kI64Min,
                                      kI64Min + 1,
                                      -(int64_t{1} << 62),
                                      std::numeric_limits<int32_t>::min()};
    return f_.PickValueInArray(kValues);
  }
  // Mostly in [lo, hi]; sometimes a nasty value or any int64.
  int64_t Int(int64_t lo, int64_t hi) {
    hi = std::max(lo, hi);
    const uint8_t sel = f_.ConsumeIntegral<uint8_t>();
    if (sel < 232) return f_.ConsumeIntegralInRange<int64_t>(lo, hi);
    if (sel < 252) return Nasty();
    return f_.ConsumeIntegral<int64_t>();
  }
  int32_t Int32(int64_t lo, int64_t hi) {
    const int64_t v = Int(lo, hi);
    return static_cast<int32_t>(
        std::max<int64_t>(std::numeric_limits<int32_t>::min(), std::min<int64_t>(v, 0x7fffffff)));
  }
  bool Bool() { return f_.ConsumeBool(); }
  float Float(float nice) {
    static const float kValues[] = {0.0f,   1.0f,    -1.0f,  0.5f, 1e-30f,   1e30f,
                                    -1e30f, 3.4e38f, 1e-45f, NAN,  INFINITY, -INFINITY};
    const uint8_t sel = f_.ConsumeIntegral<uint8_t>();
    if (sel < 200) return nice;
    if (sel < 250) return f_.PickValueInArray(kValues);
    return f_.ConsumeFloatingPoint<float>();
  }
  std::optional<float> Scale() {
    if (Bool()) return std::nullopt;
    return Float(0.25f);
  }
  template <typename E>
  E Enum(int count) {  // a valid value, sometimes an invalid one
    const uint8_t sel = f_.ConsumeIntegral<uint8_t>();
    if (sel < 248) return static_cast<E>(sel % count);
    return static_cast<E>(sel % 2 ? count : -1);
  }
  DType FloatDType() {
    static const DType kValues[] = {DType::kF32, DType::kBF16, DType::kF16};
    return f_.PickValueInArray(kValues);
  }
  Context Ctx() {
    Context ctx;
    ctx.num_threads = static_cast<int32_t>(f_.ConsumeIntegralInRange<int>(-1, 3));
    ctx.path = Enum<Path>(4);
    return ctx;
  }

  // ---- i32 views (seq_lens, block tables, cu_seqlens, positions, tree parents) ----
  // An i32 [count] view when 0 <= count <= 4096, else an unset one; values mostly in [lo, hi].
  // Sometimes of another dtype, rank, length or last-dim stride (every op must reject those).
  TensorView Ints(int64_t count, int64_t lo, int64_t hi, bool sorted = false) {
    if (count < 0 || count > 4096) return TensorView();
    return MutateInts(MakeView1(IntBuffer(count, lo, hi, sorted), DType::kI32, count));
  }
  // An i32 [rows, cols] view (block tables) when the entries number 0..4096, else an unset one.
  TensorView IntTable(int64_t rows, int64_t cols, int64_t lo, int64_t hi) {
    int64_t count = 0;
    if (rows < 0 || cols < 0 || __builtin_mul_overflow(rows, cols, &count) || count > 4096) {
      return TensorView();
    }
    const int64_t shape[2] = {rows, cols};
    return MutateInts(MakeContiguousView(IntBuffer(count, lo, hi, false), DType::kI32, 2, shape));
  }
  int32_t* IntBuffer(int64_t count, int64_t lo, int64_t hi, bool sorted) {
    auto b = std::make_unique<Buffer>(static_cast<size_t>(count) * 4);
    int32_t* p = reinterpret_cast<int32_t*>(b->data());
    for (int64_t i = 0; i < count; ++i) p[i] = Int32(lo, hi);
    if (sorted) {
      for (int64_t i = 1; i < count; ++i) p[i] = std::max(p[i], p[i - 1]);
    }
    return reinterpret_cast<int32_t*>(Keep(std::move(b), Role::kInput));
  }
  TensorView MutateInts(TensorView t) {
    const uint8_t sel = f_.ConsumeIntegral<uint8_t>();
    if (sel < 240) return t;
    switch (sel % 4) {
      case 0:
        t.dtype = Bool() ? DType::kF32 : DType::kU8;
        break;
      case 1:
        t.shape[0] += 1;
        break;
      case 2:
        t.strides[t.rank - 1] = 2;
        break;
      default:
        t.rank = t.rank == 1 ? 2 : 1;
        break;
    }
    return t;
  }

  // ---- tensors ----
  // A view of the intended dims and dtype, perhaps mutated, with a buffer when it is small.
  TensorView Tensor(std::vector<int64_t> dims, DType dtype, Role role) {
    const bool optional = role == Role::kOptionalInput || role == Role::kOptionalOutput;
    const uint8_t mode = f_.ConsumeIntegral<uint8_t>();
    TensorView t;
    if (optional && mode < 48) return t;  // off
    if (mode >= 160 && mode < 184 && !dims.empty()) {
      dims[f_.ConsumeIntegralInRange<size_t>(0, dims.size() - 1)] = Int(0, 5);
    } else if (mode >= 184 && mode < 196) {
      dtype = Enum<DType>(6);
    } else if (mode >= 196 && mode < 206) {
      // Rank 0..5: a view holds 4 dims, so a rank-5 view has only those (finding 7).
      if (Bool() && !dims.empty()) {
        dims.pop_back();
      } else if (dims.size() < 5) {
        dims.push_back(1);
      }
    } else if (mode >= 206 && mode < 224) {
      for (int64_t& d : dims) d = Bool() ? Nasty() : d;
    }
    const int rank = static_cast<int>(dims.size());
    t.dtype = dtype;
    t.rank = rank;
    bool valid =
        rank >= 1 && rank <= 4 && static_cast<int>(dtype) >= 0 && static_cast<int>(dtype) <= 5;
    // Strides: contiguous, or padded / broadcast / nasty.
    int64_t strides[4] = {1, 1, 1, 1};
    int64_t inner = 1;
    const bool odd_strides = mode >= 224 && mode < 248;
    for (int i = std::min(rank, 4) - 1; i >= 0; --i) {
      int64_t s = inner;
      if (odd_strides) {
        const uint8_t k = f_.ConsumeIntegral<uint8_t>();
        s = k < 64 ? 0 : k < 200 ? std::min(inner, kI64Max - 3) + (k & 3) : Nasty();
      }
      strides[i] = s;
      if (__builtin_mul_overflow(inner, std::max<int64_t>(dims[i], 1), &inner)) inner = kI64Max;
    }
    for (int i = 0; i < std::min(rank, 4); ++i) {
      t.shape[i] = dims[i];
      t.strides[i] = strides[i];
      valid = valid && dims[i] >= 0 && strides[i] >= 0;
    }
    // Extent (elements spanned) and work, overflow-checked.
    int64_t extent = 1, work = 1;
    bool empty = false;
    for (int i = 0; valid && i < rank; ++i) {
      int64_t span = 0;
      if (dims[i] == 0) empty = true;
      valid = !__builtin_mul_overflow(std::max<int64_t>(dims[i], 1) - 1, strides[i], &span) &&
              !__builtin_add_overflow(extent, span, &extent) &&
              !__builtin_mul_overflow(work, std::max<int64_t>(dims[i], 1), &work);
    }
    if (empty) extent = 0;
    const bool null_data = mode >= 248 || (optional && mode < 56);
    std::unique_ptr<Buffer> b;
    if (null_data) {
      // data == nullptr: required views must be rejected, optional ones are off.
    } else if (!valid) {
      if (Bool()) b = std::make_unique<Buffer>(static_cast<size_t>(8));  // one element, at most
    } else if (extent <= kMaxElems && work <= kMaxWork) {
      b = std::make_unique<Buffer>(static_cast<size_t>(extent) * DTypeSize(dtype));
    }
    // else: valid but too big to allocate; nullptr (never a short buffer).
    if (b != nullptr) {
      if (role == Role::kInput || role == Role::kOptionalInput || role == Role::kInOut) {
        FillValues(b.get(), valid ? dtype : DType::kU8);
      }
      t.data = Keep(std::move(b), role);
    }
    return t;
  }

  // ---- the checks after a call ----
  void CheckAfter(const Status& s, const char* what) {
    if (!s.ok()) Check(!s.message().empty(), std::string(what) + ": an error without a message");
    for (const Kept& k : kept_) {
      if (k.role == Role::kInput || k.role == Role::kOptionalInput) {
        Check(k.buffer->Equals(k.snapshot), std::string(what) + " wrote an input");
      } else if (!s.ok() && k.role == Role::kInOut) {
        Check(k.buffer->Equals(k.snapshot),
              std::string(what) + " failed and changed an in-place argument: " + s.ToString());
      } else if (!s.ok()) {
        Check(k.buffer->AllSentinel(),
              std::string(what) + " failed and wrote an output: " + s.ToString());
      }
    }
  }
  // Outputs and in-place arguments become sentinel / their current value again (a successful
  // call may have written them), for a second call on the same arguments.
  void Rearm() {
    for (Kept& k : kept_) {
      if (k.role == Role::kOutput || k.role == Role::kOptionalOutput) {
        std::memset(k.buffer->data(), fuzz::kSentinel, k.buffer->bytes());
      } else if (k.role == Role::kInOut) {
        k.snapshot = k.buffer->Copy();
      }
    }
  }
  // The buffers of a KV cache: inputs (decode, ReadKV) or in-place arguments (AppendKV).
  void* Bytes(int64_t bytes, Role role) {
    if (bytes < 0 || bytes > kMaxElems * 4) return nullptr;
    auto b = std::make_unique<Buffer>(static_cast<size_t>(bytes));
    FillValues(b.get(), DType::kU8);
    return Keep(std::move(b), role);
  }
  float* Floats(int64_t count, bool zero, Role role) {
    if (count < 0 || count > kMaxElems) return nullptr;
    auto b = std::make_unique<Buffer>(static_cast<size_t>(count) * 4);
    if (zero) {
      std::memset(b->data(), 0, b->bytes());
    } else {
      FillValues(b.get(), DType::kF32);
    }
    return reinterpret_cast<float*>(Keep(std::move(b), role));
  }

  FuzzedDataProvider& fdp() { return f_; }

 private:
  struct Kept {
    std::unique_ptr<Buffer> buffer;
    Role role;
    std::vector<uint8_t> snapshot;
  };
  void* Keep(std::unique_ptr<Buffer> b, Role role) {
    void* p = b->data();
    Kept k{std::move(b), role, {}};
    if (role != Role::kOutput && role != Role::kOptionalOutput) k.snapshot = k.buffer->Copy();
    kept_.push_back(std::move(k));
    return p;
  }
  // Values: a seeded stream of small numbers; sometimes a NaN or inf among them.
  void FillValues(Buffer* b, DType dtype) {
    uint64_t state = f_.ConsumeIntegral<uint8_t>();
    const uint8_t special = f_.ConsumeIntegral<uint8_t>();
    const size_t elem = DTypeSize(dtype), n = b->bytes() / elem;
    for (size_t i = 0; i < n; ++i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      const int64_t r = static_cast<int64_t>(state >> 40);
      float x = static_cast<float>(r % 2001 - 1000) / 500.0f;
      if (special >= 240 && i == special % n) x = special % 2 ? NAN : INFINITY;
      uint8_t* p = b->data() + i * elem;
      switch (dtype) {
        case DType::kF32:
          std::memcpy(p, &x, 4);
          break;
        case DType::kF16: {
          const uint16_t h = FloatToF16(x);
          std::memcpy(p, &h, 2);
          break;
        }
        case DType::kBF16: {
          const uint16_t h = FloatToBF16(x);
          std::memcpy(p, &h, 2);
          break;
        }
        case DType::kI32: {
          const int32_t v = static_cast<int32_t>(r % 4);
          std::memcpy(p, &v, 4);
          break;
        }
        default:
          *p = static_cast<uint8_t>(r & 1);
      }
    }
    for (size_t i = n * elem; i < b->bytes(); ++i) b->data()[i] = static_cast<uint8_t>(i);
  }

  FuzzedDataProvider& f_;
  std::vector<Kept> kept_;
};

// ---------------------------------------------------------------------------------------------
// Problems shared by several entry points.

struct Shape {
  int64_t b, sq, sk, hq, hkv, d;
  DType dtype;
};

Shape PickShape(Harness& h, int64_t max_seq = 40) {
  FuzzedDataProvider& f = h.fdp();
  Shape s;
  s.b = f.ConsumeIntegralInRange<int64_t>(1, 2);
  s.sq = f.ConsumeIntegralInRange<int64_t>(0, max_seq);
  s.sk = f.ConsumeIntegralInRange<int64_t>(0, max_seq);
  s.hkv = f.ConsumeIntegralInRange<int64_t>(1, 2);
  s.hq = s.hkv * f.ConsumeIntegralInRange<int64_t>(1, 2);
  static const int64_t kDims[] = {1, 3, 8, 16, 33, 64};
  s.d = f.PickValueInArray(kDims);
  s.dtype = h.FloatDType();
  return s;
}

int64_t CeilDivOr1(int64_t a, int64_t b) { return b > 0 && a >= 0 ? a / b + (a % b != 0) : 1; }

void FillMask(Harness& h, const Shape& s, MaskParams* m) {
  FuzzedDataProvider& f = h.fdp();
  const uint8_t which = f.ConsumeIntegral<uint8_t>();
  const int64_t bm = f.ConsumeBool() ? 1 : s.b, hm = f.ConsumeBool() ? 1 : s.hq;
  if (which & 1) {
    static const int64_t kBlocks[] = {16, 32, 64, 0, 8, 17};
    m->block_q = f.ConsumeIntegral<uint8_t>() < 250 ? f.PickValueInArray(kBlocks) : h.Nasty();
    m->block_k = f.ConsumeIntegral<uint8_t>() < 250 ? f.PickValueInArray(kBlocks) : h.Nasty();
    m->blocks = h.Tensor({bm, hm, CeilDivOr1(s.sq, m->block_q), CeilDivOr1(s.sk, m->block_k)},
                         f.ConsumeBool() ? DType::kU8 : DType::kBool, Role::kOptionalInput);
  }
  if (which & 2) {
    NeighborhoodMask& n = m->neighborhood;
    n.rank = static_cast<int32_t>(h.Int(1, 3));
    for (int a = 0; a < 3; ++a) {
      n.grid[a] = h.Int(1, 8);
      n.window[a] = h.Int(1, 4);
      n.dilation[a] = h.Int(1, 2);
      n.stride[a] = h.Int(1, 2);
      n.causal[a] = f.ConsumeBool();
    }
  }
  if (which & 4) m->sink_tokens = h.Int(0, s.sk);
  if (which & 8) m->prefix_len = h.Int(0, s.sk);
  if (which & 16) m->document_ids = h.Tensor({bm, s.sk}, DType::kI32, Role::kOptionalInput);
  if (which & 32) {
    m->group_size = h.Int(0, 8);
    m->shift_half_heads = f.ConsumeBool();
  }
  if (which & 64) {
    m->tree_parents = h.Ints(h.Int(0, s.sq), -1, s.sq);
  }
  if (which & 128) {
    static const DType kDense[] = {DType::kBool, DType::kU8, DType::kF32};
    m->dense =
        f.ConsumeBool()
            ? h.Tensor({s.sq, s.sk}, f.PickValueInArray(kDense), Role::kOptionalInput)
            : h.Tensor({bm, hm, s.sq, s.sk}, f.PickValueInArray(kDense), Role::kOptionalInput);
  }
  m->score = h.Enum<ScoreFunction>(2);
  m->sigmoid_bias = h.Float(-1.0f);
}

AttentionParams PickAttention(Harness& h, const Shape& s) {
  FuzzedDataProvider& f = h.fdp();
  AttentionParams p;
  p.q = h.Tensor({s.b, s.sq, s.hq, s.d}, s.dtype, Role::kInput);
  p.k = h.Tensor({s.b, s.sk, s.hkv, s.d}, s.dtype, Role::kInput);
  p.v = h.Tensor({s.b, s.sk, s.hkv, s.d}, s.dtype, Role::kInput);
  p.scale = h.Scale();
  p.causal = f.ConsumeBool();
  p.window_left = h.Int(-1, 8);
  p.window_right = h.Int(-1, 8);
  p.align = h.Enum<MaskAlign>(2);
  p.softcap = f.ConsumeBool() ? 0.0f : h.Float(30.0f);
  if (f.ConsumeBool()) {
    p.alibi_slopes = f.ConsumeBool() ? h.Tensor({s.hq}, DType::kF32, Role::kOptionalInput)
                                     : h.Tensor({s.b, s.hq}, DType::kF32, Role::kOptionalInput);
  }
  if (f.ConsumeIntegral<uint8_t>() < 48) {  // varlen: the sequences packed along the tokens
    p.num_seqs = static_cast<int32_t>(h.Int(0, 3));
    const int64_t n = p.num_seqs >= 0 ? int64_t{p.num_seqs} + 1 : 1;
    p.cu_seqlens_q = h.Ints(n, 0, s.sq, f.ConsumeBool());
    p.cu_seqlens_k = h.Ints(n, 0, s.sk, f.ConsumeBool());
  }
  if (f.ConsumeBool()) FillMask(h, s, &p.mask);
  return p;
}

void FillOutputs(Harness& h, const Shape& s, bool lse_required, AttentionParams* p, Role out_role) {
  p->out = h.Tensor({s.b, s.sq, s.hq, s.d}, s.dtype, out_role);
  p->lse = h.Tensor({s.b, s.hq, s.sq}, DType::kF32,
                    lse_required ? (out_role == Role::kOutput ? Role::kOutput : Role::kInput)
                                 : Role::kOptionalOutput);
}

// ---------------------------------------------------------------------------------------------
// KV caches.

int64_t RowBytes(KVDType dtype, int64_t d) {
  if (d < 0 || d > (int64_t{1} << 20)) return -1;  // no buffer for it
  switch (dtype) {
    case KVDType::kF32:
      return 4 * d;
    case KVDType::kBF16:
    case KVDType::kF16:
      return 2 * d;
    case KVDType::kInt8:
      return d;
    case KVDType::kInt4:
      return (d + 1) / 2;
  }
  return -1;
}

// A cache and a batch over it; the cache's buffers have `role` (AppendKV writes them).
void PickCache(Harness& h, const Shape& s, Role role, KVCacheView* c, KVBatchView* kv) {
  FuzzedDataProvider& f = h.fdp();
  c->dtype = h.Enum<KVDType>(5);
  c->num_pages = h.Int(1, 6);
  c->page_size = h.Int(1, 16);
  c->num_kv_heads = f.ConsumeIntegral<uint8_t>() < 240 ? s.hkv : h.Int(0, 3);
  c->head_dim = f.ConsumeIntegral<uint8_t>() < 240 ? s.d : h.Int(0, 64);
  const int64_t row = RowBytes(c->dtype, c->head_dim);
  int64_t rows = 0, bytes = 0;
  const bool sized = row >= 0 && c->num_pages >= 0 && c->page_size >= 0 && c->num_kv_heads >= 0 &&
                     !__builtin_mul_overflow(c->num_pages, c->num_kv_heads, &rows) &&
                     !__builtin_mul_overflow(rows, c->page_size, &rows) &&
                     !__builtin_mul_overflow(rows, row, &bytes);
  const uint8_t nulls = f.ConsumeIntegral<uint8_t>();
  if (sized && (nulls & 1) == 0) c->k = h.Bytes(bytes, role);
  if (sized && (nulls & 2) == 0) c->v = h.Bytes(bytes, role);
  const bool quantized = c->dtype == KVDType::kInt8 || c->dtype == KVDType::kInt4;
  if (sized && quantized) {
    const int64_t pairs = rows <= kMaxElems ? rows * 2 : -1;  // -1: too many, no buffer
    if ((nulls & 4) == 0) c->k_scales = h.Floats(pairs, false, role);
    if ((nulls & 8) == 0) c->v_scales = h.Floats(pairs, false, role);
    const bool zero = f.ConsumeBool();  // not yet calibrated
    int64_t channels = 0;
    if (!__builtin_mul_overflow(c->num_kv_heads, std::max<int64_t>(c->head_dim, 0), &channels)) {
      if ((nulls & 16) == 0) c->k_channel_scales = h.Floats(channels, zero, role);
      if ((nulls & 32) == 0) c->v_channel_scales = h.Floats(channels, zero, role);
    }
  }
  kv->batch = f.ConsumeIntegral<uint8_t>() < 244 ? s.b : h.Int(0, 3);
  int64_t capacity = 0;
  if (__builtin_mul_overflow(std::max<int64_t>(c->num_pages, 0), std::max<int64_t>(c->page_size, 0),
                             &capacity)) {
    capacity = kI64Max;
  }
  const bool paged = f.ConsumeBool();
  kv->seq_lens = h.Ints(kv->batch, 0, paged ? std::min<int64_t>(capacity, 64) : c->page_size);
  if (paged) {
    kv->block_table =
        h.IntTable(kv->batch, h.Int(1, 6), 0, c->num_pages > 0 ? c->num_pages - 1 : 0);
  }
}

// ---------------------------------------------------------------------------------------------
// The entry points.

void FuzzForward(Harness& h) {
  const Shape s = PickShape(h);
  AttentionParams p = PickAttention(h, s);
  FillOutputs(h, s, false, &p, Role::kOutput);
  h.CheckAfter(AttentionForward(p, h.Ctx()), "AttentionForward");
}

void FuzzBackward(Harness& h) {
  const Shape s = PickShape(h, 24);
  AttentionBackwardParams p;
  p.forward = PickAttention(h, s);
  FillOutputs(h, s, true, &p.forward, Role::kInput);
  p.dout = h.Tensor({s.b, s.sq, s.hq, s.d}, s.dtype, Role::kInput);
  p.dq = h.Tensor({s.b, s.sq, s.hq, s.d}, s.dtype, Role::kOutput);
  p.dk = h.Tensor({s.b, s.sk, s.hkv, s.d}, s.dtype, Role::kOutput);
  p.dv = h.Tensor({s.b, s.sk, s.hkv, s.d}, s.dtype, Role::kOutput);
  h.CheckAfter(AttentionBackward(p, h.Ctx()), "AttentionBackward");
}

void FuzzMerge(Harness& h) {
  FuzzedDataProvider& f = h.fdp();
  const int64_t r = f.ConsumeIntegralInRange<int64_t>(0, 4);
  const int64_t t = f.ConsumeIntegralInRange<int64_t>(0, 16);
  const int64_t heads = f.ConsumeIntegralInRange<int64_t>(1, 4);
  const int64_t d = f.ConsumeIntegralInRange<int64_t>(1, 70);
  const DType dtype = h.FloatDType();
  MergeStatesParams p;
  p.out_parts = h.Tensor({r, t, heads, d}, dtype, Role::kInput);
  p.lse_parts = h.Tensor({r, t, heads}, DType::kF32, Role::kInput);
  p.out = h.Tensor({t, heads, d}, dtype, Role::kOutput);
  p.lse = h.Tensor({t, heads}, DType::kF32, Role::kOptionalOutput);
  p.base2 = f.ConsumeBool();
  h.CheckAfter(MergeStates(p, h.Ctx()), "MergeStates");
}

DecodeParams PickDecode(Harness& h, const Shape& s, int64_t queries) {
  FuzzedDataProvider& f = h.fdp();
  DecodeParams p;
  PickCache(h, s, Role::kInput, &p.cache, &p.kv);
  const int64_t b = p.kv.batch >= 0 && p.kv.batch <= 4 ? p.kv.batch : s.b;
  p.q = h.Tensor({b, queries, s.hq, s.d}, s.dtype, Role::kInput);
  p.out = h.Tensor({b, queries, s.hq, s.d}, s.dtype, Role::kOutput);
  p.lse = h.Tensor({b, s.hq, queries}, DType::kF32, Role::kOptionalOutput);
  p.scale = h.Scale();
  p.causal = f.ConsumeBool();
  p.window_left = h.Int(-1, 16);
  p.softcap = f.ConsumeBool() ? 0.0f : h.Float(20.0f);
  if (f.ConsumeBool()) p.alibi_slopes = h.Tensor({s.hq}, DType::kF32, Role::kOptionalInput);
  p.split_tokens = f.ConsumeBool() ? 0 : h.Int(1, 16);
  return p;
}

void FuzzDecode(Harness& h) {
  FuzzedDataProvider& f = h.fdp();
  const Shape s = PickShape(h);
  const int64_t queries = h.Int(1, 4);
  DecodeParams p = PickDecode(h, s, queries >= 0 && queries <= 17 ? queries : 1);
  if (queries < 0 || queries > 17) {
    // An out-of-range Q on a view with a buffer: must be rejected.
    p.q.shape[1] = queries;
    p.out.shape[1] = queries;
  }
  const Context ctx = h.Ctx();
  switch (f.ConsumeIntegralInRange<int>(0, 2)) {
    case 0:
      h.CheckAfter(Decode(p, ctx), "Decode");
      break;
    case 1: {
      DecodePlan plan;
      h.CheckAfter(PlanDecode(p, ctx, &plan), "PlanDecode");
      break;
    }
    default: {
      DecodePlan plan;
      const Status planned = PlanDecode(p, ctx, &plan);
      h.CheckAfter(planned, "PlanDecode");
      h.Rearm();
      // Run the plan (or an empty one) on the same call, or on other sequence lengths.
      if (f.ConsumeBool()) {
        const int64_t cap = p.kv.block_table.data != nullptr ? 64 : p.cache.page_size;
        p.kv.seq_lens = h.Ints(p.kv.batch, 0, cap);
      }
      h.Rearm();
      h.CheckAfter(RunDecode(plan, p, h.Ctx()), "RunDecode");
    }
  }
}

void FuzzAppend(Harness& h) {
  FuzzedDataProvider& f = h.fdp();
  const Shape s = PickShape(h, 8);
  AppendKVParams p;
  PickCache(h, s, Role::kInOut, &p.cache, &p.batch);
  const int64_t n = f.ConsumeIntegralInRange<int64_t>(0, 5);
  p.k_new = h.Tensor({s.b, n, s.hkv, s.d}, s.dtype, Role::kInput);
  p.v_new = h.Tensor({s.b, n, s.hkv, s.d}, s.dtype, Role::kInput);
  p.rotary.rotary_dim = f.ConsumeBool() ? 0 : h.Int(0, s.d);
  p.rotary.base = h.Float(10000.0f);
  p.rotary.interleaved = f.ConsumeBool();
  h.CheckAfter(AppendKV(p, h.Ctx()), "AppendKV");
}

void FuzzReadKV(Harness& h) {
  const Shape s = PickShape(h, 8);
  KVCacheView c;
  KVBatchView kv;
  PickCache(h, s, Role::kInput, &c, &kv);
  const int64_t b = h.Int(0, kv.batch > 0 ? kv.batch - 1 : 0);
  int64_t tokens = h.fdp().ConsumeIntegralInRange<int64_t>(0, 8);
  // seq_lens[b], when the view is what validation accepts (else any count: it is rejected).
  const TensorView& lens = kv.seq_lens;
  if (lens.data != nullptr && lens.dtype == DType::kI32 && lens.rank == 1 && b >= 0 &&
      b < kv.batch && b < lens.shape[0] && (lens.strides[0] == 1 || lens.shape[0] == 1) &&
      h.fdp().ConsumeBool()) {
    tokens = static_cast<const int32_t*>(lens.data)[b];
  }
  const TensorView k_out =
      h.Tensor({tokens, c.num_kv_heads, c.head_dim}, DType::kF32, Role::kOutput);
  const TensorView v_out =
      h.Tensor({tokens, c.num_kv_heads, c.head_dim}, DType::kF32, Role::kOutput);
  ReadKVParams p;
  p.cache = c;
  p.batch = kv;
  p.b = b;
  p.k_out = k_out;
  p.v_out = v_out;
  h.CheckAfter(ReadKV(p, h.Ctx()), "ReadKV");
}

void FuzzRotary(Harness& h) {
  FuzzedDataProvider& f = h.fdp();
  const Shape s = PickShape(h, 16);
  const TensorView x = h.Tensor({s.b, s.sq, s.hq, s.d}, s.dtype, Role::kInOut);
  // positions has one entry per sequence of x as described (which may differ from s.b).
  const TensorView positions = f.ConsumeBool() ? TensorView() : h.Ints(x.shape[0], 0, 1000);
  RotaryParams r;
  r.rotary_dim = h.Int(0, s.d);
  r.base = h.Float(10000.0f);
  r.interleaved = f.ConsumeBool();
  ApplyRotaryParams p;
  p.x = x;
  p.positions = positions;
  p.rotary = r;
  h.CheckAfter(ApplyRotary(p, h.Ctx()), "ApplyRotary");
}

void FuzzSelect(Harness& h) {
  FuzzedDataProvider& f = h.fdp();
  const Shape s = PickShape(h, 64);
  BlockSelectParams p;
  static const int64_t kBlocks[] = {16, 32, 64, 0, 24};
  p.block_q = f.ConsumeIntegral<uint8_t>() < 250 ? f.PickValueInArray(kBlocks) : h.Nasty();
  p.block_k = f.ConsumeIntegral<uint8_t>() < 250 ? f.PickValueInArray(kBlocks) : h.Nasty();
  const int64_t nqb = CeilDivOr1(s.sq, p.block_q), nkb = CeilDivOr1(s.sk, p.block_k);
  p.q = h.Tensor({s.b, s.sq, s.hq, s.d}, s.dtype, Role::kInput);
  p.k = h.Tensor({s.b, s.sk, s.hkv, s.d}, s.dtype, Role::kInput);
  p.scores = h.Tensor({s.b, s.hq, nqb, nkb}, DType::kF32, Role::kOptionalInput);
  p.top_k = f.ConsumeBool() ? h.Int(0, 4) : 0;
  p.threshold = h.Float(0.5f);
  p.scale = h.Scale();
  p.causal = f.ConsumeBool();
  p.align = h.Enum<MaskAlign>(2);
  p.out = h.Tensor({s.b, s.hq, nqb, nkb}, DType::kU8, Role::kOutput);
  h.CheckAfter(SelectBlocks(p, h.Ctx()), "SelectBlocks");
}

void FuzzS2(Harness& h) {
  FuzzedDataProvider& f = h.fdp();
  S2MaskParams p;
  p.heads = h.Int(1, 4);
  p.num_q_blocks = h.Int(0, 8);
  p.num_k_blocks = h.Int(0, 8);
  p.local_blocks = h.Int(1, 4);
  p.vert_stride = h.Int(1, 8);
  p.offset = h.Int(-4, 4);
  p.causal = f.ConsumeBool();
  p.out = h.Tensor({1, p.heads, p.num_q_blocks, p.num_k_blocks}, DType::kU8, Role::kOutput);
  h.CheckAfter(BuildS2BlockMask(p, h.Ctx()), "BuildS2BlockMask");
}

void FuzzRadial(Harness& h) {
  FuzzedDataProvider& f = h.fdp();
  RadialMaskParams p;
  p.frames = h.Int(0, 6);
  p.tokens_per_frame = h.Int(0, 40);
  static const int64_t kBlocks[] = {16, 32, 128, 0, 8};
  p.block = f.ConsumeIntegral<uint8_t>() < 250 ? f.PickValueInArray(kBlocks) : h.Nasty();
  p.decay_factor = h.Float(1.0f);
  int64_t n = 0;
  if (__builtin_mul_overflow(p.frames, p.tokens_per_frame, &n)) n = -1;
  const int64_t nb = CeilDivOr1(n, p.block);
  p.out = h.Tensor({1, 1, nb, nb}, DType::kU8, Role::kOutput);
  h.CheckAfter(BuildRadialBlockMask(p, h.Ctx()), "BuildRadialBlockMask");
}

int64_t FeatureDim(LinearFeatureMap map, int64_t dk) {
  return map == LinearFeatureMap::kTaylor2 ? 1 + dk + dk * dk : dk;
}

LinearAttentionParams PickLinear(Harness& h, const Shape& s, int64_t dv, bool states) {
  FuzzedDataProvider& f = h.fdp();
  LinearAttentionParams p;
  const int64_t seq = s.sq;
  p.q = h.Tensor({s.b, seq, s.hq, s.d}, s.dtype, Role::kInput);
  p.k = h.Tensor({s.b, seq, s.hkv, s.d}, s.dtype, Role::kInput);
  p.v = h.Tensor({s.b, seq, s.hkv, dv}, s.dtype, Role::kInput);
  p.feature_map = h.Enum<LinearFeatureMap>(4);
  const int64_t features = FeatureDim(p.feature_map, s.d);
  p.scale = h.Scale();
  p.causal = f.ConsumeIntegral<uint8_t>() < 200;
  p.prefix_len = f.ConsumeBool() ? 0 : h.Int(0, seq);
  p.normalize = f.ConsumeBool();
  p.eps = h.Float(1e-6f);
  if (f.ConsumeBool()) p.decay = h.Tensor({s.hq}, DType::kF32, Role::kOptionalInput);
  if (f.ConsumeBool()) {
    p.gates = h.Tensor({s.b, seq, s.hq, s.d}, DType::kF32, Role::kOptionalInput);
  }
  p.window = f.ConsumeBool() ? 0 : h.Int(0, 8);
  if (states) {
    p.initial_state = h.Tensor({s.b, s.hq, features, dv}, DType::kF32, Role::kOptionalInput);
    p.initial_normalizer = h.Tensor({s.b, s.hq, features}, DType::kF32, Role::kOptionalInput);
    p.final_state = h.Tensor({s.b, s.hq, features, dv}, DType::kF32, Role::kOptionalOutput);
    p.final_normalizer = h.Tensor({s.b, s.hq, features}, DType::kF32, Role::kOptionalOutput);
  }
  static const int64_t kChunks[] = {64, 16, 32, 256, 0, 24, 512};
  p.chunk_size = f.ConsumeIntegral<uint8_t>() < 250 ? f.PickValueInArray(kChunks) : h.Nasty();
  return p;
}

void FuzzLinear(Harness& h, bool recurrent) {
  const Shape s = PickShape(h, 48);
  const int64_t dv = h.fdp().ConsumeIntegralInRange<int64_t>(1, 20);
  LinearAttentionParams p = PickLinear(h, s, dv, true);
  p.out = h.Tensor({s.b, s.sq, s.hq, dv}, s.dtype, Role::kOutput);
  const Context ctx = h.Ctx();
  if (recurrent) {
    h.CheckAfter(LinearAttentionRecurrent(p, ctx), "LinearAttentionRecurrent");
  } else {
    h.CheckAfter(LinearAttentionForward(p, ctx), "LinearAttentionForward");
  }
}

void FuzzLinearBackward(Harness& h) {
  FuzzedDataProvider& f = h.fdp();
  const Shape s = PickShape(h, 32);
  const int64_t dv = f.ConsumeIntegralInRange<int64_t>(1, 20);
  LinearAttentionBackwardParams p;
  p.forward = PickLinear(h, s, dv, f.ConsumeIntegral<uint8_t>() < 32);
  p.dout = h.Tensor({s.b, s.sq, s.hq, dv}, s.dtype, Role::kInput);
  p.dq = h.Tensor({s.b, s.sq, s.hq, s.d}, s.dtype, Role::kOutput);
  p.dk = h.Tensor({s.b, s.sq, s.hkv, s.d}, s.dtype, Role::kOutput);
  p.dv = h.Tensor({s.b, s.sq, s.hkv, dv}, s.dtype, Role::kOutput);
  p.dgates = h.Tensor({s.b, s.sq, s.hq, s.d}, DType::kF32, Role::kOptionalOutput);
  h.CheckAfter(LinearAttentionBackward(p, h.Ctx()), "LinearAttentionBackward");
}

LongConvParams PickLongConv(Harness& h, int64_t b, int64_t n, int64_t c) {
  FuzzedDataProvider& f = h.fdp();
  LongConvParams p;
  p.u = h.Tensor({b, n, c}, DType::kF32, Role::kInput);
  p.filter = h.Tensor({f.ConsumeIntegralInRange<int64_t>(0, n + 1), c}, DType::kF32, Role::kInput);
  p.bias = h.Tensor({c}, DType::kF32, Role::kOptionalInput);
  p.path = h.Enum<LongConvPath>(3);
  return p;
}

void FuzzLongConv(Harness& h, bool backward) {
  FuzzedDataProvider& f = h.fdp();
  const int64_t b = f.ConsumeIntegralInRange<int64_t>(0, 2),
                n = f.ConsumeIntegralInRange<int64_t>(0, 40),
                c = f.ConsumeIntegralInRange<int64_t>(0, 20);
  if (!backward) {
    LongConvParams p = PickLongConv(h, b, n, c);
    p.y = h.Tensor({b, n, c}, DType::kF32, Role::kOutput);
    h.CheckAfter(LongConv1D(p, h.Ctx()), "LongConv1D");
    return;
  }
  LongConvBackwardParams p;
  p.forward = PickLongConv(h, b, n, c);
  const int64_t l = p.forward.filter.rank == 2 ? p.forward.filter.shape[0] : 1;
  p.dy = h.Tensor({b, n, c}, DType::kF32, Role::kInput);
  p.du = h.Tensor({b, n, c}, DType::kF32, Role::kOptionalOutput);
  p.dfilter = h.Tensor({l, c}, DType::kF32, Role::kOptionalOutput);
  p.dbias = h.Tensor({c}, DType::kF32, Role::kOptionalOutput);
  h.CheckAfter(LongConv1DBackward(p, h.Ctx()), "LongConv1DBackward");
}

void FuzzH3(Harness& h, bool backward) {
  FuzzedDataProvider& f = h.fdp();
  const int64_t b = f.ConsumeIntegralInRange<int64_t>(0, 2),
                n = f.ConsumeIntegralInRange<int64_t>(0, 24),
                heads = f.ConsumeIntegralInRange<int64_t>(0, 3),
                d = f.ConsumeIntegralInRange<int64_t>(0, 3);
  H3Params p;
  p.q = h.Tensor({b, n, heads, d}, DType::kF32, Role::kInput);
  p.k = h.Tensor({b, n, heads, d}, DType::kF32, Role::kInput);
  p.v = h.Tensor({b, n, heads, d}, DType::kF32, Role::kInput);
  const int64_t ls = f.ConsumeIntegralInRange<int64_t>(0, n + 1),
                l = f.ConsumeIntegralInRange<int64_t>(0, n + 1);
  p.shift_filter = h.Tensor({ls, heads * d}, DType::kF32, Role::kInput);
  p.shift_bias = h.Tensor({heads * d}, DType::kF32, Role::kOptionalInput);
  p.ssm_filter = h.Tensor({l, heads}, DType::kF32, Role::kInput);
  p.ssm_bias = h.Tensor({heads}, DType::kF32, Role::kOptionalInput);
  p.path = h.Enum<LongConvPath>(3);
  if (!backward) {
    p.out = h.Tensor({b, n, heads, d}, DType::kF32, Role::kOutput);
    h.CheckAfter(H3Layer(p, h.Ctx()), "H3Layer");
    return;
  }
  H3BackwardParams bp;
  bp.forward = p;
  bp.dout = h.Tensor({b, n, heads, d}, DType::kF32, Role::kInput);
  bp.dq = h.Tensor({b, n, heads, d}, DType::kF32, Role::kOptionalOutput);
  bp.dk = h.Tensor({b, n, heads, d}, DType::kF32, Role::kOptionalOutput);
  bp.dv = h.Tensor({b, n, heads, d}, DType::kF32, Role::kOptionalOutput);
  bp.dshift_filter = h.Tensor({ls, heads * d}, DType::kF32, Role::kOptionalOutput);
  bp.dshift_bias = h.Tensor({heads * d}, DType::kF32, Role::kOptionalOutput);
  bp.dssm_filter = h.Tensor({l, heads}, DType::kF32, Role::kOptionalOutput);
  bp.dssm_bias = h.Tensor({heads}, DType::kF32, Role::kOptionalOutput);
  h.CheckAfter(H3LayerBackward(bp, h.Ctx()), "H3LayerBackward");
}

// The diagonal SSM: its kernel, or its scan (u, y, the state).
void FuzzSsm(Harness& h, bool scan) {
  FuzzedDataProvider& f = h.fdp();
  const int64_t c = f.ConsumeIntegralInRange<int64_t>(0, 20),
                n = f.ConsumeIntegralInRange<int64_t>(0, 5);
  DiagonalSsmParams ssm;
  ssm.a = h.Tensor({c, n, 2}, DType::kF32, Role::kInput);
  ssm.b = h.Tensor({c, n, 2}, DType::kF32, Role::kInput);
  ssm.w = h.Tensor({c, n, 2}, DType::kF32, Role::kInput);
  ssm.skip = h.Tensor({c}, DType::kF32, Role::kOptionalInput);
  if (!scan) {
    const TensorView filter =
        h.Tensor({f.ConsumeIntegralInRange<int64_t>(0, 40), c}, DType::kF32, Role::kOutput);
    h.CheckAfter(DiagonalSsmKernel(ssm, filter, h.Ctx()), "DiagonalSsmKernel");
    return;
  }
  const int64_t b = f.ConsumeIntegralInRange<int64_t>(0, 2),
                t = f.ConsumeIntegralInRange<int64_t>(0, 40);
  DiagonalSsmScanParams p;
  p.ssm = ssm;
  p.u = h.Tensor({b, t, c}, DType::kF32, Role::kInput);
  p.y = h.Tensor({b, t, c}, DType::kF32, Role::kOutput);
  p.state = h.Tensor({b, c, n, 2}, DType::kF32, Role::kInOut);
  h.CheckAfter(DiagonalSsmScan(p, h.Ctx()), "DiagonalSsmScan");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0 || size > 4096) return 0;
  FuzzedDataProvider fdp(data + 1, size - 1);
  Harness h(&fdp);
  // First bytes 208..255 (past 16 rounds of the 13 original entry points, so older corpus inputs
  // keep their entry point) pick the long convolutions and the diagonal SSM.
  if (data[0] >= 208) {
    switch ((data[0] - 208) % 6) {
      case 0:
        FuzzLongConv(h, false);
        break;
      case 1:
        FuzzLongConv(h, true);
        break;
      case 2:
        FuzzH3(h, false);
        break;
      case 3:
        FuzzH3(h, true);
        break;
      case 4:
        FuzzSsm(h, false);
        break;
      default:
        FuzzSsm(h, true);
    }
    return 0;
  }
  switch (data[0] % 13) {
    case 0:
      FuzzForward(h);
      break;
    case 1:
      FuzzBackward(h);
      break;
    case 2:
      FuzzMerge(h);
      break;
    case 3:
      FuzzDecode(h);
      break;
    case 4:
      FuzzAppend(h);
      break;
    case 5:
      FuzzReadKV(h);
      break;
    case 6:
      FuzzRotary(h);
      break;
    case 7:
      FuzzSelect(h);
      break;
    case 8:
      FuzzS2(h);
      break;
    case 9:
      FuzzRadial(h);
      break;
    case 10:
      FuzzLinear(h, false);
      break;
    case 11:
      FuzzLinear(h, true);
      break;
    default:
      FuzzLinearBackward(h);
  }
  return 0;
}
