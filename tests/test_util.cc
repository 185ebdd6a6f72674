#include "test_util.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>

namespace tessera {
namespace test {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr uint64_t kDefaultSeed = 0x7e55e2a2024ull;

// Test-setup errors (a bad shape passed to Tensor) are bugs in the test: stop loudly.
void Require(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "test_util: %s\n", what);
    std::abort();
  }
}

uint8_t GuardByte(size_t i) { return static_cast<uint8_t>(0xA5u ^ ((i * 7u) & 0xffu)); }

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::string Format(double x) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g", x);
  return buf;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Environment.

bool EnvFlag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::strcmp(v, "0") != 0;
}

uint64_t BaseSeed() {
  if (const char* v = std::getenv("TESSERA_SEED")) {
    if (v[0] != '\0') return std::strtoull(v, nullptr, 0);
  }
  return kDefaultSeed;
}

uint64_t SeedFor(const std::string& case_name) {
  uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a of the name, then mixed with the base seed
  for (unsigned char c : case_name) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return SplitMix64(h ^ SplitMix64(BaseSeed()));
}

namespace {

// Prints the base seed once per test binary run, so that any run can be reproduced.
class SeedLogger : public ::testing::Environment {
 public:
  void SetUp() override {
    std::printf("tessera tests: TESSERA_SEED=%llu%s\n", static_cast<unsigned long long>(BaseSeed()),
                std::getenv("TESSERA_SEED") ? "" : " (default)");
  }
};

::testing::Environment* const kSeedLogger = ::testing::AddGlobalTestEnvironment(new SeedLogger);

}  // namespace

std::string Repro(const std::string& case_name) {
  return "TESSERA_SEED=" + std::to_string(BaseSeed()) + " case=" + case_name +
         " seed=" + std::to_string(SeedFor(case_name));
}

// ---------------------------------------------------------------------------------------------
// Numbers.

void StoreAs(DType dtype, float x, void* dst) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(dst, &x, 4);
      return;
    case DType::kBF16: {
      const uint16_t h = FloatToBF16(x);
      std::memcpy(dst, &h, 2);
      return;
    }
    case DType::kF16: {
      const uint16_t h = FloatToF16(x);
      std::memcpy(dst, &h, 2);
      return;
    }
  }
}

float LoadAs(DType dtype, const void* src) {
  switch (dtype) {
    case DType::kF32: {
      float x;
      std::memcpy(&x, src, 4);
      return x;
    }
    case DType::kBF16: {
      uint16_t h;
      std::memcpy(&h, src, 2);
      return BF16ToFloat(h);
    }
    case DType::kF16: {
      uint16_t h;
      std::memcpy(&h, src, 2);
      return F16ToFloat(h);
    }
  }
  return std::numeric_limits<float>::quiet_NaN();
}

float RoundTo(DType dtype, float x) {
  switch (dtype) {
    case DType::kF32:
      return x;
    case DType::kBF16:
      return BF16ToFloat(FloatToBF16(x));
    case DType::kF16:
      return F16ToFloat(FloatToF16(x));
  }
  return x;
}

// ---------------------------------------------------------------------------------------------
// Tensor.

std::vector<int64_t> Tensor::ContiguousStrides(const std::vector<int64_t>& shape) {
  std::vector<int64_t> strides(shape.size());
  int64_t s = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

std::vector<int64_t> Tensor::PaddedStrides(const std::vector<int64_t>& shape, int64_t pad) {
  std::vector<int64_t> strides(shape.size());
  int64_t s = 1;
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = s;
    s *= shape[i];
    if (i + 1 == shape.size()) s += pad;
  }
  return strides;
}

Tensor::Tensor(DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides,
               int64_t offset)
    : dtype_(dtype), shape_(std::move(shape)), strides_(std::move(strides)), offset_(offset) {
  Require(!shape_.empty() && shape_.size() <= 4, "Tensor: rank must be 1..4");
  if (strides_.empty()) strides_ = ContiguousStrides(shape_);
  Require(strides_.size() == shape_.size(), "Tensor: strides and shape differ in rank");
  Require(offset_ >= 0, "Tensor: negative offset");
  int64_t last = offset_;
  for (size_t i = 0; i < shape_.size(); ++i) {
    Require(shape_[i] >= 0 && strides_[i] >= 0, "Tensor: negative shape or stride");
    if (shape_[i] > 0) last += (shape_[i] - 1) * strides_[i];
  }
  slots_ = numel() > 0 ? last + 1 : offset_;
  const size_t esize = DTypeSize(dtype_);
  bytes_.assign(static_cast<size_t>(slots_) * esize + 2 * kGuardBytes + 64, 0);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(bytes_.data());
  base_ = static_cast<size_t>((64 - addr % 64) % 64);
  uint8_t* front = bytes_.data() + base_;
  uint8_t* back = payload() + static_cast<size_t>(slots_) * esize;
  for (size_t i = 0; i < kGuardBytes; ++i) {
    front[i] = GuardByte(i);
    back[i] = GuardByte(i + kGuardBytes);
  }
  covered_.assign(static_cast<size_t>(slots_), 0);
  ForEach([&](const Index& idx) { covered_[static_cast<size_t>(SlotOf(idx))] = 1; });
  FillSlots(kNaN);
  Snapshot();
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t s : shape_) n *= s;
  return n;
}

