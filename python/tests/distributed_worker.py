# SPDX-License-Identifier: Apache-2.0
"""The ranks of test_distributed.py: every rank cuts the same random full-sequence inputs into
its shard, runs tessera.distributed.ring_attention (and its backward) and compares its shard of
the result with the single-process tessera.attention (and its gradients) on the whole sequence.

    torch_worker(rank, size, port)   torch.distributed (gloo), started by torch.multiprocessing
    python distributed_worker.py     mpi4py, started by mpirun; exits 1 on a mismatch

A failed check raises AssertionError on its rank (the launcher sees it); the error cases check
that every rank raises ValueError (none hangs) and that the group still works afterwards.
"""
import importlib.util
import os
import sys

import numpy as np

import tessera
from tessera import distributed as td

# B, N, Hq, Hkv, D: GQA, and N = 37 divides by none of P = 2, 3 (nor 2P).
B, N, HQ, HKV, D = 2, 37, 4, 2, 16


def inputs(seed, kind, dtype="f32", n=N):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(shape).astype(np.float32)
              for shape in ((B, n, HQ, D), (B, n, HKV, D), (B, n, HKV, D), (B, n, HQ, D))]
    if kind == "torch":
        import torch
        dt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
        return [torch.from_numpy(a).to(dt) for a in arrays]
    return [a.astype({"f32": np.float32, "f16": np.float16}[dtype]) for a in arrays]


def as64(x):
    if isinstance(x, np.ndarray):
        return x.astype(np.float64)
    import torch
    return x.detach().to(torch.float64).numpy()


