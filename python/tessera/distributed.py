# SPDX-License-Identifier: Apache-2.0
"""tessera.distributed: ring attention across processes, over torch.distributed or mpi4py.

A sequence of N tokens is split across the P ranks of a group; every rank passes its shard of
q, k, v ([B, S_r, H, D], S_r its token count, 0 allowed) and gets its shard of the output.
The local queries stay put while the K/V shards travel around the ring (rank r sends to r + 1,
receives from r - 1); every step computes attention of the local queries on the visiting block
and merges it into a running (O, LSE) state, while the next block is already in flight. The
result is exact attention over the whole sequence (causal positions are global).

    # torch.distributed (gloo), every rank, on its zigzag shard of the full q, k, v:
    q_r, k_r, v_r = (tessera.distributed.zigzag_shard(x, rank, world) for x in (q, k, v))
    out = tessera.distributed.ring_attention(q_r, k_r, v_r, causal=True, layout="zigzag")
    # mpi4py, numpy arrays:
    out, lse = tessera.distributed.ring_attention(q, k, v, group=MPI.COMM_WORLD,
                                                  return_lse=True)
    dq, dk, dv = tessera.distributed.ring_attention_backward(dout, q, k, v, out, lse,
                                                             group=MPI.COMM_WORLD)

With torch tensors that require grad, the output is differentiable: its backward is the ring
backward (K/V travel again, the blocks' dK/dV accumulators follow them one step behind and are
home after P steps). Every rank must run the backward, as it runs the forward: both are
collective calls.

Options and shapes are agreed across the ranks first (one all-gather of a small fingerprint):
a bad argument on one rank or an option that differs across ranks raises ValueError on every
rank, before anything is computed or sent.

Layouts: "contiguous" (rank r holds the run of tokens after those of ranks 0..r-1, any lengths)
or "zigzag" (the sequence cut into 2P near-equal chunks, rank r holds chunks r and 2P - 1 - r:
with causal attention every rank has about the same work). shard() / unshard() cut and
reassemble full-sequence arrays; shard_lengths() gives every rank's token count.

Neither torch nor mpi4py is imported here: the kind of group (and of arrays) the caller passes
decides which one is used.
"""
import math
import struct

import numpy as np

from . import _C
from . import _arrays as A

LAYOUTS = ("contiguous", "zigzag")

# Tags of the two kinds of point-to-point traffic (K/V blocks and travelling dK/dV), so that an
# exchange of one kind never matches a message of the other.
_KV_TAG = 71
_GRAD_TAG = 72

# ---- Shard layouts -------------------------------------------------------------------------


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'contiguous' or 'zigzag', got {layout!r}")


def _check_count(name, value, low):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name}: expected >= {low}, got {value}")
    return int(value)


def shard_lengths(total, size, layout="contiguous"):
    """The token count of every rank when `total` tokens are cut for `size` ranks: zigzag as
    the layout requires; contiguous as even as possible (the first total % size ranks hold one
    token more)."""
    total = _check_count("total", total, 0)
    size = _check_count("size", size, 1)
    _check_layout(layout)
    if layout == "zigzag":
        return [_C.zigzag_shard_length(total, size, r) for r in range(size)]
    base, extra = divmod(total, size)
    return [base + (1 if r < extra else 0) for r in range(size)]


def plan_shards(lengths, layout="contiguous"):
    """Every rank's segments from every rank's token count: lists of (global_start,
    local_start, length) runs (local rows [local_start, local_start + length) are the global
    positions [global_start, ...))."""
    _check_layout(layout)
    return _C.plan_shards(layout, [int(n) for n in lengths])


def _concat(parts, dim, like):
    if A.is_torch(like):
        return A.torch_module().cat(parts, dim=dim)
    return np.concatenate(parts, axis=dim)


def _slice(x, dim, start, length):
    index = [slice(None)] * len(x.shape)
    index[dim] = slice(start, start + length)
    return x[tuple(index)]


