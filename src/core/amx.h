// SPDX-License-Identifier: Apache-2.0
// Internal: which bf16 dot-product unit the bf16 kernels may use: Intel AMX tiles (the forward,
// src/attention/flash_fwd_amx.cc, and the backward, flash_bwd_amx.cc), or AVX512-BF16 vectors
// (vdpbf16ps: AMD Zen 4, Intel Cooper Lake and later; the forward only).
//
// AMX (Advanced Matrix Extensions, Sapphire Rapids and later) multiplies bf16 tiles into f32
// tiles. Using it takes three things: the CPU reports AMX-TILE and AMX-BF16 (CPUID leaf 7), the OS
// saves the tile state (XCR0 bits 17 and 18), and on Linux the process has asked for the tile
// data state once (arch_prctl ARCH_REQ_XCOMP_PERM); the kernels' f32 side needs AVX-512F/BW/VL
// and AVX512-BF16 too. The probe runs once per process.
//
// The kernels stay off when the probe fails, when the environment variable TESSERA_DISABLE_AMX
// is set to anything but "" or "0" (read once, for A/B measurements and tests), and while
// SetSimdTarget forces a SIMD target other than the CPU's best (the avx2 test runs and `--target`
// must exercise the kernels they name).
//
// AVX512-BF16 (CPUID leaf 7 subleaf 1, EAX bit 5, with AVX-512F/BW/VL and the OS saving the zmm
// state) is the fallback where AMX is missing or disabled, used only where it pays: a one-time
// probe (about a millisecond) times independent vdpbf16ps against independent f32 FMAs, and the
// vector engine runs only when its multiply-adds measure at least 1.3x as fast. On AMD Zen 4 the
// instruction does 32 multiply-adds per cycle against the FMAs' 16; on Intel cores it issues on one
// port where FMAs have two, so the Highway f32 kernels are as fast there.
// TESSERA_DISABLE_AVX512BF16 turns the vector engine off like TESSERA_DISABLE_AMX (both set: the
// Highway kernels, which convert bf16 to f32, run).
#pragma once

namespace tessera {

// The dot-product engines of the bf16 kernels, weakest first.
enum class Bf16Dot { kNone, kAvx512Bf16, kAmx };

// CPU, OS and permission support (the probe alone, cached): no environment, no target check.
bool AmxSupported();

// AmxSupported(), not disabled by TESSERA_DISABLE_AMX, and no SIMD target forced.
bool AmxEnabled();

// CPU and OS support of AVX512-BF16 with AVX-512F/BW/VL (the probe alone, cached).
bool Avx512Bf16Supported();

// Avx512Bf16Supported(), not disabled by TESSERA_DISABLE_AVX512BF16, and no SIMD target forced.
bool Avx512Bf16Usable();

// Multiply-adds per second of vdpbf16ps over those of f32 FMAs, both 512 bits wide, measured once
// per process on first use (0 where the instruction is not supported).
double Avx512Bf16SpeedupOverFma();

// The engine the bf16 kernels use now: AMX when AmxEnabled(); else AVX512-BF16 when usable and
// measured at least 1.3x the FMAs' rate; else kNone.
Bf16Dot Bf16DotEngine();

// Tests: makes Bf16DotEngine() return `engine` while it is usable on this CPU (AMX: AmxEnabled();
// AVX512-BF16: Avx512Bf16Usable(), whatever the probe measured); kNone forces the Highway kernels.
// ClearBf16DotOverrideForTesting() restores the choice. Not thread-safe against running kernels.
void SetBf16DotOverrideForTesting(Bf16Dot engine);
void ClearBf16DotOverrideForTesting();

}  // namespace tessera
