# SPDX-License-Identifier: Apache-2.0
"""tessera.distributed: sequence-parallel attention across processes (ring attention, Ulysses,
LASP-2), over torch.distributed or mpi4py.

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

ulysses_attention computes the same exact attention by Ulysses head parallelism (an all-to-all
to head shards and back; Hq and Hkv divisible by the number of ranks), and lasp2 causal linear
attention (every linear_attention variant with a state) with one all-gather of chunk states.

All of them run tessera's C++ drivers (tessera/distributed.h) with a communicator that calls back
into the group's library (tessera/_dist_comm.py). Neither torch nor mpi4py is imported here: the
kind of group (and of arrays) the caller passes decides which one is used.
"""
import numpy as np

from . import _C
from . import _arrays as A
from ._dist_comm import communicator
from .linear import _check_rank4, _decay_arg, _gates_arg

LAYOUTS = ("contiguous", "zigzag")

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


# ---- Collective calls ------------------------------------------------------------------------


def _collective(group, prepare, run):
    """Runs one driver call: prepare() (this rank's own checks and allocations) then
    run(comm, *prepared). A local error is raised only after it joined the driver's agreement,
    so the other ranks' call fails too instead of waiting for this one."""
    with communicator(group) as comm:
        try:
            prepared = prepare()
        except (TypeError, ValueError) as e:
            _C.join_with_error(comm, f"{type(e).__name__}: {e}")
            raise
        return run(comm, *prepared)


def _attention_options(causal, window, scale, softcap, layout, threads):
    _check_layout(layout)
    if not isinstance(causal, (bool, np.bool_)):
        raise ValueError(f"causal: expected a bool, got {type(causal).__name__}")
    try:
        left, right = (int(w) for w in window)
    except (TypeError, ValueError):
        raise ValueError(f"window: expected (left, right) ints (-1: unbounded), got {window!r}")
    return (bool(causal), left, right, None if scale is None else float(scale), float(softcap),
            layout, A.threads_arg(threads))


def _attention_forward_raw(algorithm, group, q, k, v, options):
    def prepare():
        kind = A.common_kind(q=q, k=k, v=v)
        _check_rank4(q, k, v)
        out = A.empty(kind, tuple(q.shape), like=q)
        lse = A.empty(kind, (q.shape[0], q.shape[2], q.shape[1]), dtype="f32")
        return out, lse

    def run(comm, out, lse):
        _C.sequence_parallel_forward(comm, algorithm, A.detach(q), A.detach(k), A.detach(v), out,
                                     lse, *options)
        return out, lse

    return _collective(group, prepare, run)


def _attention_backward_raw(algorithm, group, dout, q, k, v, out, lse, options):
    def prepare():
        kind = A.common_kind(dout=dout, q=q, k=k, v=v, out=out, lse=lse)
        _check_rank4(q, k, v)
        return tuple(A.empty(kind, tuple(x.shape), like=x) for x in (q, k, v))

    def run(comm, dq, dk, dv):
        _C.sequence_parallel_backward(comm, algorithm, A.detach(dout), A.detach(q), A.detach(k),
                                      A.detach(v), A.detach(out), A.detach(lse), dq, dk, dv,
                                      *options)
        return dq, dk, dv

    return _collective(group, prepare, run)


def _attention(algorithm, q, k, v, group, options, return_lse):
    torch = A.torch_module()
    if (torch is not None and A.is_torch(q) and torch.is_grad_enabled()
            and any(A.is_torch(x) and x.requires_grad for x in (q, k, v))):
        from ._torch_dist import SequenceParallelAttention
        out, lse = SequenceParallelAttention.apply(q, k, v, algorithm, group, options)
    else:
        out, lse = _attention_forward_raw(algorithm, group, q, k, v, options)
    return (out, lse) if return_lse else out


