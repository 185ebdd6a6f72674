#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Regenerate the quality tables of docs/kv_eviction.md with `tessera bench --op evict`.

Every policy at every budget on (a) the synthetic caches (planted heavy hitters, recency,
per-layer temperature, a needle only the held-out queries look for) and (b) Q/K/V recorded from
all-MiniLM-L6-v2 (bench/record_minilm.py; skipped without --npz). Prints Markdown: out_error
(relative error of the held-out queries' attention outputs against the full cache, mean over the
layers) per policy and budget, then per layer at --layer-budget.

  python3 bench/kv_eviction_quality.py build/tools/tessera --npz /tmp/minilm_qkv.npz
"""
import argparse
import json
import subprocess
import sys

# (row label, --policy, extra options): every policy with its defaults, and CAKE once more with
# temperatures that flatten its layer allocation (tau2 = 8 damps the shift, which otherwise
# decides the allocation alone).
POLICIES = [("streaming", "streaming", []), ("h2o", "h2o", []), ("tova", "tova", []),
            ("snapkv", "snapkv", []), ("pyramidkv", "pyramidkv", []), ("cake", "cake", []),
            ("cake tau1=0.25 tau2=8", "cake", ["--tau1", "0.25", "--tau2", "8"])]
LABELS = [p[0] for p in POLICIES]
BUDGETS = [0.05, 0.10, 0.20, 0.30, 0.50]
SYNTHETIC = ["--data", "synthetic", "--seq", "1024", "--layers", "8", "--heads", "8",
             "--kv-heads", "2", "--dim", "64", "--held-out", "32", "--causal"]


def run(binary, policy, budget, data_args, extra):
    cmd = [binary, "bench", "--op", "evict", "--policy", policy, "--budget", str(budget),
           "--window", "32", "--kv-dtype", "f32", "--threads", "1", "--json"] + data_args + extra
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out)


def tables(title, results, layer_budget):
    lines = ["### %s" % title, "",
             "out_error (mean over layers; lower is better), by budget:", "",
             "| policy | " + " | ".join("%d%%" % round(100 * b) for b in BUDGETS) + " |",
             "|---|" + "---:|" * len(BUDGETS)]
    for policy in LABELS:
        row = [results[(policy, b)]["out_error"] for b in BUDGETS]
        best = [min(results[(p, b)]["out_error"] for p in LABELS) for b in BUDGETS]
        cells = [("**%.3f**" if x == m else "%.3f") % x for x, m in zip(row, best)]
        lines.append("| %s | %s |" % (policy, " | ".join(cells)))
    r0 = results[(LABELS[0], layer_budget)]
    L = r0["layers"]
    lines += ["", "Per layer at %d%% (out_error; budget in tokens per head):" %
              round(100 * layer_budget), "",
              "| policy | " + " | ".join("layer %d" % l for l in range(L)) + " |",
              "|---|" + "---:|" * L]
    for policy in LABELS:
        r = results[(policy, layer_budget)]
        cells = ["%.3f (%d)" % (x["out_error"], x["budget"]) for x in r["per_layer"]]
        lines.append("| %s | %s |" % (policy, " | ".join(cells)))
    src = sorted({r["stats_source"] for r in results.values()})
    lines += ["", "(%d cache tokens, %d held-out queries, Hq %d, Hkv %d, D %d, window %d; "
              "statistics from: %s; policy + compaction at 20%%: %s ms)" % (
                  r0["seq"], r0["held_out"], r0["heads"], r0["kv_heads"], r0["dim"],
                  r0["window"], ", ".join(src),
                  ", ".join("%s %.2f" % (p, results[(p, 0.2)]["ms"]) for p in LABELS)), ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary", help="the tessera binary")
    parser.add_argument("--npz", help="recorded MiniLM Q/K/V (bench/record_minilm.py)")
    parser.add_argument("--held-out", type=int, default=16, help="MiniLM held-out queries")
    parser.add_argument("--layer-budget", type=float, default=0.2)
    parser.add_argument("--extra", default="", help="more bench options, e.g. '--tau2 4'")
    args = parser.parse_args()
    extra = args.extra.split()
    datasets = [("(a) synthetic", SYNTHETIC)]
    if args.npz:
        datasets.append(("(b) all-MiniLM-L6-v2", ["--data", args.npz, "--held-out",
                                                   str(args.held_out)]))
    for title, data_args in datasets:
        results = {}
        for label, policy, options in POLICIES:
            for budget in BUDGETS:
                results[(label, budget)] = run(args.binary, policy, budget, data_args,
                                               options + extra)
                print("%s %s %.2f: %.4f" % (title, label, budget,
                                            results[(label, budget)]["out_error"]),
                      file=sys.stderr)
        print(tables(title, results, args.layer_budget))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
