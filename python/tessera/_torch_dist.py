# SPDX-License-Identifier: Apache-2.0
"""torch autograd for tessera.distributed (imported only with torch tensors that need grad).
Each backward runs the distributed backward over the same group, so every rank must call
backward (as with any collective)."""
import torch

from . import distributed as D


class SequenceParallelAttention(torch.autograd.Function):
    """Ring attention or Ulysses: (out, lse), lse not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, algorithm, group, options):
        out, lse = D._attention_forward_raw(algorithm, group, q, k, v, options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.algorithm, ctx.group, ctx.options = algorithm, group, options
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dk, dv = D._attention_backward_raw(ctx.algorithm, ctx.group, dout, q, k, v, out, lse,
                                               ctx.options)
        return dq, dk, dv, None, None, None


class Lasp2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gates, decay, group, options):
        ctx.save_for_backward(q, k, v, gates, decay)
        ctx.group, ctx.options = group, options
        return D._lasp2_forward_raw(group, q, k, v, decay, gates, options)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, gates, decay = ctx.saved_tensors
        want_dgates = gates is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dgates = D._lasp2_backward_raw(ctx.group, dout.contiguous(), q, k, v, decay,
                                                   gates, ctx.options, want_dgates)
        return dq, dk, dv, dgates, None, None, None
