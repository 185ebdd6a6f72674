# SPDX-License-Identifier: Apache-2.0
"""Autograd for tessera's approximate methods with a backward (imported only once the caller
passes torch tensors that require grad): a torch.autograd.Function whose backward is
ApproxAttentionBackward with the forward's method, options and seed (the same random draws)."""
import torch

from . import _arrays as A
from . import approx as _approx


class ApproxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, config):
        method, causal, scale, seed, opts, threads = config
        out, _, _ = _approx._forward_raw(A.TORCH, method, q, k, v, bool(causal), scale, seed, opts,
                                         False, False, threads)
        ctx.save_for_backward(q, k, v)
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v = ctx.saved_tensors
        method, causal, scale, seed, opts, threads = ctx.config
        dq, dk, dv = _approx.backward_raw(A.TORCH, method, dout.contiguous(), q, k, v,
                                          bool(causal), scale, seed, opts, threads)
        return dq, dk, dv, None
