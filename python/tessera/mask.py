# SPDX-License-Identifier: Apache-2.0
"""Programmable masks and sparse attention: `tessera.Mask` and the functions that build one.

A Mask mirrors tessera/mask.h's MaskParams. Each builder returns a Mask with one pattern set;
`a & b` combines patterns (a key is visible when every pattern allows it, and causal, the window,
softcap and ALiBi of the call apply too). Pass it as `tessera.attention(..., mask=m)`.
Pictures of each pattern: docs/masks.md.
"""
import dataclasses
import math

from . import _C
from . import _arrays as A


@dataclasses.dataclass
class Mask:
    blocks: object = None          # u8 / bool [Bm, Hm, ceil(Sq / block_q), ceil(Sk / block_k)]
    block_q: int = 0
    block_k: int = 0
    neighborhood: tuple = None     # per axis: (length, window, dilation, stride, causal)
    sink_tokens: int = 0
    prefix_len: int = 0
    document_ids: object = None    # i32 [Bm, Sk]
    group_size: int = 0
    shift_half_heads: bool = True
    tree_parents: object = None    # i32 [Sq]
    dense: object = None           # bool / u8 / f32 [Sq, Sk] or [Bm, Hm, Sq, Sk]
    sigmoid: bool = False
    sigmoid_bias: float = 0.0

    def __and__(self, other):
        if not isinstance(other, Mask):
            return NotImplemented
        merged = Mask()
        default = Mask()
        for field in dataclasses.fields(Mask):
            a, b = getattr(self, field.name), getattr(other, field.name)
            d = getattr(default, field.name)
            set_a, set_b = not _same(a, d), not _same(b, d)
            if set_a and set_b and not _same(a, b):
                raise ValueError(f"mask: both masks set '{field.name}'; combine them into one")
            setattr(merged, field.name, a if set_a else b)
        return merged

    def arrays(self):
        return {"mask.blocks": self.blocks, "mask.document_ids": self.document_ids,
                "mask.tree_parents": self.tree_parents, "mask.dense": self.dense}


def _same(a, b):
    if a is None or b is None:
        return a is b
    if A.is_torch(a) or hasattr(a, "shape"):
        return a is b
    return a == b


def _int(name, x, low=None):
    if isinstance(x, bool) or not isinstance(x, int):
        try:
            import numpy as np
            if isinstance(x, np.integer):
                x = int(x)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"{name}: expected an int, got {type(x).__name__}") from None
    if low is not None and x < low:
        raise ValueError(f"{name}: expected >= {low}, got {x}")
    return x


def _block(name, x):
    """A block size of a block mask: a positive multiple of 16 up to 2^30 (tessera/mask.h)."""
    x = _int(name, x)
    if x <= 0 or x % 16 != 0 or x > (1 << 30):
        raise ValueError(f"{name}: expected a positive multiple of 16 up to 2^30, got {x}")
    return x


def _per_axis(name, value, rank):
    if isinstance(value, (tuple, list)):
        if len(value) != rank:
            raise ValueError(f"{name}: expected {rank} values (one per axis), got {len(value)}")
        return tuple(value)
    return (value,) * rank


def blocks(block_mask, block_q, block_k):
    """Block-sparse attention: block_mask u8 / bool [Bm, Hm, ceil(Sq / block_q),
    ceil(Sk / block_k)] (nonzero: the block is computed), Bm in {1, B}, Hm in {1, Hq}."""
    A.kind_of("block_mask", block_mask)
    return Mask(blocks=block_mask, block_q=_int("block_q", block_q),
                block_k=_int("block_k", block_k))


def neighborhood(grid, window, dilation=1, stride=1, causal=False):
    """Neighborhood attention (NATTEN) over a 1-, 2- or 3-D grid of tokens in row-major order:
    `grid`, `window`, `dilation`, `stride` and `causal` are one value per axis (or one for all).
    """
    grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
    rank = len(grid)
    if not 1 <= rank <= 3:
        raise ValueError(f"grid: expected 1 to 3 axes, got {rank}")
    axes = tuple(
        (_int("grid", g), _int("window", w), _int("dilation", d), _int("stride", s), bool(c))
        for g, w, d, s, c in zip(grid, _per_axis("window", window, rank),
                                 _per_axis("dilation", dilation, rank),
                                 _per_axis("stride", stride, rank),
                                 _per_axis("causal", causal, rank)))
    return Mask(neighborhood=axes)


def sinks(sink_tokens):
    """Attention sinks (StreamingLLM): keys [0, sink_tokens) stay visible past the window's left
    bound (use with `window=` of the call)."""
    return Mask(sink_tokens=_int("sink_tokens", sink_tokens, 0))


def prefix(prefix_len):
    """Prefix-LM: keys [0, prefix_len) visible to every query (with causal: a causal suffix)."""
    return Mask(prefix_len=_int("prefix_len", prefix_len, 0))


