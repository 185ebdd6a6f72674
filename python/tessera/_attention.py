# SPDX-License-Identifier: Apache-2.0
"""tessera.attention and tessera.attention_backward (exact attention, tessera/attention.h)."""
import dataclasses

import numpy as np

from . import _C
from . import _arrays as A
from .mask import Mask, _top_left

# Context::path values, for tests that force an implementation.
PATHS = {"auto": 0, "reference": 1, "generic": 2, "fast": 3}


class AttentionOptions:
    """The options of one attention call, checked and in the form the extension takes. The same
    object drives the forward and the backward (and the torch ops, through _torch._pack)."""

    __slots__ = ("scale", "causal", "window_left", "window_right", "top_left", "softcap",
                 "alibi_slopes", "cu_seqlens_q", "cu_seqlens_k", "num_seqs", "attn_mask", "mask",
                 "threads", "path")

    def __init__(self, kind, q, k, *, causal=False, window=(-1, -1), softcap=0.0,
                 alibi_slopes=None, scale=None, attn_mask=None, mask=None, cu_seqlens_q=None,
                 cu_seqlens_k=None, align="bottom_right", threads=None, path="auto"):
        self.scale = None if scale is None else float(scale)
        self.causal = bool(causal)
        if window is None:
            window = (-1, -1)
        try:
            left, right = window
            self.window_left, self.window_right = int(left), int(right)
        except (TypeError, ValueError):
            raise ValueError(f"window: expected a pair of ints (left, right), got {window!r}") \
                from None
        self.top_left = _top_left(align)
        self.softcap = float(softcap)
        self.alibi_slopes = A.as_f32(kind, "alibi_slopes", A.detach(alibi_slopes))
        if (cu_seqlens_q is None) != (cu_seqlens_k is None):
            raise ValueError("cu_seqlens_q, cu_seqlens_k: expected both or neither, got one")
        self.cu_seqlens_q = A.as_i32(kind, "cu_seqlens_q", cu_seqlens_q)
        self.cu_seqlens_k = A.as_i32(kind, "cu_seqlens_k", cu_seqlens_k)
        self.num_seqs = 0 if cu_seqlens_q is None else max(0, self.cu_seqlens_q.shape[0] - 1)
        if mask is not None and not isinstance(mask, Mask):
            raise TypeError(f"mask: expected a tessera.Mask, got {type(mask).__name__}")
        if mask is not None and kind == A.TORCH:
            # Index arrays follow q's kind, as cu_seqlens do (tree() makes numpy from a list).
            index = {f: A.as_i32(kind, "mask." + f, getattr(mask, f))
                     for f in ("tree_parents", "document_ids")
                     if getattr(mask, f) is not None and not A.is_torch(getattr(mask, f))}
            if index:
                mask = dataclasses.replace(mask, **index)
        if mask is not None:
            for name, x in mask.arrays().items():
                if x is not None and A.kind_of(name, x) != kind:
                    raise TypeError(f"{name}: expected a {kind} array like q")
        self.mask = mask
        self.attn_mask = None if attn_mask is None else _broadcast_mask(kind, attn_mask, q, k,
                                                                        self.cu_seqlens_q)
        self.threads = A.threads_arg(threads)
        if path not in PATHS:
            raise ValueError(f"path: expected one of {sorted(PATHS)}, got {path!r}")
        self.path = PATHS[path]

    @property
    def sigmoid(self):
        return self.mask is not None and self.mask.sigmoid

    def forward(self, q, k, v, out, lse):
        _C.attention_forward(q, k, v, out, lse, self.scale, self.causal, self.window_left,
                             self.window_right, self.top_left, self.softcap, self.alibi_slopes,
                             self.cu_seqlens_q, self.cu_seqlens_k, self.num_seqs, self.attn_mask,
                             self.mask, self.threads, self.path)

    def backward(self, dout, q, k, v, out, lse, dq, dk, dv):
        _C.attention_backward(dout, q, k, v, out, lse, dq, dk, dv, self.scale, self.causal,
                              self.window_left, self.window_right, self.top_left, self.softcap,
                              self.alibi_slopes, self.cu_seqlens_q, self.cu_seqlens_k,
                              self.num_seqs, self.attn_mask, self.mask, self.threads, self.path)


