# SPDX-License-Identifier: Apache-2.0
"""tessera's attention as torch operators (imported only once the caller uses torch tensors).

tessera::attention_fwd and tessera::attention_bwd are registered with torch.library.custom_op,
with fake (meta) implementations and register_autograd, so autograd, torch.compile
(fullgraph=True) and torch.library.opcheck work through them. A plain inference call (no tensor
requires grad, not under torch.compile) skips the dispatcher and calls the kernel directly.
"""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._attention import AttentionOptions, _shapes
from .mask import Mask


def needs_op(*tensors):
    """True when the call must go through the registered op: under torch.compile, or when
    autograd has to record it."""
    if torch.compiler.is_compiling():
        return True
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


# ---- Options <-> the op's flat arguments (custom ops take tensors, ints and floats only) ------

def _pack(opts):
    m = opts.mask or Mask()
    axes = m.neighborhood or ()
    nb = [list(axes[a]) if a < len(axes) else [1, 1, 1, 1, 0] for a in range(3)]
    ints = [int(opts.causal), opts.window_left, opts.window_right, int(opts.top_left),
            opts.num_seqs, opts.threads, opts.path, m.block_q, m.block_k, len(axes)]
    for field in range(5):
        ints += [int(nb[a][field]) for a in range(3)]
    ints += [m.sink_tokens, m.prefix_len, m.group_size, int(m.shift_half_heads), int(m.sigmoid),
             int(opts.mask is not None)]
    floats = [math.nan if opts.scale is None else opts.scale, opts.softcap, m.sigmoid_bias]
    tensors = [opts.alibi_slopes, opts.cu_seqlens_q, opts.cu_seqlens_k, opts.attn_mask, m.blocks,
               m.document_ids, m.tree_parents, m.dense]
    return tensors, ints, floats


def _unpack(tensors, ints, floats):
    opts = AttentionOptions.__new__(AttentionOptions)
    (opts.alibi_slopes, opts.cu_seqlens_q, opts.cu_seqlens_k, opts.attn_mask, blocks, doc, tree,
     dense) = tensors
    (causal, opts.window_left, opts.window_right, top_left, opts.num_seqs, opts.threads,
     opts.path, block_q, block_k, rank) = ints[:10]
    fields = [ints[10 + 3 * f:13 + 3 * f] for f in range(5)]
    sink, prefix, group, shift, sigmoid, has_mask = ints[25:31]
    opts.causal, opts.top_left = bool(causal), bool(top_left)
    scale, opts.softcap, sigmoid_bias = floats
    opts.scale = None if math.isnan(scale) else scale
    opts.mask = None
    if has_mask:
        axes = tuple((fields[0][a], fields[1][a], fields[2][a], fields[3][a], bool(fields[4][a]))
                     for a in range(rank)) or None
        opts.mask = Mask(blocks=blocks, block_q=block_q, block_k=block_k, neighborhood=axes,
                         sink_tokens=sink, prefix_len=prefix, document_ids=doc, group_size=group,
                         shift_half_heads=bool(shift), tree_parents=tree, dense=dense,
                         sigmoid=bool(sigmoid), sigmoid_bias=sigmoid_bias)
    return opts


# ---- The operators ---------------------------------------------------------------------------

@torch.library.custom_op("tessera::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, tensors: List[Optional[Tensor]],
                  ints: List[int], floats: List[float]) -> Tuple[Tensor, Tensor]:
    opts = _unpack(tensors, ints, floats)
    out_shape, lse_shape = _shapes(q, k, v, opts.cu_seqlens_q)
    out = torch.empty_like(q) if tuple(out_shape) == tuple(q.shape) else q.new_empty(out_shape)
    if opts.sigmoid:
        lse = torch.empty((0,), dtype=torch.float32)
        opts.forward(q, k, v, out, None)
    else:
        lse = torch.empty(lse_shape, dtype=torch.float32)
        opts.forward(q, k, v, out, lse)
    return out, lse


@attention_fwd.register_fake
def _(q, k, v, tensors, ints, floats):
    cu_q = tensors[1]
    out_shape, lse_shape = _shapes(q, k, v, cu_q)
    sigmoid = bool(ints[29]) and bool(ints[30])
    out = torch.empty_like(q) if tuple(out_shape) == tuple(q.shape) else q.new_empty(out_shape)
    return out, q.new_empty((0,) if sigmoid else lse_shape, dtype=torch.float32)


@torch.library.custom_op("tessera::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  tensors: List[Optional[Tensor]], ints: List[int],
                  floats: List[float]) -> Tuple[Tensor, Tensor, Tensor]:
    opts = _unpack(tensors, ints, floats)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    opts.backward(dout, q, k, v, out, None if opts.sigmoid else lse, dq, dk, dv)
    return dq, dk, dv


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, tensors, ints, floats):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, tensors, ints, floats = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *[t for t in tensors if t is not None])
    ctx.present = [t is not None for t in tensors]
    ctx.ints, ctx.floats = ints, floats
    # As in flash_attn, the LSE is an output without a gradient.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *saved = ctx.saved_tensors
    it = iter(saved)
    tensors = [next(it) if present else None for present in ctx.present]
    dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, tensors, ctx.ints, ctx.floats)
    return dq, dk, dv, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention_op(q, k, v, opts):
    """The forward through the registered op; returns (out, lse or None)."""
    tensors, ints, floats = _pack(opts)
    out, lse = attention_fwd(q, k, v, tensors, ints, floats)
    return out, (None if opts.sigmoid else lse)
