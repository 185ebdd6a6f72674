# SPDX-License-Identifier: Apache-2.0
"""tessera's linear attention as torch operators (imported only once the caller uses torch
tensors).

tessera::linear_fwd (chunked or recurrent forward, optionally with states) and
tessera::linear_bwd (LinearAttentionBackward: dq, dk, dv and dgates) are registered with
torch.library.custom_op, with fake implementations and register_autograd, so autograd,
torch.compile (fullgraph=True) and torch.library.opcheck work through them. A plain inference
call (no tensor requires grad, not under torch.compile) calls the kernel directly.

What has no gradient here: decay (the per-head lambda), LRPE's angles lrpe_theta (fixed
frequencies, as in TransNormer), the state inputs and outputs and BASED's window part
(LinearAttentionBackward does not implement them). Asking autograd for them raises ValueError up
front rather than returning a wrong gradient. With LRPE the gradients of q, k and v are
LinearAttentionBackward's for the same lrpe_theta and position_offset.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._torch import needs_op as _needs_op
from .linear import LinearOptions, state_shapes

__all__ = ["needs_op", "linear_op"]


def needs_op(*tensors):
    """True when the call must go through the registered op: under torch.compile, or when
    autograd has to record it."""
    return _needs_op(*tensors)


def _empty0():
    return torch.empty((0,), dtype=torch.float32)


@torch.library.custom_op("tessera::linear_fwd", mutates_args=())
def linear_fwd(q: Tensor, k: Tensor, v: Tensor, decay: Optional[Tensor], gates: Optional[Tensor],
               lrpe_theta: Optional[Tensor], initial_state: Optional[Tensor],
               initial_normalizer: Optional[Tensor], feature_map: str, ints: List[int],
               floats: List[float], position_offset: int, recurrent: bool,
               return_state: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """out [B, S, Hq, Dv]; final state [B, Hq, F, Dv] and normalizer [B, Hq, F] (float32) when
    return_state (the normalizer only with normalize), else empty [0] tensors. F doubles with
    lrpe_theta (LRPE, positions from position_offset)."""
    opts = LinearOptions.unpack(feature_map, ints, floats, position_offset)
    out = torch.empty(tuple(q.shape[:3]) + (v.shape[3],), dtype=q.dtype)
    state, norm = _empty0(), _empty0()
    if return_state:
        state_shape, norm_shape = state_shapes(q, v, feature_map, lrpe_theta is not None)
        state = torch.empty(state_shape, dtype=torch.float32)
        if opts.normalize:
            norm = torch.empty(norm_shape, dtype=torch.float32)
    opts.forward(recurrent, q, k, v, out, decay, gates, lrpe_theta, initial_state,
                 initial_normalizer, state if return_state else None,
                 norm if return_state and opts.normalize else None)
    return out, state, norm


@linear_fwd.register_fake
def _(q, k, v, decay, gates, lrpe_theta, initial_state, initial_normalizer, feature_map, ints,
      floats, position_offset, recurrent, return_state):
    out = q.new_empty(tuple(q.shape[:3]) + (v.shape[3],))
    normalize = bool(ints[2])
    if not return_state:
        return out, q.new_empty((0,), dtype=torch.float32), q.new_empty((0,), dtype=torch.float32)
    state_shape, norm_shape = state_shapes(q, v, feature_map, lrpe_theta is not None)
    return (out, q.new_empty(state_shape, dtype=torch.float32),
            q.new_empty(norm_shape if normalize else (0,), dtype=torch.float32))


@torch.library.custom_op("tessera::linear_bwd", mutates_args=())
def linear_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, decay: Optional[Tensor],
               gates: Optional[Tensor], lrpe_theta: Optional[Tensor], feature_map: str,
               ints: List[int], floats: List[float],
               position_offset: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv (dtypes of q, k, v) and dgates (float32, the shape of gates; empty [0] without
    gates)."""
    opts = LinearOptions.unpack(feature_map, ints, floats, position_offset)
    dq = torch.empty(q.shape, dtype=q.dtype)
    dk = torch.empty(k.shape, dtype=k.dtype)
    dv = torch.empty(v.shape, dtype=v.dtype)
    dgates = torch.empty(gates.shape, dtype=torch.float32) if gates is not None else _empty0()
    opts.backward(dout, q, k, v, dq, dk, dv, dgates if gates is not None else None, decay, gates,
                  lrpe_theta)
    return dq, dk, dv, dgates


