// SPDX-License-Identifier: Apache-2.0
// Internal: whether the Intel AMX bf16 kernels (src/attention/flash_fwd_amx.cc) may run.
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
#pragma once

namespace tessera {

// CPU, OS and permission support (the probe alone, cached): no environment, no target check.
bool AmxSupported();

// AmxSupported(), not disabled by TESSERA_DISABLE_AMX, and no SIMD target forced.
bool AmxEnabled();

}  // namespace tessera
