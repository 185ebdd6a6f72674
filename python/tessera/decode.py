# SPDX-License-Identifier: Apache-2.0
"""Decode over a KV cache (tessera/decode.h, tessera/kv_cache.h) and the state merge (merge.h).

    cache = tessera.KVCache(batch=2, num_kv_heads=8, head_dim=128, max_tokens=4096, dtype="int8")
    cache.append(k, v)                       # k, v [B, n, Hkv, D]: the prompt, then each step
    out = tessera.decode(q, cache, causal=True)   # q [B, Q, Hq, D], Q in 1..16
"""
import numpy as np

from . import _C
from . import _arrays as A

KV_DTYPES = ("f32", "bf16", "f16", "int8", "int4")
# Tokens per page of a paged cache (tessera/kv_cache.h; a contiguous cache takes any capacity).
MAX_PAGE_SIZE = 256


def _int(name, x, low):
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    if x < low:
        raise ValueError(f"{name}: expected >= {low}, got {x}")
    return int(x)


class KVCache:
    """One layer's KV cache, owned by tessera: contiguous (each sequence owns max_tokens slots)
    or paged (page_size tokens per page, pages taken from a shared pool as sequences grow, up to
    num_pages). dtype f32, bf16, f16, or int8 / int4 (ZipCache's channel-separable token-wise
    quantization, calibrated by the first append). Sequences grow through append; seq_lens holds
    each one's length."""

    def __init__(self, batch, num_kv_heads, head_dim, max_tokens, dtype="f16", page_size=None,
                 num_pages=None):
        self.batch = _int("batch", batch, 1)
        self.num_kv_heads = _int("num_kv_heads", num_kv_heads, 1)
        self.head_dim = _int("head_dim", head_dim, 1)
        self.max_tokens = _int("max_tokens", max_tokens, 1)
        if dtype not in KV_DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(KV_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.paged = page_size is not None
        if self.paged:
            self.page_size = _int("page_size", page_size, 1)
            if self.page_size > MAX_PAGE_SIZE:
                raise ValueError(f"page_size: expected 1..{MAX_PAGE_SIZE} tokens per page for a "
                                 f"paged cache, got {self.page_size}")
            pages_per_seq = -(-self.max_tokens // self.page_size)
            self.num_pages = (self.batch * pages_per_seq if num_pages is None
                              else _int("num_pages", num_pages, 1))
            self._block_table = np.zeros((self.batch, pages_per_seq), dtype=np.int32)
            self._pages_held = np.zeros(self.batch, dtype=np.int64)
            self._free_pages = list(range(self.num_pages - 1, -1, -1))
        else:
            if num_pages is not None:
                raise ValueError("num_pages: expected None for a contiguous cache (page_size=None)")
            self.page_size = self.max_tokens
            self.num_pages = self.batch
            self._block_table = None
        self._pool = _C.KVPool(dtype, self.num_pages, self.page_size, self.num_kv_heads,
                               self.head_dim)
        self._seq_lens = np.zeros(self.batch, dtype=np.int32)
        self._kind = A.NUMPY

    @property
    def seq_lens(self):
        """Tokens held by each sequence (a copy)."""
        return self._seq_lens.copy()

    @property
    def block_table(self):
        """The page ids of each sequence (paged caches; a copy), or None."""
        return None if self._block_table is None else self._block_table.copy()

    @property
    def nbytes(self):
        return self._pool.bytes

    def _reserve(self, n):
        """Pages for n more tokens of every sequence, all or none (a paged cache)."""
        need = [-(-(int(s) + n) // self.page_size) - int(h)
                for s, h in zip(self._seq_lens, self._pages_held)]
        total = sum(max(0, x) for x in need)
        if total > len(self._free_pages):
            raise ValueError(f"k: expected at most {len(self._free_pages)} free pages for {n} new "
                             f"tokens per sequence, got a need of {total} (num_pages="
                             f"{self.num_pages})")
        taken = []
        for b, x in enumerate(need):
            for _ in range(max(0, x)):
                page = self._free_pages.pop()
                taken.append((b, int(self._pages_held[b]), page))
                self._block_table[b, self._pages_held[b]] = page
                self._pages_held[b] += 1
        return taken

    def _release(self, taken):
        for b, slot, page in reversed(taken):
            self._pages_held[b] -= 1
            self._block_table[b, slot] = 0
            self._free_pages.append(page)

    def append(self, k, v, *, rotary_dim=0, rotary_base=10000.0, rotary_interleaved=False,
               xpos_scale_base=0.0, xpos_gamma=0.4, threads=None):
        """Appends k, v [B, n, Hkv, D] (f32 / bf16 / f16, any strides) to every sequence, with
        RoPE applied to k at its absolute positions when rotary_dim > 0 (and xPos's key scale
        zeta_c^(-p / xpos_scale_base) when xpos_scale_base > 0; rotate the queries with
        apply_rotary(..., xpos_scale_base=..., keys=False)). All or nothing: on error the cache is
        unchanged."""
        kind = A.common_kind(k=k, v=v)
        if len(k.shape) != 4:
            raise ValueError(f"k: expected [B, n, Hkv, D], got shape {list(k.shape)}")
        n = int(k.shape[1])
        if int(self._seq_lens.max(initial=0)) + n > self.max_tokens:
            raise ValueError(f"k: expected at most {self.max_tokens - int(self._seq_lens.max())} "
                             f"new tokens (max_tokens={self.max_tokens}), got {n}")
        taken = self._reserve(n) if self.paged else []
        try:
            self._pool.append(k, v, self._seq_lens, self._block_table,
                              _int("rotary_dim", rotary_dim, 0), float(rotary_base),
                              bool(rotary_interleaved), float(xpos_scale_base),
                              float(xpos_gamma), A.threads_arg(threads))
        except BaseException:
            self._release(taken)
            raise
        self._seq_lens += n
        self._kind = kind

    def read(self, b, kind=None):
        """Tokens [0, seq_lens[b]) of sequence b, dequantized: (k, v) float32 [seq_len, Hkv, D],
        numpy or torch as the last append (or `kind`: 'numpy' / 'torch')."""
        b = _int("b", b, 0)
        if b >= self.batch:
            raise ValueError(f"b: expected < batch ({self.batch}), got {b}")
        kind = kind or self._kind
        shape = (int(self._seq_lens[b]), self.num_kv_heads, self.head_dim)
        k = A.empty(kind, shape, dtype="f32")
        v = A.empty(kind, shape, dtype="f32")
        self._pool.read(b, self._seq_lens, self._block_table, k, v, 0)
        return k, v

    def clear(self):
        """Empties every sequence (and returns the pages of a paged cache to the pool)."""
        self._seq_lens[:] = 0
        if self.paged:
            self._block_table[:] = 0
            self._pages_held[:] = 0
            self._free_pages = list(range(self.num_pages - 1, -1, -1))


def decode(q, cache, *, causal=False, window_left=-1, softcap=0.0, alibi_slopes=None, scale=None,
           split_tokens=0, return_lse=False, probs=None, accumulated=None, threads=None,
           path="auto"):
    """Attention of q [B, Q, Hq, D] (Q in 1..16 new tokens per sequence, Hq a multiple of the
    cache's Hkv) over every token of each sequence of `cache` (the new ones included: append
    them first). Query row i sits at position seq_lens[b] - Q + i (bottom-right, as
    flash_attn_with_kvcache). Returns out [B, Q, Hq, D] (kind and dtype of q), and with
    return_lse the natural-log LSE, float32 [B, Hq, Q].

    Statistics for eviction (TOVA, H2O; tessera.kv_policy), written in place into arrays the
    caller owns (float32, the kind of q, S >= the longest sequence): probs [B, Hq, Q, S] receives
    the final probability of every key j < seq_lens[b] (0 where masked), and accumulated
    [B, Hkv, S] gets the sum over each KV head's query heads and rows added (H2O's running
    attention; zero it once)."""
    from ._attention import PATHS
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a tessera.KVCache, got {type(cache).__name__}")
    kind = A.kind_of("q", q)
    if len(q.shape) != 4:
        raise ValueError(f"q: expected [B, Q, Hq, D], got shape {list(q.shape)}")
    if path not in PATHS:
        raise ValueError(f"path: expected one of {sorted(PATHS)}, got {path!r}")
    B, Q, Hq, _ = q.shape
    out = A.empty(kind, q.shape, like=q)
    lse = A.empty(kind, (B, Hq, Q), dtype="f32") if return_lse else None
    cache._pool.decode(A.detach(q), cache._seq_lens, cache._block_table, out, lse,
                       None if scale is None else float(scale), bool(causal), int(window_left),
                       float(softcap), A.as_f32(kind, "alibi_slopes", A.detach(alibi_slopes)),
                       _int("split_tokens", split_tokens, 0), probs, accumulated,
                       A.threads_arg(threads), PATHS[path])
    return (out, lse) if return_lse else out


def merge_states(outs, lses, *, base2=False, threads=None):
    """Merges attention states over disjoint key sets: outs [R, T, H, D] (or a list of R
    [T, H, D] arrays), lses [R, T, H] float32 (natural log, or base 2 with base2=True; -inf: an
    empty part). Returns (out [T, H, D], lse [T, H])."""
    if isinstance(outs, (list, tuple)):
        outs, lses = _stack(outs, "outs"), _stack(lses, "lses")
    kind = A.common_kind(outs=outs, lses=lses)
    if len(outs.shape) != 4:
        raise ValueError(f"outs: expected [R, T, H, D], got shape {list(outs.shape)}")
    out = A.empty(kind, outs.shape[1:], like=outs)
    lse = A.empty(kind, outs.shape[1:3], dtype="f32")
    _C.merge_states(A.detach(outs), A.detach(lses), out, lse, bool(base2), A.threads_arg(threads))
    return out, lse


def _stack(parts, name):
    if len(parts) == 0:
        raise ValueError(f"{name}: expected at least one part, got an empty list")
    kind = A.common_kind(**{f"{name}[{i}]": p for i, p in enumerate(parts)})
    if kind == A.TORCH:
        return A.torch_module().stack([A.detach(p) for p in parts])
    return np.stack(parts)


def apply_rotary(x, positions=None, *, rotary_dim=None, base=10000.0, interleaved=False,
                 xpos_scale_base=0.0, xpos_gamma=0.4, keys=False, inplace=False, threads=None):
    """RoPE on x [B, S, H, D] (f32 / bf16 / f16): token s of sequence b at position
    positions[b] + s (positions int32 [B]; None: s). rotary_dim defaults to D; half-split (NeoX)
    pairs unless interleaved (GPT-J). xpos_scale_base > 0: xPos, pair c also scaled by
    zeta_c^(p / xpos_scale_base) (queries) or zeta_c^(-p / xpos_scale_base) (keys=True),
    zeta_c = (2c / rotary_dim + xpos_gamma) / (1 + xpos_gamma). Returns the rotated array (x
    itself with inplace=True); torch results carry no autograd history (the rotation has no
    backward)."""
    kind = A.kind_of("x", x)
    if len(x.shape) != 4:
        raise ValueError(f"x: expected [B, S, H, D], got shape {list(x.shape)}")
    y = x
    if not inplace:
        # detached: the rotation has no backward, so the copy must not carry x's autograd history
        # (a clone of x would pass gradients through as if nothing had been rotated).
        y = x.detach().clone() if kind == A.TORCH else x.copy()
    elif kind == A.TORCH and x.requires_grad:
        raise ValueError("x: expected a tensor without requires_grad for inplace=True")
    rd = int(x.shape[3]) if rotary_dim is None else _int("rotary_dim", rotary_dim, 0)
    _C.apply_rotary(A.detach(y), A.as_i32(kind, "positions", positions), rd, float(base),
                    bool(interleaved), float(xpos_scale_base), float(xpos_gamma), bool(keys),
                    A.threads_arg(threads))
    return y