def ring_attention(q, k, v, *, group=None, causal=False, window=(-1, -1), scale=None,
                   softcap=0.0, layout="contiguous", return_lse=False, threads=0):
    """Exact attention over the whole sequence, sequence-parallel: q [B, S_r, Hq, D] and k, v
    [B, S_r, Hkv, D] are this rank's shard (Hq a multiple of Hkv; S_r may differ across ranks,
    0 included; zigzag shards must be those of shard()). Returns this rank's out [B, S_r, Hq, D]
    (dtype of q) and, with return_lse, its natural-log LSE f32 [B, Hq, S_r].

    group: None (torch.distributed's default group), a torch.distributed ProcessGroup (gloo),
    or an mpi4py communicator. Arrays: torch CPU tensors or numpy arrays (float32 / float16;
    torch also bfloat16). causal and window=(left, right) (-1: unbounded) mask by global
    position (blocks outside the window are skipped); scale defaults to 1/sqrt(D);
    softcap: s <- c * tanh(s / c). threads: tessera's worker threads per rank (0: all).

    Collective: every rank of the group calls it with the same options. Bad arguments on any
    rank, or options that differ, raise ValueError on every rank before any compute. With torch
    tensors that require grad the output is differentiable (the ring backward, run by every
    rank)."""
    options = _attention_options(causal, window, scale, softcap, layout, threads)
    return _attention("ring", q, k, v, group, options, return_lse)


def ring_attention_backward(dout, q, k, v, out, lse, *, group=None, causal=False,
                            window=(-1, -1), scale=None, softcap=0.0, layout="contiguous",
                            threads=0):
    """Gradients (dq, dk, dv) of this rank's shard for ring_attention with the same options,
    from its out and lse (ring_attention(..., return_lse=True)) and the output gradient dout:
    the ring backward (the K/V blocks travel again; each block's dK/dV sums travel one step
    behind them and come home after P steps). Arrays of the kind and dtype of q. Collective, as
    the forward (same checks, same errors on every rank)."""
    options = _attention_options(causal, window, scale, softcap, layout, threads)
    return _attention_backward_raw("ring", group, dout, q, k, v, out, lse, options)


def ulysses_attention(q, k, v, *, group=None, causal=False, window=(-1, -1), scale=None,
                      softcap=0.0, layout="contiguous", return_lse=False, threads=0):
    """ring_attention's result by Ulysses head parallelism: an all-to-all gives every rank all
    N tokens of Hq / P query heads (and Hkv / P KV heads), attention runs locally, and a second
    all-to-all brings the output back. Hq and Hkv must be divisible by the number of ranks.
    Less traffic than the ring for moderate N, but nothing overlaps and every rank holds the
    whole sequence of its heads. Same arguments, errors and autograd as ring_attention."""
    options = _attention_options(causal, window, scale, softcap, layout, threads)
    return _attention("ulysses", q, k, v, group, options, return_lse)


def ulysses_attention_backward(dout, q, k, v, out, lse, *, group=None, causal=False,
                               window=(-1, -1), scale=None, softcap=0.0, layout="contiguous",
                               threads=0):
    """Gradients (dq, dk, dv) of ulysses_attention for this rank's shard."""
    options = _attention_options(causal, window, scale, softcap, layout, threads)
    return _attention_backward_raw("ulysses", group, dout, q, k, v, out, lse, options)


# ---- LASP-2 ----------------------------------------------------------------------------------

_FEATURE_MAPS = ("identity", "elu1", "relu", "taylor2")


def _lasp2_options(feature_map, scale, normalize, eps, chunk_size, threads):
    if feature_map not in _FEATURE_MAPS:
        raise ValueError(f"feature_map: expected one of {', '.join(_FEATURE_MAPS)}, got "
                         f"{feature_map!r}")
    return (feature_map, None if scale is None else float(scale), bool(normalize), float(eps),
            int(chunk_size), A.threads_arg(threads))