def shard(x, rank, size, *, dim=1, layout="contiguous"):
    """This rank's shard of a full-sequence array x (numpy or torch; the sequence along `dim`,
    dim 1 of [B, N, H, D] by default) for `layout`, the layout ring_attention must then be
    given (its default is contiguous, as here). A view for contiguous shards (shard_lengths'
    cut), a copy for zigzag ones (two chunks)."""
    A.kind_of("x", x)
    size = _check_count("size", size, 1)
    rank = _check_count("rank", rank, 0)
    if rank >= size:
        raise ValueError(f"rank: expected in [0, {size}), got {rank}")
    dim = dim % len(x.shape)
    segments = plan_shards(shard_lengths(x.shape[dim], size, layout), layout)[rank]
    parts = [_slice(x, dim, g, n) for g, _, n in segments]
    return parts[0] if len(parts) == 1 else _concat(parts, dim, x)


def zigzag_shard(x, rank, size, dim=1):
    """shard(x, rank, size, dim=dim, layout="zigzag")."""
    return shard(x, rank, size, dim=dim, layout="zigzag")


def unshard(shards, *, dim=1, layout="contiguous"):
    """The full-sequence array from every rank's shard (in rank order): the inverse of shard()
    (contiguous shards may have any lengths)."""
    shards = list(shards)
    if not shards:
        raise ValueError("shards: expected one array per rank, got none")
    dim = dim % len(shards[0].shape)
    segments = plan_shards([s.shape[dim] for s in shards], layout)
    runs = sorted(((g, _slice(s, dim, local, n))
                   for s, segs in zip(shards, segments) for g, local, n in segs),
                  key=lambda run: run[0])
    return _concat([run for _, run in runs], dim, shards[0])


# ---- Communicators -------------------------------------------------------------------------
# Both expose rank, size, all_gather_ints (a blocking all-gather of a few int64) and exchange
# (a non-blocking send to rank + 1 and receive from rank - 1; None skips either side) with wait.


class _TorchGroup:
    def __init__(self, group):
        import torch.distributed as dist
        self.dist, self.group = dist, group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("group: expected a process group this process belongs to")
        self._next = self._global((self.rank + 1) % self.size)
        self._prev = self._global((self.rank - 1) % self.size)

    def _global(self, group_rank):
        if self.group is None or self.group is self.dist.group.WORLD:
            return group_rank
        return self.dist.get_global_rank(self.group, group_rank)

    @staticmethod
    def _tensor(buffer):
        return buffer if A.is_torch(buffer) else A.torch_module().from_numpy(buffer)

    def all_gather_ints(self, values):
        torch = A.torch_module()
        mine = torch.tensor(values, dtype=torch.int64)
        every = [torch.empty_like(mine) for _ in range(self.size)]
        self.dist.all_gather(every, mine, group=self.group)
        return [t.tolist() for t in every]

    def exchange(self, send, recv, tag):
        works = []
        if recv is not None:
            works.append(self.dist.irecv(self._tensor(recv), src=self._prev, group=self.group,
                                         tag=tag))
        if send is not None:
            works.append(self.dist.isend(self._tensor(send), dst=self._next, group=self.group,
                                         tag=tag))
        return works

    def wait(self, works):
        for work in works:
            work.wait()


class _MpiGroup:
    def __init__(self, comm):
        from mpi4py import MPI
        self.mpi, self.comm = MPI, comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._next = (self.rank + 1) % self.size
        self._prev = (self.rank - 1) % self.size

    def _bytes(self, buffer):
        if A.is_torch(buffer):
            buffer = buffer.view(A.torch_module().uint8).numpy()
        return [buffer.view(np.uint8), self.mpi.BYTE]

    def all_gather_ints(self, values):
        mine = np.asarray(values, dtype=np.int64)
        every = np.empty((self.size, mine.size), dtype=np.int64)
        self.comm.Allgather(mine, every)
        return every.tolist()

    def exchange(self, send, recv, tag):
        requests = []
        if recv is not None:
            requests.append(self.comm.Irecv(self._bytes(recv), source=self._prev, tag=tag))
        if send is not None:
            requests.append(self.comm.Isend(self._bytes(send), dest=self._next, tag=tag))
        return requests

    def wait(self, requests):
        if requests:
            self.mpi.Request.Waitall(requests)