@linear_bwd.register_fake
def _(dout, q, k, v, decay, gates, lrpe_theta, feature_map, ints, floats, position_offset):
    dgates = (q.new_empty(gates.shape, dtype=torch.float32) if gates is not None
              else q.new_empty((0,), dtype=torch.float32))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dgates


def _setup_context(ctx, inputs, output):
    (q, k, v, decay, gates, lrpe_theta, initial_state, initial_normalizer, feature_map, ints,
     floats, position_offset, recurrent, return_state) = inputs
    ctx.save_for_backward(q, k, v, decay, gates, lrpe_theta)
    ctx.feature_map, ctx.ints, ctx.floats = feature_map, ints, floats
    ctx.position_offset = position_offset
    ctx.has_state = initial_state is not None or initial_normalizer is not None or return_state
    _, state, norm = output
    ctx.mark_non_differentiable(state, norm)


def _backward(ctx, dout, dstate, dnorm):
    q, k, v, decay, gates, lrpe_theta = ctx.saved_tensors
    if ctx.has_state or ctx.ints[3] > 0:
        # linear_op refuses these calls up front; a direct call of the op lands here.
        raise ValueError("tessera::linear_fwd: the backward does not support states or the "
                         "window (LinearAttentionBackward)")
    # dout is read in place, any strides (an expanded one from .sum() included).
    dq, dk, dv, dgates = linear_bwd(dout, q, k, v, decay, gates, lrpe_theta, ctx.feature_map,
                                    ctx.ints, ctx.floats, ctx.position_offset)
    # No gradient for decay, lrpe_theta, the states and the non-tensor arguments.
    return (dq, dk, dv, None, dgates if gates is not None else None, None, None, None, None,
            None, None, None, None, None)


linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def _requires_grad(t):
    return t is not None and t.requires_grad


def linear_op(recurrent, q, k, v, decay, gates, lrpe_theta, initial_state, initial_normalizer,
              return_state, opts):
    """The forward through the registered op; returns (out, state or None, normalizer or
    None). Refuses, with ValueError, what the backward cannot differentiate."""
    grad = torch.is_grad_enabled()
    if grad and _requires_grad(decay):
        raise ValueError("decay: expected a tensor without requires_grad (tessera computes no "
                         "gradient for the per-head decay; detach it, or use gates for a "
                         "learned decay)")
    if grad and _requires_grad(lrpe_theta):
        raise ValueError("lrpe_theta: expected a tensor without requires_grad (tessera computes "
                         "no gradient for LRPE's angles; detach them)")
    for name, t in (("initial_state", initial_state), ("initial_normalizer", initial_normalizer)):
        if grad and _requires_grad(t):
            raise ValueError(f"{name}: expected a tensor without requires_grad (tessera's "
                             f"linear-attention backward has no gradient for the states)")
    if grad and any(_requires_grad(t) for t in (q, k, v, gates)):
        if initial_state is not None or initial_normalizer is not None:
            raise ValueError("initial_state: tessera's linear-attention backward does not support "
                             "a state input; q, k, v or gates require grad (use torch.no_grad() "
                             "for inference with a state)")
        if return_state:
            raise ValueError("return_state: tessera's linear-attention backward does not support "
                             "a state output; q, k, v or gates require grad (use torch.no_grad() "
                             "for inference with a state)")
        if opts.window > 0:
            raise ValueError(f"window: the gradient of BASED's sliding-window part is not "
                             f"implemented; q, k, v or gates require grad (window = "
                             f"{opts.window})")
    feature_map, ints, floats = opts.pack()
    out, state, norm = linear_fwd(q, k, v, decay, gates, lrpe_theta, initial_state,
                                  initial_normalizer, feature_map, ints, floats,
                                  opts.position_offset, bool(recurrent), bool(return_state))
    if not return_state:
        return out, None, None
    return out, state, (norm if opts.normalize else None)
