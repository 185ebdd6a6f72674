// Shared test utilities: seeded random tensors with owned, guarded storage in every dtype and
// layout; the comparator of docs/RELIABILITY.md §2; and the naive same-precision attention
// reference the ratio rule measures against.
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "tessera/attention.h"
#include "tessera/types.h"
#include "tolerances.h"

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

// ---------------------------------------------------------------------------------------------
// Comparator (RELIABILITY.md §2).

// Comparator policy on non-finite values: fails when NaN or +-inf occurs on exactly one side,
// when infinities differ in sign, or when the reference is NaN (a test that expects NaN checks
// it explicitly). Both sides equal infinities pass.
::testing::AssertionResult CheckNonFinite(const std::vector<double>& got,
                                          const std::vector<double>& ref, const char* what);

// max |got - ref| over elements finite on both sides.
double MaxAbsError(const std::vector<double>& got, const std::vector<double>& ref);
// sum (got - ref)^2 / sum ref^2 over finite elements (0 when both sums are 0).
double Nmse(const std::vector<double>& got, const std::vector<double>& ref);
// 2 * max |(ref + 0.3 - 0.3) - ref| evaluated in `dtype` (ref rounded to dtype first), and at
// least one ulp of the largest |ref| (see the comment in the .cc).
double NoiseFloor(DType dtype, const std::vector<double>& ref);
// Distance from |x| (rounded to `dtype`) to the next larger value of the dtype; 0 at the top.
double Ulp(DType dtype, double x);

enum class Rule {
  kStandard,   // f32: ceilings + NMSE + relative error; bf16/f16: ratio rule + ceilings
  kRatioOnly,  // ill-conditioned inputs (huge logits or values): ratio rule, any dtype
};

// Checks a forward output (values converted to double from `dtype`) against the fp64 reference.
// `naive` is the naive same-precision output, required for bf16/f16 and for kRatioOnly.
// `magnitude` is sum_j p_ij |v_jd| per element (the fp64 reference run on |V|), the scale of the
// fp32 relative-error rule (tolerances.h); without it |ref| is used.
::testing::AssertionResult CheckOutput(DType dtype, const std::vector<double>& got,
                                       const std::vector<double>& ref,
                                       const std::vector<double>* naive,
                                       Rule rule = Rule::kStandard,
                                       const std::vector<double>* magnitude = nullptr);
// Checks an LSE against the fp64 reference (kLseCeiling; -inf must match exactly). Under
// kRatioOnly the naive same-precision LSE bounds the error instead.
::testing::AssertionResult CheckLse(const std::vector<double>& got, const std::vector<double>& ref,
                                    const std::vector<double>* naive = nullptr,
                                    Rule rule = Rule::kStandard);
// Element-wise |got - ref| <= atol + rtol * |ref|, with the non-finite policy.
::testing::AssertionResult CheckClose(const std::vector<double>& got,
                                      const std::vector<double>& ref, Ceiling ceiling,
                                      const char* what);

// The gradient ceiling of a dtype (tolerances.h); `gqa` selects the looser bf16 GQA ceiling.
Ceiling GradCeiling(DType dtype, bool gqa);

// How CheckGradient judges one gradient.
struct GradRule {
  Rule rule = Rule::kStandard;
  bool softcap = false;  // the ratio rule's floor gains kGradSoftcapExtra
  bool gqa = false;      // bf16 GQA ceiling
};

// Checks a gradient (dq, dk or dv; values converted to double from `dtype`) against the fp64
// reference (RELIABILITY.md §2, gradient rows):
//   bf16/f16 and kRatioOnly: err <= kGradRatio * err(naive) + floor (+ kGradSoftcapExtra);
//   kStandard: the gradient ceiling of the dtype, and for f32 NMSE <= kF32MaxNmse and a relative
//   error <= kF32MaxRelErr against `magnitude` (AttentionBackwardMagnitude) where it exceeds
//   kF32RelErrMinMagnitude.
// `naive` (AttentionBackwardNaive) is required for bf16/f16 and for kRatioOnly.
::testing::AssertionResult CheckGradient(DType dtype, const std::vector<double>& got,
                                         const std::vector<double>& ref,
                                         const std::vector<double>* naive,
                                         const std::vector<double>* magnitude, GradRule rule,
                                         const char* what);

// ---------------------------------------------------------------------------------------------
// Naive same-precision reference.

// The materialized algorithm evaluated in the input precision (params.q.dtype), with another
// operation order than the kernels: K is scaled instead of Q, S and P are rounded to the dtype,
// P is normalized before P.V, and the output is rounded to the dtype (the FlashAttention tests'
// reorder_ops reference). Accumulation is f32. Same conventions, inputs and output layouts as
// ref::AttentionForwardF64; lse is the f32 value computed from the rounded scores.
void AttentionForwardNaive(const AttentionParams& params, double* out, double* lse);

// The naive same-precision backward: the autograd of the materialized forward above, evaluated
// in the input precision with f32 accumulation, every intermediate (S, P, O, dP, dS, per-head
// dK/dV) rounded to the dtype, and another operation order than the kernels: K is scaled instead
// of Q, D_i = sum_j P_ij dP_ij from the rounded P and dP (the kernels use rowsum(dO * O)), and the
// softcap derivative is 1 - t^2 with the rounded t = tanh(u / c). Reads params.forward's inputs
// and options and params.dout (out and lse are ignored); writes dq, dk, dv rounded to the dtype,
// in the layouts and with the conventions of ref::AttentionBackwardF64.
void AttentionBackwardNaive(const AttentionBackwardParams& params, double* dq, double* dk,
                            double* dv);

// The magnitude of the terms behind each gradient element, in fp64 (the scale of the f32
// relative-error rule, as `magnitude` is for outputs): with a_ij = sum_d |dO_id| |v_jd|,
// A_i = sum_j P_ij a_ij and m_ij = P_ij (a_ij + A_i) |ds/du|_ij (a bound on |dS_ij|),
//   dq_id = |scale| sum_j m_ij |k_jd|,  dk_jd = |scale| sum_i m_ij |q_id|,
//   dv_jd = sum_i P_ij |dO_id|
// (dk, dv summed over the GQA group). Same layouts and conventions as ref::AttentionBackwardF64.
void AttentionBackwardMagnitude(const AttentionBackwardParams& params, double* dq, double* dk,
                                double* dv);

}  // namespace test
}  // namespace tessera