def _communicator(group):
    """The group as a communicator: None (torch.distributed's default group), a
    torch.distributed ProcessGroup or an mpi4py communicator (told apart by type, without
    importing either library); one already made passes through."""
    if isinstance(group, (_TorchGroup, _MpiGroup)):
        return group
    if type(group).__module__.split(".")[0] == "mpi4py":
        return _MpiGroup(group)
    torch = A.torch_module()
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if group is None:
        if dist is None or not dist.is_available() or not dist.is_initialized():
            raise ValueError("group: expected a torch.distributed process group or an mpi4py "
                             "communicator, got None while torch.distributed is not initialized")
        return _TorchGroup(None)
    if dist is not None and dist.is_available() and isinstance(group, dist.ProcessGroup):
        return _TorchGroup(group)
    raise TypeError(f"group: expected None, a torch.distributed ProcessGroup or an mpi4py "
                    f"communicator, got {type(group).__name__}")


# ---- Agreement -----------------------------------------------------------------------------

_FORWARD, _BACKWARD = 1, 2
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_DTYPES = ("f32", "bf16", "f16")
# The options every rank must share, in fingerprint order, with how to print a value.
_AGREED = (
    ("operation", lambda v: {_FORWARD: "forward", _BACKWARD: "backward"}.get(v, v)),
    ("layout", lambda v: LAYOUTS[v]),
    ("batch", int),
    ("heads_q", int),
    ("heads_kv", int),
    ("head_dim", int),
    ("dtype", lambda v: _DTYPES[v]),
    ("causal", bool),
    ("scale", lambda v: struct.unpack("<f", struct.pack("<I", v))[0]),
    ("softcap", lambda v: struct.unpack("<f", struct.pack("<I", v))[0]),
)


def _float_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


class _Ring:
    """One call's checked options, the communicator, and (after agree) every rank's token
    count and segments."""

    def __init__(self, comm, causal, scale, softcap, layout, threads):
        self.comm = comm
        self.causal, self.scale, self.softcap = causal, scale, softcap
        self.layout, self.threads = layout, threads
        self.lengths = self.segments = None

    def agree(self, fingerprint, local_error):
        """The collective before any compute: every rank sends its fingerprint ([ok, S_r,
        options...], zeros after a local error); every rank then raises the same kind of error,
        or learns every rank's length."""
        every = self.comm.all_gather_ints(fingerprint)
        if local_error is not None:
            raise local_error
        for r, theirs in enumerate(every):
            if theirs[0] != 1:
                raise ValueError(f"rank {r}: invalid arguments on that rank (its error names "
                                 f"them); nothing was computed on any rank")
        for r, theirs in enumerate(every[1:], start=1):
            for i, (name, show) in enumerate(_AGREED):
                if theirs[2 + i] != every[0][2 + i]:
                    raise ValueError(f"{name}: expected the same value on every rank, got "
                                     f"{show(every[0][2 + i])} on rank 0 and "
                                     f"{show(theirs[2 + i])} on rank {r}")
        self.lengths = [theirs[1] for theirs in every]
        self.segments = _C.plan_shards(self.layout, self.lengths)

    def step_options(self):
        return self.causal, self.scale, self.softcap, self.threads

    def block_numel(self, owner, B, Hkv, D):
        return B * self.lengths[owner] * Hkv * D


def _as_float32(name, x, what):
    x = float(x)
    if not (math.isfinite(x) and abs(x) <= _FLOAT32_MAX):
        raise ValueError(f"{name}: expected {what}, got {x}")
    return x


def _check_ring_options(causal, scale, softcap, layout, threads):
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal: expected a bool, got {type(causal).__name__}")
    if scale is not None:
        scale = _as_float32("scale", scale, "a finite float32 value")
    softcap = _as_float32("softcap", softcap, "a finite float32 value >= 0 (0 disables)")
    if softcap < 0:
        raise ValueError(f"softcap: expected a finite float32 value >= 0 (0 disables), got "
                         f"{softcap}")
    _check_layout(layout)
    return bool(causal), scale, softcap, A.threads_arg(threads)


def _fingerprint(operation, layout, options, shapes):
    """This rank's agreement record: [ok, S_r] and the _AGREED options in their order."""
    causal, scale, softcap, _ = options
    B, S, Hq, Hkv, D, dtype = shapes
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    return [1, S, operation, LAYOUTS.index(layout), B, Hq, Hkv, D, _DTYPES.index(dtype),
            int(causal), _float_bits(scale), _float_bits(softcap)]