void* Tensor::data() { return payload() + static_cast<size_t>(offset_) * DTypeSize(dtype_); }
const void* Tensor::data() const {
  return payload() + static_cast<size_t>(offset_) * DTypeSize(dtype_);
}

TensorView Tensor::view() {
  TensorView v;
  v.data = data();
  v.dtype = dtype_;
  v.rank = rank();
  for (int i = 0; i < rank(); ++i) {
    v.shape[i] = shape_[static_cast<size_t>(i)];
    v.strides[i] = strides_[static_cast<size_t>(i)];
  }
  return v;
}

TensorView Tensor::view() const { return const_cast<Tensor*>(this)->view(); }

int64_t Tensor::SlotOf(const Index& idx) const {
  int64_t slot = offset_;
  for (int i = 0; i < rank(); ++i) slot += idx[static_cast<size_t>(i)] * stride(i);
  return slot;
}

double Tensor::Get(const Index& idx) const {
  return LoadAs(dtype_, payload() + static_cast<size_t>(SlotOf(idx)) * DTypeSize(dtype_));
}

void Tensor::Set(const Index& idx, double value) {
  StoreAs(dtype_, static_cast<float>(value),
          payload() + static_cast<size_t>(SlotOf(idx)) * DTypeSize(dtype_));
}

void Tensor::ForEach(const std::function<void(const Index&)>& fn) const {
  if (numel() == 0) return;
  Index idx = {0, 0, 0, 0};
  const int r = rank();
  while (true) {
    fn(idx);
    int d = r - 1;
    while (d >= 0) {
      if (++idx[static_cast<size_t>(d)] < shape(d)) break;
      idx[static_cast<size_t>(d)] = 0;
      --d;
    }
    if (d < 0) return;
  }
}

std::vector<double> Tensor::ToVector() const {
  std::vector<double> out;
  out.reserve(static_cast<size_t>(numel()));
  ForEach([&](const Index& idx) { out.push_back(Get(idx)); });
  return out;
}

void Tensor::FromVector(const std::vector<double>& values) {
  Require(static_cast<int64_t>(values.size()) == numel(), "FromVector: size mismatch");
  size_t i = 0;
  ForEach([&](const Index& idx) { Set(idx, values[i++]); });
}

void Tensor::FillNormal(Rng& rng, double mult) {
  ForEach([&](const Index& idx) { Set(idx, static_cast<double>(rng.Normal()) * mult); });
}

void Tensor::FillSlots(double value) {
  const size_t esize = DTypeSize(dtype_);
  for (int64_t s = 0; s < slots_; ++s) {
    StoreAs(dtype_, static_cast<float>(value), payload() + static_cast<size_t>(s) * esize);
  }
}

void Tensor::Snapshot() { snapshot_ = bytes_; }

