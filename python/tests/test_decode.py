# SPDX-License-Identifier: Apache-2.0
"""tessera.KVCache, tessera.decode, tessera.merge_states and tessera.apply_rotary against numpy
references: the cache read back, fp64 attention over it (conftest.py), a numpy RoPE and the
log-sum-exp merge (include/tessera/kv_cache.h, decode.h, merge.h)."""
import math

import numpy as np
import pytest

import tessera
from conftest import assert_close, randn, ref_attention, to64, tol, torch_or_skip

KV_TOL = {"f32": 0.0, "bf16": 2 ** -8, "f16": 2 ** -11}


def rope_reference(x, pos, rotary_dim, base=10000.0, interleaved=False):
    """RoPE in fp64 of x [B, S, H, D] with token s of sequence b at position pos[b] + s:
    theta_c = base^(-2c / r); pairs (c, c + r/2) half-split, (2c, 2c + 1) interleaved."""
    x = to64(x).copy()
    B, S, H, D = x.shape
    r = rotary_dim
    theta = float(np.float32(base)) ** (-2.0 * np.arange(r // 2) / r)
    p = (np.asarray(pos, dtype=np.float64)[:, None] + np.arange(S)[None, :])  # [B, S]
    ang = p[:, :, None, None] * theta[None, None, None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    if interleaved:
        a, b = x[..., 0:r:2].copy(), x[..., 1:r:2].copy()
        x[..., 0:r:2] = a * cos - b * sin
        x[..., 1:r:2] = a * sin + b * cos
    else:
        a, b = x[..., :r // 2].copy(), x[..., r // 2:r].copy()
        x[..., :r // 2] = a * cos - b * sin
        x[..., r // 2:r] = a * sin + b * cos
    return x


def nmse(got, ref):
    g, r = to64(got), to64(ref)
    return float(np.sum((g - r) ** 2) / np.sum(r ** 2))


def make_cache(dtype, B, Hkv, D, max_tokens, page_size=None, num_pages=None):
    return tessera.KVCache(B, Hkv, D, max_tokens, dtype=dtype, page_size=page_size,
                           num_pages=num_pages)


def fill(rng, cache, steps, dtype="f32", kind="numpy", **append_kw):
    """Appends random k, v in steps of the given sizes; returns the full k, v [B, S, Hkv, D]
    (f64, as appended, before any RoPE)."""
    ks, vs = [], []
    for n in steps:
        k = randn(rng, (cache.batch, n, cache.num_kv_heads, cache.head_dim), dtype, kind)
        v = randn(rng, (cache.batch, n, cache.num_kv_heads, cache.head_dim), dtype, kind)
        cache.append(k, v, **append_kw)
        ks.append(to64(k))
        vs.append(to64(v))
    return np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)


def read_all(cache):
    ks, vs = zip(*(cache.read(b, kind="numpy") for b in range(cache.batch)))
    return np.stack([to64(x) for x in ks]), np.stack([to64(x) for x in vs])


# ---- The cache ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("layout", [None, 1, 16])
def test_append_and_read_back(rng, dtype, layout):
    B, Hkv, D = 3, 2, 24
    cache = make_cache(dtype, B, Hkv, D, 50, page_size=layout)
    k, v = fill(rng, cache, [7, 1, 20, 3])
    assert cache.seq_lens.tolist() == [31] * B
    rk, rv = read_all(cache)
    assert rk.shape == (B, 31, Hkv, D)
    # stored in the cache dtype: exact for f32, the dtype's rounding (to nearest) otherwise
    rel = KV_TOL[dtype]
    assert_close(rk, k, 1e-30, rel, name="k")
    assert_close(rv, v, 1e-30, rel, name="v")
    k_read, v_read = cache.read(1)
    assert isinstance(k_read, np.ndarray) and k_read.dtype == np.float32


def test_paged_pages_come_from_the_pool(rng):
    B, page = 3, 4
    cache = make_cache("f16", B, 1, 8, 20, page_size=page, num_pages=40)
    assert cache.paged and cache.block_table.shape == (B, 5)
    fill(rng, cache, [3])
    assert cache.block_table[:, 0].tolist() != [0, 0, 0]
    fill(rng, cache, [6, 2])  # 11 tokens: 3 pages per sequence
    table = cache.block_table
    used = table[:, :3]
    assert len(set(used.ravel().tolist())) == 3 * B  # distinct pages
    assert ((used >= 0) & (used < 40)).all()
    cache.clear()
    assert cache.seq_lens.tolist() == [0] * B


@pytest.mark.parametrize("page_size", [1, 16])
def test_paged_equals_contiguous_bitwise(rng, page_size):
    B, Hkv, Hq, D = 2, 2, 6, 32
    steps = [13, 1, 30]
    contiguous = make_cache("f16", B, Hkv, D, 64)
    paged = make_cache("f16", B, Hkv, D, 64, page_size=page_size, num_pages=200)
    state = np.random.default_rng(7)
    fill(state, contiguous, steps)
    state = np.random.default_rng(7)
    fill(state, paged, steps)
    q = randn(rng, (B, 3, Hq, D))
    a = tessera.decode(q, contiguous, causal=True, split_tokens=16)
    b = tessera.decode(q, paged, causal=True, split_tokens=16)
    assert np.array_equal(a, b)


# ---- Decode -------------------------------------------------------------------------------------

def check_decode(rng, cache, Q, Hq, qdtype="f32", kind="numpy", **kw):
    B, D = cache.batch, cache.head_dim
    q = randn(rng, (B, Q, Hq, D), qdtype, kind)
    out, lse = tessera.decode(q, cache, return_lse=True, **kw)
    assert type(out) is type(q) and out.dtype == q.dtype and tuple(out.shape) == (B, Q, Hq, D)
    assert tuple(lse.shape) == (B, Hq, Q)
    rk, rv = read_all(cache)
    ref_kw = dict(causal=kw.get("causal", False), softcap=kw.get("softcap", 0.0),
                  scale=kw.get("scale"), window=(kw.get("window_left", -1), -1))
    if kw.get("alibi_slopes") is not None:
        ref_kw["alibi"] = to64(kw["alibi_slopes"])
    ref_out, ref_lse = ref_attention(q, rk, rv, **ref_kw)
    return q, out, lse, ref_out, ref_lse


@pytest.mark.parametrize("Q", [1, 5, 16])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(causal=True, window_left=6),
                                dict(window_left=3),
                                dict(softcap=2.0, scale=0.4), dict(causal=True, alibi=True)],
                         ids=str)
@pytest.mark.parametrize("layout", [None, 16])
def test_decode_f16_cache(rng, Q, kw, layout):
    B, Hkv, Hq, D = 2, 2, 6, 64
    cache = make_cache("f16", B, Hkv, D, 80, page_size=layout)
    fill(rng, cache, [30, Q])
    kw = dict(kw)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = rng.uniform(0.05, 0.5, Hq).astype(np.float32)
    _, out, lse, ref_out, ref_lse = check_decode(rng, cache, Q, Hq, **kw)
    assert_close(out, ref_out, *tol("f32"))
    assert_close(lse, ref_lse, 1e-4, 1e-5, name="lse")


@pytest.mark.parametrize("qdtype", ["f32", "bf16", "f16"])
def test_decode_torch_queries(rng, qdtype):
    torch = torch_or_skip()
    B, Hkv, Hq, D = 2, 1, 4, 32
    cache = make_cache("bf16", B, Hkv, D, 40, page_size=1)
    fill(rng, cache, [20, 2], kind="torch")
    q, out, lse, ref_out, ref_lse = check_decode(rng, cache, 2, Hq, qdtype, "torch", causal=True)
    assert isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)
    assert_close(out, ref_out, *tol(qdtype, 22))
    k_read, _ = cache.read(0)
    assert isinstance(k_read, torch.Tensor)


def test_decode_threads_and_batch_composition_bitwise(rng):
    # decode.h: bitwise identical for every thread count and batch composition (same split size)
    B, Hkv, Hq, D = 3, 2, 4, 40
    cache = make_cache("int8", B, Hkv, D, 300, page_size=16)
    fill(rng, cache, [260])
    q = randn(rng, (B, 2, Hq, D), "f16")
    a = tessera.decode(q, cache, causal=True, split_tokens=64, threads=1)
    b = tessera.decode(q, cache, causal=True, split_tokens=64)
    c = tessera.decode(q, cache, causal=True, split_tokens=64, threads=3)
    assert np.array_equal(a, b) and np.array_equal(a, c)
    _, out, _, ref_out, _ = check_decode(rng, cache, 2, Hq, causal=True)
    assert nmse(out, ref_out) < 5e-4
    # one sequence alone gets the bits it gets in a batch (an f16 cache: no calibration)
    kk, vv = randn(rng, (B, 200, Hkv, D)), randn(rng, (B, 200, Hkv, D))
    batch = make_cache("f16", B, Hkv, D, 300)
    batch.append(kk, vv)
    single = make_cache("f16", 1, Hkv, D, 300, page_size=1)
    single.append(kk[1:2], vv[1:2])
    out_b = tessera.decode(q, batch, split_tokens=64)
    out_s = tessera.decode(q[1:2], single, split_tokens=64)
    assert np.array_equal(out_b[1:2], out_s)


def test_decode_f32_cache_mha(rng):
    cache = make_cache("f32", 1, 3, 40, 10)
    fill(rng, cache, [10])
    _, out, lse, ref_out, ref_lse = check_decode(rng, cache, 1, 3)
    assert_close(out, ref_out, *tol("f32"))
    assert_close(lse, ref_lse, 1e-4, 1e-5, name="lse")


@pytest.mark.parametrize("dtype,limit", [("int8", 5e-4), ("int4", 5e-2)])
@pytest.mark.parametrize("layout", [None, 16])
def test_decode_quantized(rng, dtype, limit, layout):
    B, Hkv, Hq, D, S = 2, 2, 4, 64, 200
    cache = make_cache(dtype, B, Hkv, D, S, page_size=layout)
    k, v = fill(rng, cache, [150, 40, 10])
    rk, rv = read_all(cache)
    # the storage error of the dequantized cache (docs/decode.md: int8 ~6e-5, int4 ~1.8e-2)
    assert nmse(rk, k) < limit and nmse(rv, v) < limit
    assert nmse(rk, k) > 0  # really quantized
    q, out, lse, ref_out, ref_lse = check_decode(rng, cache, 4, Hq, causal=True)
    # against fp64 on the dequantized cache (docs/testing.md §2: NMSE <= 5e-4)
    assert nmse(out, ref_out) < 5e-4
    # against fp64 on the unquantized values (docs/decode.md's table)
    ref_unq, _ = ref_attention(q, k, v, causal=True)
    assert nmse(out, ref_unq) < limit
    assert np.isfinite(to64(lse)).all()


def test_rope_on_append(rng):
    B, Hkv, D, r = 2, 2, 16, 12
    for interleaved in (False, True):
        cache = make_cache("f32", B, Hkv, D, 40)
        k, v = fill(rng, cache, [5, 1, 9], rotary_dim=r, rotary_base=500.0,
                    rotary_interleaved=interleaved)
        rk, rv = read_all(cache)
        assert_close(rk, rope_reference(k, np.zeros(B), r, 500.0, interleaved), 2e-5, 2e-5,
                     name="rotated k")
        assert_close(rv, v, 0, 0, name="v (not rotated)")
        # the same as apply_rotary on the appended tokens at their absolute positions
        rot = tessera.apply_rotary(k[:, 5:6].astype(np.float32), np.full(B, 5, np.int32),
                                   rotary_dim=r, base=500.0, interleaved=interleaved)
        assert_close(rk[:, 5:6], to64(rot), 1e-6, 1e-6, name="k vs apply_rotary")


# ---- apply_rotary -------------------------------------------------------------------------------

@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 8])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_apply_rotary(rng, interleaved, rotary_dim, dtype):
    B, S, H, D = 2, 9, 3, 16
    x = randn(rng, (B, S, H, D), dtype)
    pos = np.array([0, 17], dtype=np.int32)
    before = x.copy()
    y = tessera.apply_rotary(x, pos, rotary_dim=rotary_dim, interleaved=interleaved)
    assert y is not x and np.array_equal(x, before)
    assert y.dtype == x.dtype
    ref = rope_reference(x, pos, rotary_dim or D, interleaved=interleaved)
    atol = 2e-5 if dtype == "f32" else 2e-3
    assert_close(y, ref, atol, atol)
    if rotary_dim:
        assert np.array_equal(y[..., rotary_dim:], x[..., rotary_dim:])
    z = tessera.apply_rotary(x, pos, rotary_dim=rotary_dim, interleaved=interleaved, inplace=True)
    assert z is x and np.array_equal(x, y)


