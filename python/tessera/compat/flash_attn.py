# SPDX-License-Identifier: Apache-2.0
"""flash_attn 2.x's functions, computed by tessera on the CPU.

    from tessera.compat.flash_attn import flash_attn_func
    out = flash_attn_func(q, k, v, causal=True)     # q [B, S, H, D], k / v [B, S, Hkv, D]

flash_attn's semantics: layout [batch, seqlen, heads, head_dim]; causal and window_size=(left,
right) aligned to the bottom-right corner when seqlen_q != seqlen_k; softmax_scale defaults to
1 / sqrt(head_dim); alibi_slopes float32 [H] or [B, H]; softcap on the scaled scores; the LSE is
natural-log, [B, H, S] (varlen: [H, total]). tessera has no dropout and does not return the
attention probabilities: dropout_p > 0 and return_attn_probs=True are ValueErrors. Every call is
deterministic (`deterministic` is accepted and has nothing to switch). Differentiable under torch.
"""

from .. import _arrays as A
from .._attention import attention


def _check_unsupported(dropout_p, return_attn_probs):
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p: tessera has no attention dropout; expected 0.0, got "
                         f"{dropout_p}")
    if return_attn_probs:
        raise ValueError("return_attn_probs: tessera never materializes the attention "
                         "probabilities; expected False, got True")


def _call(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_size, softcap,
          alibi_slopes, return_lse):
    return attention(q, k, v, causal=causal, window=window_size, softcap=softcap,
                     alibi_slopes=alibi_slopes, scale=softmax_scale, cu_seqlens_q=cu_seqlens_q,
                     cu_seqlens_k=cu_seqlens_k, return_lse=return_lse)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                    return_attn_probs=False):
    """q [B, Sq, H, D], k / v [B, Sk, Hkv, D] -> out [B, Sq, H, D]."""
    _check_unsupported(dropout_p, return_attn_probs)
    return _call(q, k, v, None, None, softmax_scale, causal, window_size, softcap, alibi_slopes,
                 False)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """qkv [B, S, 3, H, D] (read in place through strided views) -> out [B, S, H, D]."""
    _check_unsupported(dropout_p, return_attn_probs)
    _expect_packed("qkv", qkv, 5, 3)
    return _call(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None, None, softmax_scale, causal,
                 window_size, softcap, alibi_slopes, False)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """q [B, Sq, H, D], kv [B, Sk, 2, Hkv, D] -> out [B, Sq, H, D]."""
    _check_unsupported(dropout_p, return_attn_probs)
    _expect_packed("kv", kv, 5, 2)
    return _call(q, kv[:, :, 0], kv[:, :, 1], None, None, softmax_scale, causal, window_size,
                 softcap, alibi_slopes, False)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """Packed sequences: q [total_q, H, D], k / v [total_k, Hkv, D], cu_seqlens int32
    [batch + 1] -> out [total_q, H, D]. max_seqlen_* are accepted for compatibility (tessera
    reads the lengths from cu_seqlens)."""
    _check_unsupported(dropout_p, return_attn_probs)
    if block_table is not None:
        raise ValueError("block_table: paged K/V in flash_attn_varlen_func is not supported by "
                         "tessera; use flash_attn_with_kvcache or tessera.KVCache")
    return _call(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, window_size,
                 softcap, alibi_slopes, False)


def _expect_packed(name, x, rank, count):
    A.kind_of(name, x)
    if len(x.shape) != rank or x.shape[2] != count:
        raise ValueError(f"{name}: expected shape [B, S, {count}, H, D], got {list(x.shape)}")


