// SPDX-License-Identifier: Apache-2.0
// Test cases of the attention entry points, shared by the forward and backward tests: the case
// description (Spec) and its name, the storage layouts of strided views, a case's random inputs
// and the tessera parameters that describe it, the sweeps both entry points run, mask
// arithmetic, and the helpers of the tests that call every path (empty problems, rejected
// arguments).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "tessera/attention.h"
#include "tessera/context.h"
#include "tessera/status.h"
#include "tessera/types.h"
#include "test_util.h"

namespace tessera {
namespace test {

// ---------------------------------------------------------------------------------------------
// Paths.

// The head dims documented to have a fast instantiation (context.h), independent of the kernel's
// own HasFastHeadDim (core/dispatch.h) so a change there shows up here.
bool HasFastPath(int64_t dim);

// Every path a head dim can be forced through (kFast only where it has an instantiation).
std::vector<Path> PathsFor(int64_t dim);

// Every path, kFast included whatever the head dim (for calls that must fail alike on each).
inline constexpr Path kAllPaths[] = {Path::kAuto, Path::kReference, Path::kGeneric, Path::kFast};

// ---------------------------------------------------------------------------------------------
// Cases.

enum class AlibiKind { kNone, kPerHead, kPerBatch };

// Storage of a [.., S, H, D] tensor relative to its logical view. Gaps hold NaN.
enum class Layout {
  kContiguous,
  kPaddedDim,       // 3 spare elements after every head-dim row
  kHeadSliced,      // heads [1, H + 1) of a tensor with H + 2 heads
  kHeadsMajor,      // storage [B, H, S, D] behind a [B, S, H, D] view (transposed strides)
  kSeqSliced,       // tokens [1, S + 1) of a tensor with S + 2 tokens (a view into a bigger cache)
  kBatchBroadcast,  // stride-0 batch: every batch entry reads batch 0 (inputs only)
};

const char* LayoutName(Layout l);

// One test problem. Its name identifies it and seeds its random inputs.
struct Spec {
  int64_t batch = 1;
  int64_t seq_q = 1;
  int64_t seq_k = 1;
  int64_t heads_q = 1;
  int64_t heads_kv = 1;
  int64_t dim = 64;
  DType dtype = DType::kF32;
  bool causal = false;
  int64_t window_left = -1;
  int64_t window_right = -1;
  MaskAlign align = MaskAlign::kBottomRight;
  float softcap = 0.0f;
  std::optional<float> scale;
  AlibiKind alibi = AlibiKind::kNone;
  // Varlen when non-empty (then batch, seq_q and seq_k are unused): per-sequence lengths.
  std::vector<int32_t> seqlens_q;
  std::vector<int32_t> seqlens_k;
  int64_t extra_q_tokens = 0;  // varlen: query tokens after the last sequence (left untouched)
  int64_t extra_k_tokens = 0;  // varlen: key tokens after the last sequence (never read or written)
  bool varlen_rank4 = false;   // [1, T, H, D] views instead of [T, H, D]
  bool with_lse = true;        // the forward writes lse (the backward always reads one)
  double q_mult = 1.0;         // q ~ N(0, 1) * q_mult
  // Storage of each tensor; the name tags every one that is not contiguous. The forward tests
  // lay out q and k/v independently, the backward tests q, k and v together (in_layout): a case
  // sets one or the other.
  Layout q_layout = Layout::kContiguous;     // q
  Layout kv_layout = Layout::kContiguous;    // k and v
  Layout in_layout = Layout::kContiguous;    // q, k and v
  Layout out_layout = Layout::kContiguous;   // out (the backward reads it); lse rows padded too
  Layout dout_layout = Layout::kContiguous;  // the upstream gradient
  Layout grad_layout = Layout::kContiguous;  // dq, dk, dv
  int64_t misalign = 0;  // element offset of every base pointer from 64-byte alignment
  Rule rule = Rule::kStandard;