def test_apply_rotary_default_positions_and_strided(rng):
    x_full = randn(rng, (1, 6, 4, 32))
    x = x_full[:, :, ::2]  # a strided view, rotated in place
    ref = rope_reference(x, [0], 32)
    other = x_full[:, :, 1::2].copy()
    tessera.apply_rotary(x, inplace=True)
    assert_close(x, ref, 2e-5, 2e-5)
    assert np.array_equal(x_full[:, :, 1::2], other)  # the other heads are untouched


def test_apply_rotary_torch(rng):
    torch = torch_or_skip()
    x = randn(rng, (2, 5, 2, 8), "bf16", "torch")
    y = tessera.apply_rotary(x, torch.tensor([3, 0], dtype=torch.int32))
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16
    assert_close(y, rope_reference(x, [3, 0], 8), 2e-2, 1e-2)
    with pytest.raises(ValueError, match="x"):
        tessera.apply_rotary(x.clone().requires_grad_(), inplace=True)


# ---- merge_states -------------------------------------------------------------------------------

def _state(rng, q, k, v):
    out, lse = tessera.attention(q, k, v, return_lse=True)
    return out[0], np.ascontiguousarray(np.swapaxes(lse[0], 0, 1))  # [T, H, D], [T, H]


@pytest.mark.parametrize("split", [1, 10, 29])
def test_merge_halves_equals_whole(rng, split):
    T, H, D, S = 6, 3, 16, 30
    q = randn(rng, (1, T, H, D))
    k, v = randn(rng, (1, S, H, D)), randn(rng, (1, S, H, D))
    o1, l1 = _state(rng, q, k[:, :split], v[:, :split])
    o2, l2 = _state(rng, q, k[:, split:], v[:, split:])
    out, lse = tessera.merge_states(np.stack([o1, o2]), np.stack([l1, l2]))
    ref_out, ref_lse = ref_attention(q, k, v)
    assert out.shape == (T, H, D) and lse.shape == (T, H) and lse.dtype == np.float32
    assert_close(out, ref_out[0], *tol("f32"))
    assert_close(lse, ref_lse[0].T, 1e-4, 1e-5, name="lse")
    # list input and base-2 LSEs
    out_l, lse_l = tessera.merge_states([o1, o2], [l1, l2])
    assert np.array_equal(out_l, out) and np.array_equal(lse_l, lse)
    ln2 = math.log(2)
    out2, lse2 = tessera.merge_states([o1, o2], [l1 / ln2, l2 / ln2], base2=True)
    assert_close(out2, ref_out[0], *tol("f32"))
    assert_close(lse2, ref_lse[0].T / ln2, 1e-4, 1e-5, name="lse base 2")


