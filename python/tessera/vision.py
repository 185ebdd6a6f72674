# SPDX-License-Identifier: Apache-2.0
"""Vision attention operators (tessera/vision.h; docs/vision.md).

    out = tessera.channel_attention(q, k, v)        # q, k, v [B, N, H, dh]

DaViT's channel attention: the dh channels of a head attend to each other across the N spatial
tokens,

    A[b, h]          = softmax over c' of scale * sum_n q[b, n, h, c] k[b, n, h, c']   (dh x dh)
    out[b, n, h, c]  = sum_c' A[b, h][c, c'] v[b, n, h, c']

with scale 1 / sqrt(dh) by default (DaViT's). HaloNet, strip attention (S2AFormer / CSWin) and
SHViT are calls of tessera.attention with a neighborhood mask or on channel-sliced views, and
HiLo is tessera.approx_attention(method="hilo"): docs/vision.md shows each.
"""
from . import _C
from . import _arrays as A


def channel_attention(q, k, v, *, scale=None, threads=None):
    """DaViT channel attention: out [B, N, H, dh] in the dtype of q.

    q, k, v [B, N, H, dh]: float32 (numpy arrays or torch CPU tensors; torch bfloat16 / float16
    too, accumulated in float32), any strides, read in place. scale: the softmax scale (default
    1 / sqrt(dh)). No autograd: there is no backward, so torch tensors that require grad are
    refused while grad mode is on (detach them or run under torch.no_grad()). Bitwise identical
    for every thread count."""
    kind = A.common_kind(q=q, k=k, v=v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise ValueError(f"{name}: expected rank 4 [B, N, H, dh], got shape {list(x.shape)}")
    if (kind == A.TORCH and A.torch_module().is_grad_enabled()
            and any(x.requires_grad for x in (q, k, v))):
        raise ValueError("channel_attention has no backward: pass tensors without requires_grad "
                         "(or call it under torch.no_grad())")
    out = A.empty(kind, q.shape, like=q)
    _C.channel_attention(q, k, v, out, None if scale is None else float(scale),
                         A.threads_arg(threads))
    return out