  bool varlen() const { return !seqlens_q.empty(); }
  int64_t num_seqs() const { return varlen() ? static_cast<int64_t>(seqlens_q.size()) : batch; }
  // The storage of q and of k/v (q_layout / kv_layout, or in_layout for both).
  Layout QLayout() const { return in_layout != Layout::kContiguous ? in_layout : q_layout; }
  Layout KvLayout() const { return in_layout != Layout::kContiguous ? in_layout : kv_layout; }

  // A unique, gtest-safe name; also the seed of the case's random inputs.
  std::string Name() const;
};

void PrintTo(const Spec& s, std::ostream* os);

// The gtest name of a parameterized case: its Name().
std::string SpecName(const ::testing::TestParamInfo<Spec>& info);

// Removes specs with duplicate names (gtest rejects them), keeping the first.
std::vector<Spec> Unique(std::vector<Spec> specs);

// A dense problem: batch 1, no mask, no modifiers.
Spec Dense(int64_t sq, int64_t sk, int64_t hq, int64_t hkv, int64_t d, DType dt = DType::kF32);

// A varlen problem with these per-sequence lengths, no mask, no modifiers.
Spec Varlen(std::vector<int32_t> seqlens_q, std::vector<int32_t> seqlens_k, int64_t hq, int64_t hkv,
            int64_t d);

// The bf16/f16 and ratio-rule checks compare against the naive same-precision computation.
bool NeedsNaive(const Spec& s);

// ---------------------------------------------------------------------------------------------
// Sweeps run by both entry points (unfiltered: pass them through Unique).

// (Lq, Lk) pairs.
using Shapes = std::vector<std::pair<int64_t, int64_t>>;

// Masks: none, causal, windows (0,0), (1,0), (0,1), (7,7), (Lk,0), causal + left window,
// one-sided windows, plus `random_windows` fixed pseudo-random windows per shape; each in both
// alignments, on every shape (Hq:Hkv = 2:1, D = 64).
std::vector<Spec> MaskSweep(const Shapes& shapes, int random_windows);

// ALiBi slopes [Hq] and [B, Hq] (B = 2, Hq:Hkv = 4:2, D = 64) with no mask, causal and causal
// top-left, in f32 and bf16, on every shape; and ALiBi together with softcap and a window (the
// modifier order matters).
std::vector<Spec> AlibiSweep(const Shapes& shapes);

// Custom scales, including 0 (every visible key weighs the same) and a negative one, causal in
// f32 and bf16; and logits ~16x larger than usual (ill-conditioned in f32, ratio rule).
std::vector<Spec> ScaleSweep(int64_t sq, int64_t sk);

// Per-sequence lengths of a varlen case.
struct SeqLens {
  std::vector<int32_t> q, k;
};

// Each set of lengths with no mask, causal and causal top-left (Hq:Hkv = 4:2, D = 64), with 3
// query and 2 key tokens past the last sequence.
std::vector<Spec> VarlenSweep(const std::vector<SeqLens>& lens);

// Varlen with rank-4 views, ALiBi per sequence, a window and a generic head dim (Hq:Hkv = 4:1,
// D = 72), over sequences of 0 to 40 tokens.
Spec VarlenMix();

// Cases with query rows that see no key (bug class 1): PyTorch #127055's banded mask
// triu(-inf, 1) + tril(-inf, -10) on n x n (window (9, 0), top-left), the same with Lk = n / 2
// (rows past Lk + 9 see nothing), and bottom-right causal with Lq > Lk in f32, bf16 and f16.
std::vector<Spec> FullyMaskedSpecs(int64_t n);

// Varlen with 12 sequences, every 4th without keys (Hq:Hkv = 2:1, D = 64, causal).
Spec EveryFourthSequenceWithoutKeys();

// ---------------------------------------------------------------------------------------------
// Inputs and parameters.

// A tensor of logical shape [B, S, H, D] or [T, H, D] stored with `layout`.
Tensor MakeTensor(DType dtype, const std::vector<int64_t>& shape, Layout layout, int64_t offset);

// The shape of q/out (heads = Hq) or k/v (heads = Hkv) with `tokens` tokens.
std::vector<int64_t> TokenShape(const Spec& s, int64_t tokens, int64_t heads);

struct Inputs {
  Tensor q, k, v, slopes;
  Tensor dout;  // the upstream gradient (MakeBackwardInputs only)
  std::vector<int32_t> cu_q, cu_k;
  int64_t tokens_q = 0;  // Sq (dense) or total query tokens (varlen)
  int64_t tokens_k = 0;

