# SPDX-License-Identifier: Apache-2.0
"""tessera.compat.flash_attn against an fp64 torch reference of flash_attn 2.x's semantics."""
import math

import pytest

torch = pytest.importorskip("torch")

from tessera.compat.flash_attn import (flash_attn_func, flash_attn_kvpacked_func,  # noqa: E402
                                       flash_attn_qkvpacked_func, flash_attn_varlen_func,
                                       flash_attn_with_kvcache)


def reference(q, k, v, causal=False, window=(-1, -1), softcap=0.0, alibi=None, scale=None):
    """fp64 attention with flash_attn's conventions: [B, S, H, D], bottom-right alignment,
    natural-log LSE [B, H, Sq]; rows that see no key give 0 and LSE -inf."""
    q, k, v = q.double(), k.double(), v.double()
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(Sq).view(Sq, 1) + Sk - Sq
    j = torch.arange(Sk).view(1, Sk)
    if alibi is not None:
        slopes = alibi.double().view(-1 if alibi.dim() == 2 else 1, H, 1, 1)
        if alibi.dim() == 2:
            slopes = alibi.double().view(B, H, 1, 1)
        s = s - slopes * (pos - j).abs()
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    visible = torch.ones(Sq, Sk, dtype=torch.bool)
    if left >= 0:
        visible &= j >= pos - left
    if right >= 0:
        visible &= j <= pos + right
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)


def assert_close(got, want, tol):
    err = (got.double() - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= tol * scale, f"max error {err} > {tol} * {scale}"


CASES = [
    dict(),
    dict(causal=True),
    dict(causal=True, window_size=(5, -1)),
    dict(window_size=(3, 2)),
    dict(softcap=5.0),
    dict(softmax_scale=0.3),
    dict(causal=True, alibi=True),
]


@pytest.mark.parametrize("opts", CASES)
@pytest.mark.parametrize("shape", [(2, 7, 19, 4, 2, 32), (1, 33, 33, 2, 2, 64),
                                   (1, 1, 40, 4, 1, 128)])
def test_flash_attn_func(opts, shape):
    B, Sq, Sk, H, Hkv, D = shape
    q, k, v = rand(B, Sq, H, D, seed=1), rand(B, Sk, Hkv, D, seed=2), rand(B, Sk, Hkv, D, seed=3)
    opts = dict(opts)
    alibi = rand(H, seed=4).abs() * 0.5 if opts.pop("alibi", False) else None
    out = flash_attn_func(q, k, v, alibi_slopes=alibi, **opts)
    want, _ = reference(q, k, v, causal=opts.get("causal", False),
                        window=opts.get("window_size", (-1, -1)), softcap=opts.get("softcap", 0.0),
                        alibi=alibi, scale=opts.get("softmax_scale"))
    assert isinstance(out, torch.Tensor) and out.shape == (B, Sq, H, D)
    assert_close(out, want, 2e-5)


def test_packed_forms_read_in_place():
    B, S, H, D = 2, 21, 3, 40
    qkv = rand(B, S, 3, H, D, seed=5)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    want, _ = reference(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    assert_close(out, want, 2e-5)
    q, kv = rand(B, 9, H, D, seed=6), rand(B, S, 2, 1, D, seed=7)
    out = flash_attn_kvpacked_func(q, kv, causal=True)
    want, _ = reference(q, kv[:, :, 0], kv[:, :, 1], causal=True)
    assert_close(out, want, 2e-5)


def test_varlen_matches_each_sequence():
    lens_q, lens_k, H, Hkv, D = [3, 17, 1], [5, 17, 30], 4, 2, 64
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    q = rand(sum(lens_q), H, D, seed=8)
    k, v = rand(sum(lens_k), Hkv, D, seed=9), rand(sum(lens_k), Hkv, D, seed=10)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True)
    for s in range(3):
        qs = q[cu_q[s]:cu_q[s + 1]].unsqueeze(0)
        ks, vs = k[cu_k[s]:cu_k[s + 1]].unsqueeze(0), v[cu_k[s]:cu_k[s + 1]].unsqueeze(0)
        want, _ = reference(qs, ks, vs, causal=True)
        assert_close(out[cu_q[s]:cu_q[s + 1]], want[0], 2e-5)


def test_gradients_match_fp64_autograd():
    q = rand(2, 13, 4, 32, seed=11).requires_grad_()
    k = rand(2, 20, 2, 32, seed=12).requires_grad_()
    v = rand(2, 20, 2, 32, seed=13).requires_grad_()
    dout = rand(2, 13, 4, 32, seed=14)
    out = flash_attn_func(q, k, v, causal=True, softcap=3.0)
    out.backward(dout)
    q2, k2, v2 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want, _ = reference(q2, k2, v2, causal=True, softcap=3.0)
    want.backward(dout.double())
    for got, ref in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert_close(got, ref, 5e-5)


def test_bf16_error_is_small():
    q, k, v = (rand(1, 64, 2, 64, seed=s, dtype=torch.bfloat16) for s in (15, 16, 17))
    out = flash_attn_func(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    want, _ = reference(q, k, v, causal=True)
    assert_close(out, want, 2e-2)


def rope_tables(n, rd, base=10000.0):
    inv = 1.0 / base ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    f = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    return f.cos().float(), f.sin().float()


def rope_ref(x, cos, sin, positions, interleaved):
    """x [B, S, H, D] rotated at positions [B, S], fp64."""
    x = x.double()
    half = cos.shape[1]
    c, s = cos.double()[positions].unsqueeze(2), sin.double()[positions].unsqueeze(2)
    if interleaved:
        x1, x2 = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
        r = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), -1).flatten(-2)
    else:
        x1, x2 = x[..., :half], x[..., half:2 * half]
        r = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), -1)
    return torch.cat((r, x[..., 2 * half:]), -1)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("rotary", [None, "interleaved", "half"])