def check(name, got, want, rtol=1e-5, atol_factor=1e-5):
    """|got - want| <= atol + rtol |want|, atol = atol_factor x the scale of `want` (its largest
    magnitude over the whole sequence, passed in as want's full array)."""
    got, want = as64(got), as64(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    atol = atol_factor * max(1.0, float(np.max(np.abs(want)))) if want.size else 0.0
    err = np.abs(got - want) - (atol + rtol * np.abs(want))
    assert not np.any(err > 0), (f"{name}: max |diff| {np.max(np.abs(got - want)):.3g} over "
                                 f"the tolerance (atol {atol:.3g}, rtol {rtol})")


def contiguous_with_empty(size, n=N):
    """Contiguous lengths with an empty shard (rank 1, or rank 0 for P = 2)."""
    if size == 2:
        return [0, n]
    lengths = [n // (size - 1)] * size
    lengths[1] = 0
    lengths[-1] += n - sum(lengths)
    return lengths


def cut(x, rank, size, layout, lengths=None):
    """This rank's shard of x along dim 1 (contiguous with explicit lengths when given)."""
    if lengths is None:
        return td.shard(x, rank, size, layout=layout)
    start = sum(lengths[:rank])
    return x[:, start:start + lengths[rank]]


# ---- torch.distributed ---------------------------------------------------------------------

def torch_case(group, rank, size, causal, layout, lengths=None, seed=0, dtype="f32", **opts):
    import torch
    q, k, v, dout = inputs(seed, "torch", dtype)
    full = [x.clone().requires_grad_(dtype == "f32") for x in (q, k, v)]
    ref_out, ref_lse = tessera.attention(*full, causal=causal, align="top_left",
                                         return_lse=True, threads=1, **opts)
    shards = [cut(x, rank, size, layout, lengths).clone().requires_grad_(dtype == "f32")
              for x in (q, k, v)]
    out, lse = td.ring_attention(*shards, group=group, causal=causal, layout=layout,
                                 return_lse=True, threads=1, **opts)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    label = f"P={size} rank {rank} causal={causal} {layout} {dtype} {opts}"
    if dtype != "f32":  # forward only: the output carries bf16 rounding
        check(f"{label} out", out, cut(ref_out, rank, size, layout, lengths), 1e-2, 1e-2)
        return
    check(f"{label} out", out, cut(ref_out, rank, size, layout, lengths))
    check(f"{label} lse", lse, _cut_lse(ref_lse, rank, size, layout, lengths))
    (ref_out * dout).sum().backward()
    (out * cut(dout, rank, size, layout, lengths)).sum().backward()
    for name, mine, ref in zip(("dq", "dk", "dv"), shards, full):
        want = cut(ref.grad, rank, size, layout, lengths)
        scale = float(ref.grad.abs().max())
        check(f"{label} {name}", mine.grad / scale, want / scale)


def ulysses_case(group, rank, size, kind, causal, layout, seed=7):
    """Ulysses against tessera.attention: heads 2P / P so that both divide by P."""
    rng = np.random.default_rng(seed)
    hq, hkv = 2 * size, size
    arrays = [rng.standard_normal(s).astype(np.float32)
              for s in ((1, N, hq, D), (1, N, hkv, D), (1, N, hkv, D), (1, N, hq, D))]
    ref_out, ref_lse = tessera.attention(*arrays[:3], causal=causal, return_lse=True, threads=1)
    ref_grads = tessera.attention_backward(arrays[3], *arrays[:3], ref_out, ref_lse,
                                           causal=causal, threads=1)
    label = f"ulysses P={size} rank {rank} causal={causal} {layout} {kind}"
    mine = [cut(x, rank, size, layout) for x in arrays]
    if kind == "torch":
        import torch
        mine = [torch.from_numpy(np.ascontiguousarray(x)) for x in mine]
        for x in mine[:3]:
            x.requires_grad_()
    out, lse = td.ulysses_attention(*mine[:3], group=group, causal=causal, layout=layout,
                                    return_lse=True, threads=1)
    check(f"{label} out", out, cut(ref_out, rank, size, layout))
    check(f"{label} lse", lse, _cut_lse(ref_lse, rank, size, layout, None))
    if kind == "torch":
        (out * mine[3]).sum().backward()
        grads = [x.grad for x in mine[:3]]
    else:
        grads = td.ulysses_attention_backward(mine[3], *mine[:3], out, lse, group=group,
                                              causal=causal, layout=layout, threads=1)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        scale = float(np.max(np.abs(ref)))
        check(f"{label} {name}", got / scale, cut(ref, rank, size, layout) / scale)


def lasp2_case(group, rank, size, kind, variant, lengths=None, seed=8):
    """LASP-2 against tessera.linear_attention (and its gradients) on the whole sequence."""
    rng = np.random.default_rng(seed)
    q, v, dout = (rng.standard_normal((B, N, h, D)).astype(np.float32) for h in (HQ, HKV, HQ))
    k = (0.3 * rng.standard_normal((B, N, HKV, D))).astype(np.float32)
    opts = {}
    if variant == "gla":
        opts["gates"] = (-0.05 - 0.2 * rng.random((B, N, HQ, D))).astype(np.float32)
    elif variant == "decay":
        opts["decay"] = np.array([0.9, 0.95, 0.8, 0.99], np.float32)
    elif variant == "normalized":
        opts.update(feature_map="elu1", normalize=True)
    ref = tessera.linear_attention(q, k, v, threads=1, **opts)
    ref_grads = tessera.linear_attention_backward(dout, q, k, v, threads=1, **opts)
    mine = [cut(x, rank, size, "contiguous", lengths) for x in (q, k, v, dout)]
    mine_opts = dict(opts)
    if "gates" in opts:
        mine_opts["gates"] = cut(opts["gates"], rank, size, "contiguous", lengths)
    label = f"lasp2 {variant} P={size} rank {rank} {kind}"
    if kind == "torch":
        import torch
        mine = [torch.from_numpy(np.ascontiguousarray(x)) for x in mine]
        mine_opts = {key: torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray)
                     else x for key, x in mine_opts.items()}
        leaves = mine[:3] + ([mine_opts["gates"]] if "gates" in mine_opts else [])
        for x in leaves:
            x.requires_grad_()
        out = td.lasp2(*mine[:3], group=group, threads=1, **mine_opts)
        (out * mine[3]).sum().backward()
        grads = [x.grad for x in leaves]
    else:
        out = td.lasp2(*mine[:3], group=group, threads=1, **mine_opts)
        grads = td.lasp2_backward(mine[3], *mine[:3], group=group, threads=1, **mine_opts)
    check(f"{label} out", out, cut(ref, rank, size, "contiguous", lengths))
    for name, got, want in zip(("dq", "dk", "dv", "dgates"), grads, ref_grads):
        scale = float(np.max(np.abs(want)))
        check(f"{label} {name}", got / scale,
              cut(want, rank, size, "contiguous", lengths) / scale)


def _cut_lse(lse, rank, size, layout, lengths):
    # lse is [B, Hq, N]: the sequence is dim 2.
    if lengths is None:
        return td.shard(lse, rank, size, dim=2, layout=layout)
    start = sum(lengths[:rank])
    return lse[:, :, start:start + lengths[rank]]


def expect_error(match, call):
    try:
        call()
    except ValueError as e:
        assert match in str(e), f"expected an error naming {match!r}, got: {e}"
        return str(e)
    raise AssertionError(f"expected ValueError naming {match!r}, got none")


def torch_errors(rank, size):
    import torch
    q, k, v, _ = inputs(1, "torch")
    mine = [td.shard(x, rank, size) for x in (q, k, v)]
    # An option that differs across ranks: every rank names it.
    if size > 1:
        expect_error("causal", lambda: td.ring_attention(*mine, causal=rank == 0, threads=1))
        expect_error("layout", lambda: td.ring_attention(
            *mine, layout="zigzag" if rank == 0 else "contiguous", threads=1))
    # A bad shard on the last rank: it names the argument, the others name the rank.
    bad_k = mine[1][..., :8] if rank == size - 1 else mine[1]
    expect_error("k: expected" if rank == size - 1 else f"rank {size - 1}: invalid",
                 lambda: td.ring_attention(mine[0], bad_k, mine[2], threads=1))
    # Zigzag lengths that are not the zigzag cut: every rank gets PlanShards' error.
    if size > 1:
        lengths = [N] + [0] * (size - 1)
        wrong = [cut(x, rank, size, "contiguous", lengths) for x in (q, k, v)]
        expect_error("shard of rank", lambda: td.ring_attention(*wrong, layout="zigzag",
                                                                threads=1))
    # The group still works (no message was left behind by the failed calls).
    torch_case(None, rank, size, True, "zigzag", seed=2)
    del torch


def torch_worker(rank, size, port):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        for causal in (False, True):
            for layout in ("contiguous", "zigzag"):
                torch_case(None, rank, size, causal, layout)
        torch_case(None, rank, size, True, "contiguous", lengths=contiguous_with_empty(size)
                   if size > 1 else None)
        torch_case(None, rank, size, True, "zigzag", softcap=3.0, scale=0.4, seed=3)
        torch_case(None, rank, size, True, "zigzag", dtype="bf16", seed=4)
        torch_case(None, rank, size, True, "zigzag", window=(6, -1), seed=9)
        torch_case(None, rank, size, False, "contiguous", window=(4, 3), seed=10)
        torch_errors(rank, size)
        for causal in (False, True):
            ulysses_case(None, rank, size, "torch", causal, "zigzag")
        for variant in ("plain", "decay", "gla", "normalized"):
            lasp2_case(None, rank, size, "torch", variant)
        if size > 1:
            lasp2_case(None, rank, size, "torch", "gla", lengths=contiguous_with_empty(size))
        if size == 3:
            # A subgroup: ranks 1 and 2 (group ranks 0 and 1) run a ring of two.
            sub = dist.new_group([1, 2])
            if rank in (1, 2):
                torch_case(sub, rank - 1, 2, True, "zigzag", seed=5)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---- mpi4py --------------------------------------------------------------------------------

def mpi_case(comm, causal, layout, lengths=None, seed=0, dtype="f32"):
    rank, size = comm.Get_rank(), comm.Get_size()
    q, k, v, dout = inputs(seed, "numpy", dtype)
    ref_out, ref_lse = tessera.attention(q, k, v, causal=causal, align="top_left",
                                         return_lse=True, threads=1)
    # Contiguous shards stay strided views of the full arrays (read in place).
    mine = [cut(x, rank, size, layout, lengths) for x in (q, k, v, dout)]
    out, lse = td.ring_attention(*mine[:3], group=comm, causal=causal, layout=layout,
                                 return_lse=True, threads=1)
    label = f"P={size} rank {rank} causal={causal} {layout} {dtype}"
    assert isinstance(out, np.ndarray) and out.dtype == q.dtype
    if dtype != "f32":
        check(f"{label} out", out, cut(ref_out, rank, size, layout, lengths), 2e-3, 2e-3)
        return
    check(f"{label} out", out, cut(ref_out, rank, size, layout, lengths))
    check(f"{label} lse", lse, _cut_lse(ref_lse, rank, size, layout, lengths))
    grads = td.ring_attention_backward(mine[3], *mine[:3], out, lse, group=comm, causal=causal,
                                       layout=layout, threads=1)
    ref_grads = tessera.attention_backward(dout, q, k, v, ref_out, ref_lse, causal=causal,
                                           align="top_left", threads=1)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        scale = float(np.max(np.abs(ref)))
        check(f"{label} {name}", got / scale, cut(ref, rank, size, layout, lengths) / scale)


def mpi_main():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    for causal in (False, True):
        for layout in ("contiguous", "zigzag"):
            mpi_case(comm, causal, layout)
    if size > 1:
        mpi_case(comm, True, "contiguous", lengths=contiguous_with_empty(size))
    mpi_case(comm, True, "zigzag", dtype="f16", seed=4)
    q, k, v, _ = inputs(1, "numpy")
    mine = [td.shard(x, rank, size) for x in (q, k, v)]
    if size > 1:
        expect_error("causal", lambda: td.ring_attention(*mine, group=comm, causal=rank == 0,
                                                         threads=1))
    mpi_case(comm, True, "zigzag", seed=2)
    ulysses_case(comm, rank, size, "numpy", True, "contiguous")
    for variant in ("gla", "normalized"):
        lasp2_case(comm, rank, size, "numpy", variant)
    if importlib.util.find_spec("torch") is not None:
        # torch tensors over an mpi4py communicator: autograd runs the ring backward over MPI.
        import torch
        torch.set_num_threads(1)
        torch_case(comm, rank, size, True, "zigzag", seed=6)
    comm.Barrier()
    if rank == 0:
        print(f"distributed_worker: mpi4py P={size}: ok")


if __name__ == "__main__":
    try:
        mpi_main()
    except BaseException:  # noqa: BLE001 - any failure must end every rank with a non-zero code
        import traceback
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        from mpi4py import MPI
        MPI.COMM_WORLD.Abort(1)
