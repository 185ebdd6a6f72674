#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The Python package's performance targets (issue: Python package), measured in one process
against PyTorch's own CPU scaled_dot_product_attention on the same tensors, in interleaved
rounds (medians), and against `tessera bench` (the C++ benchmark, same shape and threads):

  tiny      B=1, S=16, H=1, D=64 through tessera.compat.flash_attn.flash_attn_func vs torch's
            SDPA: target at most 2x torch's time per call.
  fwd       fp32, B=1, H=8, D=128, N=4096: tessera.attention on the [B, H, N, D] tensors
            SDPA takes (transposed views) vs SDPA (target: at least as fast), and on contiguous
            [B, N, H, D] tensors, the layout of `tessera bench`, vs `tessera bench` run in a
            subprocess right after (target: within 5%).
  fwd_bwd   the same shape, forward + backward through autograd vs SDPA's.
  bf16      the forward in bf16: speed vs SDPA's bf16, and max error vs fp64 at most 3x SDPA's.
  rss       N=16384 (fp32, causal) from torch, in a fresh process: the peak RSS the call adds
            is at most the output + 64 MiB.

  python3 bench/python_targets.py --threads 2 --tessera build/tools/tessera [--json out.json]

Needs torch and the tessera package (make python installs both into build/venv).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import tessera
from tessera.compat.flash_attn import flash_attn_func


