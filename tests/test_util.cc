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
    default:  // the test tensors are attention inputs: f32, bf16 or f16
      ADD_FAILURE() << "StoreAs: unsupported dtype " << DTypeName(dtype);
      return;
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
    default:  // the test tensors are attention inputs: f32, bf16 or f16
      break;
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
    default:  // mask dtypes are not rounded
      break;
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

std::vector<double> FiniteDifferenceGradient(Tensor* x, const std::function<double()>& loss) {
  std::vector<double> grad;
  const double h = 1.0 / 256.0;
  x->ForEach([&](const Index& i) {
    const double x0 = x->Get(i);
    auto at = [&](double step) {
      x->Set(i, x0 + step);
      const double l = loss();
      x->Set(i, x0);
      return l;
    };
    const double d1 = (at(h) - at(-h)) / (2.0 * h);
    const double d2 = (at(h / 2) - at(-h / 2)) / h;
    grad.push_back((4.0 * d2 - d1) / 3.0);
  });
  return grad;
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

// err(got) <= ratio * err(naive) + floor + extra_floor, or the `fallback` ceiling where the naive
// computation itself overflowed.
::testing::AssertionResult CheckRatio(DType dtype, const std::vector<double>& got,
                                      const std::vector<double>& ref,
                                      const std::vector<double>* naive, Ceiling fallback,
                                      const char* what, double ratio = kForwardRatio,
                                      double extra_floor = 0.0) {
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
  const double floor = NoiseFloor(dtype, ref) + extra_floor;
  const double bound = ratio * naive_err + floor;
  if (err <= bound) return ::testing::AssertionSuccess();
  const size_t w = WorstIndex(got, ref);
  return ::testing::AssertionFailure()
         << what << ": ratio rule failed: err " << Format(err) << " > " << ratio << " * naive err "
         << Format(naive_err) << " + floor " << Format(floor) << "; worst element " << w << ": got "
         << Format(got[w]) << ", ref " << Format(ref[w]);
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

Ceiling GradCeiling(DType dtype, bool gqa) {
  switch (dtype) {
    case DType::kF32:
      return kGradCeilingF32;
    case DType::kBF16:
      return gqa ? kGradCeilingBF16Gqa : kGradCeilingBF16;
    case DType::kF16:
      return kGradCeilingF16;
    default:  // mask dtypes carry no gradient
      break;
  }
  return kGradCeilingF32;
}

::testing::AssertionResult CheckGradient(DType dtype, const std::vector<double>& got,
                                         const std::vector<double>& ref,
                                         const std::vector<double>* naive,
                                         const std::vector<double>* magnitude, GradRule rule,
                                         const char* what) {
  ::testing::AssertionResult nf = CheckNonFinite(got, ref, what);
  if (!nf) return nf;
  const Ceiling ceiling = GradCeiling(dtype, rule.gqa);
  if (rule.rule == Rule::kRatioOnly || dtype != DType::kF32) {
    ::testing::AssertionResult r = CheckRatio(dtype, got, ref, naive, ceiling, what, kGradRatio,
                                              rule.softcap ? kGradSoftcapExtra : 0.0);
    if (!r) return r;
  }
  if (rule.rule == Rule::kRatioOnly) return ::testing::AssertionSuccess();

  const std::string ceiling_what = std::string(what) + " (ceiling)";
  ::testing::AssertionResult c = CheckClose(got, ref, ceiling, ceiling_what.c_str());
  if (!c) return c;
  if (dtype == DType::kF32) {
    // A gradient that cancels to exactly 0 everywhere (one visible key per row: dS = P (dP - D)
    // = 0) has no scale for NMSE; the ceilings and the magnitude rule bound the residue.
    double ref_energy = 0.0;
    for (double r : ref) ref_energy += std::isfinite(r) ? r * r : 0.0;
    const double nmse = ref_energy == 0.0 ? 0.0 : Nmse(got, ref);
    if (!(nmse <= kF32MaxNmse)) {
      return ::testing::AssertionFailure()
             << what << ": NMSE " << Format(nmse) << " > " << kF32MaxNmse;
    }
    const bool have_mag = magnitude != nullptr && magnitude->size() == ref.size();
    for (size_t i = 0; i < got.size(); ++i) {
      const double mag = have_mag ? (*magnitude)[i] : std::fabs(ref[i]);
      if (!std::isfinite(ref[i]) || !(mag > kF32RelErrMinMagnitude)) continue;
      const double rel = std::fabs(got[i] - ref[i]) / mag;
      if (!(rel <= kF32MaxRelErr)) {
        return ::testing::AssertionFailure()
               << what << "[" << i << "]: relative error " << Format(rel) << " > " << kF32MaxRelErr
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

// ---------------------------------------------------------------------------------------------
// Naive same-precision backward and the gradient magnitudes.

namespace {

// Problem geometry read from the public params, the way the references read it.
struct BackwardGeometry {
  explicit BackwardGeometry(const AttentionBackwardParams& bp)
      : p(bp.forward),
        q(StridesOf(bp.forward.q)),
        k(StridesOf(bp.forward.k)),
        v(StridesOf(bp.forward.v)),
        dout(StridesOf(bp.dout)) {
    varlen = p.cu_seqlens_q != nullptr;
    num_seqs = varlen ? p.num_seqs : p.q.shape[0];
    group = q.heads / k.heads;
    scale = p.scale.has_value() ? *p.scale
                                : static_cast<float>(1.0 / std::sqrt(static_cast<double>(q.dim)));
    window_right = p.causal ? 0 : p.window_right;
  }

  int64_t QBegin(int64_t b) const { return varlen ? p.cu_seqlens_q[b] : 0; }
  int64_t QLen(int64_t b) const {
    return varlen ? p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b] : q.tokens;
  }
  int64_t KBegin(int64_t b) const { return varlen ? p.cu_seqlens_k[b] : 0; }
  int64_t KLen(int64_t b) const {
    return varlen ? p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] : k.tokens;
  }
  // Position shift of sequence b's queries (bottom-right alignment).
  int64_t Shift(int64_t b) const { return p.align == MaskAlign::kTopLeft ? 0 : KLen(b) - QLen(b); }
  bool Visible(int64_t pos, int64_t j) const {
    return (p.window_left < 0 || j >= pos - p.window_left) &&
           (window_right < 0 || j <= pos + window_right);
  }
  float Slope(int64_t b, int64_t h) const {
    const TensorView& a = p.alibi_slopes;
    if (a.data == nullptr) return 0.0f;
    return a.rank == 1 ? LoadView(a, h * a.strides[0])
                       : LoadView(a, b * a.strides[0] + h * a.strides[1]);
  }
  // Element offset of (b, token t of the token axis, head h, d) in a view.
  int64_t Offset(const Strides4& st, int64_t b, int64_t t, int64_t h, int64_t d) const {
    return (varlen ? 0 : b * st.s[0]) + t * st.s[1] + h * st.s[2] + d * st.s[3];
  }
  // Row index of (b, t) in the contiguous result layouts ([B, S, ..] or [T, ..]).
  int64_t QRow(int64_t b, int64_t t) const { return varlen ? t : b * q.tokens + t; }
  int64_t KRow(int64_t b, int64_t t) const { return varlen ? t : b * k.tokens + t; }

  const AttentionParams& p;
  Strides4 q, k, v, dout;
  bool varlen = false;
  int64_t num_seqs = 0;
  int64_t group = 1;
  float scale = 1.0f;
  int64_t window_right = -1;
};

size_t At(int64_t i) { return static_cast<size_t>(i); }

}  // namespace

void AttentionBackwardNaive(const AttentionBackwardParams& bp, double* dq, double* dk, double* dv) {
  const BackwardGeometry g(bp);
  const AttentionParams& p = bp.forward;
  const DType dt = p.q.dtype;
  auto round = [dt](float x) { return RoundTo(dt, x); };
  const int64_t hq = g.q.heads, hkv = g.k.heads, dim = g.q.dim, dim_v = g.v.dim;
  const float cap = p.softcap;
  const float inf = std::numeric_limits<float>::infinity();

  std::vector<float> kscaled, vals, qrow(At(dim)), dorow(At(dim_v)), s, prob, dcap, dp, ds;
  std::vector<float> head_dk, head_dv, group_dk, group_dv;
  for (int64_t b = 0; b < g.num_seqs; ++b) {
    const int64_t q0 = g.QBegin(b), lq = g.QLen(b), k0 = g.KBegin(b), lk = g.KLen(b);
    const int64_t shift = g.Shift(b);
    for (int64_t kvh = 0; kvh < hkv; ++kvh) {
      kscaled.assign(At(lk * dim), 0.0f);
      vals.assign(At(lk * dim_v), 0.0f);
      for (int64_t j = 0; j < lk; ++j) {
        for (int64_t d = 0; d < dim; ++d) {
          kscaled[At(j * dim + d)] =
              round(LoadView(p.k, g.Offset(g.k, b, k0 + j, kvh, d)) * g.scale);
        }
        for (int64_t d = 0; d < dim_v; ++d) {
          vals[At(j * dim_v + d)] = LoadView(p.v, g.Offset(g.v, b, k0 + j, kvh, d));
        }
      }
      group_dk.assign(kscaled.size(), 0.0f);
      group_dv.assign(vals.size(), 0.0f);
      for (int64_t h = kvh * g.group; h < (kvh + 1) * g.group; ++h) {
        head_dk.assign(kscaled.size(), 0.0f);  // dL/d(scaled K) of this head, f32 accumulation
        head_dv.assign(vals.size(), 0.0f);
        const float slope = g.Slope(b, h);
        for (int64_t i = 0; i < lq; ++i) {
          const int64_t pos = i + shift;
          for (int64_t d = 0; d < dim; ++d) {
            qrow[At(d)] = LoadView(p.q, g.Offset(g.q, b, q0 + i, h, d));
          }
          for (int64_t d = 0; d < dim_v; ++d) {
            dorow[At(d)] = LoadView(bp.dout, g.Offset(g.dout, b, q0 + i, h, d));
          }
          s.assign(At(lk), -inf);
          dcap.assign(At(lk), 1.0f);
          float m = -inf;
          bool any = false, nan = false;
          for (int64_t j = 0; j < lk; ++j) {
            if (!g.Visible(pos, j)) continue;
            any = true;
            float acc = 0.0f;
            for (int64_t d = 0; d < dim; ++d) acc += qrow[At(d)] * kscaled[At(j * dim + d)];
            float x = round(acc);
            if (cap > 0.0f) {
              const float t = round(std::tanh(round(x / cap)));
              x = round(cap * t);
              dcap[At(j)] = round(1.0f - t * t);
            }
            if (p.alibi_slopes.data != nullptr) {
              x = round(x - round(slope * static_cast<float>(std::llabs(pos - j))));
            }
            s[At(j)] = x;
            nan = nan || std::isnan(x);
            m = std::max(m, x);
          }
          double* dq_row = dq + (g.QRow(b, q0 + i) * hq + h) * dim;
          if (!any) {
            std::fill(dq_row, dq_row + dim, 0.0);
            continue;
          }
          if (nan) m = std::numeric_limits<float>::quiet_NaN();
          float l = 0.0f;
          prob.assign(At(lk), 0.0f);
          for (int64_t j = 0; j < lk; ++j) {
            if (s[At(j)] == -inf) continue;
            prob[At(j)] = std::exp(s[At(j)] - m);
            l += prob[At(j)];
          }
          for (float& x : prob) x = round(x / l);
          // dP = dO V^T, then the softmax backward dS = P (dP - sum_j P dP).
          dp.assign(At(lk), 0.0f);
          float delta = 0.0f;
          for (int64_t j = 0; j < lk; ++j) {
            if (prob[At(j)] == 0.0f) continue;
            float acc = 0.0f;
            for (int64_t d = 0; d < dim_v; ++d) acc += dorow[At(d)] * vals[At(j * dim_v + d)];
            dp[At(j)] = round(acc);
            delta += prob[At(j)] * dp[At(j)];
          }
          ds.assign(At(lk), 0.0f);
          for (int64_t j = 0; j < lk; ++j) {
            if (prob[At(j)] == 0.0f) continue;
            float x = round(prob[At(j)] * (dp[At(j)] - delta));
            if (cap > 0.0f) x = round(x * dcap[At(j)]);
            ds[At(j)] = x;
          }
          for (int64_t d = 0; d < dim; ++d) {
            float acc = 0.0f;
            for (int64_t j = 0; j < lk; ++j) acc += ds[At(j)] * kscaled[At(j * dim + d)];
            dq_row[d] = round(acc);
          }
          for (int64_t j = 0; j < lk; ++j) {
            if (prob[At(j)] == 0.0f) continue;
            for (int64_t d = 0; d < dim; ++d) head_dk[At(j * dim + d)] += ds[At(j)] * qrow[At(d)];
            for (int64_t d = 0; d < dim_v; ++d) {
              head_dv[At(j * dim_v + d)] += prob[At(j)] * dorow[At(d)];
            }
          }
        }
        // Per-head gradients rounded, through K's scaling, then summed over the group.
        for (size_t e = 0; e < head_dk.size(); ++e) {
          group_dk[e] += round(round(head_dk[e]) * g.scale);
        }
        for (size_t e = 0; e < head_dv.size(); ++e) group_dv[e] += round(head_dv[e]);
      }
      for (int64_t j = 0; j < lk; ++j) {
        const int64_t row = g.KRow(b, k0 + j);
        for (int64_t d = 0; d < dim; ++d) {
          dk[(row * hkv + kvh) * dim + d] = round(group_dk[At(j * dim + d)]);
        }
        for (int64_t d = 0; d < dim_v; ++d) {
          dv[(row * hkv + kvh) * dim_v + d] = round(group_dv[At(j * dim_v + d)]);
        }
      }
    }
  }
}

void AttentionBackwardMagnitude(const AttentionBackwardParams& bp, double* dq, double* dk,
                                double* dv) {
  const BackwardGeometry g(bp);
  const AttentionParams& p = bp.forward;
  const int64_t hq = g.q.heads, hkv = g.k.heads, dim = g.q.dim, dim_v = g.v.dim;
  const double scale = g.scale, abs_scale = std::fabs(scale);
  const double cap = p.softcap;
  const double inf = std::numeric_limits<double>::infinity();

  std::vector<double> keys, vals, qrow(At(dim)), dorow(At(dim_v)), s, dcap, a;
  std::vector<double> mag_k, mag_v;
  for (int64_t b = 0; b < g.num_seqs; ++b) {
    const int64_t q0 = g.QBegin(b), lq = g.QLen(b), k0 = g.KBegin(b), lk = g.KLen(b);
    const int64_t shift = g.Shift(b);
    for (int64_t kvh = 0; kvh < hkv; ++kvh) {
      keys.assign(At(lk * dim), 0.0);
      vals.assign(At(lk * dim_v), 0.0);
      for (int64_t j = 0; j < lk; ++j) {
        for (int64_t d = 0; d < dim; ++d) {
          keys[At(j * dim + d)] = LoadView(p.k, g.Offset(g.k, b, k0 + j, kvh, d));
        }
        for (int64_t d = 0; d < dim_v; ++d) {
          vals[At(j * dim_v + d)] = LoadView(p.v, g.Offset(g.v, b, k0 + j, kvh, d));
        }
      }
      mag_k.assign(keys.size(), 0.0);
      mag_v.assign(vals.size(), 0.0);
      for (int64_t h = kvh * g.group; h < (kvh + 1) * g.group; ++h) {
        const double slope = g.Slope(b, h);
        for (int64_t i = 0; i < lq; ++i) {
          const int64_t pos = i + shift;
          for (int64_t d = 0; d < dim; ++d) {
            qrow[At(d)] = LoadView(p.q, g.Offset(g.q, b, q0 + i, h, d));
          }
          for (int64_t d = 0; d < dim_v; ++d) {
            dorow[At(d)] = LoadView(bp.dout, g.Offset(g.dout, b, q0 + i, h, d));
          }
          s.assign(At(lk), -inf);
          dcap.assign(At(lk), 1.0);
          double m = -inf;
          for (int64_t j = 0; j < lk; ++j) {
            if (!g.Visible(pos, j)) continue;
            double dot = 0.0;
            for (int64_t d = 0; d < dim; ++d) dot += qrow[At(d)] * keys[At(j * dim + d)];
            double x = scale * dot;
            if (cap > 0.0) {
              const double t = std::tanh(x / cap);
              x = cap * t;
              dcap[At(j)] = 1.0 - t * t;
            }
            x -= slope * static_cast<double>(std::llabs(pos - j));
            s[At(j)] = x;
            m = std::max(m, x);
          }
          double* dq_row = dq + (g.QRow(b, q0 + i) * hq + h) * dim;
          std::fill(dq_row, dq_row + dim, 0.0);
          if (m == -inf) continue;
          double l = 0.0;
          for (int64_t j = 0; j < lk; ++j) {
            s[At(j)] = s[At(j)] == -inf ? 0.0 : std::exp(s[At(j)] - m);
            l += s[At(j)];
          }
          a.assign(At(lk), 0.0);
          double total = 0.0;
          for (int64_t j = 0; j < lk; ++j) {
            s[At(j)] /= l;
            for (int64_t d = 0; d < dim_v; ++d) {
              a[At(j)] += std::fabs(dorow[At(d)]) * std::fabs(vals[At(j * dim_v + d)]);
            }
            total += s[At(j)] * a[At(j)];
          }
          for (int64_t j = 0; j < lk; ++j) {
            const double pj = s[At(j)];
            if (pj == 0.0) continue;
            const double mj = pj * (a[At(j)] + total) * dcap[At(j)];
            for (int64_t d = 0; d < dim; ++d) {
              dq_row[d] += abs_scale * mj * std::fabs(keys[At(j * dim + d)]);
              mag_k[At(j * dim + d)] += abs_scale * mj * std::fabs(qrow[At(d)]);
            }
            for (int64_t d = 0; d < dim_v; ++d) {
              mag_v[At(j * dim_v + d)] += pj * std::fabs(dorow[At(d)]);
            }
          }
        }
      }
      for (int64_t j = 0; j < lk; ++j) {
        const int64_t row = g.KRow(b, k0 + j);
        for (int64_t d = 0; d < dim; ++d) dk[(row * hkv + kvh) * dim + d] = mag_k[At(j * dim + d)];
        for (int64_t d = 0; d < dim_v; ++d) {
          dv[(row * hkv + kvh) * dim_v + d] = mag_v[At(j * dim_v + d)];
        }
      }
    }
  }
}

}  // namespace test
}  // namespace tessera
