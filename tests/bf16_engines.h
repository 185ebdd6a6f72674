// SPDX-License-Identifier: Apache-2.0
// Tests of the bf16 kernels on a dot-product unit (flash_fwd_amx.cc, flash_bwd_amx.cc): which
// engine runs, skipping where the CPU lacks it, and the cases of the scope both kernels share.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "attention_cases.h"
#include "core/amx.h"

namespace tessera {
namespace test {

// The AMX kernels run only where the CPU has AMX-TILE / AMX-BF16 and the OS grants the tile state
// (and TESSERA_DISABLE_AMX is unset). Elsewhere an AMX test has nothing to run, so it is skipped:
// the Highway kernels it compares against are covered by the forward and backward suites on
// every machine, and the AVX512-BF16 engine by its own suites where the CPU has it.
#define SKIP_WITHOUT_AMX()                                                 \
  do {                                                                     \
    if (!AmxEnabled()) GTEST_SKIP() << "AMX unavailable or disabled here"; \
  } while (0)

// Runs its scope on the AVX512-BF16 engine (the engine of AMX-less CPUs such as AMD Zen 4, chosen
// there by a speed probe; forced here whatever the probe says).
class Avx512Bf16Scope {
 public:
  Avx512Bf16Scope() { SetBf16DotOverrideForTesting(Bf16Dot::kAvx512Bf16); }
  ~Avx512Bf16Scope() { ClearBf16DotOverrideForTesting(); }
  bool available() const { return Bf16DotEngine() == Bf16Dot::kAvx512Bf16; }
};

// A CPU without AVX512-BF16 (or TESSERA_DISABLE_AVX512BF16 set) cannot run that engine: the test
// is skipped, as SKIP_WITHOUT_AMX for AMX; the Highway kernels still run there.
#define SKIP_WITHOUT_AVX512BF16(scope)                                               \
  do {                                                                               \
    if (!(scope).available()) GTEST_SKIP() << "AVX512-BF16 unavailable or disabled"; \
  } while (0)

inline Spec Bf16(int64_t sq, int64_t sk, int64_t hq, int64_t hkv, int64_t d) {
  return Dense(sq, sk, hq, hkv, d, DType::kBF16);
}

// The cases of the scope the AMX forward and backward share beyond lengths, head dims and
// layouts: GQA groups (8:1 makes a 128-row forward task of 16 positions; 3:1 pads rows to 32),
// sliding windows in both alignments, rows that see nothing (a top-left window with Lk < Lq, and
// bottom-right causal with Lq > Lk), and custom scales (0: every visible key weighs the same;
// negative).
inline void AppendSharedBf16Cases(std::vector<Spec>* specs) {
  for (auto [hq, hkv] : {std::pair<int64_t, int64_t>{8, 1}, {6, 2}, {3, 1}}) {
    Spec s = Bf16(150, 210, hq, hkv, 64);
    specs->push_back(s);
    s.causal = true;
    specs->push_back(s);
  }
  for (auto [wl, wr] : {std::pair<int64_t, int64_t>{0, 0}, {7, 7}, {40, 0}, {0, 90}, {200, 3}}) {
    for (MaskAlign align : {MaskAlign::kBottomRight, MaskAlign::kTopLeft}) {
      Spec s = Bf16(190, 230, 2, 1, 64);
      s.window_left = wl;
      s.window_right = wr;
      s.align = align;
      specs->push_back(s);
    }
  }
  Spec s = Bf16(200, 60, 2, 1, 64);
  s.window_left = 9;
  s.window_right = 0;
  s.align = MaskAlign::kTopLeft;
  specs->push_back(s);
  s.causal = true;
  s.window_left = -1;
  s.window_right = -1;
  s.align = MaskAlign::kBottomRight;
  specs->push_back(s);
  for (float scale : {0.0f, -0.2f, 0.5f}) {
    Spec c = Bf16(70, 90, 2, 1, 128);
    c.scale = scale;
    c.causal = true;
    specs->push_back(c);
  }
}

}  // namespace test
}  // namespace tessera
