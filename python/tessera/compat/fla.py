# SPDX-License-Identifier: Apache-2.0
"""Drop-in replacements for flash-linear-attention's (fla) linear-attention ops, on tessera's CPU
kernels:

    from tessera.compat.fla import chunk_gla, chunk_simple_gla, chunk_retention
    o, final_state = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)

Same names, arguments, defaults and results as fla.ops (layout [B, T, H, K] by default; gates in
log space; scale=None meaning K^-0.5; initial_state / final state float32 [N, H, K, V]; the
final state is None unless output_final_state). numpy arrays and torch CPU tensors are accepted;
with torch tensors that require grad the outputs are differentiable in q, k, v and the gates
(tessera's LinearAttentionBackward). What tessera cannot honour raises ValueError or
NotImplementedError rather than returning something else:

- value-wise gates (fused_recurrent_gla's gv) are not implemented;
- a gradient through initial_state or the final state is not implemented (states are fine under
  torch.no_grad() or with inputs that do not require grad);
- cu_seqlens (variable-length batches, B = 1) runs one call per sequence.
"""
import math

import numpy as np

from .. import _arrays as A
from ..linear import linear_attention, linear_attention_recurrent

__all__ = ["chunk_gla", "fused_recurrent_gla", "chunk_simple_gla", "chunk_retention",
           "parallel_based"]


# ---- Array helpers for both kinds ------------------------------------------------------------

def _swap12(x):
    """[B, H, T, ...] <-> [B, T, H, ...] as a view."""
    if x is None:
        return None
    return x.transpose(1, 2) if A.is_torch(x) else np.swapaxes(x, 1, 2)


def _flip_time(x):
    """x reversed along dim 1 (a copy: tessera reads non-negative strides only)."""
    if x is None:
        return None
    if A.is_torch(x):
        return x.flip(1)
    return np.ascontiguousarray(x[:, ::-1])


def _concat(xs, dim):
    if A.is_torch(xs[0]):
        return A.torch_module().cat(xs, dim=dim)
    return np.concatenate(xs, axis=dim)


def _float32(name, kind, x):
    """x as float32 (torch keeps autograd through the conversion); None stays None."""
    if x is None:
        return None
    if A.kind_of(name, x) != kind:
        raise TypeError(f"{name}: expected a {kind} array like q")
    if A.dtype_name(x) not in ("f32", "f64", "f16", "bf16"):
        raise ValueError(f"{name}: expected a float dtype, got {A.dtype_name(x)}")
    if kind == A.TORCH:
        return x if x.dtype == A.torch_module().float32 else x.float()
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _requires_grad(x):
    torch = A.torch_module()
    return (x is not None and A.is_torch(x) and x.requires_grad and torch is not None
            and torch.is_grad_enabled())


def _shape(x):
    return tuple(int(s) for s in x.shape)


def _offsets(cu_seqlens, cu_seqlens_cpu=None):
    src = cu_seqlens_cpu if cu_seqlens_cpu is not None else cu_seqlens
    if A.is_torch(src):
        if src.is_floating_point():
            raise ValueError(f"cu_seqlens: expected integers, got dtype {src.dtype}")
        offs = [int(x) for x in src.detach().cpu().tolist()]
    else:
        a = np.asarray(src)
        if a.dtype.kind not in "iu":
            raise ValueError(f"cu_seqlens: expected integers, got dtype {a.dtype}")
        offs = [int(x) for x in a.tolist()]
    if len(offs) < 2 or offs[0] != 0 or any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets starting at 0 with at "
                         f"least 2 entries, got {offs}")
    return offs


# ---- The common driver -----------------------------------------------------------------------

