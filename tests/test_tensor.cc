// SPDX-License-Identifier: Apache-2.0
#include "test_tensor.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

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
                 << idx[3] << "]: " << FormatDouble(LoadAs(dtype_, a)) << " vs "
                 << FormatDouble(LoadAs(dtype_, b));
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

std::string FormatDouble(double x) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g", x);
  return buf;
}

}  // namespace test
}  // namespace tessera
