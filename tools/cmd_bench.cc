// SPDX-License-Identifier: Apache-2.0
// `tessera bench`: times a tessera op on random inputs next to the machine's measured FMA peak
// (or, for decode, its read bandwidth) and, on request, a baseline measured in the same process.
// This file holds the options and the table of ops (kOps); the timing harness is
// bench_harness.h, and each op has a file of its own: bench_attention.cc (forward, backward),
// bench_decode.cc and bench_linear.cc; --dist (sequence-parallel attention under mpirun) is
// bench_dist.cc.
#include <CLI/CLI.hpp>
#include <memory>
#include <string>
#include <vector>

#include "bench_harness.h"
#include "cli_common.h"
#include "cmd_dist.h"
#include "mask_spec.h"

namespace tessera {
namespace cli {
namespace {

using bench::BenchOptions;

// The ops `bench` knows; an entry without a function is announced but not implemented yet.
struct BenchOp {
  const char* name;
  int (*main)(const BenchOptions&);
};
const BenchOp kOps[] = {
    {"forward", bench::BenchForward},   {"backward", bench::BenchBackward},
    {"decode", bench::BenchDecode},     {"linear", bench::BenchLinear},
    {"evict", bench::BenchEvict},       {"approx", bench::BenchApprox},
    {"longconv", bench::BenchLongConv}, {"h3", bench::BenchH3},
    {"ssm", bench::BenchSsm},
};

// --op evict takes its own options, --kv-dtype and --page-size of decode's and --window.
std::string EvictOptionError(const BenchOptions& o) {
  if (o.op != "evict") {
    return o.given_evict_only.empty() ? "" : o.given_evict_only[0] + ": only with --op evict";
  }
  for (const std::string& name : o.given_decode_only) {
    if (name != "--kv-dtype" && name != "--page-size") return name + ": not with --op evict";
  }
  for (const std::string& name : o.given_linear_only) {
    if (name != "--window") return name + ": only with --op linear";
  }
  return "";
}

// --op approx takes its own knobs and --window (routing's tokens per cluster, HiLo's s); the
// options of the other ops would be ignored, so they are refused.
std::string ApproxOptionError(const BenchOptions& o) {
  if (o.op != "approx") {
    return o.given_approx_only.empty() ? "" : o.given_approx_only[0] + ": only with --op approx";
  }
  if (!o.given_other_only.empty()) return o.given_other_only[0] + ": not with --op approx";
  for (const std::string& name : o.given_linear_only) {
    if (name != "--window") return name + ": only with --op linear";
  }
  return "";
}

// --op longconv takes its own options (and --batch, --seq, --vs direct, --backward, the timing
// ones); --op h3 its own, --filter-len and --conv-path of longconv's (and --heads, --dim too).
// The attention ops' options would be ignored, so they are refused.
// --op ssm its own (--modes), --channels and --conv-block of longconv's.
std::string LongConvOptionError(const BenchOptions& o) {
  const bool longconv = o.op == "longconv", h3 = o.op == "h3", ssm = o.op == "ssm";
  if (!h3 && !o.given_h3_only.empty()) return o.given_h3_only[0] + ": only with --op h3";
  if (!ssm && !o.given_ssm_only.empty()) return o.given_ssm_only[0] + ": only with --op ssm";
  for (const std::string& name : o.given_longconv_only) {
    const bool shared = name == "--filter-len" || name == "--conv-path";
    const bool ssm_too = name == "--channels" || name == "--conv-block";
    if (!longconv && !h3 && !ssm) {
      return name + (shared ? ": only with --op longconv or --op h3" : ": only with --op longconv");
    }
    if (h3 && !shared) return name + ": not with --op h3";
    if (ssm && !ssm_too) return name + ": not with --op ssm";
  }
  if (!longconv && !h3 && !ssm) return "";
  for (const auto* given : {&o.given_other_only, &o.given_linear_only, &o.given_decode_only,
                            &o.given_evict_only, &o.given_approx_only}) {
    if (!given->empty()) return (*given)[0] + ": not with --op " + o.op;
  }
  return "";
}

int BenchMain(const BenchOptions& o) {
  if (o.io && o.op != "forward" && o.op != "backward") {
    return Fail("bench", "--io: only with --op forward or --op backward, not with --op " + o.op);
  }
  if (const std::string error = LongConvOptionError(o); !error.empty()) return Fail("bench", error);
  if (const std::string error = EvictOptionError(o); !error.empty()) return Fail("bench", error);
  if (const std::string error = ApproxOptionError(o); !error.empty()) return Fail("bench", error);
  // Options of one side given to the other would be silently ignored: refuse them by name.
  if (o.op == "linear" && !o.given_other_only.empty()) {
    return Fail("bench", o.given_other_only[0] + ": not with --op linear");
  }
  if (o.op != "linear" && o.op != "evict" && o.op != "approx" && !o.given_linear_only.empty()) {
    return Fail("bench", o.given_linear_only[0] + ": only with --op linear");
  }
  if (o.op != "decode" && o.op != "linear" && o.op != "evict" && !o.given_decode_only.empty()) {
    return Fail("bench", o.given_decode_only[0] + ": only with --op decode");
  }
  std::string supported;
  for (const BenchOp& op : kOps) {
    if (op.main == nullptr) continue;
    supported += supported.empty() ? op.name : std::string(", ") + op.name;
  }
  for (const BenchOp& op : kOps) {
    if (o.op != op.name) continue;
    if (op.main == nullptr) {
      return Fail("bench", "unsupported op '" + o.op +
                               "': not implemented yet in this build (supported: " + supported +
                               ")");
    }
    std::string error;
    if (!ApplySimdTarget(o.target, &error)) return Fail("bench", error);
    return op.main(o);
  }
  return Fail("bench", "unknown op '" + o.op + "' (supported: " + supported + ")");
}

}  // namespace

CommandMain AddBenchCommand(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* sub = app.add_subcommand(
      "bench", "Benchmark an op on random inputs against the measured peak and a baseline");
  // Options of the other ops (refused with --op linear), of linear only and of decode only
  // (refused without).
  std::vector<CLI::Option*> other_only, linear_only, decode_only, evict_only, approx_only,
      longconv_only;
  sub->add_option(
         "--op", o->op,
         "operation: forward, backward, decode, linear, evict, approx, longconv, h3 or ssm")
      ->capture_default_str();
  sub->add_option("--batch", o->batch, "batch size B")->capture_default_str();
  sub->add_option("--heads", o->heads, "query heads Hq")->capture_default_str();
  sub->add_option("--kv-heads", o->kv_heads, "key/value heads Hkv (default: Hq)");
  sub->add_option("--seq", o->seq, "query length Sq (linear: the sequence length N)")
      ->capture_default_str();
  other_only.push_back(sub->add_option("--seq-k", o->seq_k,
                                       "key length Sk (default: Sq); decode: the cache length"));
  sub->add_option("--dim", o->dim,
                  "head dim D (linear: of q/k and v, and the --vs exact baseline's)")
      ->capture_default_str();
  sub->add_flag("--causal", o->causal, "causal mask (linear: the default)");
  sub->add_option("--dtype", o->dtype, "input dtype: f32, bf16 or f16 (decode: of q and out)")
      ->capture_default_str();
  // A decode option also counts as not-linear.
  auto decode_option = [&](CLI::Option* opt) {
    other_only.push_back(opt);
    decode_only.push_back(opt);
  };
  decode_option(
      sub->add_option("--queries", o->queries, "decode: query rows per sequence Q (1..16)")
          ->capture_default_str());
  decode_option(sub->add_option("--kv-dtype", o->kv_dtype,
                                "decode: KV cache dtype: f32, bf16, f16, int8, int4")
                    ->capture_default_str());
  decode_option(sub->add_option("--page-size", o->page_size,
                                "decode: tokens per page of a paged cache with shuffled pages (0 = "
                                "contiguous)")
                    ->capture_default_str());
  decode_option(
      sub->add_option("--split-tokens", o->split_tokens,
                      "decode: keys per split (0 = the default for the cache's page size)")
          ->capture_default_str());
  decode_option(sub->add_option(
      "--lens", o->lens,
      "decode: per-sequence cache lengths 'L1,L2,...', one per --batch (default: all --seq-k)"));
  decode_option(
      sub->add_option("--kv-file", o->kv_file,
                      "decode: stream the cache from this KV file (built from random data "
                      "first when it does not exist; one sequence)"));
  decode_option(sub->add_flag(
      "--cold", o->cold, "decode --kv-file: drop the file from the page cache before each run"));
  decode_option(
      sub->add_option("--kv-reader", o->kv_reader, "decode --kv-file: auto, io_uring or threads")
          ->capture_default_str());
  decode_option(sub->add_option("--kv-chunk-tokens", o->kv_chunk_tokens,
                                "decode --kv-file: tokens per streamed chunk (0 = about 4 MiB)")
                    ->capture_default_str());
  decode_option(sub->add_option("--kv-buffers", o->kv_buffers,
                                "decode --kv-file: chunk buffers in the ring, 2..8 (0 = 3)")
                    ->capture_default_str());
  decode_option(
      sub->add_option("--kv-decode-threads", o->kv_decode_threads,
                      "decode --kv-file: threads of each chunk's decode, at most --threads "
                      "(0 = 1)")
          ->capture_default_str());
  decode_option(sub->add_option("--kv-select-top-k", o->kv_select_top_k,
                                "decode --kv-file: read only the top-k chunks SelectBlocks picks "
                                "from the file's key means (0 = every chunk)")
                    ->capture_default_str());
  sub->add_option("--threads", o->threads, "threads (0 = all)");
  sub->add_option("--vs", o->vs,
                  "also time a baseline in the same process: naive (OpenBLAS, unmasked) or dense "
                  "(tessera without the mask, same causal flag and number of runs); linear: "
                  "exact (tessera's exact attention, same shape at head dim --dim, f32); decode: "
                  "naive, or stream (a plain read of the bytes decode reads, timed in pairs "
                  "with it: frac_stream = read ms / decode ms)");
  CLI::Option* mask_option =
      sub->add_option("--mask", o->mask,
                      "forward/backward: a programmable mask (grammar below); GFLOP/s then counts "
                      "only the visible (query, key) pairs");
  other_only.push_back(mask_option);
  other_only.push_back(sub->add_flag(
      "--io", o->io,
      "forward / backward: also report the DRAM <-> L2 bytes of the kernels' tiling (a model), "
      "FlashAttention's lower bound for this L2, and the measured last-level-cache misses where "
      "the CPU counts them"));
  other_only.push_back(sub->add_option(
      "--stats-window", o->stats_window,
      "forward: also compute the attention statistics of the last W query rows (key mass, its "
      "square, row entropy; summed over the GQA group when Hkv < Hq) and time the plain forward "
      "in alternating runs: stats_overhead = ms / plain_ms - 1"));
  decode_option(sub->add_option(
      "--decode-stats", o->decode_stats,
      "decode: also write DecodeStats: probs, accumulated or both, and time plain decode in "
      "alternating runs: stats_overhead = ms / plain_ms - 1"));
  other_only.push_back(sub->add_flag("--baseline-only", o->baseline_only,
                                     "time only the naive baseline (its memory measured alone)"));
  sub->add_flag("--json", o->json, "print one JSON object on stdout");
  sub->add_option("--warmup", o->warmup, "untimed warm-up runs")->capture_default_str();
  sub->add_option("--reps", o->reps,
                  "timed runs (default: ~1.5 s worth, at least 3; decode: ~1 s, at least 5)");
  sub->add_option("--seed", o->seed, "random seed")->capture_default_str();
  sub->add_option("--path", o->path, "force a kernel path: auto|reference|generic|fast")
      ->group("");  // hidden: for kernel developers
  sub->add_option("--target", o->target,
                  SimdTargetHelp() + "; the peak is measured on it too (simd_target in --json)")
      ->capture_default_str();

  const std::string group = "Linear attention (--op linear)";
  const auto linear_option = [&](CLI::Option* opt) {
    opt->group(group);
    linear_only.push_back(opt);
    return opt;
  };
  auto normalize_value = std::make_shared<bool>(false);
  linear_option(sub->add_option("--variant", o->variant,
                                "plain, decay (RetNet rates), gla (random gates) or based (Taylor "
                                "map, normalized)")
                    ->capture_default_str());
  linear_option(sub->add_option("--feature-map", o->feature_map,
                                "phi: identity (default), elu1, relu or taylor2 (based)"));
  linear_option(sub->add_option("--dim-v", o->dim_v, "value head dim Dv (default: --dim)"));
  linear_option(sub->add_option("--feature-dim", o->feature_dim,
                                "based: the q/k head dim (default 16; F = 1 + Dk + Dk^2)"));
  CLI::Option* normalize_option =
      linear_option(sub->add_flag("--normalize,!--no-normalize", *normalize_value,
                                  "divide by phi(q).sum(phi(k)) (based: on by default)"));
  linear_option(sub->add_option("--window", o->window,
                                "W: add the exact softmax window over the last W keys (based: "
                                "default 64, else 0 = off)"));
  linear_option(sub->add_option("--chunk", o->chunk, "tokens per chunk: 16..256, a multiple of 16")
                    ->capture_default_str());
  linear_option(sub->add_option("--form", o->form, "chunked or recurrent (token by token)")
                    ->capture_default_str());
  linear_option(sub->add_flag("--non-causal", o->non_causal,
                              "every query sees every key (plain / based); the baseline too"));
  linear_option(sub->add_flag("--lrpe", o->lrpe,
                              "LRPE with angles theta_f = 10000^(-f/Dk) shared by the heads: F "
                              "doubles (plain / decay; identity, elu1 or relu map)"));
  const std::string evict_group =
      "KV cache eviction (--op evict; also --kv-dtype, --page-size, --window)";
  const auto evict_option = [&](CLI::Option* opt) {
    opt->group(evict_group);
    evict_only.push_back(opt);
    return opt;
  };
  evict_option(
      sub->add_option("--policy", o->policy, "cake, h2o, tova, snapkv, pyramidkv or streaming"));
  evict_option(sub->add_option("--budget", o->budget,
                               "fraction of the cache tokens kept per layer (CAKE, PyramidKV: "
                               "on average over the layers)")
                   ->capture_default_str());
  evict_option(sub->add_option("--layers", o->layers,
                               "layers (default: 4 synthetic, or every layer of --data)"));
  evict_option(sub->add_option("--held-out", o->held_out,
                               "later queries whose outputs over the compacted cache are "
                               "compared with the full cache's (out_error)")
                   ->capture_default_str());
  evict_option(sub->add_option("--data", o->data,
                               "synthetic (--seq cache tokens), or an .npz with q [L, S, Hq, D], "
                               "k, v [L, S, Hkv, D] (bench/record_minilm.py)")
                   ->capture_default_str());
  evict_option(sub->add_option("--sinks", o->sinks, "streaming: attention-sink tokens kept")
                   ->capture_default_str());
  evict_option(sub->add_option("--gamma", o->gamma, "cake: weight of the attention variance")
                   ->capture_default_str());
  evict_option(sub->add_option("--tau1", o->tau1, "cake: temperature of the dispersion")
                   ->capture_default_str());
  evict_option(
      sub->add_option("--tau2", o->tau2, "cake: temperature of the shift")->capture_default_str());
  const std::string approx_group = "Approximate attention (--op approx; also --window, --causal)";
  AddApproxKnobs(sub, &o->approx, approx_group);
  approx_only = o->approx.options;
  approx_only.push_back(sub->add_option("--inputs", o->inputs,
                                        "approx: random, or peaked (keys clustered around 8 "
                                        "directions, queries near one of them)")
                            ->capture_default_str()
                            ->group(approx_group));
  approx_only.push_back(sub->add_option("--qk-scale", o->qk_scale,
                                        "approx: multiply q and k by this (the logits scale by "
                                        "its square)")
                            ->capture_default_str()
                            ->group(approx_group));
  const std::string lc_group = "Long convolution (--op longconv; also --batch, --seq, --vs direct)";
  for (CLI::Option* opt :
       {sub->add_option("--channels", o->channels, "longconv: channels C")->capture_default_str(),
        sub->add_option("--filter-len", o->filter_len, "longconv: filter length L (0: --seq)")
            ->capture_default_str(),
        sub->add_option("--conv-path", o->lc_path, "longconv: auto, direct, fft or stream")
            ->capture_default_str(),
        sub->add_option("--conv-block", o->block,
                        "longconv: tokens per block of --conv-path stream")
            ->capture_default_str()}) {
    longconv_only.push_back(opt->group(lc_group));
  }
  const std::string h3_group =
      "H3 layer (--op h3; also --batch, --seq, --heads, --dim, --filter-len, --conv-path auto, "
      "direct or fft, --backward, --vs direct)";
  std::vector<CLI::Option*> h3_only = {
      sub->add_option("--shift-len", o->shift_len, "h3: shift filter length Ls (<= --seq)")
          ->capture_default_str()
          ->group(h3_group)};
  std::vector<CLI::Option*> ssm_only = {
      sub->add_option("--modes", o->modes, "ssm: complex modes n per channel")
          ->capture_default_str()
          ->group("Diagonal SSM (--op ssm; also --batch, --seq, --channels, --conv-block: tokens "
                  "per streamed call, --vs fft)")};
  const std::string dist_group = "Sequence parallel (--dist; under mpirun -np P)";
  auto dist = std::make_shared<DistBenchOptions>();
  CLI::Option* dist_option =
      sub->add_option("--dist", dist->dist,
                      "ring or ulysses: time sequence-parallel exact attention across the ranks "
                      "of the MPI job on random shards (keys below); lasp2 (with --op linear): "
                      "causal linear attention")
          ->group(dist_group);
  CLI::Option* layout_option =
      sub->add_option("--layout", dist->layout, "with --dist: contiguous or zigzag (ring, ulysses)")
          ->capture_default_str()
          ->group(dist_group);
  CLI::Option* backward_option =
      sub->add_flag("--backward", dist->backward,
                    "with --dist, --op longconv or --op h3: time the backward")
          ->group(dist_group);
  sub->footer(
      std::string(R"(FLOPs: forward 4*B*Hq*Sq*Sk*D (causal with Sq == Sk: half of it); with --mask,
4*D*P where P = density*B*Hq*Sq*Sk is the number of visible (query, key) pairs (density in
--json; counted from the mask's structure, or on a sample of rows for large element-wise
masks: density_exact false); backward 2.5x the forward. GFLOP/s = FLOPs / median time; for
select: masks the median includes SelectBlocks (select_ms alone). Linear: 4*B*Hq*N*F*Dv (+4*F
per token and head with --normalize, + 2*(Dk+Dv) per pair of the exact window; F = 2*Dk with
--lrpe), and tokens_per_s = B*N / median time.

)") + DistBenchHelp() +
      MaskSpecHelp());
  return [o, sub, dist, dist_option, layout_option, backward_option, mask_option, normalize_option,
          normalize_value, other_only, linear_only, decode_only, evict_only, approx_only,
          longconv_only, h3_only, ssm_only] {
    o->normalize = normalize_option->count() > 0 ? (*normalize_value ? 1 : 0) : -1;
    if (dist_option->count() > 0) {
      // Only the options the drivers take; the others would be ignored, so they are refused.
      if (std::string error = DistBenchOptionError(*sub, *o, *dist); !error.empty()) {
        return Fail("bench", error);
      }
      std::string error;
      if (!ApplySimdTarget(o->target, &error)) return Fail("bench", error);
      return BenchDist(*o, *dist);
    }
    if (layout_option->count() > 0) return Fail("bench", "--layout: only with --dist");
    // Without --dist, --backward is the long convolutions' (the attention backward is --op
    // backward).
    o->backward = backward_option->count() > 0;
    if (o->backward && o->op != "longconv" && o->op != "h3") {
      return Fail("bench",
                  "--backward: only with --dist, --op longconv or --op h3 (the attention "
                  "backward is --op backward)");
    }
    o->has_mask = mask_option->count() > 0;
    for (const CLI::Option* opt : other_only) {
      if (opt->count() > 0) o->given_other_only.push_back(opt->get_name());
    }
    for (const CLI::Option* opt : linear_only) {
      if (opt->count() > 0) o->given_linear_only.push_back(opt->get_name());
    }
    for (const CLI::Option* opt : decode_only) {
      if (opt->count() > 0) o->given_decode_only.push_back(opt->get_name());
    }
    for (const CLI::Option* opt : evict_only) {
      if (opt->count() > 0) o->given_evict_only.push_back(opt->get_name());
    }
    for (const CLI::Option* opt : approx_only) {
      if (opt->count() > 0) o->given_approx_only.push_back(opt->get_name());
    }
    for (const CLI::Option* opt : longconv_only) {
      if (opt->count() > 0) o->given_longconv_only.push_back(opt->get_name());
    }
    for (const CLI::Option* opt : ssm_only) {
      if (opt->count() > 0) o->given_ssm_only.push_back(opt->get_name());
    }
    for (const CLI::Option* opt : h3_only) {
      if (opt->count() > 0) o->given_h3_only.push_back(opt->get_name());
    }
    return BenchMain(*o);
  };
}

}  // namespace cli
}  // namespace tessera