def documents(document_ids):
    """Packed documents: i32 [Sk] or [Bm, Sk] document ids, non-decreasing; a query sees only
    keys of its own document."""
    kind = A.kind_of("document_ids", document_ids)
    ids = A.as_i32(kind, "document_ids", document_ids)
    if len(ids.shape) == 1:
        ids = ids.reshape(1, ids.shape[0])
    return Mask(document_ids=ids)


def tree(parents):
    """Tree verification (speculative decoding): parents i32 [Sq], parents[t] in [-1, t); the Sq
    queries are the last Sq keys; node t sees the prefix, its ancestors and itself."""
    kind = A.kind_of("parents", parents) if not isinstance(parents, (list, tuple)) else A.NUMPY
    return Mask(tree_parents=A.as_i32(kind, "parents", parents))


def groups(group_size, shift_half_heads=True):
    """LongLoRA's shifted sparse attention (S^2-Attn): attention within groups of `group_size`
    tokens, heads [Hq/2, Hq) rolled by half a group when shift_half_heads."""
    return Mask(group_size=_int("group_size", group_size, 1),
                shift_half_heads=bool(shift_half_heads))


longlora_shift = groups


def dense(mask):
    """A dense mask: bool / u8 (True: visible) or f32 (added to the logit), [Sq, Sk] or
    [Bm, Hm, Sq, Sk]. `attention(attn_mask=...)` also broadcasts one."""
    A.kind_of("mask", mask)
    return Mask(dense=mask)


def sigmoid(bias=0.0):
    """FlashSigmoid: weights 1 / (1 + exp(-(s + bias))) instead of the softmax (no LSE)."""
    return Mask(sigmoid=True, sigmoid_bias=float(bias))


def _block_mask_array(kind, shape):
    import numpy as np
    if kind == A.TORCH:
        torch = A.torch_module()
        return torch.empty(shape, dtype=torch.uint8)
    return np.empty(shape, dtype=np.uint8)


def s2(heads, seq_q, seq_k, block, local_blocks=1, vert_stride=1, offset=0, causal=True,
       kind=A.NUMPY, threads=None):
    """S2-Attention's heterogeneous context sharding as a block mask over blocks of `block`
    tokens (docs/algorithms.md §4.3)."""
    block = _block("block", block)
    nq = -(-_int("seq_q", seq_q, 0) // block)
    nk = -(-_int("seq_k", seq_k, 0) // block)
    out = _block_mask_array(kind, (1, _int("heads", heads, 1), nq, nk))
    _C.build_s2(out, heads, nq, nk, _int("local_blocks", local_blocks),
                _int("vert_stride", vert_stride), _int("offset", offset), bool(causal),
                A.threads_arg(threads))
    return Mask(blocks=out, block_q=block, block_k=block)


def radial(frames, tokens_per_frame, block=128, decay_factor=1.0, kind=A.NUMPY, threads=None):
    """Radial attention's static video mask (docs/algorithms.md §4.6) as a block mask."""
    n = _int("frames", frames, 0) * _int("tokens_per_frame", tokens_per_frame, 0)
    block = _int("block", block, 1)
    nb = -(-n // block)
    out = _block_mask_array(kind, (1, 1, nb, nb))
    _C.build_radial(out, frames, tokens_per_frame, block, float(decay_factor),
                    A.threads_arg(threads))
    return Mask(blocks=out, block_q=block, block_k=block)


def select_blocks(q, k, block_q=64, block_k=64, top_k=0, threshold=0.0, scale=None,
                  causal=False, align="bottom_right", scores=None, threads=None):
    """Content-based block selection (SeerAttention without learned gates, MoBA): pooled q.k
    gate scores (or the caller's `scores`), top_k blocks or a cumulative-mass threshold per
    query block; returns the block Mask for the same q and k."""
    kind = A.common_kind(q=q, k=k, scores=scores)
    q, k, scores = A.detach(q), A.detach(k), A.detach(scores)
    if len(q.shape) != 4 or len(k.shape) != 4:
        raise ValueError(f"q, k: expected [B, S, H, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    bq, bk = _int("block_q", block_q, 1), _int("block_k", block_k, 1)
    shape = (q.shape[0], q.shape[2], -(-q.shape[1] // bq), -(-k.shape[1] // bk))
    out = _block_mask_array(kind, shape)
    _C.select_blocks(q, k, scores, out, bq, bk, _int("top_k", top_k, 0), float(threshold),
                     None if scale is None else float(scale), bool(causal),
                     _top_left(align), A.threads_arg(threads))
    return Mask(blocks=out, block_q=bq, block_k=bk)


def _top_left(align):
    if align not in ("bottom_right", "top_left"):
        raise ValueError(f"align: expected 'bottom_right' or 'top_left', got {align!r}")
    return align == "top_left"


def default_sigmoid_bias(seq_k):
    """FlashSigmoid's suggested bias, -log(Sk)."""
    return -math.log(max(1, seq_k))
