#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The per-CPU performance targets, measured with `tessera bench` on this machine in interleaved
rounds (every case once per round, medians over the rounds), as ratios that are comparable across
machines: fraction of the FMA peak measured in the same process, bf16 / f16 against fp32
throughput, decode against a plain read of the same bytes (frac_stream), the ragged batch
against one sequence of the same total length, the forced AVX2 target against the AVX2 peak.
The peers (PyTorch's SDPA) are in bench/peers.py.

  python3 bench/cpu_targets.py [--tessera build/tools/tessera] [--rounds 3] [--threads 2]
                               [--only NAME,...] [--json out.json]

Shape: B = 1, H = 8, D = 128, N = 4096 (decode: 32 query heads over 8 KV heads, 32K tokens).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

FWD = ["--seq", "4096"]
DECODE = ["--op", "decode", "--batch", "1", "--heads", "32", "--kv-heads", "8", "--seq-k", "32768"]
RAGGED_LENS = ",".join(["131072"] + ["1024"] * 31)

# name -> bench arguments
CASES = {
    "fwd_f32": FWD,
    "fwd_f32_causal": FWD + ["--causal"],
    "bwd_f32": FWD + ["--op", "backward"],
    "bwd_f32_causal": FWD + ["--op", "backward", "--causal"],
    "fwd_bf16": FWD + ["--dtype", "bf16"],
    "bwd_bf16": FWD + ["--op", "backward", "--dtype", "bf16"],
    "fwd_f16": FWD + ["--dtype", "f16"],
    "bwd_f16": FWD + ["--op", "backward", "--dtype", "f16"],
    "fwd_f32_avx2": FWD + ["--target", "avx2"],
    "decode_f16": DECODE + ["--kv-dtype", "f16", "--vs", "stream"],
    "decode_bf16": DECODE + ["--kv-dtype", "bf16", "--vs", "stream"],
    "decode_int8": DECODE + ["--kv-dtype", "int8", "--vs", "stream"],
    "decode_ragged": ["--op", "decode", "--batch", "32", "--heads", "32", "--kv-heads", "8",
                      "--lens", RAGGED_LENS, "--kv-dtype", "f16"],
    "decode_single": ["--op", "decode", "--batch", "1", "--heads", "32", "--kv-heads", "8",
                      "--seq-k", str(131072 + 31 * 1024), "--kv-dtype", "f16"],
}

# name -> (description, function of the per-case medians, minimum)
TARGETS = [
    ("fp32 forward, fraction of FMA peak", lambda m: m["fwd_f32"]["frac_peak"], 0.80),
    ("fp32 causal forward, fraction of FMA peak", lambda m: m["fwd_f32_causal"]["frac_peak"],
     0.80),
    ("fp32 backward, fraction of FMA peak", lambda m: m["bwd_f32"]["frac_peak"], 0.65),
    ("fp32 causal backward, fraction of FMA peak", lambda m: m["bwd_f32_causal"]["frac_peak"],
     0.65),
    ("bf16 forward / fp32 forward throughput",
     lambda m: m["fwd_f32"]["ms"] / m["fwd_bf16"]["ms"], 1.7),
    ("bf16 backward / fp32 backward throughput",
     lambda m: m["bwd_f32"]["ms"] / m["bwd_bf16"]["ms"], 1.7),
    ("f16 forward / fp32 forward throughput", lambda m: m["fwd_f32"]["ms"] / m["fwd_f16"]["ms"],
     1.0),
    ("f16 backward / fp32 backward throughput",
     lambda m: m["bwd_f32"]["ms"] / m["bwd_f16"]["ms"], 1.0),
    ("AVX2 forced forward, fraction of AVX2 FMA peak",
     lambda m: m["fwd_f32_avx2"]["frac_peak"], 0.70),
    ("decode f16 32K, frac_stream", lambda m: m["decode_f16"]["frac_stream"], 0.80),
    ("decode bf16 32K, frac_stream", lambda m: m["decode_bf16"]["frac_stream"], 0.80),
    ("decode int8 32K, frac_stream", lambda m: m["decode_int8"]["frac_stream"], 0.80),
    ("decode 1x128K + 31x1K / one sequence, bytes per second",
     lambda m: m["decode_ragged"]["gbps"] / m["decode_single"]["gbps"], 0.80),
]

KEYS = ("ms", "frac_peak", "frac_stream", "gbps", "gflops", "peak_gflops")


def run_case(binary, args, threads):
    cmd = [binary, "bench", *args, "--threads", str(threads), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tessera", default=os.path.join("build", "tools", "tessera"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="comma-separated case names (default: all)")
    ap.add_argument("--json", help="also write the medians and targets here")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(CASES)
    for n in names:
        if n not in CASES:
            sys.exit(f"cpu_targets: unknown case {n!r}; choices: {', '.join(CASES)}")
    runs = {n: [] for n in names}
    for r in range(a.rounds):
        for n in names:
            print(f"round {r + 1}/{a.rounds}: {n}", file=sys.stderr)
            runs[n].append(run_case(a.tessera, CASES[n], a.threads))
    medians = {n: {k: statistics.median(x[k] for x in rs) for k in KEYS if k in rs[0]}
               for n, rs in runs.items()}
    info = runs[names[0]][0]
    print(f"tessera bench, {a.threads} threads, {a.rounds} interleaved rounds, SIMD target "
          f"{info.get('simd_target')}\n")
    print(f"{'case':<16} {'ms':>9} {'GFLOP/s':>9} {'frac_peak':>9} {'frac_stream':>11} {'GB/s':>7}")
    for n, m in medians.items():
        cols = [f"{m[k]:>9.2f}" if k in m else f"{'':>9}" for k in ("ms", "gflops", "frac_peak")]
        fs = f"{m['frac_stream']:>11.2f}" if "frac_stream" in m else f"{'':>11}"
        gb = f"{m['gbps']:>7.1f}" if "gbps" in m else f"{'':>7}"
        print(f"{n:<16} {' '.join(cols)} {fs} {gb}")
    print()
    results = []
    for desc, fn, minimum in TARGETS:
        try:
            value = fn(medians)
        except KeyError:
            continue  # a case left out by --only
        met = value >= minimum
        results.append({"target": desc, "value": value, "minimum": minimum, "met": met})
        print(f"{'met ' if met else 'MISS'} {desc}: {value:.2f} (target >= {minimum})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "rounds": a.rounds, "medians": medians,
                       "targets": results, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
