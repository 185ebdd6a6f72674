#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""PyTorch's CPU scaled_dot_product_attention on the decode case of docs/decode.md.

Not part of the build or the tests (PyTorch is not a dependency): run it where torch is
installed, next to `tessera bench --op decode` on the same shape, e.g.

  python3 bench/torch_sdpa_decode.py --threads 2 --seq-k 32768
  tessera bench --op decode --batch 1 --heads 32 --kv-heads 8 --seq-k 32768 --dim 128 \
      --threads 2 --kv-dtype f16 --dtype f16

One query token per sequence, Hq query heads over Hkv KV heads, K/V [B, Hkv, S, D] (head-major,
as tessera's cache). Three ways to call SDPA:
  gqa            enable_gqa=True (the documented GQA call);
  expanded_kv    K/V repeated to Hq heads beforehand (the repeat is not timed);
  grouped_rows   the G query heads of a KV head as G query rows of one head (exact for decode
                 without a mask: every row sees every key).
Prints the median and min of --reps timed calls per dtype and form.
"""
import argparse
import statistics
import time

import torch


def timed(fn, reps):
    with torch.no_grad():
        for _ in range(2):
            fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--seq-k", type=int, default=32768)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--dtypes", default="f32,bf16,f16")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    group = a.heads // a.kv_heads
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={a.batch} "
          f"Hq={a.heads} Hkv={a.kv_heads} S={a.seq_k} D={a.dim}")
    for name in a.dtypes.split(","):
        dt = dtypes[name]
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(a.batch, a.heads, 1, a.dim, generator=gen).to(dt)
        k = torch.randn(a.batch, a.kv_heads, a.seq_k, a.dim, generator=gen).to(dt)
        v = torch.randn(a.batch, a.kv_heads, a.seq_k, a.dim, generator=gen).to(dt)
        k_rep = k.repeat_interleave(group, dim=1).contiguous()
        v_rep = v.repeat_interleave(group, dim=1).contiguous()
        q_rows = q.view(a.batch, a.kv_heads, group, a.dim)
        forms = {
            "gqa": lambda: sdpa(q, k, v, enable_gqa=True),
            "expanded_kv": lambda: sdpa(q, k_rep, v_rep),
            "grouped_rows": lambda: sdpa(q_rows, k, v),
        }
        line = [f"{name:5s}"]
        for form, fn in forms.items():
            med, low = timed(fn, a.reps)
            line.append(f"{form} {med:.2f} ms (min {low:.2f})")
        print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