::testing::AssertionResult Tensor::GuardsIntact() const {
  const uint8_t* front = bytes_.data() + base_;
  const uint8_t* back = payload() + static_cast<size_t>(slots_) * DTypeSize(dtype_);
  for (size_t i = 0; i < kGuardBytes; ++i) {
    if (front[i] != GuardByte(i)) {
      return ::testing::AssertionFailure() << "front guard byte " << i << " (" << kGuardBytes - i
                                           << " bytes before the payload) overwritten";
    }
    if (back[i] != GuardByte(i + kGuardBytes)) {
      return ::testing::AssertionFailure()
             << "back guard byte " << i << " after the payload overwritten";
    }
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult Tensor::OutsideViewUntouched() const {
  ::testing::AssertionResult guards = GuardsIntact();
  if (!guards) return guards;
  const size_t esize = DTypeSize(dtype_);
  const size_t start = base_ + kGuardBytes;
  for (int64_t s = 0; s < slots_; ++s) {
    if (covered_[static_cast<size_t>(s)]) continue;
    const size_t at = start + static_cast<size_t>(s) * esize;
    if (std::memcmp(bytes_.data() + at, snapshot_.data() + at, esize) != 0) {
      return ::testing::AssertionFailure()
             << "payload slot " << s << " belongs to no element but was written";
    }
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult Tensor::Unchanged() const {
  const size_t esize = DTypeSize(dtype_);
  for (size_t i = 0; i < bytes_.size(); ++i) {
    if (bytes_[i] != snapshot_[i]) {
      const int64_t rel = static_cast<int64_t>(i) - static_cast<int64_t>(base_ + kGuardBytes);
      return ::testing::AssertionFailure()
             << "byte " << rel << " relative to the payload start (slot "
             << (rel >= 0 ? rel / static_cast<int64_t>(esize) : -1) << ") changed";
    }
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult Tensor::AllFinite() const {
  ::testing::AssertionResult result = ::testing::AssertionSuccess();
  int64_t n = 0;
  ForEach([&](const Index& idx) {
    const double x = Get(idx);
    if (!std::isfinite(x) && result) {
      result = ::testing::AssertionFailure() << "element " << n << " [" << idx[0] << ", " << idx[1]
                                             << ", " << idx[2] << ", " << idx[3] << "] is " << x;
    }
    ++n;
  });
  return result;
}

Tensor Tensor::ContiguousCopy() const {
  Tensor c(dtype_, shape_);
  const size_t esize = DTypeSize(dtype_);
  ForEach([&](const Index& idx) {
    std::memcpy(c.payload() + static_cast<size_t>(c.SlotOf(idx)) * esize,
                payload() + static_cast<size_t>(SlotOf(idx)) * esize, esize);
  });
  return c;
}

::testing::AssertionResult Tensor::BitwiseEqual(const Tensor& other) const {
  if (other.shape_ != shape_ || other.dtype_ != dtype_) {
    return ::testing::AssertionFailure() << "shape or dtype differs";
  }
  const size_t esize = DTypeSize(dtype_);
  ::testing::AssertionResult result = ::testing::AssertionSuccess();
  int64_t mismatches = 0;
  ForEach([&](const Index& idx) {
    const uint8_t* a = payload() + static_cast<size_t>(SlotOf(idx)) * esize;
    const uint8_t* b = other.payload() + static_cast<size_t>(other.SlotOf(idx)) * esize;
    if (std::memcmp(a, b, esize) != 0) {
      if (mismatches == 0) {
        result = ::testing::AssertionFailure()
                 << "first difference at [" << idx[0] << ", " << idx[1] << ", " << idx[2] << ", "
                 << idx[3] << "]: " << Format(LoadAs(dtype_, a)) << " vs "
                 << Format(LoadAs(dtype_, b));
      }
      ++mismatches;
    }
  });
  if (!result) result << " (" << mismatches << " elements differ)";
  return result;
}

// ---------------------------------------------------------------------------------------------
// Comparator.

::testing::AssertionResult CheckNonFinite(const std::vector<double>& got,
                                          const std::vector<double>& ref, const char* what) {
  if (got.size() != ref.size()) {
    return ::testing::AssertionFailure()
           << what << ": " << got.size() << " elements vs " << ref.size() << " in the reference";
  }
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], r = ref[i];
    if (std::isnan(r)) {
      return ::testing::AssertionFailure() << what << "[" << i << "]: the reference is NaN (got "
                                           << Format(g) << "); a test that expects NaN must say so";
    }
    if (std::isfinite(g) && std::isfinite(r)) continue;
    if (std::isinf(g) && std::isinf(r) && (g > 0) == (r > 0)) continue;
    return ::testing::AssertionFailure()
           << what << "[" << i << "]: got " << Format(g) << ", reference " << Format(r)
           << " (non-finite on one side or infinities of different sign)";
  }
  return ::testing::AssertionSuccess();
}

double MaxAbsError(const std::vector<double>& got, const std::vector<double>& ref) {
  double err = 0.0;
  for (size_t i = 0; i < got.size() && i < ref.size(); ++i) {
    if (std::isfinite(got[i]) && std::isfinite(ref[i])) {
      err = std::max(err, std::fabs(got[i] - ref[i]));
    }
  }
  return err;
}

double Nmse(const std::vector<double>& got, const std::vector<double>& ref) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < got.size() && i < ref.size(); ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(ref[i])) continue;
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  if (num == 0.0) return 0.0;
  return den == 0.0 ? std::numeric_limits<double>::infinity() : num / den;
}

double Ulp(DType dtype, double x) {
  const float a = RoundTo(dtype, static_cast<float>(std::fabs(x)));
  if (!std::isfinite(a)) return 0.0;
  float next;
  switch (dtype) {
    case DType::kF32:
      next = std::nextafter(a, std::numeric_limits<float>::infinity());
      break;
    case DType::kBF16:
      next = BF16ToFloat(static_cast<uint16_t>(FloatToBF16(a) + 1));
      break;
    case DType::kF16:
      next = F16ToFloat(static_cast<uint16_t>(FloatToF16(a) + 1));
      break;
    default:
      return 0.0;
  }
  if (!std::isfinite(next)) return 0.0;
  return static_cast<double>(next) - static_cast<double>(a);
}

double NoiseFloor(DType dtype, const std::vector<double>& ref) {
  const float shift = static_cast<float>(kNoiseFloorShift);
  double worst = 0.0, largest = 0.0;
  for (double r : ref) {
    if (!std::isfinite(r)) continue;
    largest = std::max(largest, std::fabs(r));
    const float x = RoundTo(dtype, static_cast<float>(r));
    const float y = RoundTo(dtype, RoundTo(dtype, x + shift) - shift);
    worst = std::max(worst, std::fabs(static_cast<double>(y) - static_cast<double>(x)));
  }
  // Where the shift is below one ulp (f16 values in the hundreds), x + 0.3 - 0.3 can round back
  // to x everywhere and the literal formula gives 0; the floor's intent, one rounding at the
  // reference's magnitude, is then half an ulp of the largest |ref|.
  return kNoiseFloorFactor * std::max(worst, 0.5 * Ulp(dtype, largest));
}

namespace {

// Index of the element with the largest |got - ref| (finite on both sides).
size_t WorstIndex(const std::vector<double>& got, const std::vector<double>& ref) {
  size_t worst = 0;
  double err = -1.0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(ref[i])) continue;
    const double e = std::fabs(got[i] - ref[i]);
    if (e > err) {
      err = e;
      worst = i;
    }
  }
  return worst;
}

::testing::AssertionResult CheckRatio(DType dtype, const std::vector<double>& got,
                                      const std::vector<double>& ref,
                                      const std::vector<double>* naive, Ceiling fallback,
                                      const char* what) {
  if (naive == nullptr || naive->size() != ref.size()) {
    return ::testing::AssertionFailure() << what << ": the ratio rule needs the naive output";
  }
  // A naive computation that overflows (inf or NaN where fp64 is finite) bounds nothing: the
  // ratio rule would compare with an infinite error. The dtype's ceiling applies instead.
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isfinite(ref[i]) && !std::isfinite((*naive)[i])) {
      return CheckClose(got, ref, fallback, what);
    }
  }
  const double err = MaxAbsError(got, ref);
  const double naive_err = MaxAbsError(*naive, ref);
  const double floor = NoiseFloor(dtype, ref);
  const double bound = kForwardRatio * naive_err + floor;
  if (err <= bound) return ::testing::AssertionSuccess();
  const size_t w = WorstIndex(got, ref);
  return ::testing::AssertionFailure()
         << what << ": ratio rule failed: err " << Format(err) << " > " << kForwardRatio
         << " * naive err " << Format(naive_err) << " + floor " << Format(floor)
         << "; worst element " << w << ": got " << Format(got[w]) << ", ref " << Format(ref[w]);
}

}  // namespace