def _run(op, q, k, v, *, gates=None, gates_rank=None, decay=None, scale=None,
         initial_state=None, output_final_state=False, cu_seqlens=None, cu_seqlens_cpu=None,
         head_first=False, reverse=False, recurrent=False, feature_map="identity",
         normalize=False):
    """Runs tessera for one fla call. Shapes are fla's: q, k [B, T, H, K], v [B, T, H, V], gates
    [B, T, H(, K)] (or [B, H, T(, K)] with head_first); returns (o, final_state or None)."""
    kind = A.common_kind(q=q, k=k, v=v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            layout = "[B, H, T, dim]" if head_first else "[B, T, H, dim]"
            raise ValueError(f"{op}: {name}: expected rank 4 {layout}, got shape "
                             f"{list(x.shape)}")
    given = None if gates is None else _shape(gates)
    if head_first:
        q, k, v, gates = _swap12(q), _swap12(k), _swap12(v), _swap12(gates)
    B, T, H, K = _shape(q)
    if gates is not None:
        want = (B, T, H, K)[:gates_rank]
        if head_first:
            want = (B, H, T, K)[:gates_rank]
        if given != want:
            layout = ("[B, H, T" if head_first else "[B, T, H") + (", K]" if gates_rank == 4
                                                                   else "]")
            raise ValueError(f"{op}: g: expected shape {layout} = {list(want)}, got "
                             f"{list(given)}")
        gates = _float32("g", kind, gates)
    initial_state = _float32("initial_state", kind, initial_state)
    if scale is not None:
        scale = float(scale)

    def one(q, k, v, gates, h0):
        if reverse:
            q, k, v, gates = _flip_time(q), _flip_time(k), _flip_time(v), _flip_time(gates)
        fn = linear_attention_recurrent if recurrent else linear_attention
        res = fn(q, k, v, feature_map=feature_map, scale=scale, normalize=normalize,
                 decay=decay, gates=gates, initial_state=h0, return_state=output_final_state)
        o, ht = (res[0], res[1]) if output_final_state else (res, None)
        return (_flip_time(o) if reverse else o), ht

    if cu_seqlens is None:
        o, ht = one(q, k, v, gates, initial_state)
    else:
        offs = _offsets(cu_seqlens, cu_seqlens_cpu)
        if head_first:
            raise ValueError(f"{op}: cu_seqlens: expected head_first=False (variable-length "
                             f"inputs are [1, total, H, dim]), got head_first=True")
        if B != 1:
            raise ValueError(f"{op}: cu_seqlens: expected a batch size of 1 (flattened "
                             f"sequences), got q of shape {list(q.shape)}")
        if offs[-1] != T:
            raise ValueError(f"{op}: cu_seqlens: expected the last offset to equal the total "
                             f"length {T}, got {offs[-1]}")
        n = len(offs) - 1
        if initial_state is not None and int(initial_state.shape[0]) != n:
            raise ValueError(f"{op}: initial_state: expected one state per sequence ({n}), got "
                             f"shape {list(initial_state.shape)}")
        outs, states = [], []
        for i in range(n):
            a, b = offs[i], offs[i + 1]
            h0 = None if initial_state is None else initial_state[i:i + 1]
            o_i, ht_i = one(q[:, a:b], k[:, a:b], v[:, a:b],
                            None if gates is None else gates[:, a:b], h0)
            outs.append(o_i)
            states.append(ht_i)
        o = _concat(outs, 1)
        ht = _concat(states, 0) if output_final_state else None
    if head_first:
        o = _swap12(o)
    return o, ht


def _decay_from_log(kind, name, log_decay, heads):
    """Per-head lambda = exp(log_decay) as float32 [H] (log_decay <= 0)."""
    if A.kind_of(name, log_decay) != kind:
        raise TypeError(f"{name}: expected a {kind} array like q")
    if len(log_decay.shape) != 1 or int(log_decay.shape[0]) != heads:
        raise ValueError(f"{name}: expected shape [H] = [{heads}], got {list(log_decay.shape)}")
    if kind == A.TORCH:
        x = log_decay.detach().float()
        if bool((x > 0).any()) or not bool(x.isfinite().all()):
            raise ValueError(f"{name}: expected finite log decays <= 0, got {x.tolist()}")
        return x.exp()
    x = np.asarray(log_decay, dtype=np.float64)
    if (x > 0).any() or not np.isfinite(x).all():
        raise ValueError(f"{name}: expected finite log decays <= 0, got {x.tolist()}")
    return np.exp(x).astype(np.float32)


# ---- GLA ---------------------------------------------------------------------------------------

def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, head_first=False):
    """fla.ops.gla.chunk_gla: gated linear attention, chunked.

    q, k [B, T, H, K], v [B, T, H, V], g [B, T, H, K] log-space forget gates (<= 0, e.g.
    logsigmoid) applied to the keys. scale: default K^-0.5. initial_state [N, H, K, V].
    Returns (o [B, T, H, V], final_state float32 [N, H, K, V] or None).
    """
    return _run("chunk_gla", q, k, v, gates=g, gates_rank=4, scale=scale,
                initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, head_first=head_first)


