// SPDX-License-Identifier: Apache-2.0
// Internal: the exact backward for bf16 inputs on Intel AMX tiles (design notes and measurements
// in flash_bwd_amx.cc). AttentionBackward routes here from flash_bwd.cc, after validation, when
// Path::kAuto runs, Bf16DotEngine() is kAmx (core/amx.h) and AmxBackwardHandles(problem); every
// other call (the AVX512-BF16 engine included) runs the Highway kernel of flash_bwd-inl.h.
#pragma once

#include <cstdint>

#include "core/attention_problem.h"

namespace tessera {

// Whether the AMX backward implements this problem: bf16 tensors, a dense batch (no cu_seqlens),
// a head dim that is a multiple of 32 up to 256, no softcap, no ALiBi and no mask beyond the
// window (causal and sliding windows, either alignment). GQA, any strides and a custom scale are
// handled. Says nothing about the CPU (see AmxEnabled()).
bool AmxBackwardHandles(const AttentionBackwardProblem& bp);

// Runs the backward on `threads` threads, writing dq, dk and dv. Requires AmxEnabled(),
// AmxBackwardHandles(bp), at least one query row and one key. Returns false (writing nothing)
// when a buffer cannot be allocated.
bool AmxBackward(const AttentionBackwardProblem& bp, int32_t threads);

}  // namespace tessera