::testing::AssertionResult CheckClose(const std::vector<double>& got,
                                      const std::vector<double>& ref, Ceiling ceiling,
                                      const char* what) {
  ::testing::AssertionResult nf = CheckNonFinite(got, ref, what);
  if (!nf) return nf;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(ref[i])) continue;
    const double e = std::fabs(got[i] - ref[i]);
    const double limit = ceiling.atol + ceiling.rtol * std::fabs(ref[i]);
    if (!(e <= limit)) {
      return ::testing::AssertionFailure()
             << what << "[" << i << "]: got " << Format(got[i]) << ", ref " << Format(ref[i])
             << ", |diff| " << Format(e) << " > atol " << ceiling.atol << " + rtol " << ceiling.rtol
             << " * |ref| (max abs error " << Format(MaxAbsError(got, ref)) << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult CheckOutput(DType dtype, const std::vector<double>& got,
                                       const std::vector<double>& ref,
                                       const std::vector<double>* naive, Rule rule,
                                       const std::vector<double>* magnitude) {
  ::testing::AssertionResult nf = CheckNonFinite(got, ref, "out");
  if (!nf) return nf;
  if (rule == Rule::kRatioOnly || dtype != DType::kF32) {
    ::testing::AssertionResult r = CheckRatio(dtype, got, ref, naive, OutputCeiling(dtype), "out");
    if (!r) return r;
  }
  if (rule == Rule::kRatioOnly) return ::testing::AssertionSuccess();

  ::testing::AssertionResult c = CheckClose(got, ref, OutputCeiling(dtype), "out (ceiling)");
  if (!c) return c;
  if (dtype == DType::kF32) {
    const double nmse = Nmse(got, ref);
    if (!(nmse <= kF32MaxNmse)) {
      return ::testing::AssertionFailure() << "out: NMSE " << Format(nmse) << " > " << kF32MaxNmse;
    }
    const bool have_mag = magnitude != nullptr && magnitude->size() == ref.size();
    for (size_t i = 0; i < got.size(); ++i) {
      const double mag = have_mag ? (*magnitude)[i] : std::fabs(ref[i]);
      if (!std::isfinite(ref[i]) || !(mag > kF32RelErrMinMagnitude)) continue;
      const double rel = std::fabs(got[i] - ref[i]) / mag;
      if (!(rel <= kF32MaxRelErr)) {
        return ::testing::AssertionFailure()
               << "out[" << i << "]: relative error " << Format(rel) << " > " << kF32MaxRelErr
               << " (got " << Format(got[i]) << ", ref " << Format(ref[i]) << ", magnitude "
               << Format(mag) << ")";
      }
    }
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult CheckLse(const std::vector<double>& got, const std::vector<double>& ref,
                                    const std::vector<double>* naive, Rule rule) {
  if (rule == Rule::kRatioOnly) {
    ::testing::AssertionResult nf = CheckNonFinite(got, ref, "lse");
    if (!nf) return nf;
    return CheckRatio(DType::kF32, got, ref, naive, kLseCeiling, "lse");
  }
  return CheckClose(got, ref, kLseCeiling, "lse");
}

// ---------------------------------------------------------------------------------------------
// Naive same-precision reference.

namespace {

float LoadView(const TensorView& t, int64_t offset) {
  return LoadAs(
      t.dtype, static_cast<const char*>(t.data) + static_cast<size_t>(offset) * DTypeSize(t.dtype));
}

// [B, S, H, D] or varlen [T, H, D] strides, batch first (0 for rank 3).
struct Strides4 {
  int64_t s[4];
  int64_t tokens, heads, dim;
};

Strides4 StridesOf(const TensorView& t) {
  Strides4 r;
  const int first = t.rank == 4 ? 1 : 0;
  r.s[0] = t.rank == 4 ? t.strides[0] : 0;
  for (int i = 0; i < 3; ++i) r.s[i + 1] = t.strides[first + i];
  r.tokens = t.shape[first];
  r.heads = t.shape[first + 1];
  r.dim = t.shape[first + 2];
  return r;
}

}  // namespace

void AttentionForwardNaive(const AttentionParams& p, double* out, double* lse) {
  const DType dt = p.q.dtype;
  auto round = [dt](float x) { return RoundTo(dt, x); };
  const Strides4 qs = StridesOf(p.q), ks = StridesOf(p.k), vs = StridesOf(p.v);
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t num_seqs = varlen ? p.num_seqs : p.q.shape[0];
  const int64_t hq = qs.heads, hkv = ks.heads, dim = qs.dim, dim_v = vs.dim;
  const int64_t total_q = qs.tokens;
  const float scale = p.scale.has_value()
                          ? *p.scale
                          : static_cast<float>(1.0 / std::sqrt(static_cast<double>(dim)));
  const float cap = p.softcap;
  int64_t wl = p.window_left, wr = p.window_right;
  if (p.causal) wr = 0;
  const float inf = std::numeric_limits<float>::infinity();

  std::vector<float> kscaled, vals, s, prob, qrow(static_cast<size_t>(dim));
  for (int64_t b = 0; b < num_seqs; ++b) {
    const int64_t q0 = varlen ? p.cu_seqlens_q[b] : 0;
    const int64_t lq = varlen ? p.cu_seqlens_q[b + 1] - q0 : qs.tokens;
    const int64_t k0 = varlen ? p.cu_seqlens_k[b] : 0;
    const int64_t lk = varlen ? p.cu_seqlens_k[b + 1] - k0 : ks.tokens;
    const int64_t bb = varlen ? 0 : b;
    const int64_t delta = p.align == MaskAlign::kTopLeft ? 0 : lk - lq;
    for (int64_t g = 0; g < hkv; ++g) {
      // Scale K rather than Q (reordered relative to the kernels), rounded to the dtype.
      kscaled.assign(static_cast<size_t>(lk * dim), 0.0f);
      vals.assign(static_cast<size_t>(lk * dim_v), 0.0f);
      for (int64_t j = 0; j < lk; ++j) {
        for (int64_t d = 0; d < dim; ++d) {
          const float x =
              LoadView(p.k, bb * ks.s[0] + (k0 + j) * ks.s[1] + g * ks.s[2] + d * ks.s[3]);
          kscaled[static_cast<size_t>(j * dim + d)] = round(x * scale);
        }
        for (int64_t d = 0; d < dim_v; ++d) {
          vals[static_cast<size_t>(j * dim_v + d)] =
              LoadView(p.v, bb * vs.s[0] + (k0 + j) * vs.s[1] + g * vs.s[2] + d * vs.s[3]);
        }
      }
      for (int64_t h = g * (hq / hkv); h < (g + 1) * (hq / hkv); ++h) {
        float slope = 0.0f;
        if (p.alibi_slopes.data != nullptr) {
          const TensorView& a = p.alibi_slopes;
          slope = a.rank == 1 ? LoadView(a, h * a.strides[0])
                              : LoadView(a, b * a.strides[0] + h * a.strides[1]);
        }
        for (int64_t i = 0; i < lq; ++i) {
          const int64_t pos = i + delta;
          for (int64_t d = 0; d < dim; ++d) {
            qrow[static_cast<size_t>(d)] =
                LoadView(p.q, bb * qs.s[0] + (q0 + i) * qs.s[1] + h * qs.s[2] + d * qs.s[3]);
          }
          s.assign(static_cast<size_t>(lk), -inf);
          float m = -inf;
          bool any = false, nan = false;
          for (int64_t j = 0; j < lk; ++j) {
            if ((wl >= 0 && j < pos - wl) || (wr >= 0 && j > pos + wr)) continue;
            any = true;
            float acc = 0.0f;
            for (int64_t d = 0; d < dim; ++d) {
              acc += qrow[static_cast<size_t>(d)] * kscaled[static_cast<size_t>(j * dim + d)];
            }
            float v = round(acc);
            if (cap > 0.0f) v = round(cap * round(std::tanh(round(v / cap))));
            if (p.alibi_slopes.data != nullptr) {
              v = round(v - round(slope * static_cast<float>(std::llabs(pos - j))));
            }
            s[static_cast<size_t>(j)] = v;
            nan = nan || std::isnan(v);
            m = std::max(m, v);
          }
          double* orow = varlen ? out + ((q0 + i) * hq + h) * dim_v
                                : out + ((b * total_q + i) * hq + h) * dim_v;
          double* lrow = nullptr;
          if (lse != nullptr) {
            lrow = varlen ? lse + h * total_q + q0 + i : lse + (b * hq + h) * total_q + i;
          }
          if (!any) {
            std::fill(orow, orow + dim_v, 0.0);
            if (lrow != nullptr) *lrow = -std::numeric_limits<double>::infinity();
            continue;
          }
          if (nan) m = std::numeric_limits<float>::quiet_NaN();
          float l = 0.0f;
          prob.assign(static_cast<size_t>(lk), 0.0f);
          for (int64_t j = 0; j < lk; ++j) {
            if (s[static_cast<size_t>(j)] == -inf) continue;
            prob[static_cast<size_t>(j)] = std::exp(s[static_cast<size_t>(j)] - m);
            l += prob[static_cast<size_t>(j)];
          }
          for (float& x : prob) x = round(x / l);  // P normalized, in the dtype
          for (int64_t d = 0; d < dim_v; ++d) {
            float acc = 0.0f;
            for (int64_t j = 0; j < lk; ++j) {
              if (prob[static_cast<size_t>(j)] == 0.0f) continue;
              acc += prob[static_cast<size_t>(j)] * vals[static_cast<size_t>(j * dim_v + d)];
            }
            orow[d] = round(acc);
          }
          if (lrow != nullptr) *lrow = static_cast<double>(m + std::log(l));
        }
      }
    }
  }
}

}  // namespace test
}  // namespace tessera