def test_merge_empty_parts(rng):
    T, H, D = 4, 2, 8
    o = randn(rng, (T, H, D))
    l = rng.standard_normal((T, H)).astype(np.float32)
    junk = randn(rng, (T, H, D))
    empty = np.full((T, H), -np.inf, dtype=np.float32)
    out, lse = tessera.merge_states([junk, o, junk], [empty, l, empty])
    assert np.array_equal(out, o) and np.array_equal(lse, l)  # bitwise (merge.h)
    out, lse = tessera.merge_states([junk, junk], [empty, empty])
    assert np.all(out == 0) and np.all(np.isneginf(lse))
    # a row empty in one part only
    l2 = l.copy()
    l2[1, 0] = -np.inf
    out, lse = tessera.merge_states([o, junk], [l, l2])
    w1 = 1 / (1 + np.exp(to64(l2) - to64(l)))
    ref = w1[..., None] * to64(o) + (1 - w1[..., None]) * to64(junk)
    assert_close(out, ref, 1e-6, 1e-6)
    assert_close(lse, np.logaddexp(to64(l), to64(l2)), 1e-6, 1e-6, name="lse")


def test_merge_torch_bf16(rng):
    torch = torch_or_skip()
    outs = randn(rng, (3, 5, 2, 8), "bf16", "torch")
    lses = torch.from_numpy(rng.standard_normal((3, 5, 2)).astype(np.float32))
    out, lse = tessera.merge_states(outs, lses)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    w = np.exp(to64(lses) - np.logaddexp.reduce(to64(lses), axis=0))
    assert_close(out, np.sum(w[..., None] * to64(outs), axis=0), 1e-2, 1e-2)
    assert_close(lse, np.logaddexp.reduce(to64(lses), axis=0), 1e-5, 1e-6, name="lse")