def _check_shards(kind, **arrays):
    """Local checks of a shard's arrays: those the kernels would make, done before the
    agreement so that no rank fails once the ring runs. Returns (B, S_r, Hq, Hkv, D, dtype)."""
    for name, x in arrays.items():
        if kind == A.TORCH and not x.is_cpu:
            raise ValueError(f"{name}: expected a CPU tensor, got one on {x.device}")
        want = (3, "[B, Hq, S_r]") if name == "lse" else (4, "[B, S_r, H, D] (this rank's shard)")
        if len(x.shape) != want[0]:
            raise ValueError(f"{name}: expected rank {want[0]} {want[1]}, got shape "
                             f"{list(x.shape)}")
    q, k, v = arrays["q"], arrays["k"], arrays["v"]
    dtype = A.dtype_name(q)
    if dtype not in _DTYPES:
        raise ValueError(f"q: expected dtype f32, bf16 or f16, got {dtype}")
    for name, x in arrays.items():
        want = "f32" if name == "lse" else dtype
        if A.dtype_name(x) != want:
            raise ValueError(f"{name}: expected dtype {want}, got {A.dtype_name(x)}")
    B, S, Hq, D = (int(n) for n in q.shape)
    Hkv = int(k.shape[2])
    if not 1 <= D <= 512:
        raise ValueError(f"q: expected head dim D in [1, 512], got {D}")
    if tuple(k.shape) != (B, S, Hkv, D) or Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"k: expected [{B}, {S}, Hkv, {D}] (the shard's tokens, Hkv >= 1 "
                         f"dividing the {Hq} query heads), got {list(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected shape {list(k.shape)} (that of k), got {list(v.shape)}")
    for name in ("out", "dout"):
        if name in arrays and tuple(arrays[name].shape) != tuple(q.shape):
            raise ValueError(f"{name}: expected shape {list(q.shape)} (that of q), got "
                             f"{list(arrays[name].shape)}")
    if "lse" in arrays and tuple(arrays["lse"].shape) != (B, Hq, S):
        raise ValueError(f"lse: expected shape {[B, Hq, S]}, got {list(arrays['lse'].shape)}")
    return B, S, Hq, Hkv, D, dtype


def _prepare(operation, comm, causal, scale, softcap, layout, threads, arrays):
    """Local checks and agreement: returns (ring, kind, shapes). A local error is raised only
    after this rank's fingerprint went out, so the other ranks never wait for it."""
    error = shapes = kind = None
    fingerprint = [0] * (2 + len(_AGREED))
    options = (False, None, 0.0, 0)
    try:
        options = _check_ring_options(causal, scale, softcap, layout, threads)
        kind = A.common_kind(**arrays)
        shapes = _check_shards(kind, **arrays)
        fingerprint = _fingerprint(operation, layout, options, shapes)
    except Exception as e:  # noqa: BLE001 - any local failure must still reach the gather
        error = e if isinstance(e, (ValueError, TypeError)) else ValueError(
            f"local arguments: {type(e).__name__}: {e}")
        fingerprint = [0] * (2 + len(_AGREED))
    ring = _Ring(comm, options[0], options[1], options[2],
                 layout if error is None else LAYOUTS[0], options[3])
    ring.agree(fingerprint, error)
    return ring, kind, shapes


# ---- The ring ------------------------------------------------------------------------------


def _zeros(kind, shape, dtype="f32", like=None, fill=0.0):
    x = A.empty(kind, shape, like=like, dtype=dtype)
    x[...] = fill
    return x


def _blocks(buffer, numel, shape):
    """Views of K and V (or dK and dV) packed one after the other at the start of `buffer`."""
    return buffer[:numel].reshape(shape), buffer[numel:2 * numel].reshape(shape)


def _finish(kind, acc, like):
    """acc (f32) rounded to the dtype of `like` (RingFinishForward's rounding)."""
    result = A.empty(kind, acc.shape, like=like)
    _C.ring_finish_forward(acc, None, result, None)
    return result


