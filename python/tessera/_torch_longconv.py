# SPDX-License-Identifier: Apache-2.0
"""Autograd for tessera's long convolutions (imported only once the caller passes torch tensors
that require grad): torch.autograd.Functions whose forward is LongConv1D / H3Layer and whose
backward is LongConv1DBackward / H3LayerBackward, asked only for the gradients autograd needs.
The inputs are saved as given (no copies) and read in place, with their strides, by both."""
import torch

from . import _arrays as A
from . import longconv as _lc


class LongConv1DFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, filter, bias, path, threads):
        y = _lc.conv_forward_raw(A.TORCH, u, filter, bias, path, threads)
        ctx.save_for_backward(u, filter, bias)
        ctx.path, ctx.threads = path, threads
        return y

    @staticmethod
    def backward(ctx, dy):
        u, filter, bias = ctx.saved_tensors
        want_du, want_dfilter, want_dbias = ctx.needs_input_grad[:3]
        # dy is read in place, any strides (the stride-0 expansion of y.sum() included).
        du, dfilter, dbias = _lc.conv_backward_raw(A.TORCH, dy, u, filter, bias, want_du,
                                                   want_dfilter, want_dbias, ctx.path,
                                                   ctx.threads)
        return du, dfilter, dbias, None, None


class H3Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, shift_filter, shift_bias, ssm_filter, ssm_bias, path, threads):
        out = _lc.h3_forward_raw(A.TORCH, q, k, v, shift_filter, shift_bias, ssm_filter, ssm_bias,
                                 path, threads)
        ctx.save_for_backward(q, k, v, shift_filter, shift_bias, ssm_filter, ssm_bias)
        ctx.path, ctx.threads = path, threads
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, shift_filter, shift_bias, ssm_filter, ssm_bias = ctx.saved_tensors
        grads = _lc.h3_backward_raw(A.TORCH, dout, q, k, v, shift_filter, shift_bias, ssm_filter,
                                    ssm_bias, ctx.needs_input_grad[:7], ctx.path, ctx.threads)
        return (*grads, None, None)