def _broadcast_mask(kind, attn_mask, q, k, cu_seqlens_q):
    """attn_mask (bool: True = attend, or float: added to the scaled logit) as a view of shape
    [Bm, Hm, Sq, Sk] with Bm in {1, B}, Hm in {1, Hq}: dims of extent 1 along Sq and Sk are
    broadcast with stride 0 (a [B, 1, 1, Sk] padding mask is never materialized). A float mask
    other than f32 is converted to f32 once, at its own size."""
    if A.kind_of("attn_mask", attn_mask) != kind:
        raise TypeError(f"attn_mask: expected a {kind} array like q")
    if cu_seqlens_q is not None:
        raise ValueError("attn_mask: expected no dense mask with cu_seqlens (varlen batches take "
                         "causal and window masks only)")
    if kind == A.TORCH and attn_mask.requires_grad and A.torch_module().is_grad_enabled():
        raise ValueError("attn_mask: expected a mask without requires_grad (tessera computes no "
                         "gradient for an additive mask)")
    m = A.detach(attn_mask)
    name = A.dtype_name(m)
    if name not in ("bool", "u8", "f32"):
        if name in ("f16", "bf16", "f64"):
            m = A.as_f32(kind, "attn_mask", m)
        else:
            raise ValueError(f"attn_mask: expected dtype bool (True: attend) or a float dtype "
                             f"(added to the logit), got {name}")
    if len(q.shape) != 4 or len(k.shape) != 4:
        raise ValueError(f"q, k: expected [B, S, H, D] with attn_mask, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    B, Sq, Hq, _ = q.shape
    Sk = k.shape[1]
    if len(m.shape) > 4:
        raise ValueError(f"attn_mask: expected at most 4 dims, got shape {tuple(m.shape)}")
    shape = (1,) * (4 - len(m.shape)) + tuple(m.shape)
    m = m.reshape(shape)
    target = (B, Hq, Sq, Sk)
    for got, want in zip(shape, target):
        if got not in (1, want):
            raise ValueError(f"attn_mask: expected a shape broadcastable to [B, Hq, Sq, Sk] = "
                             f"{list(target)}, got {list(attn_mask.shape)}")
    wanted = (shape[0], shape[1], Sq, Sk)
    if tuple(shape) != wanted:
        if kind == A.TORCH:
            m = m.expand(*wanted)
        else:
            m = np.broadcast_to(m, wanted)
    return m


def _shapes(q, k, v, cu):
    if cu is None:
        if len(q.shape) != 4:
            raise ValueError(f"q: expected [B, Sq, Hq, D], got shape {list(q.shape)}")
        B, Sq, Hq, _ = q.shape
        return tuple(q.shape[:3]) + (v.shape[-1],), (B, Hq, Sq)
    if len(q.shape) == 3:
        total, Hq, _ = q.shape
    elif len(q.shape) == 4 and q.shape[0] == 1:
        _, total, Hq, _ = q.shape
    else:
        raise ValueError(f"q: expected [total, Hq, D] or [1, total, Hq, D] with cu_seqlens, got "
                         f"shape {list(q.shape)}")
    return tuple(q.shape[:-1]) + (v.shape[-1],), (Hq, total)


def attention_raw(kind, q, k, v, opts, want_lse):
    """The forward without autograd: allocates out (and lse when wanted or needed)."""
    out_shape, lse_shape = _shapes(q, k, v, opts.cu_seqlens_q)
    out = A.empty_like(kind, q, out_shape)
    lse = A.empty(kind, lse_shape, dtype="f32") if want_lse and not opts.sigmoid else None
    opts.forward(q, k, v, out, lse)
    return out, lse


def _attention_plain(q, k, v, causal, window, softcap, scale, align, return_lse, threads):
    """The common call (no masks, ALiBi or varlen; no autograd) with the least Python between
    the caller and the kernel: a tiny attention costs about as much as its argument handling.
    None when the general path must take the call."""
    if type(q) is np.ndarray:
        kind = A.NUMPY
    elif A.is_torch(q):
        kind = A.TORCH
        if (q.requires_grad or k.requires_grad or v.requires_grad) and torch_grad_enabled() \
                or A.torch_module().compiler.is_compiling():
            return None
    else:
        return None
    if len(q.shape) != 4 or align not in ("bottom_right", "top_left"):
        return None
    if window is None:
        left, right = -1, -1
    elif type(window) is tuple and len(window) == 2 and type(window[0]) is type(window[1]) is int:
        left, right = window
    else:
        return None  # the general path checks it (and names it in its error)
    out = A.empty_like(kind, q, q.shape)
    lse = A.empty(kind, (q.shape[0], q.shape[2], q.shape[1]), dtype="f32") if return_lse else None
    _C.attention_forward(q, k, v, out, lse, None if scale is None else float(scale), bool(causal),
                         left, right, align == "top_left", float(softcap), None, None, None, 0,
                         None, None, A.threads_arg(threads), 0)
    return (out, lse) if return_lse else out


def torch_grad_enabled():
    return A.torch_module().is_grad_enabled()


def attention(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, alibi_slopes=None,
              scale=None, attn_mask=None, mask=None, cu_seqlens_q=None, cu_seqlens_k=None,
              align="bottom_right", return_lse=False, threads=None, path="auto"):
    """Exact attention: softmax(scale * q k^T + modifiers, masked) v, FlashAttention-style.

    q [B, Sq, Hq, D], k / v [B, Sk, Hkv, D] (Hq a multiple of Hkv; any strides, read in place),
    or [total, H, D] with cu_seqlens_q / cu_seqlens_k (int32 [num_seqs + 1]). float32, bfloat16 or
    float16 (numpy: float32 / float16). Returns out [B, Sq, Hq, D] of the kind and dtype of q, and
    with return_lse the natural-log LSE, float32 [B, Hq, Sq] ([Hq, total] with cu_seqlens).

    causal / window=(left, right) are aligned bottom-right (FlashAttention) unless
    align="top_left" (PyTorch's is_causal); -1 is unbounded. softcap: s <- c * tanh(s / c).
    alibi_slopes: float32 [Hq] or [B, Hq]. attn_mask: bool (True = attend) or float (added to the
    scaled logit), broadcastable to [B, Hq, Sq, Sk] (never materialized). mask: a tessera.Mask.
    threads: worker threads (None: every hardware thread, or OMP_NUM_THREADS).

    With torch tensors that require grad, the result is differentiable (the backward is
    tessera's AttentionBackward). Bad arguments raise ValueError (TypeError for the wrong kind of
    object) and nothing is written.
    """
    if (attn_mask is None and mask is None and alibi_slopes is None and cu_seqlens_q is None
            and cu_seqlens_k is None and path == "auto" and type(q) is type(k) is type(v)):
        out = _attention_plain(q, k, v, causal, window, softcap, scale, align, return_lse,
                               threads)
        if out is not None:
            return out
    kind = A.common_kind(q=q, k=k, v=v)
    opts = AttentionOptions(kind, q, k, causal=causal, window=window, softcap=softcap,
                            alibi_slopes=alibi_slopes, scale=scale, attn_mask=attn_mask,
                            mask=mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                            align=align, threads=threads, path=path)
    if kind == A.TORCH:
        from . import _torch
        if _torch.needs_op(q, k, v, attn_mask):
            out, lse = _torch.attention_op(q, k, v, opts)
            return (out, lse) if return_lse else out
    out, lse = attention_raw(kind, q, k, v, opts, return_lse)
    return (out, lse) if return_lse else out


class AttentionStats(tuple):
    """Window statistics of attention_stats: key_mass [B, H, Sk], key_mass_sq [B, H, Sk] and
    row_entropy [B, Hq, stats_window], float32 (H = Hq, or Hkv with sum_gqa_group)."""
    __slots__ = ()
    _fields = ("key_mass", "key_mass_sq", "row_entropy")

    def __new__(cls, key_mass, key_mass_sq, row_entropy):
        return tuple.__new__(cls, (key_mass, key_mass_sq, row_entropy))

    key_mass = property(lambda self: self[0])
    key_mass_sq = property(lambda self: self[1])
    row_entropy = property(lambda self: self[2])


def attention_stats(q, k, v, stats_window, *, sum_gqa_group=False, causal=False,
                    window=(-1, -1), softcap=0.0, alibi_slopes=None, scale=None,
                    align="bottom_right", return_lse=False, threads=None, path="auto"):
    """tessera.attention plus the attention statistics of its last `stats_window` query rows,
    the observation window that SnapKV, H2O and CAKE evict by: returns (out, AttentionStats) or
    (out, lse, AttentionStats) with return_lse. With p_ij the probability of window row i on key j:
    key_mass = sum_i p_ij, key_mass_sq = sum_i p_ij^2 (per query head, or per KV head summed over
    its group with sum_gqa_group), row_entropy = -sum_j p_ij ln p_ij per window row. Dense batch
    [B, S, H, D] with causal / window / softcap / ALiBi (no mask, no cu_seqlens); no autograd.
    The statistics cost one more pass over K for the window rows only."""
    kind = A.common_kind(q=q, k=k, v=v)
    q, k, v = A.detach(q), A.detach(k), A.detach(v)
    opts = AttentionOptions(kind, q, k, causal=causal, window=window, softcap=softcap,
                            alibi_slopes=alibi_slopes, scale=scale, align=align,
                            threads=threads, path=path)
    if len(q.shape) != 4 or len(k.shape) != 4:
        raise ValueError(f"q, k: expected [B, S, H, D] (no cu_seqlens with statistics), got "
                         f"shapes {list(q.shape)} and {list(k.shape)}")
    B, Sq, Hq, _ = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    W = int(stats_window)
    heads = Hkv if sum_gqa_group else Hq
    out = A.empty(kind, q.shape, like=q)
    lse = A.empty(kind, (B, Hq, Sq), dtype="f32") if return_lse else None
    key_mass = A.empty(kind, (B, heads, Sk), dtype="f32")
    key_mass_sq = A.empty(kind, (B, heads, Sk), dtype="f32")
    row_entropy = A.empty(kind, (B, Hq, max(W, 0)), dtype="f32")
    _C.attention_stats(q, k, v, out, lse, key_mass, key_mass_sq, row_entropy, W,
                       bool(sum_gqa_group), opts.scale, opts.causal, opts.window_left,
                       opts.window_right, opts.top_left, opts.softcap, opts.alibi_slopes,
                       opts.threads, opts.path)
    stats = AttentionStats(key_mass, key_mass_sq, row_entropy)
    return (out, lse, stats) if return_lse else (out, stats)


def attention_backward(dout, q, k, v, out, lse, *, causal=False, window=(-1, -1), softcap=0.0,
                       alibi_slopes=None, scale=None, attn_mask=None, mask=None,
                       cu_seqlens_q=None, cu_seqlens_k=None, align="bottom_right", threads=None,
                       path="auto"):
    """Gradients (dq, dk, dv) of tessera.attention with the same options, from its output `out`
    and log-sum-exp `lse` (attention(..., return_lse=True)); dk / dv are summed over the query
    heads of each GQA group. Arrays of the kind and dtype of q."""
    kind = A.common_kind(dout=dout, q=q, k=k, v=v, out=out, lse=lse)
    opts = AttentionOptions(kind, q, k, causal=causal, window=window, softcap=softcap,
                            alibi_slopes=alibi_slopes, scale=scale, attn_mask=attn_mask,
                            mask=mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                            align=align, threads=threads, path=path)
    dq = A.empty(kind, q.shape, like=q)
    dk = A.empty(kind, k.shape, like=k)
    dv = A.empty(kind, v.shape, like=v)
    opts.backward(dout, q, k, v, out, lse, dq, dk, dv)
    return dq, dk, dv