def _rotate(x, cos, sin, positions, interleaved):
    """RoPE with the caller's cos / sin tables [seqlen_ro, rotary_dim / 2] on x [B, S, H, D] at
    positions [B, S] (torch), as flash_attn's apply_rotary_emb: returns a new tensor."""
    torch = A.torch_module()
    half = cos.shape[1]
    rd = 2 * half
    c = cos[positions].unsqueeze(2).to(torch.float32)  # [B, S, 1, rd / 2]
    s = sin[positions].unsqueeze(2).to(torch.float32)
    xr = x[..., :rd].to(torch.float32)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                            rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                            cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """Decode / chunked prefill over the caller's KV cache, flash_attn's contract:
    q [B, Sq, H, D]; k_cache / v_cache [B_cache, S_cache, Hkv, D], or with block_table (int32
    [B, max_blocks]) paged [num_blocks, block_size, Hkv, D]; cache_seqlens int or int32 [B]
    (tokens already in the cache; None: the whole cache). When k / v [B, Sk_new, Hkv, D] are
    given they are written into the cache in place at positions cache_seqlens and on (after
    RoPE with rotary_cos / rotary_sin [seqlen_ro, rotary_dim / 2] on k, and on q at the same
    positions when causal or windowed, else at cache_seqlens), and attention runs over
    cache_seqlens + Sk_new keys per sequence. torch tensors only (the cache is updated in
    place). Returns out [B, Sq, H, D] and, with return_softmax_lse, the LSE [B, H, Sq]."""
    torch = A.torch_module()
    if torch is None or not A.is_torch(q):
        raise TypeError("q: flash_attn_with_kvcache expects torch tensors (it updates the cache "
                        "in place)")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not A.is_torch(x):
            raise TypeError(f"{name}: expected a torch tensor, got {type(x).__name__}")
    if cache_leftpad is not None:
        raise ValueError("cache_leftpad: not supported by tessera (expected None)")
    if (k is None) != (v is None):
        raise ValueError("k, v: expected both or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos, rotary_sin: expected both or neither")
    if len(q.shape) != 4:
        raise ValueError(f"q: expected [B, Sq, H, D], got shape {list(q.shape)}")
    B, Sq = q.shape[0], q.shape[1]
    n_new = 0 if k is None else k.shape[1]
    paged = block_table is not None
    page = k_cache.shape[1]
    capacity = block_table.shape[1] * page if paged else k_cache.shape[1]
    if cache_seqlens is None:
        # flash_attn: without lengths every sequence is the whole cache
        if k is not None:
            raise ValueError("cache_seqlens: expected the cache lengths when k / v are appended, "
                             "got None")
        lens = torch.full((B,), capacity, dtype=torch.int64)
    elif isinstance(cache_seqlens, int):
        lens = torch.full((B,), cache_seqlens, dtype=torch.int64)
    else:
        lens = torch.as_tensor(cache_seqlens).to(torch.int64).reshape(-1)
    if lens.shape[0] != B:
        raise ValueError(f"cache_seqlens: expected {B} entries, got {lens.shape[0]}")
    if bool((lens < 0).any()) or bool((lens + n_new > capacity).any()):
        raise ValueError(f"cache_seqlens: expected 0 <= cache_seqlens and cache_seqlens + "
                         f"{n_new} new tokens <= the cache's {capacity} slots, got "
                         f"{lens.tolist()}")
    batch_idx = (torch.arange(B) if cache_batch_idx is None
                 else torch.as_tensor(cache_batch_idx).to(torch.int64))

    if rotary_cos is not None:
        rd_pos = lens.unsqueeze(1) + torch.arange(max(Sq, n_new)).unsqueeze(0)
        windowed = causal or tuple(window_size) != (-1, -1)
        q_pos = rd_pos[:, :Sq] if windowed else lens.unsqueeze(1).expand(B, Sq)
        q = _rotate(q, rotary_cos, rotary_sin, q_pos, rotary_interleaved)
        if k is not None:
            k = _rotate(k, rotary_cos, rotary_sin, rd_pos[:, :n_new], rotary_interleaved)

    def token_slots(b, start, stop):
        """(cache tensor index) for tokens [start, stop) of sequence b."""
        t = torch.arange(start, stop)
        if paged:
            return block_table[b].to(torch.int64)[t // page], t % page
        return batch_idx[b].expand_as(t), t

    outs, lses = [], []
    with torch.no_grad():
        for b in range(B):
            start, stop = int(lens[b]), int(lens[b]) + n_new
            if k is not None:
                rows, cols = token_slots(b, start, stop)
                k_cache[rows, cols] = k[b].to(k_cache.dtype)
                v_cache[rows, cols] = v[b].to(v_cache.dtype)
            if paged:
                rows, cols = token_slots(b, 0, stop)
                kb, vb = k_cache[rows, cols], v_cache[rows, cols]  # gathered pages
            else:
                kb, vb = k_cache[batch_idx[b], :stop], v_cache[batch_idx[b], :stop]
            slopes = alibi_slopes
            if slopes is not None and len(slopes.shape) == 2:
                slopes = slopes[b:b + 1]
            r = attention(q[b:b + 1], kb.unsqueeze(0), vb.unsqueeze(0), causal=causal,
                          window=window_size, softcap=softcap, alibi_slopes=slopes,
                          scale=softmax_scale, return_lse=return_softmax_lse)
            if return_softmax_lse:
                outs.append(r[0])
                lses.append(r[1])
            else:
                outs.append(r)
    out = torch.cat(outs) if B > 0 else torch.empty_like(q)
    if return_softmax_lse:
        lse = torch.cat(lses) if B > 0 else q.new_empty((0, q.shape[2], Sq), dtype=torch.float32)
        return out, lse
    return out
