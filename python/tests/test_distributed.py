# SPDX-License-Identifier: Apache-2.0
"""tessera.distributed: ring attention over torch.distributed (gloo, P = 1, 2, 3 processes
spawned here) and mpi4py (mpirun -np 2), forward and backward against the single-process
tessera.attention on the whole sequence; the shard helpers and the step bindings.

The ranks' checks live in distributed_worker.py; a rank's failure fails the test, and a hang
fails it at the join's timeout."""
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import tessera
from tessera import _C
from tessera import distributed as td

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- Shard helpers -------------------------------------------------------------------------

@pytest.mark.parametrize("total,size", [(37, 1), (37, 2), (37, 3), (5, 4), (0, 3), (64, 4)])
def test_shard_lengths_and_plan(total, size):
    zig = td.shard_lengths(total, size, "zigzag")
    assert sum(zig) == total and len(zig) == size
    # Chunks of the 2P cut: the first total % 2P one token longer; rank r holds r and 2P-1-r.
    chunks = [total // (2 * size) + (c < total % (2 * size)) for c in range(2 * size)]
    assert zig == [chunks[r] + chunks[2 * size - 1 - r] for r in range(size)]
    segments = td.plan_shards(zig, "zigzag")
    covered = sorted((g, n) for segs in segments for g, _, n in segs)
    pos = 0
    for g, n in covered:
        assert g == pos
        pos += n
    assert pos == total
    cont = td.shard_lengths(total, size, "contiguous")
    assert sum(cont) == total and max(cont) - min(cont) <= 1


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_shard_unshard_roundtrip(layout, size):
    x = np.arange(2 * 37 * 3, dtype=np.float32).reshape(2, 37, 3)
    shards = [td.shard(x, r, size, layout=layout) for r in range(size)]
    assert [s.shape[1] for s in shards] == td.shard_lengths(37, size, layout)
    assert np.array_equal(td.unshard(shards, layout=layout), x)
    if layout == "zigzag" and size == 2:
        # Rank 0: chunks 0 and 3 of [10, 9, 9, 9]; rank 1: chunks 1 and 2.
        assert np.array_equal(shards[0][0, :, 0], x[0, list(range(10)) + list(range(28, 37)), 0])
        assert np.array_equal(td.zigzag_shard(x, 1, 2), shards[1])
    lse = np.arange(2 * 3 * 37, dtype=np.float32).reshape(2, 3, 37)
    back = td.unshard([td.shard(lse, r, size, dim=-1, layout=layout) for r in range(size)],
                      dim=-1, layout=layout)
    assert np.array_equal(back, lse)


def test_shard_torch_and_uneven_contiguous():
    torch = pytest.importorskip("torch")
    x = torch.arange(40.0).reshape(1, 40, 1, 1)
    shards = [td.shard(x, r, 3) for r in range(3)]
    assert all(isinstance(s, torch.Tensor) for s in shards)
    assert torch.equal(td.unshard(shards), x)
    # Contiguous shards of any lengths (an empty one included) reassemble in rank order.
    parts = [x[:, :25], x[:, 25:25], x[:, 25:]]
    assert torch.equal(td.unshard(parts, layout="contiguous"), x)


def test_shard_errors():
    x = np.zeros((1, 8, 1, 1), np.float32)
    with pytest.raises(ValueError, match="layout"):
        td.shard(x, 0, 2, layout="ring")
    with pytest.raises(ValueError, match="rank"):
        td.shard(x, 2, 2)
    with pytest.raises(ValueError, match="size"):
        td.shard_lengths(8, 0)
    with pytest.raises(ValueError, match="shard of rank 0"):
        td.unshard([x, x[:, :2]], layout="zigzag")  # 8 + 2 tokens are not a zigzag cut
    with pytest.raises(ValueError, match="rank"):
        _C.zigzag_shard_length(8, 2, 2)
    with pytest.raises(ValueError, match="layout"):
        _C.plan_shards("ring", [1, 2])


# ---- The step bindings, in one process -----------------------------------------------------

def test_steps_in_one_process_match_attention(rng=np.random.default_rng(7)):
    # Two "ranks" of a zigzag cut, driven by hand: rank 0's queries over both blocks.
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in ((2, 21, 4, 8), (2, 21, 2, 8), (2, 21, 2, 8)))
    segments = _C.plan_shards("zigzag", td.shard_lengths(21, 2, "zigzag"))
    mine = [td.zigzag_shard(x, 0, 2) for x in (q, k, v)]
    acc_out = np.zeros(mine[0].shape, np.float32)
    acc_lse = np.full((2, 4, mine[0].shape[1]), -np.inf, np.float32)
    for owner in (0, 1):
        kb, vb = (np.ascontiguousarray(td.zigzag_shard(x, owner, 2)) for x in (k, v))
        _C.ring_forward_step(mine[0], kb, vb, acc_out, acc_lse, segments[0], segments[owner],
                             True, None, 0.0, 1)
    out = np.empty_like(mine[0])
    lse = np.empty_like(acc_lse)
    _C.ring_finish_forward(acc_out, acc_lse, out, lse)
    ref_out, ref_lse = tessera.attention(q, k, v, causal=True, return_lse=True)
    np.testing.assert_allclose(out, td.zigzag_shard(ref_out, 0, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, td.zigzag_shard(ref_lse, 0, 2, dim=2), rtol=1e-5, atol=1e-5)


def test_step_binding_errors():
    q = np.zeros((1, 4, 2, 8), np.float32)
    acc = np.zeros((1, 4, 2, 8), np.float32)
    lse = np.zeros((1, 2, 4), np.float32)
    seg = [(0, 0, 4)]
    with pytest.raises(ValueError, match="acc_lse"):
        _C.ring_forward_step(q, q, q, acc, lse[:, :, :3], seg, seg, False, None, 0.0, 1)
    with pytest.raises(ValueError, match="q_segments"):
        _C.ring_forward_step(q, q, q, acc, lse, [(0, 2, 4)], seg, False, None, 0.0, 1)
    with pytest.raises(ValueError, match="out: expected shape"):
        _C.ring_finish_forward(acc, lse, np.zeros((1, 3, 2, 8), np.float32), None)
    with pytest.raises(ValueError, match="acc_out"):
        _C.ring_finish_forward(acc.astype(np.float16), lse, q, None)
    with pytest.raises(ValueError, match="lse: expected f32"):
        _C.ring_finish_forward(acc, lse, q, np.zeros((1, 4, 2), np.float32))


def test_group_errors():
    q = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises(TypeError, match="group"):
        td.ring_attention(q, q, q, group=object())
    if "torch" not in sys.modules or not sys.modules["torch"].distributed.is_initialized():
        with pytest.raises(ValueError, match="group"):
            td.ring_attention(q, q, q)


# ---- torch.distributed (gloo) --------------------------------------------------------------

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("size", [1, 2, 3])
def test_torch_distributed_ring(size):
    torch = pytest.importorskip("torch")
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    sys.path.insert(0, HERE) if HERE not in sys.path else None
    import distributed_worker
    context = mp.start_processes(distributed_worker.torch_worker, args=(size, free_port()),
                                 nprocs=size, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"P={size}: the ranks did not finish within 180 s (a hang)")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    del torch


# ---- mpi4py under mpirun -------------------------------------------------------------------

def test_mpi4py_ring():
    pytest.importorskip("mpi4py")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun is not installed")
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1")
    command = [mpirun, "-np", "2", "--oversubscribe", sys.executable,
               os.path.join(HERE, "distributed_worker.py")]
    try:
        run = subprocess.run(command, env=env, cwd=HERE, capture_output=True, text=True,
                             timeout=180)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpirun did not finish within 180 s (a hang): {e.stdout} {e.stderr}")
    assert run.returncode == 0, f"mpirun failed ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    assert "mpi4py P=2: ok" in run.stdout
