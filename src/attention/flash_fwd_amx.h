// SPDX-License-Identifier: Apache-2.0
// Internal: the exact forward for bf16 inputs on Intel AMX tiles (design notes and measurements
// in flash_fwd_amx.cc). AttentionForward routes here from flash_fwd.cc, after validation and the
// decode route, when Path::kAuto runs, AmxEnabled() (core/amx.h) and AmxForwardHandles(problem);
// every other call runs the Highway kernel of flash_fwd-inl.h as before.
#pragma once

#include <cstdint>

#include "core/amx.h"
#include "core/attention_problem.h"

namespace tessera {

// Whether the AMX forward implements this problem: bf16 q/k/v/out, a dense batch (no
// cu_seqlens), a head dim that is a multiple of 32 up to 256, no softcap, no ALiBi and no mask
// beyond the window (causal and sliding windows, either alignment). GQA, any strides, a custom
// scale and an optional LSE are all handled. Says nothing about the CPU (see AmxEnabled()).
bool AmxForwardHandles(const AttentionProblem& p);

// Runs the forward on `threads` threads with `engine` (AMX tiles or AVX512-BF16 vectors; the
// CPU must have it: Bf16DotEngine() or a weaker engine). Requires AmxForwardHandles(p). Returns
// false (writing nothing) when the per-worker scratch cannot be allocated or engine is kNone.
bool AmxForward(const AttentionProblem& p, int32_t threads, Bf16Dot engine);

}  // namespace tessera
