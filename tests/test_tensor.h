// SPDX-License-Identifier: Apache-2.0
// Test environment and tensors: the environment flags and seeds of every test (TESSERA_SMALL_TESTS,
// TESSERA_LONG_TESTS, TESSERA_SEED), dtype rounding, a seeded random source, and strided tensors
// with owned, guarded, NaN-prefilled storage in every dtype and layout.
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "tessera/types.h"

namespace tessera {
namespace test {

// ---------------------------------------------------------------------------------------------
// Environment.

// True when the variable is set to something other than "" or "0".
bool EnvFlag(const char* name);
// TESSERA_SMALL_TESTS=1 (sanitizer builds): heavy tests shrink their shapes but still cover tile
// tails. TESSERA_LONG_TESTS=1: large sweeps run too.
inline bool SmallTests() { return EnvFlag("TESSERA_SMALL_TESTS"); }
inline bool LongTests() { return EnvFlag("TESSERA_LONG_TESTS"); }

// Base seed: TESSERA_SEED when set, else a fixed default, so runs are reproducible.
uint64_t BaseSeed();
// Seed of one case: the base seed mixed with the case name.
uint64_t SeedFor(const std::string& case_name);
// One-line repro printed with every failure: "TESSERA_SEED=<base> case=<name> seed=<seed>".
std::string Repro(const std::string& case_name);

// ---------------------------------------------------------------------------------------------
// A read-only i32 view of int32 values (cu_seqlens, seq_lens, block tables, tree parents, rotary
// positions): [n], or [rows, cols].
inline TensorView I32View(const int32_t* data, int64_t n) {
  return MakeView1(const_cast<int32_t*>(data), DType::kI32, n);
}
inline TensorView I32View(const int32_t* data, int64_t rows, int64_t cols) {
  const int64_t shape[2] = {rows, cols};
  return MakeContiguousView(const_cast<int32_t*>(data), DType::kI32, 2, shape);
}
inline TensorView I32View(const std::vector<int32_t>& v) {
  return I32View(v.data(), static_cast<int64_t>(v.size()));
}

// Numbers.

// The value `x` becomes when stored in `dtype` (through float, round to nearest even).
float RoundTo(DType dtype, float x);
// Converts between a dtype's storage and float.
void StoreAs(DType dtype, float x, void* dst);
float LoadAs(DType dtype, const void* src);

class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}
  float Normal() { return normal_(engine_); }
  double Uniform(double lo, double hi) {
    return std::uniform_real_distribution<double>(lo, hi)(engine_);
  }
  // Uniform integer in [lo, hi].
  int64_t UniformInt(int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(engine_);
  }
  std::mt19937_64& engine() { return engine_; }

 private:
  std::mt19937_64 engine_;
  std::normal_distribution<float> normal_{0.0f, 1.0f};
};

// ---------------------------------------------------------------------------------------------
// Tensors with owned storage.

inline constexpr size_t kGuardBytes = 1024;

using Index = std::array<int64_t, 4>;

// A strided tensor of rank 1..4 that owns its storage:
//   [1 KiB guard][payload: `offset` elements, then the strided elements and any gaps][1 KiB guard]
// The payload starts 64-byte aligned, so `offset` (in elements) controls misalignment. Every
// payload slot starts as NaN (gaps included: a kernel that reads padding sees NaN) and the guards
// hold a byte pattern. Move-only: the payload address is part of what a test controls.
class Tensor {
 public:
  Tensor() = default;
  // Empty `strides` means contiguous row-major.
  Tensor(DType dtype, std::vector<int64_t> shape, std::vector<int64_t> strides = {},
         int64_t offset = 0);
  Tensor(Tensor&&) = default;
  Tensor& operator=(Tensor&&) = default;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;

  static std::vector<int64_t> ContiguousStrides(const std::vector<int64_t>& shape);
  // Row-major strides where each innermost row is followed by `pad` unused elements.
  static std::vector<int64_t> PaddedStrides(const std::vector<int64_t>& shape, int64_t pad);

  DType dtype() const { return dtype_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t shape(int i) const { return shape_[static_cast<size_t>(i)]; }
  int64_t stride(int i) const { return strides_[static_cast<size_t>(i)]; }
  const std::vector<int64_t>& shape() const { return shape_; }
  const std::vector<int64_t>& strides() const { return strides_; }
  int64_t numel() const;
  // Address of element [0, ..., 0].
  void* data();
  const void* data() const;
  TensorView view();
  TensorView view() const;  // for inputs: tessera never writes them

  // Element access; indices past rank() are ignored.
  double Get(const Index& idx) const;
  void Set(const Index& idx, double value);
  // Calls fn(idx) for every element in row-major order.
  void ForEach(const std::function<void(const Index&)>& fn) const;

  // Values in row-major order of the view (the fp64 references' output layouts).
  std::vector<double> ToVector() const;
  // Sets every element from row-major `values` (rounded to the dtype).
  void FromVector(const std::vector<double>& values);
  // Fills every element with N(0, 1) * mult (rounded to the dtype).
  void FillNormal(Rng& rng, double mult = 1.0);
  // Sets every payload slot, gaps included, to `value`.
  void FillSlots(double value);

  // Records every byte (guards, gaps, elements) for the checks below.
  void Snapshot();
  // Guards still hold their pattern.
  ::testing::AssertionResult GuardsIntact() const;
  // Guards and gaps (payload bytes that belong to no element) equal the snapshot.
  ::testing::AssertionResult OutsideViewUntouched() const;
  // Every byte equals the snapshot (outputs after a rejected call or a no-op).
  ::testing::AssertionResult Unchanged() const;
  // Every element is finite.
  ::testing::AssertionResult AllFinite() const;

  // A contiguous tensor with the same values.
  Tensor ContiguousCopy() const;
  // Element values bitwise equal (shapes must match; layouts may differ).
  ::testing::AssertionResult BitwiseEqual(const Tensor& other) const;

 private:
  int64_t SlotOf(const Index& idx) const;  // payload slot of an element
  const uint8_t* payload() const { return bytes_.data() + base_ + kGuardBytes; }
  uint8_t* payload() { return bytes_.data() + base_ + kGuardBytes; }

  DType dtype_ = DType::kF32;
  std::vector<int64_t> shape_;
  std::vector<int64_t> strides_;
  int64_t offset_ = 0;
  int64_t slots_ = 0;             // payload size in elements
  size_t base_ = 0;               // alignment padding before the front guard
  std::vector<uint8_t> bytes_;    // alignment pad + guard + payload + guard
  std::vector<uint8_t> covered_;  // per payload slot: 1 when some element lives there
  std::vector<uint8_t> snapshot_;
};

// The gradient of loss() with respect to every element of x, by Richardson-extrapolated central
// differences with steps 2^-8 and 2^-9 (exact on a grid of multiples of 2^-9): the
// finite-difference oracle of the fp64 backward references. x is restored element by element.
std::vector<double> FiniteDifferenceGradient(Tensor* x, const std::function<double()>& loss);

// A double printed with 9 significant digits (failure messages).
std::string FormatDouble(double x);

}  // namespace test
}  // namespace tessera