def fused_recurrent_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None,
                        output_final_state=False, reverse=False, cu_seqlens=None,
                        head_first=False):
    """fla.ops.gla.fused_recurrent_gla: GLA token by token (tessera's recurrent form).

    gk [B, T, H, K]: log-space key gates (None: no gates). gv (value-wise gates) is not
    supported. reverse=True runs the recurrence from the last token to the first.
    Returns (o, final_state or None).
    """
    if gv is not None:
        raise NotImplementedError("fused_recurrent_gla: gv (value-wise gates [B, T, H, V]) is "
                                  "not implemented in tessera; only gk (key-wise gates)")
    return _run("fused_recurrent_gla", q, k, v, gates=gk, gates_rank=4, scale=scale,
                initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, head_first=head_first, reverse=bool(reverse),
                recurrent=True)


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                     output_final_state=False, cu_seqlens=None, cu_seqlens_cpu=None,
                     head_first=False):
    """fla.ops.simple_gla.chunk_simple_gla: linear attention with one log-space gate per token
    and head (g [B, T, H]), or a constant per-head log decay (g_gamma [H], data-independent);
    at most one of the two. Returns (o, final_state or None)."""
    if g is not None and g_gamma is not None:
        raise ValueError("chunk_simple_gla: g, g_gamma: expected at most one of the per-token "
                         "gates g and the per-head decay g_gamma, got both")
    decay = gates = None
    if g_gamma is not None:
        kind = A.common_kind(q=q, k=k, v=v)
        heads = int(q.shape[1] if head_first else q.shape[2])
        if _requires_grad(g_gamma):
            # A learned decay: as scalar gates broadcast over [B, T] (differentiable through
            # the gates path), instead of the constant-decay path.
            if len(g_gamma.shape) != 1 or int(g_gamma.shape[0]) != heads:
                raise ValueError(f"chunk_simple_gla: g_gamma: expected shape [H] = [{heads}], "
                                 f"got {list(g_gamma.shape)}")
            b, t = int(q.shape[0]), int(q.shape[2] if head_first else q.shape[1])
            gates = g_gamma.float().reshape(1, 1, heads).expand(b, t, heads)
            if head_first:
                gates = gates.transpose(1, 2)
        else:
            decay = _decay_from_log(kind, "g_gamma", g_gamma, heads)
    else:
        gates = g
    return _run("chunk_simple_gla", q, k, v, gates=gates, gates_rank=3, decay=decay,
                scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, cu_seqlens_cpu=cu_seqlens_cpu, head_first=head_first)


# ---- RetNet ------------------------------------------------------------------------------------

def chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False,
                    cu_seqlens=None, head_first=False):
    """fla.ops.retention.chunk_retention: RetNet's retention, a fixed decay per head
    h of 1 - 2^(-5 - h) (H = the query heads). Returns (o, final_state or None)."""
    kind = A.common_kind(q=q, k=k, v=v)
    heads = int(q.shape[1] if head_first else q.shape[2]) if len(q.shape) == 4 else 0
    lam = [1.0 - math.pow(2.0, -5.0 - h) for h in range(heads)]
    if kind == A.TORCH:
        decay = A.torch_module().tensor(lam, dtype=A.torch_module().float32)
    else:
        decay = np.asarray(lam, dtype=np.float32)
    return _run("chunk_retention", q, k, v, decay=decay, scale=scale,
                initial_state=initial_state, output_final_state=output_final_state,
                cu_seqlens=cu_seqlens, head_first=head_first)


# ---- BASED -------------------------------------------------------------------------------------

def parallel_based(q, k, v, scale=None, use_norm=True, head_first=False):
    """fla.ops.based.parallel_based: BASED's linear part, causal, with the weight
    1 + s + s^2 / 2 for s = scale q . k (scale default K^-0.5), divided by the sum of the
    weights (+ 1e-6) with use_norm. Returns o [B, T, H, V] only (no state), as fla does."""
    kind = A.common_kind(q=q, k=k, v=v)
    if len(q.shape) == 4 and scale is not None:
        # tessera's Taylor map has s = q . k / sqrt(K): fold any other scale into q.
        mul = float(scale) * math.sqrt(int(q.shape[-1]))
        if mul != 1.0:
            q = q * mul if kind == A.TORCH else (q * np.asarray(mul, dtype=q.dtype))
    return _run("parallel_based", q, k, v, scale=1.0, feature_map="taylor2",
                normalize=bool(use_norm), head_first=head_first)[0]