def _ring_forward(ring, kind, shapes, q, k, v):
    B, S, Hq, Hkv, D, _ = shapes
    comm, lengths, segments = ring.comm, ring.lengths, ring.segments
    rank, size = comm.rank, comm.size
    max_numel = B * max(lengths) * Hkv * D
    # K then V of the visiting block; two buffers so the next block arrives during the compute.
    blocks = [A.empty(kind, (2 * max_numel,), like=q) for _ in range(2)]
    own_k, own_v = _blocks(blocks[0], B * S * Hkv * D, (B, S, Hkv, D))
    own_k[...] = k
    own_v[...] = v
    acc_out = _zeros(kind, (B, S, Hq, D))
    acc_lse = _zeros(kind, (B, Hq, S), fill=-np.inf)
    cur = 0
    for step in range(size):
        owner = (rank - step) % size
        numel = ring.block_numel(owner, B, Hkv, D)
        pending = None
        if step + 1 < size:
            incoming = ring.block_numel((owner - 1) % size, B, Hkv, D)
            pending = comm.exchange(blocks[cur][:2 * numel] if numel else None,
                                    blocks[1 - cur][:2 * incoming] if incoming else None,
                                    _KV_TAG)
        k_block, v_block = _blocks(blocks[cur], numel, (B, lengths[owner], Hkv, D))
        try:
            _C.ring_forward_step(q, k_block, v_block, acc_out, acc_lse, segments[rank],
                                 segments[owner], *ring.step_options())
        finally:
            if pending is not None:
                comm.wait(pending)
        if pending is not None:
            cur = 1 - cur
    out = A.empty(kind, q.shape, like=q)
    lse = A.empty(kind, (B, Hq, S), dtype="f32")
    _C.ring_finish_forward(acc_out, acc_lse, out, lse)
    return out, lse


def _ring_backward(ring, kind, shapes, dout, q, k, v, out, lse):
    B, S, Hq, Hkv, D, _ = shapes
    comm, lengths, segments = ring.comm, ring.lengths, ring.segments
    rank, size = comm.rank, comm.size
    max_numel = B * max(lengths) * Hkv * D
    blocks = [A.empty(kind, (2 * max_numel,), like=q) for _ in range(2)]
    own_k, own_v = _blocks(blocks[0], B * S * Hkv * D, (B, S, Hkv, D))
    own_k[...] = k
    own_v[...] = v
    # dK then dV (f32) of the block this rank works on; two so one travels while the next fills.
    grads = [_zeros(kind, (2 * max_numel,)) for _ in range(2)]
    step_grads = _zeros(kind, (2 * max_numel,))
    dq_acc = _zeros(kind, (B, S, Hq, D))
    cur = gcur = 0
    grad_pending = None
    try:
        for step in range(size):
            owner = (rank - step) % size
            next_owner = (owner - 1) % size
            numel = ring.block_numel(owner, B, Hkv, D)
            incoming = ring.block_numel(next_owner, B, Hkv, D)
            kv_pending = None
            if step + 1 < size:
                kv_pending = comm.exchange(blocks[cur][:2 * numel] if numel else None,
                                           blocks[1 - cur][:2 * incoming] if incoming else None,
                                           _KV_TAG)
            try:
                shape = (B, lengths[owner], Hkv, D)
                k_block, v_block = _blocks(blocks[cur], numel, shape)
                step_grads[:2 * numel] = 0
                dk_step, dv_step = _blocks(step_grads, numel, shape)
                _C.ring_backward_step(q, k_block, v_block, out, lse, dout, dq_acc, dk_step,
                                      dv_step, segments[rank], segments[owner],
                                      *ring.step_options())
                # The block's accumulators: its owner's start at zero; the others arrive from
                # rank - 1, one step behind the K/V.
                if grad_pending is not None:
                    comm.wait(grad_pending)
                    grad_pending = None
                    gcur = 1 - gcur
                    grads[gcur][:2 * numel] += step_grads[:2 * numel]
                else:
                    grads[gcur][:2 * numel] = step_grads[:2 * numel]
                if size > 1:
                    # Passed on; the last step's send brings every rank its own shard's sums.
                    grad_pending = comm.exchange(
                        grads[gcur][:2 * numel] if numel else None,
                        grads[1 - gcur][:2 * incoming] if incoming else None, _GRAD_TAG)
            finally:
                if kv_pending is not None:
                    comm.wait(kv_pending)
            if kv_pending is not None:
                cur = 1 - cur
    finally:
        if grad_pending is not None:
            comm.wait(grad_pending)
            gcur = 1 - gcur
    dk_home, dv_home = _blocks(grads[gcur], B * S * Hkv * D, (B, S, Hkv, D))
    return _finish(kind, dq_acc, q), _finish(kind, dk_home, k), _finish(kind, dv_home, v)