  // Tokens that belong to some sequence: a prefix of the token axis (all of it when dense).
  int64_t covered_q() const { return cu_q.empty() ? tokens_q : cu_q.back(); }
  int64_t covered_k() const { return cu_k.empty() ? tokens_k : cu_k.back(); }
};

// Random inputs for a spec: q ~ N(0, 1) * q_mult, k, v ~ N(0, 1), rounded to the dtype. The
// values depend only on the spec's name, never on its layout fields' storage.
Inputs MakeInputs(const Spec& s);
// The same with an upstream gradient dout ~ N(0, 1), drawn after v.
Inputs MakeBackwardInputs(const Spec& s);

// `s` with every tensor in contiguous, aligned storage.
Spec ContiguousSpec(const Spec& s);
// The inputs of ContiguousSpec(s): `in` copied into contiguous, aligned storage (same values).
Inputs ContiguousInputs(const Spec& s, const Inputs& in);

// The same problem as MHA: *mha becomes `s` with Hkv = Hq, and the returned inputs hold the
// same q (and dout) with every KV head repeated Hq / Hkv times.
Inputs WithRepeatedKv(const Spec& s, const Inputs& in, Spec* mha);

// Copies tokens [t0, t0 + n) of a varlen tensor ([T, H, D] or [1, T, H, D]) into a dense
// [1, n, H, D] one.
Tensor SliceTokens(const Tensor& packed, int64_t t0, int64_t n);

// The first `covered` tokens of a row-major [.., T, H, D] vector (returned), the rest appended
// to `outside` when it is not null.
std::vector<double> Prefix(const std::vector<double>& x, int64_t covered, int64_t tokens,
                           std::vector<double>* outside);

// The forward's outputs (also what the backward reads).
struct Outputs {
  Tensor out;
  Tensor lse;  // only with Spec::with_lse
};

// Fresh NaN-prefilled, guarded outputs in the spec's out_layout.
Outputs MakeOutputs(const Spec& s, const Inputs& in);

// The forward parameters of a case; without `o`, no out and no lse.
AttentionParams MakeParams(const Spec& s, const Inputs& in, Outputs* o);

// Runs the forward on fresh outputs. Guards and gaps are checked here.
Status RunForward(const Spec& s, const Inputs& in, Path path, int32_t threads, Outputs* o);

// ---------------------------------------------------------------------------------------------
// Masks (dense specs), from the definition.

// Visible-key count of query row i.
int64_t VisibleKeys(const Spec& s, int64_t i);
// True when some query row sees key j.
bool KeySeen(const Spec& s, int64_t j);

// ---------------------------------------------------------------------------------------------
// Calls on every path.

// Row-major strides computed as if every zero extent were 1: an empty tensor whose strides are
// all non-zero (the natural row-major strides of an empty shape contain zeros).
std::vector<int64_t> StridesIgnoringEmptyDims(std::vector<int64_t> shape);

// Calls `run` on every path a head dim can be forced through and exits 0 when each call succeeds
// and leaves `outputs` bitwise untouched, 1 otherwise. For EXPECT_EXIT: a crash (SIGFPE from a
// division by an empty extent, bug class 7) fails the one test instead of the whole binary.
[[noreturn]] void RunOnEveryPathAndExit(const std::function<Status(const Context&)>& run,
                                        const std::vector<const Tensor*>& outputs, int64_t dim);

// True when `name` occurs in `message` as a whole identifier (not inside a longer one).
bool NamesArgument(const std::string& message, const std::string& name);

// Calls `run` on every path (kAllPaths); each call must give `code` with a message naming `arg`
// and leave `outputs` bitwise untouched.
void ExpectRejectedOnEveryPath(const std::function<Status(const Context&)>& run, StatusCode code,
                               const std::string& arg, const std::vector<const Tensor*>& outputs);

}  // namespace test
}  // namespace tessera