def test_with_kvcache_appends_in_place_and_attends(paged, rotary):
    B, H, Hkv, D, Sq = 3, 4, 2, 32, 2
    lens = torch.tensor([0, 5, 11], dtype=torch.int32)
    capacity = 16
    k_full, v_full = rand(B, capacity, Hkv, D, seed=20), rand(B, capacity, Hkv, D, seed=21)
    k_new, v_new = rand(B, Sq, Hkv, D, seed=22), rand(B, Sq, Hkv, D, seed=23)
    q = rand(B, Sq, H, D, seed=24)
    if paged:
        page = 4
        pages = capacity // page
        perm = torch.randperm(B * pages, generator=torch.Generator().manual_seed(3))
        block_table = perm.view(B, pages).to(torch.int32)
        k_cache = torch.zeros(B * pages, page, Hkv, D)
        v_cache = torch.zeros(B * pages, page, Hkv, D)
        for b in range(B):
            for t in range(capacity):
                k_cache[block_table[b, t // page], t % page] = k_full[b, t]
                v_cache[block_table[b, t // page], t % page] = v_full[b, t]
    else:
        block_table = None
        k_cache, v_cache = k_full.clone(), v_full.clone()
    cos = sin = None
    if rotary is not None:
        cos, sin = rope_tables(64, 16)
    out, lse = flash_attn_with_kvcache(
        q, k_cache, v_cache, k=k_new, v=v_new, rotary_cos=cos, rotary_sin=sin,
        cache_seqlens=lens, block_table=block_table, causal=True,
        rotary_interleaved=(rotary == "interleaved"), return_softmax_lse=True)
    for b in range(B):
        n = int(lens[b]) + Sq
        pos = (int(lens[b]) + torch.arange(Sq)).unsqueeze(0)
        kb_new, qb = k_new[b:b + 1].double(), q[b:b + 1].double()
        if rotary is not None:
            kb_new = rope_ref(k_new[b:b + 1], cos, sin, pos, rotary == "interleaved")
            qb = rope_ref(q[b:b + 1], cos, sin, pos, rotary == "interleaved")
        kb = torch.cat((k_full[b:b + 1, :lens[b]].double(), kb_new), 1)
        vb = torch.cat((v_full[b:b + 1, :lens[b]].double(), v_new[b:b + 1].double()), 1)
        want, want_lse = reference(qb, kb, vb, causal=True)
        assert_close(out[b:b + 1], want, 2e-5)
        assert_close(lse[b:b + 1], want_lse, 2e-5)
        for t in range(n):  # the new tokens were written into the cache, in place
            if paged:
                got_k = k_cache[block_table[b, t // 4], t % 4]
            else:
                got_k = k_cache[b, t]
            assert_close(got_k, kb[0, t], 1e-6)


def test_with_kvcache_without_lengths_reads_the_whole_cache():
    q = rand(2, 1, 4, 32, seed=30)
    k_cache, v_cache = rand(2, 9, 2, 32, seed=31), rand(2, 9, 2, 32, seed=32)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, causal=True)
    want, _ = reference(q, k_cache, v_cache, causal=True)
    assert_close(out, want, 2e-5)
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, k_cache, v_cache, k=rand(2, 1, 2, 32), v=rand(2, 1, 2, 32))


def test_unsupported_options_are_clear_errors():
    q = rand(1, 4, 1, 16)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="return_attn_probs"):
        flash_attn_func(q, q, q, return_attn_probs=True)
    with pytest.raises(ValueError, match="head"):
        flash_attn_func(q, rand(1, 4, 3, 16), rand(1, 4, 3, 16))
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(q, torch.zeros(1, 4, 1, 16), torch.zeros(1, 4, 1, 16),
                                k=rand(1, 2, 1, 16), v=rand(1, 2, 1, 16), cache_seqlens=3)