# ---- torch autograd ------------------------------------------------------------------------

_autograd_function = None


def _torch_function():
    """The autograd Function, defined once torch is in use (tessera never imports torch)."""
    global _autograd_function
    if _autograd_function is None:
        torch = A.torch_module()

        class RingAttention(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v, ring, shapes):
                out, lse = _ring_forward(ring, A.TORCH, shapes, q, k, v)
                ctx.save_for_backward(q, k, v, out, lse)
                ctx.ring = ring
                ctx.mark_non_differentiable(lse)
                return out, lse

            @staticmethod
            def backward(ctx, dout, _dlse):
                q, k, v, out, lse = ctx.saved_tensors
                ring = ctx.ring
                if dout is None:
                    dout = torch.zeros_like(out)
                dq, dk, dv = ring_attention_backward(
                    dout, q, k, v, out, lse, group=ring.comm, causal=ring.causal,
                    scale=ring.scale, softcap=ring.softcap, layout=ring.layout,
                    threads=ring.threads)
                return dq, dk, dv, None, None

        _autograd_function = RingAttention
    return _autograd_function


# ---- Public entry points ---------------------------------------------------------------------


def ring_attention(q, k, v, *, group=None, causal=False, scale=None, softcap=0.0,
                   layout="contiguous", return_lse=False, threads=0):
    """Exact attention over the whole sequence, sequence-parallel: q [B, S_r, Hq, D] and k, v
    [B, S_r, Hkv, D] are this rank's shard (Hq a multiple of Hkv; S_r may differ across ranks,
    0 included; zigzag shards must be those of shard()). Returns this rank's out [B, S_r, Hq, D]
    (dtype of q) and, with return_lse, its natural-log LSE f32 [B, Hq, S_r].

    group: None (torch.distributed's default group), a torch.distributed ProcessGroup (gloo),
    or an mpi4py communicator. Arrays: torch CPU tensors or numpy arrays (float32 / float16;
    torch also bfloat16). causal masks by global position; scale defaults to 1/sqrt(D);
    softcap: s <- c * tanh(s / c). threads: tessera's worker threads per rank (0: all).

    Collective: every rank of the group calls it with the same options. Bad arguments on any
    rank, or options that differ, raise ValueError on every rank before any compute. With torch
    tensors that require grad the output is differentiable (the ring backward, run by every
    rank)."""
    comm = _communicator(group)
    arrays = {"q": A.detach(q), "k": A.detach(k), "v": A.detach(v)}
    ring, kind, shapes = _prepare(_FORWARD, comm, causal, scale, softcap, layout, threads,
                                  arrays)
    if kind == A.TORCH and A.torch_module().is_grad_enabled() and any(
            x.requires_grad for x in (q, k, v)):
        out, lse = _torch_function().apply(q, k, v, ring, shapes)
    else:
        out, lse = _ring_forward(ring, kind, shapes, arrays["q"], arrays["k"], arrays["v"])
    return (out, lse) if return_lse else out


def ring_attention_backward(dout, q, k, v, out, lse, *, group=None, causal=False, scale=None,
                            softcap=0.0, layout="contiguous", threads=0):
    """Gradients (dq, dk, dv) of this rank's shard for ring_attention with the same options,
    from its out and lse (ring_attention(..., return_lse=True)) and the output gradient dout:
    the ring backward (the K/V blocks travel again; each block's dK/dV sums travel one step
    behind them and come home after P steps). Arrays of the kind and dtype of q. Collective, as
    the forward (same checks, same errors on every rank)."""
    comm = _communicator(group)
    arrays = {"q": A.detach(q), "k": A.detach(k), "v": A.detach(v), "out": A.detach(out),
              "lse": A.detach(lse), "dout": A.detach(dout)}
    ring, kind, shapes = _prepare(_BACKWARD, comm, causal, scale, softcap, layout, threads,
                                  arrays)
    a = arrays
    return _ring_backward(ring, kind, shapes, a["dout"], a["q"], a["k"], a["v"], a["out"],
                          a["lse"])