def test_xpos_rotation_scales_pairs_and_keeps_dot_products_relative():
    # xPos: RoPE's rotation times zeta_c^(+-p / scale_base) (queries +, keys -); a query-key dot
    # product then depends on the distance only, and KVCache.append stores the key form.
    rng = np.random.default_rng(3)
    D, gamma, scale_base = 8, 0.4, 64.0
    x = rng.standard_normal((1, 1, 1, D)).astype(np.float32)
    y = rng.standard_normal((1, 1, 1, D)).astype(np.float32)

    def rotate(v, pos, keys):
        return tessera.apply_rotary(v, np.array([pos], np.int32), xpos_scale_base=scale_base,
                                    xpos_gamma=gamma, keys=keys)

    pos = 37
    q, k = rotate(x, pos, False)[0, 0, 0], rotate(x, pos, True)[0, 0, 0]
    half = D // 2
    for c in range(half):
        theta = 10000.0 ** (-2.0 * c / D)
        cs, sn = np.cos(pos * theta), np.sin(pos * theta)
        x1, x2 = float(x[0, 0, 0, c]), float(x[0, 0, 0, c + half])
        zeta = (2.0 * c / D + gamma) / (1.0 + gamma)
        for got, scale in ((q, zeta ** (pos / scale_base)), (k, zeta ** (-pos / scale_base))):
            np.testing.assert_allclose(got[c], (x1 * cs - x2 * sn) * scale, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got[c + half], (x1 * sn + x2 * cs) * scale, rtol=1e-5,
                                       atol=1e-6)

    def dot(m, n):
        return float(np.dot(rotate(x, m, False).ravel().astype(np.float64),
                            rotate(y, n, True).ravel().astype(np.float64)))

    assert abs(dot(9, 4) - dot(209, 204)) <= 1e-4 * abs(dot(9, 4)) + 1e-6
    cache = tessera.KVCache(batch=1, num_kv_heads=1, head_dim=D, max_tokens=64, dtype="f32")
    cache.append(np.zeros((1, 40, 1, D), np.float32), np.zeros((1, 40, 1, D), np.float32),
                 rotary_dim=D, xpos_scale_base=scale_base, xpos_gamma=gamma)
    cache.append(y, y, rotary_dim=D, xpos_scale_base=scale_base, xpos_gamma=gamma)
    stored_k, _ = cache.read(0)
    np.testing.assert_array_equal(stored_k[40, 0], rotate(y, 40, True)[0, 0, 0])
    with pytest.raises(ValueError, match="xpos_scale_base"):
        rotate(x, 1000000, True)
    with pytest.raises(ValueError, match="xpos_gamma"):
        tessera.apply_rotary(x, xpos_scale_base=64.0, xpos_gamma=-1.0)
