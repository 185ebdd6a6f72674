#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""tessera against PyTorch's CPU scaled_dot_product_attention, on the same tensors.

Not part of the build or the tests (PyTorch is not a dependency): run it with an interpreter
that has torch and the tessera package, e.g.

  python3 bench/peers.py --threads 2              # every workload, table
  python3 bench/peers.py --threads 2 --only fwd_f32,dec_f16 --json

Layouts: tessera gets [B, S, H, D] contiguous tensors (its natural layout, as `tessera bench`);
PyTorch gets the [B, H, S, D] view of the same tensors (transpose(1, 2): what a model that keeps
[B, S, H, D] would pass) and, timed too, contiguous [B, H, S, D] copies (its own natural
layout). The ratio is torch / tessera against the faster of the two torch layouts. Decode: the
cache is tessera's KVCache (filled once, untimed); torch reads K/V [B, Hkv, S, D] contiguous
with enable_gqa=True.

Timing: `--rounds` interleaved rounds; in each, every implementation of a workload runs once
after a warm-up call before the first round. Medians over rounds. Same threads on both sides:
torch.set_num_threads(T) and tessera's threads=T. FLOPs: forward 4*B*H*Sq*Sk*D (causal: half),
forward+backward 3.5x the forward (the backward counts 2.5x); decode reports the KV bytes read
per call and GB/s.
"""
import argparse
import json
import statistics
import sys
import time

import torch
import tessera

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

# name, kind, dtype, N, causal, the issue's target (ratio = torch ms / tessera ms)
WORKLOADS = [
    ("fwd_f32", "fwd", "f32", 4096, False, "ratio >= 1.3"),
    ("fwd_f32_causal", "fwd", "f32", 4096, True, "ratio >= 1.3"),
    ("fwd_f32_16k", "fwd", "f32", 16384, False, "ratio >= 1.3"),
    ("fwdbwd_f32", "fwdbwd", "f32", 4096, False, "ratio >= 1.3"),
    ("fwdbwd_f32_causal", "fwdbwd", "f32", 4096, True, "ratio >= 1.3"),
    ("fwd_bf16", "fwd", "bf16", 4096, False, "ratio >= 2.5; >= 1.7x fp32 GFLOP/s"),
    ("fwdbwd_bf16", "fwdbwd", "bf16", 4096, False, "ratio >= 2.5; >= 1.7x fp32 GFLOP/s"),
    ("fwd_f16", "fwd", "f16", 4096, False, ">= fp32 GFLOP/s"),
    ("dec_f16", "decode", "f16", 32768, False, "0.8 of a stream read (tessera bench)"),
    ("dec_bf16", "decode", "bf16", 32768, False, "0.8 of a stream read (tessera bench)"),
]


def once_ms(fn):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def attention_case(kind, dtype, n, causal, a):
    """The timed callables {impl: fn} of a forward or forward+backward workload."""
    gen = torch.Generator().manual_seed(0)
    shape = (a.batch, n, a.heads, a.dim)  # [B, S, H, D]
    dt = DTYPES[dtype]
    q, k, v, dout = (torch.randn(shape, generator=gen).to(dt) for _ in range(4))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    contig = [x.transpose(1, 2).contiguous() for x in (q, k, v, dout)]
    threads = a.threads
    if kind == "fwd":
        def tessera_fn():
            tessera.attention(q, k, v, causal=causal, threads=threads)

        def torch_view():
            with torch.no_grad():
                sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)

        def torch_contig():
            with torch.no_grad():
                sdpa(contig[0], contig[1], contig[2], is_causal=causal)
        return {"tessera": tessera_fn, "torch_bhsd_view": torch_view, "torch_bhsd": torch_contig}

    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    leaves_c = [x.detach().clone().requires_grad_(True) for x in contig[:3]]

    def step(fn, xs, g):
        for x in xs:
            x.grad = None
        fn(*xs).backward(g)

    def tessera_fn():
        step(lambda q_, k_, v_: tessera.attention(q_, k_, v_, causal=causal, threads=threads),
             leaves, dout)

    def torch_view():
        step(lambda q_, k_, v_: sdpa(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                     is_causal=causal), leaves, dout.transpose(1, 2))

    def torch_contig():
        step(lambda q_, k_, v_: sdpa(q_, k_, v_, is_causal=causal), leaves_c, contig[3])
    return {"tessera": tessera_fn, "torch_bhsd_view": torch_view, "torch_bhsd": torch_contig}


def decode_case(dtype, n, a):
    gen = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]
    hq, hkv, d = a.decode_heads, a.decode_kv_heads, a.dim
    k = torch.randn(1, n, hkv, d, generator=gen).to(dt)
    v = torch.randn(1, n, hkv, d, generator=gen).to(dt)
    q = torch.randn(1, 1, hq, d, generator=gen).to(dt)
    cache = tessera.KVCache(batch=1, num_kv_heads=hkv, head_dim=d, max_tokens=n, dtype=dtype)
    cache.append(k, v, threads=a.threads)
    kt, vt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    qt = q.transpose(1, 2).contiguous()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    threads = a.threads

    def tessera_fn():
        tessera.decode(q, cache, threads=threads)

    def torch_fn():
        with torch.no_grad():
            sdpa(qt, kt, vt, enable_gqa=True)
    return {"tessera": tessera_fn, "torch_bhsd": torch_fn}


def run(a):
    torch.set_num_threads(a.threads)
    only = set(a.only.split(",")) if a.only else None
    results = []
    for name, kind, dtype, n, causal, target in WORKLOADS:
        if only is not None and name not in only:
            continue
        if a.seq_scale != 1:
            n = max(64, n // a.seq_scale)
        try:
            fns = decode_case(dtype, n, a) if kind == "decode" else \
                attention_case(kind, dtype, n, causal, a)
        except (RuntimeError, ValueError, TypeError) as e:  # an op torch cannot run, say
            results.append({"name": name, "error": str(e)})
            continue
        times = {impl: [] for impl in fns}
        errors = {}
        for impl, fn in list(fns.items()):  # warm-up
            try:
                fn()
            except (RuntimeError, ValueError, TypeError) as e:
                errors[impl] = str(e)
                del fns[impl]
                del times[impl]
        for _ in range(a.rounds):
            for impl, fn in fns.items():
                times[impl].append(once_ms(fn))
        r = {"name": name, "kind": kind, "dtype": dtype, "seq": n, "causal": causal,
             "batch": 1 if kind == "decode" else a.batch, "threads": a.threads,
             "target": target, "rounds": a.rounds}
        if kind == "decode":
            r.update(heads=a.decode_heads, kv_heads=a.decode_kv_heads, dim=a.dim)
            r["bytes"] = 2 * n * a.decode_kv_heads * a.dim * torch.finfo(DTYPES[dtype]).bits // 8
        else:
            r.update(heads=a.heads, dim=a.dim)
            flops = 4.0 * a.batch * a.heads * n * n * a.dim * (0.5 if causal else 1.0)
            r["flops"] = flops * (3.5 if kind == "fwdbwd" else 1.0)
        for impl, ts in times.items():
            ms = statistics.median(ts)
            r[impl + "_ms"] = ms
            if "flops" in r:
                r[impl + "_gflops"] = r["flops"] / (ms * 1e-3) * 1e-9
            else:
                r[impl + "_gbps"] = r["bytes"] / (ms * 1e-3) * 1e-9
        for impl, e in errors.items():
            r[impl + "_error"] = e
        torch_ms = [r[i + "_ms"] for i in ("torch_bhsd_view", "torch_bhsd") if i + "_ms" in r]
        if torch_ms and "tessera_ms" in r:
            r["ratio"] = min(torch_ms) / r["tessera_ms"]
        results.append(r)
    return results


def print_table(results, a):
    print(f"torch {torch.__version__}, tessera {tessera.__version__}, {a.threads} threads, "
          f"{a.rounds} interleaved rounds (medians); ratio = best torch ms / tessera ms")
    head = (f"{'workload':<19} {'seq':>6} {'tessera ms':>11} {'torch ms':>10} {'(view)':>9} "
            f"{'tessera':>9} {'torch':>9} {'ratio':>6}  target")
    print(head)
    print("-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['name']:<19} error: {r['error']}")
            continue
        unit = "gflops" if "flops" in r else "gbps"

        def cell(key, fmt, width):
            return format(r[key], fmt).rjust(width) if key in r else "-".rjust(width)
        best_torch = min((i for i in ("torch_bhsd_view", "torch_bhsd") if i + "_ms" in r),
                         key=lambda i: r[i + "_ms"], default=None)
        print(f"{r['name']:<19} {r['seq']:>6} {cell('tessera_ms', '.2f', 11)} "
              f"{cell('torch_bhsd_ms', '.2f', 10)} {cell('torch_bhsd_view_ms', '.2f', 9)} "
              f"{cell('tessera_' + unit, '.1f', 9)} "
              f"{cell(best_torch + '_' + unit, '.1f', 9) if best_torch else '-'.rjust(9)} "
              f"{cell('ratio', '.2f', 6)}  {r['target']}")
        for key, value in r.items():
            if key.endswith("_error"):
                print(f"  {key[:-6]}: {value}")
    print("units: GFLOP/s (attention), GB/s of KV read (decode)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--decode-heads", type=int, default=32)
    ap.add_argument("--decode-kv-heads", type=int, default=8)
    ap.add_argument("--only", default="", help="comma-separated workload names: " +
                    ", ".join(w[0] for w in WORKLOADS))
    ap.add_argument("--seq-scale", type=int, default=1,
                    help="divide every sequence length by this (a quick smoke run)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    a = ap.parse_args()
    if a.threads < 1 or a.rounds < 1 or a.seq_scale < 1:
        ap.error("--threads, --rounds and --seq-scale: expected >= 1")
    results = run(a)
    if a.json:
        json.dump({"torch": torch.__version__, "tessera": tessera.__version__,
                   "threads": a.threads, "rounds": a.rounds, "results": results}, sys.stdout)
        print()
    else:
        print_table(results, a)


if __name__ == "__main__":
    main()