def _lasp2_forward_raw(group, q, k, v, decay, gates, options):
    feature_map, scale, normalize, eps, chunk_size, threads = options

    def prepare():
        kind = A.common_kind(q=q, k=k, v=v)
        _check_rank4(q, k, v)
        return (A.empty(kind, tuple(q.shape[:3]) + (v.shape[3],), like=q),
                _decay_arg(kind, decay), _gates_arg(kind, gates))

    def run(comm, out, decay_f32, gates_f32):
        _C.lasp2_forward(comm, A.detach(q), A.detach(k), A.detach(v), out, feature_map, scale,
                         normalize, eps, A.detach(decay_f32), A.detach(gates_f32), chunk_size,
                         threads)
        return out

    return _collective(group, prepare, run)


def _lasp2_backward_raw(group, dout, q, k, v, decay, gates, options, want_dgates=True):
    feature_map, scale, normalize, eps, chunk_size, threads = options

    def prepare():
        kind = A.common_kind(dout=dout, q=q, k=k, v=v)
        _check_rank4(q, k, v)
        gates_f32 = _gates_arg(kind, gates)
        dgates = (A.empty(kind, tuple(gates.shape), dtype="f32")
                  if gates is not None and want_dgates else None)
        return tuple(A.empty(kind, tuple(x.shape), like=x) for x in (q, k, v)) + (
            dgates, _decay_arg(kind, decay), gates_f32)

    def run(comm, dq, dk, dv, dgates, decay_f32, gates_f32):
        _C.lasp2_backward(comm, A.detach(dout), A.detach(q), A.detach(k), A.detach(v), dq, dk,
                          dv, dgates, feature_map, scale, normalize, eps, A.detach(decay_f32),
                          A.detach(gates_f32), chunk_size, threads)
        return dq, dk, dv, dgates

    return _collective(group, prepare, run)


def lasp2(q, k, v, *, group=None, feature_map="identity", scale=None, normalize=False, eps=1e-6,
          decay=None, gates=None, chunk_size=64, threads=0):
    """Causal linear attention over a sequence split across ranks (LASP-2).

    q [B, S_r, Hq, Dk], k [B, S_r, Hkv, Dk], v [B, S_r, Hkv, Dv]: this rank's chunk; the chunks
    follow the ranks' order (rank 0 first) and may differ in length (0 included). group as for
    ring_attention. The options are linear_attention's (feature_map, scale, normalize, eps,
    decay [Hq], gates [B, S_r, Hq, Dk] or [B, S_r, Hq]); every rank passes the same ones.
    Returns this rank's output [B, S_r, Hq, Dv]: the same rows as linear_attention on the whole
    sequence. Torch tensors that require grad get gradients for q, k, v and gates (the backward
    is LASP-2's backward over the same group, run by every rank)."""
    options = _lasp2_options(feature_map, scale, normalize, eps, chunk_size, threads)
    torch = A.torch_module()
    if (torch is not None and A.is_torch(q) and torch.is_grad_enabled()
            and any(A.is_torch(x) and x.requires_grad for x in (q, k, v, gates)
                    if x is not None)):
        if decay is not None and A.is_torch(decay) and decay.requires_grad:
            raise ValueError("decay: expected no gradient (LASP-2 has none for the decay rates)")
        from ._torch_dist import Lasp2
        return Lasp2.apply(q, k, v, gates, decay, group, options)
    return _lasp2_forward_raw(group, q, k, v, decay, gates, options)


def lasp2_backward(dout, q, k, v, *, group=None, feature_map="identity", scale=None,
                   normalize=False, eps=1e-6, decay=None, gates=None, chunk_size=64, threads=0):
    """Gradients of lasp2 for this rank's chunk: (dq, dk, dv), plus dgates (float32) when gates
    are given."""
    options = _lasp2_options(feature_map, scale, normalize, eps, chunk_size, threads)
    dq, dk, dv, dgates = _lasp2_backward_raw(group, dout, q, k, v, decay, gates, options)
    return (dq, dk, dv) if gates is None else (dq, dk, dv, dgates)