def interleaved(fns, rounds, reps):
    """Median seconds per call of each fn, rounds alternating between them."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            times[name].append((time.perf_counter() - t) / reps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def tiny(rounds):
    q, k, v = (torch.randn(1, 16, 1, 64) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with torch.no_grad():
        t = interleaved({"tessera_flash_attn_func": lambda: flash_attn_func(q, k, v),
                         "torch_sdpa": lambda: F.scaled_dot_product_attention(qt, kt, vt)},
                        rounds, 2000)
    return {"us": {n: s * 1e6 for n, s in t.items()},
            "ratio": t["tessera_flash_attn_func"] / t["torch_sdpa"], "target": "<= 2"}


def shape_tensors(n, dtype, grad=False):
    g = torch.Generator().manual_seed(0)
    # [B, H, N, D] for torch, and its [B, N, H, D] transpose (a view) for tessera
    q, k, v = (torch.randn(1, 8, n, 128, generator=g).to(dtype).requires_grad_(grad)
               for _ in range(3))
    return q, k, v


def forward(rounds, threads, causal):
    q, k, v = shape_tensors(4096, torch.float32)
    qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))
    # The layout `tessera bench` uses: contiguous [B, N, H, D] (each head's rows strided by H * D)
    qc, kc, vc = (x.contiguous() for x in (qs, ks, vs))
    with torch.no_grad():
        t = interleaved({
            "tessera": lambda: tessera.attention(qs, ks, vs, causal=causal, align="top_left",
                                                 threads=threads),
            "tessera_bsdh": lambda: tessera.attention(qc, kc, vc, causal=causal,
                                                      align="top_left", threads=threads),
            "torch_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)},
            rounds, 1)
    return {"ms": {n: s * 1e3 for n, s in t.items()},
            "speedup_vs_torch": t["torch_sdpa"] / t["tessera"]}


def forward_backward(rounds, threads, causal):
    q, k, v = shape_tensors(4096, torch.float32, grad=True)
    dout = torch.randn(1, 8, 4096, 128)

    def ours():
        out = tessera.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                causal=causal, align="top_left", threads=threads)
        out.transpose(1, 2).backward(dout)

    def theirs():
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(dout)

    t = interleaved({"tessera": ours, "torch_sdpa": theirs}, rounds, 1)
    return {"ms": {n: s * 1e3 for n, s in t.items()},
            "speedup_vs_torch": t["torch_sdpa"] / t["tessera"]}


def bf16(rounds, threads, causal):
    q, k, v = shape_tensors(4096, torch.bfloat16)
    qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))
    with torch.no_grad():
        t = interleaved({
            "tessera": lambda: tessera.attention(qs, ks, vs, causal=causal, align="top_left",
                                                 threads=threads),
            "torch_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)},
            rounds, 1)
        # errors on the first 256 queries against fp64 over all keys (the full fp64 reference
        # is 4096 x 4096 per head; 256 rows keep it quick)
        rows = 256
        ref = F.scaled_dot_product_attention(q[:, :, :rows].double(), k.double(), v.double(),
                                             attn_mask=_top_left_causal(rows, 4096) if causal
                                             else None)
        ours = tessera.attention(qs, ks, vs, causal=causal, align="top_left",
                                 threads=threads)[:, :rows].transpose(1, 2)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal)[:, :, :rows]
        err_ours = (ours.double() - ref).abs().max().item()
        err_theirs = (theirs.double() - ref).abs().max().item()
    return {"ms": {n: s * 1e3 for n, s in t.items()},
            "speedup_vs_torch": t["torch_sdpa"] / t["tessera"],
            "max_err": {"tessera": err_ours, "torch_sdpa": err_theirs},
            "err_ratio": err_ours / err_theirs if err_theirs > 0 else float("inf")}


def _top_left_causal(rows, keys):
    return torch.ones(rows, keys, dtype=torch.bool).tril()


def tessera_bench(binary, threads, causal, dtype="f32", reps=5):
    if not binary:
        return None
    cmd = [binary, "bench", "--batch", "1", "--heads", "8", "--seq", "4096", "--dim", "128",
           "--threads", str(threads), "--dtype", dtype, "--reps", str(reps), "--json"]
    if causal:
        cmd.append("--causal")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["ms"]


RSS_CHILD = r"""
import sys, torch, tessera
n, threads = int(sys.argv[1]), int(sys.argv[2])
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
q, k, v = (torch.randn(1, n, 8, 128) for _ in range(3))
tessera.attention(q[:, :64], k[:, :64], v[:, :64], threads=threads)  # load, spawn threads
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
before = hwm()
out = tessera.attention(q, k, v, causal=True, threads=threads)
print(hwm() - before, out.numel() * out.element_size())
"""


def rss(threads):
    n = 16384
    r = subprocess.run([sys.executable, "-c", RSS_CHILD, str(n), str(threads)], check=True,
                       capture_output=True, text=True)
    added, out_bytes = map(int, r.stdout.split())
    return {"added_mib": added / 2**20, "output_mib": out_bytes / 2**20,
            "overhead_mib": (added - out_bytes) / 2**20, "target_overhead_mib": 64}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--causal", action="store_true", help="causal forward shapes")
    ap.add_argument("--tessera", default="", help="the tessera CLI, for `tessera bench`")
    ap.add_argument("--only", default="tiny,fwd,fwd_bwd,bf16,rss")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    only = set(a.only.split(","))
    result = {"threads": a.threads, "causal": a.causal, "torch": torch.__version__,
              "tessera": tessera.__version__, "simd_target": tessera.info()["simd_target"]}
    if "tiny" in only:
        result["tiny"] = tiny(a.rounds)
        print("tiny", json.dumps(result["tiny"]), flush=True)
    if "fwd" in only:
        result["fwd"] = forward(a.rounds, a.threads, a.causal)
        cli = tessera_bench(a.tessera, a.threads, a.causal)
        if cli is not None:
            result["fwd"]["ms"]["tessera_bench_cli"] = cli
            result["fwd"]["python_over_cli"] = result["fwd"]["ms"]["tessera_bsdh"] / cli
        print("fwd", json.dumps(result["fwd"]), flush=True)
    if "fwd_bwd" in only:
        result["fwd_bwd"] = forward_backward(a.rounds, a.threads, a.causal)
        print("fwd_bwd", json.dumps(result["fwd_bwd"]), flush=True)
    if "bf16" in only:
        result["bf16"] = bf16(a.rounds, a.threads, a.causal)
        print("bf16", json.dumps(result["bf16"]), flush=True)
    if "rss" in only:
        result["rss"] = rss(a.threads)
        print("rss", json.dumps(result["rss"]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
