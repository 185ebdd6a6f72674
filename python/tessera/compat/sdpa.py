# SPDX-License-Identifier: Apache-2.0
"""torch.nn.functional.scaled_dot_product_attention, computed by tessera.

    from tessera.compat.sdpa import scaled_dot_product_attention, patch
    out = scaled_dot_product_attention(q, k, v, is_causal=True)   # q [B, H, L, E]
    with patch():            # every supported CPU call of torch's SDPA goes to tessera
        model(inputs)

PyTorch's semantics exactly: query [..., Hq, L, E], key / value [..., Hkv, S, E]; is_causal is
aligned top-left (query i sees keys j <= i); a bool attn_mask is True where attention is allowed,
a float one is added to the scaled scores; both broadcast to [B, Hq, L, S]; scale defaults to
1 / sqrt(E); Hq != Hkv needs enable_gqa=True. Inputs are read in place through transposed views
(no copies); the output is a contiguous [..., Hq, L, E] tensor, differentiable when the inputs
require grad.
"""
import contextlib
import threading

from .. import _arrays as A
from .._attention import attention

_original = None
_lock = threading.Lock()
_depth = 0
calls = {"tessera": 0, "torch": 0}  # routed calls inside patch(), for inspection and tests


def unsupported_reason(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                       scale=None, enable_gqa=False):
    """Why tessera cannot take this call (a string), or None when it can."""
    torch = A.torch_module()
    if torch is None:
        return "torch is not imported"
    tensors = [query, key, value] + ([attn_mask] if attn_mask is not None else [])
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "arguments are not all tensors"
    if any(t.device.type != "cpu" for t in tensors):
        return "not on the CPU"
    if any(t.is_nested or t.layout != torch.strided for t in tensors):
        return "nested or sparse tensors"
    if dropout_p != 0.0:
        return "dropout"
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {query.dtype}"
    if key.dtype != query.dtype or value.dtype != query.dtype:
        return "mixed dtypes"
    if query.dim() < 3 or query.dim() > 4 or key.dim() != query.dim() or \
            value.dim() != query.dim():
        return "not 3 or 4 dims"
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        return "value head dim differs from the query's"
    if query.shape[-1] > 512 or query.shape[-1] == 0:
        return "head dim outside 1..512"
    hq, hkv = query.shape[-3], key.shape[-3]
    if value.shape[-3] != hkv or key.shape[-2] != value.shape[-2]:
        return "key and value shapes differ"
    if hq != hkv and (not enable_gqa or hkv == 0 or hq % hkv != 0):
        return "head counts differ without enable_gqa"
    if query.dim() == 4 and (key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]):
        return "batch sizes differ"
    if attn_mask is not None:
        if is_causal:
            return "attn_mask with is_causal"
        if attn_mask.requires_grad:
            return "a mask that requires grad"
        if attn_mask.dtype not in (torch.bool, torch.float32, torch.bfloat16, torch.float16,
                                   torch.float64):
            return f"mask dtype {attn_mask.dtype}"
        if attn_mask.dim() > 4:
            return "mask with more than 4 dims"
        target = (query.shape[0] if query.dim() == 4 else 1, hq, query.shape[-2], key.shape[-2])
        shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
        if any(s not in (1, t) for s, t in zip(shape, target)):
            return "mask not broadcastable"
    return None


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention's contract, computed by tessera.
    Raises ValueError for what tessera does not support (dropout, CUDA tensors, ...)."""
    reason = unsupported_reason(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                enable_gqa)
    if reason is not None:
        raise ValueError(f"scaled_dot_product_attention: tessera does not support this call "
                         f"({reason})")
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if attn_mask is not None and attn_mask.dim() == 4:
            raise ValueError("attn_mask: expected at most 3 dims for 3-dim inputs")
    # [B, H, L, E] -> [B, L, H, E]: views, read in place; the output comes back in q's memory
    # order, so its transpose is a contiguous [B, H, L, E] tensor as torch returns.
    out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                    causal=is_causal, align="top_left", scale=scale, attn_mask=attn_mask)
    out = out.transpose(1, 2)
    return out.squeeze(0) if squeeze else out


def _routed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
            enable_gqa=False):
    if unsupported_reason(query, key, value, attn_mask, dropout_p, is_causal, scale,
                          enable_gqa) is None:
        calls["tessera"] += 1
        return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                            scale, enable_gqa)
    calls["torch"] += 1
    kwargs = {"enable_gqa": enable_gqa} if enable_gqa else {}
    return _original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                     is_causal=is_causal, scale=scale, **kwargs)


@contextlib.contextmanager
def patch():
    """Routes torch.nn.functional.scaled_dot_product_attention to tessera for the CPU calls it
    supports (and to PyTorch's own function for the rest: CUDA tensors, dropout, ...) while the
    context is active. Nests; restores the original on exit."""
    global _original, _depth
    import torch.nn.functional as F
    with _lock:
        if _depth == 0:
            _original = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _routed
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                F.scaled_dot_product_attention = _original
