// SPDX-License-Identifier: Apache-2.0
// Standalone reproduction of the "build lottery" of memory-bound decode (docs/decode.md, Kernel):
// two 64 MB streams of 256-byte rows (K and V), ~50 cycles of FMAs per row, and each row's lines
// prefetched into L2 32 rows ahead. The prefetch of the lines is written three ways; each runs
// behind 0, 7, 23 and 41 nops, which moves the loop's code and nothing else. On the 2-core Zen 4
// VM, built as below, the rolled loop with K and V alternating ran at 73-80 cycles per row and
// the other two at 52-55, at every padding; built with -march=native the rolled loop ran at 52
// or 75 depending on the padding.
//
// Not part of the build (it needs AVX-512 at run time):
//   g++ -O2 -mavx512f -mfma bench/prefetch_modes.cc -o /tmp/prefetch_modes && /tmp/prefetch_modes
// Cycles assume 3.7 GHz.
#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

constexpr long kRows = 1 << 18;
constexpr long kRowBytes = 256;
constexpr long kAhead = 32;

float* AllocateStream() {
  const size_t bytes = kRows * kRowBytes;
  void* p = std::aligned_alloc(size_t{2} << 20, bytes);
  if (p == nullptr) std::exit(1);
  madvise(p, bytes, MADV_HUGEPAGE);
  std::memset(p, 0, bytes);
  return static_cast<float*>(p);
}

enum Prefetch { kRolled, kUnrolled, kKThenV };

template <Prefetch kHow, int kPad>
__attribute__((noinline)) float Stream(const float* k_rows, const float* v_rows) {
  const __m512 q0 = _mm512_set1_ps(0.5f), q1 = _mm512_set1_ps(0.25f);
  const __m512 q2 = _mm512_set1_ps(0.125f), q3 = _mm512_set1_ps(1.0f);
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, o0 = a0, o1 = a0, o2 = a0, o3 = a0;
  if (kPad > 0) asm volatile(".rept %c0\n nop\n .endr" ::"i"(kPad));
  for (long j = 0; j < kRows; ++j) {
    if (j + kAhead < kRows) {
      const char* kr = reinterpret_cast<const char*>(k_rows + (j + kAhead) * 64);
      const char* vr = reinterpret_cast<const char*>(v_rows + (j + kAhead) * 64);
      if (kHow == kRolled) {
#pragma GCC unroll 1
        for (long off = 0; off < kRowBytes; off += 64) {
          __builtin_prefetch(kr + off, 0, 2);
          __builtin_prefetch(vr + off, 0, 2);
        }
      } else if (kHow == kUnrolled) {
#pragma GCC unroll 8
        for (long off = 0; off < kRowBytes; off += 64) {
          __builtin_prefetch(kr + off, 0, 2);
          __builtin_prefetch(vr + off, 0, 2);
        }
      } else {
#pragma GCC unroll 8
        for (long off = 0; off < kRowBytes; off += 64) __builtin_prefetch(kr + off, 0, 2);
#pragma GCC unroll 8
        for (long off = 0; off < kRowBytes; off += 64) __builtin_prefetch(vr + off, 0, 2);
      }
    }
    const float* k = k_rows + j * 64;
    const float* v = v_rows + j * 64;
    // Six FMA steps on each 64-float row: a stand-in for decode's scores and P.V.
    auto fma_row = [](const float* row, __m512 m0, __m512 m1, __m512 m2, __m512 m3, __m512& s0,
                      __m512& s1, __m512& s2, __m512& s3) {
      const __m512 x0 = _mm512_load_ps(row), x1 = _mm512_load_ps(row + 16);
      const __m512 x2 = _mm512_load_ps(row + 32), x3 = _mm512_load_ps(row + 48);
      for (int r = 0; r < 6; ++r) {
        s0 = _mm512_fmadd_ps(x0, m0, s0);
        s1 = _mm512_fmadd_ps(x1, m1, s1);
        s2 = _mm512_fmadd_ps(x2, m2, s2);
        s3 = _mm512_fmadd_ps(x3, m3, s3);
      }
    };
    fma_row(k, q0, q1, q2, q3, a0, a1, a2, a3);
    const __m512 p = _mm512_set1_ps(0.001f * static_cast<float>(j & 7));
    fma_row(v, p, p, p, p, o0, o1, o2, o3);
  }
  const __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                 _mm512_add_ps(_mm512_add_ps(o0, o1), _mm512_add_ps(o2, o3)));
  return _mm512_reduce_add_ps(s);
}

// Best of 5 runs, in cycles per row.
template <Prefetch kHow, int kPad>
double CyclesPerRow(const float* k_rows, const float* v_rows) {
  double best = 1e9;
  for (int rep = 0; rep < 5; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    volatile float sink = Stream<kHow, kPad>(k_rows, v_rows);
    (void)sink;
    best = std::min(
        best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best * 3.7e9 / kRows;
}

template <Prefetch kHow>
void Row(const char* name, const float* k_rows, const float* v_rows) {
  std::printf("%-22s pad 0: %5.1f  pad 7: %5.1f  pad 23: %5.1f  pad 41: %5.1f\n", name,
              CyclesPerRow<kHow, 0>(k_rows, v_rows), CyclesPerRow<kHow, 7>(k_rows, v_rows),
              CyclesPerRow<kHow, 23>(k_rows, v_rows), CyclesPerRow<kHow, 41>(k_rows, v_rows));
}

}  // namespace

int main() {
  const float* k_rows = AllocateStream();
  const float* v_rows = AllocateStream();
  std::printf("cycles per row (3.7 GHz), 256K rows of K and V, lines prefetched %ld rows ahead\n",
              kAhead);
  for (int round = 0; round < 2; ++round) {
    Row<kRolled>("rolled, K/V alternating", k_rows, v_rows);
    Row<kUnrolled>("unrolled", k_rows, v_rows);
    Row<kKThenV>("K lines, then V lines", k_rows, v_rows);
  }
  return 0;
}
