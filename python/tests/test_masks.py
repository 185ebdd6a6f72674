# SPDX-License-Identifier: Apache-2.0
"""Every builder of tessera.mask against a visibility rule written here from the comments of
include/tessera/mask.h (and docs/algorithms.md §4), checked through tessera.attention against the
fp64 reference of conftest.py; the block-mask builders (s2, radial, select_blocks) are also
compared element by element with their formulas."""
import math

import numpy as np
import pytest

import tessera
from conftest import (assert_close, positions, qkv, randn, ref_attention, to64, tol,
                      torch_or_skip, window_visible)


def check(q, k, v, mask, visible, bias=None, sigmoid=None, full=False, **kw):
    """tessera.attention(mask=mask, **kw) against the reference with `visible` (broadcastable to
    [B, Hq, Sq, Sk]) ANDed with the call's causal / window test, or with full=True, `visible`
    alone (it already holds the base rule of mask.h, window included)."""
    if sigmoid is None:
        out, lse = tessera.attention(q, k, v, mask=mask, return_lse=True, **kw)
    else:
        out, lse = tessera.attention(q, k, v, mask=mask, **kw), None
    ref_kw = {n: x for n, x in kw.items()
              if not full or n not in ("causal", "window", "align")}
    ref_out, ref_lse = ref_attention(q, k, v, visible=visible, bias=bias, sigmoid=sigmoid,
                                     **ref_kw)
    assert_close(out, ref_out, *tol("f32"))
    if lse is not None:
        assert_close(lse, ref_lse, 1e-4, 1e-5, name="lse")
    return out


def base_visible(Sq, Sk, causal=False, window=(-1, -1), sinks=0, prefix=0,
                 align="bottom_right"):
    """base(i, j) = window(i, j) OR (j < sinks AND j <= pos(i) + wr) OR j < prefix (mask.h)."""
    wl, wr = window
    if causal:
        wr = 0 if wr < 0 else min(wr, 0)
    pos = positions(Sq, Sk, align)[:, None]
    j = np.arange(Sk)[None, :]
    vis = window_visible(Sq, Sk, causal, window, align)
    sink = j < sinks
    if wr >= 0:
        sink = sink & (j <= pos + wr)
    return vis | sink | (j < prefix)


# ---- blocks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bm_hm", [(1, 1), (2, 1), (1, 4), (2, 4)])
@pytest.mark.parametrize("block_dtype", ["u8", "bool"])
def test_blocks(rng, bm_hm, block_dtype):
    B, H, Sq, Sk = 2, 4, 40, 70
    bq, bk = 16, 32
    Bm, Hm = bm_hm
    nb = (Bm, Hm, -(-Sq // bq), -(-Sk // bk))
    bits = rng.random(nb) < 0.6
    blocks = bits.astype(np.uint8) if block_dtype == "u8" else bits
    q, k, v = qkv(rng, B, Sq, Sk, H, 2, 16)
    vis = bits[:, :, np.arange(Sq) // bq][:, :, :, np.arange(Sk) // bk]  # indices, not positions
    for causal in (False, True):
        check(q, k, v, tessera.mask.blocks(blocks, bq, bk), vis, causal=causal)


def test_blocks_torch(rng):
    torch = torch_or_skip()
    B, H, S = 1, 2, 48
    bits = rng.random((1, H, 3, 3)) < 0.5
    q, k, v = qkv(rng, B, S, S, H, H, 8, "f32", "torch")
    m = tessera.mask.blocks(torch.from_numpy(bits.astype(np.uint8)), 16, 16)
    vis = bits[:, :, np.arange(S) // 16][:, :, :, np.arange(S) // 16]
    out = check(q, k, v, m, vis)
    assert isinstance(out, torch.Tensor)


# ---- neighborhood -------------------------------------------------------------------------------

def _axis_visible(L, K, d, s, causal):
    """[L, L] per-axis rule of docs/algorithms.md §4.2 (query coordinate x, key coordinate y)."""
    vis = np.zeros((L, L), dtype=bool)
    wl, wr = K // 2, K // 2 + K % 2 - 1
    for x in range(L):
        xg = x // d
        Lg = L // d + (1 if x % d < L % d else 0)
        for y in range(L):
            if x % d != y % d:
                continue
            yg = y // d
            if causal:
                lead = min((xg // s) * s + s - 1, Lg - 1)
                vis[x, y] = yg <= xg and lead - yg < K
            else:
                lead = min((xg // s) * s + s // 2, Lg - 1)
                c = min(max(lead, wl), Lg - 1 - wr)
                vis[x, y] = c - wl <= yg <= c + wr
    return vis


def neighborhood_visible(grid, window, dilation, stride, causal):
    rank = len(grid)
    per = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x,) * rank
    window, dilation, stride, causal = per(window), per(dilation), per(stride), per(causal)
    coords = np.stack(np.unravel_index(np.arange(int(np.prod(grid))), grid), axis=1)
    vis = np.ones((len(coords), len(coords)), dtype=bool)
    for a in range(rank):
        ax = _axis_visible(grid[a], window[a], dilation[a], stride[a], causal[a])
        vis &= ax[coords[:, a][:, None], coords[:, a][None, :]]
    return vis


def test_neighborhood_axis_rule_hand_examples():
    # The rule of the reference itself on a hand-checked axis: L = 7, K = 3, non-causal: the
    # window is centred and shifted (not shrunk) at the borders, so every query sees 3 keys.
    vis = _axis_visible(7, 3, 1, 1, False)
    assert vis.sum(axis=1).tolist() == [3] * 7
    assert np.flatnonzero(vis[0]).tolist() == [0, 1, 2]
    assert np.flatnonzero(vis[3]).tolist() == [2, 3, 4]
    assert np.flatnonzero(vis[6]).tolist() == [4, 5, 6]
    # causal: the 3 keys ending at the query
    vis = _axis_visible(7, 3, 1, 1, True)
    assert np.flatnonzero(vis[0]).tolist() == [0]
    assert np.flatnonzero(vis[5]).tolist() == [3, 4, 5]
    # dilation 2: only the same parity
    vis = _axis_visible(8, 3, 2, 1, False)
    assert np.flatnonzero(vis[0]).tolist() == [0, 2, 4]
    assert np.flatnonzero(vis[7]).tolist() == [3, 5, 7]


@pytest.mark.parametrize("case", [
    dict(grid=(20,), window=5),
    dict(grid=(20,), window=5, causal=True),
    dict(grid=(20,), window=4),
    dict(grid=(16,), window=4, stride=2),
    dict(grid=(6, 9), window=(4, 2), dilation=(1, 2)),
    dict(grid=(21,), window=3, dilation=3),
    dict(grid=(24,), window=6, stride=6),
    dict(grid=(24,), window=6, stride=4, causal=True),
    dict(grid=(6, 7), window=(3, 5)),
    dict(grid=(6, 8), window=3, dilation=(1, 2), stride=(1, 3)),
    dict(grid=(6, 7), window=(3, 3), causal=(True, False)),
    dict(grid=(3, 4, 5), window=(3, 3, 3)),
    dict(grid=(4, 4, 6), window=(2, 3, 3), dilation=(2, 1, 2), causal=(False, True, False)),
    dict(grid=(4, 3, 6), window=(4, 3, 2), stride=(2, 1, 2), causal=True),
], ids=str)
def test_neighborhood(rng, case):
    grid = case["grid"]
    args = dict(window=case["window"], dilation=case.get("dilation", 1),
                stride=case.get("stride", 1), causal=case.get("causal", False))
    S = int(np.prod(grid))
    q, k, v = qkv(rng, 1, S, S, 2, 1, 16)
    vis = neighborhood_visible(grid, **args)
    check(q, k, v, tessera.mask.neighborhood(grid, **args), vis)


# ---- sinks, prefix ------------------------------------------------------------------------------

@pytest.mark.parametrize("sinks", [1, 4])
@pytest.mark.parametrize("kw", [dict(causal=True, window=(5, -1)), dict(window=(3, 2)),
                                dict(window=(6, 0))], ids=str)
@pytest.mark.parametrize("sq_sk", [(30, 30), (8, 30)])
def test_sinks(rng, sinks, kw, sq_sk):
    Sq, Sk = sq_sk
    q, k, v = qkv(rng, 1, Sq, Sk, 2, 2, 16)
    vis = base_visible(Sq, Sk, sinks=sinks, **kw)
    # the rule has an effect here: some sink key is visible only through the sink term
    assert (vis & ~window_visible(Sq, Sk, **kw)).any()
    check(q, k, v, tessera.mask.sinks(sinks), vis, full=True, **kw)


@pytest.mark.parametrize("kw", [dict(causal=True), dict(causal=True, window=(3, 0)), dict()],
                         ids=str)
def test_prefix(rng, kw):
    S, P = 25, 7
    q, k, v = qkv(rng, 2, S, S, 2, 1, 16)
    vis = base_visible(S, S, prefix=P, **kw)
    check(q, k, v, tessera.mask.prefix(P), vis, full=True, **kw)


# ---- documents ----------------------------------------------------------------------------------

@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("sq_sk", [(30, 30), (10, 30)])
def test_documents(rng, per_batch, sq_sk):
    B, Sq, Sk = 2, *sq_sk
    lens = [[5, 12, 13], [20, 1, 9]] if per_batch else [[5, 12, 13]]
    ids = np.stack([np.repeat(np.arange(len(l)), l) for l in lens]).astype(np.int32)
    q, k, v = qkv(rng, B, Sq, Sk, 2, 2, 16)
    pos = positions(Sq, Sk)
    vis = ids[:, None, pos, None] == ids[:, None, None, :]
    for causal in (False, True):
        arg = ids if per_batch else ids[0]
        check(q, k, v, tessera.mask.documents(arg), vis, causal=causal)


def test_documents_chunked_local_attention(rng):
    # docs/algorithms.md §2.5: chunked local attention = document ids floor(j / C) + causal.
    S, C = 32, 8
    q, k, v = qkv(rng, 1, S, S, 2, 2, 16)
    ids = (np.arange(S) // C).astype(np.int64)  # any integer dtype is accepted
    vis = (np.arange(S)[:, None] // C) == (np.arange(S)[None, :] // C)
    check(q, k, v, tessera.mask.documents(ids), vis, causal=True)


def test_documents_top_left_rows_past_the_keys(rng):
    # top-left with Sq > Sk: a query at a position outside [0, Sk) sees nothing.
    Sq, Sk = 12, 8
    ids = np.array([0, 0, 0, 1, 1, 1, 1, 1], dtype=np.int32)
    q, k, v = qkv(rng, 1, Sq, Sk, 1, 1, 8)
    pos = positions(Sq, Sk, "top_left")
    vis = np.zeros((Sq, Sk), dtype=bool)
    inside = pos < Sk
    vis[inside] = ids[pos[inside], None] == ids[None, :]
    out = check(q, k, v, tessera.mask.documents(ids), vis, align="top_left")
    assert np.all(out[:, 8:] == 0)


# ---- tree ---------------------------------------------------------------------------------------

def tree_visible(parents, Sk):
    Sq = len(parents)
    vis = np.zeros((Sq, Sk), dtype=bool)
    vis[:, :Sk - Sq] = True
    for t in range(Sq):
        node = t
        while node >= 0:
            vis[t, Sk - Sq + node] = True
            node = parents[node]
    return vis


@pytest.mark.parametrize("parents", [[-1, 0, 0, 1, 1, 2, -1, 6], [-1, 0, 1, 2, 3],
                                     [-1, -1, -1]], ids=str)
@pytest.mark.parametrize("as_list", [False, True])
def test_tree(rng, parents, as_list):
    Sq, Sk = len(parents), 20
    q, k, v = qkv(rng, 1, Sq, Sk, 4, 2, 16)
    arg = parents if as_list else np.array(parents, dtype=np.int32)
    vis = tree_visible(parents, Sk)
    check(q, k, v, tessera.mask.tree(arg), vis)
    check(q, k, v, tessera.mask.tree(arg), vis, causal=True)


def test_tree_chain_equals_causal(rng):
    Sq, Sk = 6, 15
    q, k, v = qkv(rng, 1, Sq, Sk, 2, 2, 16)
    chain = tessera.attention(q, k, v, mask=tessera.mask.tree(list(range(-1, Sq - 1))))
    causal = tessera.attention(q, k, v, causal=True)
    assert_close(chain, to64(causal), 1e-6, 1e-6)


# ---- groups (LongLoRA / SinkLoRA) ---------------------------------------------------------------

def groups_visible(H, S, G, shift, causal=False, window=(-1, -1), sinks=0):
    """[H, S, S]: window(i, j) inside groups of G, in rolled coordinates rho(x) = (x - G/2) mod S
    for the heads [H/2, H) (the single head when H = 1) when shift; OR the sink term."""
    vis = np.zeros((H, S, S), dtype=bool)
    x = np.arange(S)
    wvis = window_visible(S, S, causal, window)  # on (rho(i), rho(j)); Sq == Sk so pos(i) = i
    for h in range(H):
        shifted = shift and (h >= H // 2 or H == 1)
        r = (x - G // 2) % S if shifted else x
        same = (r[:, None] // G) == (r[None, :] // G)
        vis[h] = same & wvis[r[:, None], r[None, :]]
    wl, wr = window
    if causal:
        wr = 0 if wr < 0 else min(wr, 0)
    sink = x[None, :] < sinks
    if wr >= 0:
        sink = sink & (x[None, :] <= x[:, None] + wr)
    return vis | sink[None]


@pytest.mark.parametrize("H", [1, 4])
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_groups(rng, H, shift, causal):
    S, G = 32, 8
    q, k, v = qkv(rng, 1, S, S, H, 1, 16)
    vis = groups_visible(H, S, G, shift, causal)
    check(q, k, v, tessera.mask.groups(G, shift_half_heads=shift), vis[None], full=True,
          causal=causal)
    if shift:
        assert tessera.mask.longlora_shift(G) == tessera.mask.groups(G)


def test_groups_with_sinks_sinklora(rng):
    # SinkLoRA (docs/algorithms.md §4.5): unshifted groups, causal, plus sink tokens.
    S, G, sinks = 32, 8, 3
    q, k, v = qkv(rng, 1, S, S, 2, 2, 16)
    vis = groups_visible(2, S, G, False, causal=True, sinks=sinks)
    i, j = np.arange(S)[:, None], np.arange(S)[None, :]
    assert np.array_equal(vis[0], (j <= i) & ((i // G == j // G) | (j < sinks)))
    m = tessera.mask.groups(G, shift_half_heads=False) & tessera.mask.sinks(sinks)
    check(q, k, v, m, vis[None], full=True, causal=True)


# ---- dense, sigmoid -----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(9, 14), (2, 1, 9, 14), (1, 4, 9, 14), (2, 4, 9, 14)], ids=str)
@pytest.mark.parametrize("mask_dtype", ["bool", "u8", "f32"])
def test_dense(rng, shape, mask_dtype):
    B, H, Sq, Sk = 2, 4, 9, 14
    q, k, v = qkv(rng, B, Sq, Sk, H, 2, 16)
    if mask_dtype == "f32":
        m = rng.standard_normal(shape).astype(np.float32)
        m[rng.random(shape) < 0.25] = -np.inf
        visible, bias = None, m.astype(np.float64)
    else:
        bits = rng.random(shape) < 0.6
        m = bits if mask_dtype == "bool" else bits.astype(np.uint8) * 7
        visible, bias = bits, None
    check(q, k, v, tessera.mask.dense(m), visible, bias, causal=True)


@pytest.mark.parametrize("bias", [0.0, -math.log(20)])
def test_sigmoid(rng, bias):
    q, k, v = qkv(rng, 2, 11, 20, 4, 2, 16)
    m = tessera.mask.sigmoid(bias)
    check(q, k, v, m, None, sigmoid=bias)
    check(q, k, v, m, None, sigmoid=bias, causal=True, softcap=2.0)
    # no LSE with the sigmoid score: return_lse gives None
    out, lse = tessera.attention(q, k, v, mask=m, return_lse=True)
    assert lse is None


def test_sigmoid_backward(rng):
    q, k, v = qkv(rng, 1, 7, 10, 2, 1, 8)
    dout = randn(rng, q.shape)
    m = tessera.mask.sigmoid(-1.0)
    out = tessera.attention(q, k, v, mask=m, causal=True)
    dq, dk, dv = tessera.attention_backward(dout, q, k, v, out, None, mask=m, causal=True)
    _, _, rdq, rdk, rdv = ref_attention(q, k, v, dout=dout, causal=True, sigmoid=-1.0)
    for name, g, r in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert_close(g, r, 5e-5, 5e-5, name=name)


# ---- Mask & Mask --------------------------------------------------------------------------------

def test_combination(rng):
    B, H, S = 1, 2, 40
    q, k, v = qkv(rng, B, S, S, H, H, 16)
    ids = np.repeat([0, 1], [17, 23]).astype(np.int32)
    bits = rng.random((1, H, 3, 3)) < 0.7
    bits[..., 0] = True
    dense_bits = rng.random((S, S)) < 0.8
    m = (tessera.mask.documents(ids) & tessera.mask.prefix(4) & tessera.mask.blocks(bits, 16, 16)
         & tessera.mask.dense(dense_bits) & tessera.mask.sinks(2))
    vis = (base_visible(S, S, causal=True, window=(6, -1), sinks=2, prefix=4)[None, None]
           & (ids[:, None] == ids[None, :])[None, None]
           & bits[:, :, np.arange(S) // 16][:, :, :, np.arange(S) // 16]
           & dense_bits[None, None])
    check(q, k, v, m, vis, full=True, causal=True, window=(6, -1))


def test_combination_rejects_two_values_of_a_field():
    with pytest.raises(ValueError, match="prefix_len"):
        tessera.mask.prefix(3) & tessera.mask.prefix(4)
    same = tessera.mask.prefix(3) & tessera.mask.prefix(3)
    assert same.prefix_len == 3
    with pytest.raises(TypeError):
        tessera.mask.prefix(3) & 5


def test_neighborhood_and_sigmoid(rng):
    S = 24
    q, k, v = qkv(rng, 1, S, S, 2, 2, 16)
    m = tessera.mask.neighborhood((S,), 5) & tessera.mask.sigmoid(-0.5)
    check(q, k, v, m, neighborhood_visible((S,), 5, 1, 1, False), sigmoid=-0.5)


# ---- Block-mask builders ------------------------------------------------------------------------

def s2_reference(H, nq, nk, L, V, o, causal):
    sigma = max(1, V // H)
    out = np.zeros((1, H, nq, nk), dtype=np.uint8)
    for h in range(H):
        for qb in range(nq):
            for kb in range(nk):
                if causal:
                    keep = qb >= kb and (qb - kb < L or (kb + h * sigma + o) % V == 0)
                else:
                    dist = max(0, qb - kb - L + 1) + max(0, kb - qb - L + 1)
                    keep = abs(qb - kb) < L or (dist + h * sigma + o) % V == 0
                out[0, h, qb, kb] = keep
    return out


@pytest.mark.parametrize("case", [
    dict(heads=4, local_blocks=2, vert_stride=4, offset=0, causal=True),
    dict(heads=2, local_blocks=1, vert_stride=8, offset=3, causal=True),
    dict(heads=3, local_blocks=2, vert_stride=3, offset=-5, causal=False),
    dict(heads=8, local_blocks=1, vert_stride=2, offset=1, causal=False),
], ids=str)
def test_s2(rng, case):
    block, Sq, Sk = 16, 100, 130
    m = tessera.mask.s2(seq_q=Sq, seq_k=Sk, block=block, **case)
    nq, nk = -(-Sq // block), -(-Sk // block)
    ref = s2_reference(case["heads"], nq, nk, case["local_blocks"], case["vert_stride"],
                       case["offset"], case["causal"])
    assert m.blocks.shape == ref.shape and m.block_q == block and m.block_k == block
    assert np.array_equal(m.blocks, ref)
    # and through attention
    H = case["heads"]
    q, k, v = qkv(rng, 1, Sq, Sk, H, 1, 8)
    vis = ref.astype(bool)[:, :, np.arange(Sq) // block][:, :, :, np.arange(Sk) // block]
    check(q, k, v, m, vis)


def test_s2_torch():
    torch = torch_or_skip()
    m = tessera.mask.s2(2, 64, 64, 16, local_blocks=1, vert_stride=2, kind="torch")
    assert isinstance(m.blocks, torch.Tensor)
    assert np.array_equal(m.blocks.numpy(), s2_reference(2, 4, 4, 1, 2, 0, True))


def radial_reference(frames, n_f, block, decay):
    """The token mask of docs/algorithms.md §4.6 reduced to blocks (mask.h's 60% / 1/3 rule)."""
    n = frames * n_f
    f = np.arange(n) // n_f
    o = np.arange(n) % n_f
    dist = np.abs(f[:, None] - f[None, :])
    offset = np.abs(o[:, None] - o[None, :])
    tok = dist <= 1
    for d in range(2, frames):
        base = 2.0 ** (n_f.bit_length() - d.bit_length())
        if base < 128 and d % math.floor(128 / base) != 0:
            continue
        tok |= (dist == d) & (offset <= max(base * decay, block))
    nb = -(-n // block)
    out = np.zeros((1, 1, nb, nb), dtype=np.uint8)
    for I in range(nb):
        rows = tok[I * block:(I + 1) * block]
        for J in range(nb):
            count = rows[:, J * block:(J + 1) * block].sum(axis=0)
            non_empty = int((count > 0).sum())
            dense = int((3 * count > rows.shape[0]).sum())
            out[0, 0, I, J] = 5 * dense > 3 * non_empty
    return out, tok


# the last two have partial blocks on which the 60% and 1/3 thresholds decide
@pytest.mark.parametrize("case", [(12, 40, 16, 1.0), (20, 24, 32, 0.5), (9, 50, 16, 3.0),
                                  (4, 300, 32, 0.05), (6, 200, 32, 0.3)], ids=str)
def test_radial(case):
    frames, n_f, block, decay = case
    m = tessera.mask.radial(frames, n_f, block=block, decay_factor=decay)
    ref, tok = radial_reference(frames, n_f, block, decay)
    assert 0 < ref.sum() < ref.size  # a real pattern, neither empty nor full
    assert m.blocks.shape == ref.shape
    assert np.array_equal(m.blocks, ref)


def select_reference(q, k, bq, bk, top_k=0, threshold=0.0, scale=None, causal=False,
                     align="bottom_right"):
    q, k = to64(q), to64(k)
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    nq, nk = -(-Sq // bq), -(-Sk // bk)
    scale = float(np.float32(1 / math.sqrt(D))) if scale is None else scale
    out = np.zeros((B, Hq, nq, nk), dtype=np.uint8)
    for b in range(B):
        for h in range(Hq):
            kp = np.stack([k[b, J * bk:(J + 1) * bk, h // G].mean(axis=0) for J in range(nk)])
            for I in range(nq):
                qp = q[b, I * bq:(I + 1) * bq, h].mean(axis=0)
                g = scale * kp @ qp
                allowed = np.ones(nk, dtype=bool)
                if causal:
                    last = min((I + 1) * bq, Sq) - 1 + (Sk - Sq if align == "bottom_right"
                                                          else 0)
                    if last < 0:
                        continue
                    allowed = np.arange(nk) * bk <= last
                idx = np.flatnonzero(allowed)
                order = idx[np.argsort(-g[idx], kind="stable")]
                keep = set()
                if causal:
                    keep.add(int(idx[-1]))  # the diagonal block, always kept
                if top_k:
                    for j in order:
                        if len(keep) >= top_k:
                            break
                        keep.add(int(j))
                else:
                    p = np.exp(g[idx] - g[idx].max())
                    p = dict(zip(idx.tolist(), p / p.sum()))
                    mass = sum(p[j] for j in keep)
                    for j in order:
                        if mass >= threshold:
                            break
                        if int(j) not in keep:
                            keep.add(int(j))
                            mass += p[j]
                out[b, h, I, sorted(keep)] = 1
    return out


@pytest.mark.parametrize("kw", [dict(top_k=2), dict(top_k=3, causal=True), dict(threshold=0.6),
                                dict(top_k=1, scale=0.3),
                                dict(top_k=2, causal=True, align="top_left")], ids=str)
def test_select_blocks(rng, kw):
    B, Sq, Sk, Hq, Hkv, D = 2, 70, 100, 4, 2, 16
    q, k, v = qkv(rng, B, Sq, Sk, Hq, Hkv, D)
    # distinct pooled means per block so the ranking is clear
    k += rng.standard_normal((B, -(-Sk // 16), 1, D)).repeat(16, axis=1)[:, :Sk].astype(np.float32)
    m = tessera.mask.select_blocks(q, k, block_q=16, block_k=16, **kw)
    ref = select_reference(q, k, 16, 16, **kw)
    assert m.blocks.shape == ref.shape
    assert np.array_equal(m.blocks.astype(np.uint8), ref)
    if kw.get("top_k"):
        assert (ref.sum(axis=-1) <= kw["top_k"]).all()
    vis = ref.astype(bool)[:, :, np.arange(Sq) // 16][:, :, :, np.arange(Sk) // 16]
    check(q, k, v, m, vis, causal=kw.get("causal", False))


@pytest.mark.parametrize("dtype,kind", [("bf16", "torch"), ("f16", "numpy")])
def test_select_blocks_low_precision(rng, dtype, kind):
    q, k, _ = qkv(rng, 2, 70, 100, 4, 2, 16, dtype, kind)
    m = tessera.mask.select_blocks(q, k, block_q=16, block_k=32, top_k=2, causal=True)
    assert type(m.blocks) is type(q)
    ref = select_reference(q, k, 16, 32, top_k=2, causal=True)
    assert np.array_equal(to64(m.blocks).astype(np.uint8), ref)


def test_select_blocks_user_scores(rng):
    B, S, H, D = 1, 64, 2, 8
    q, k, _ = qkv(rng, B, S, S, H, H, D)
    scores = rng.standard_normal((B, H, 4, 4)).astype(np.float32)
    m = tessera.mask.select_blocks(q, k, block_q=16, block_k=16, top_k=2, scores=scores)
    ref = np.zeros_like(m.blocks)
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :2]
    np.put_along_axis(ref, top, 1, axis=-1)
    assert np.array_equal(m.blocks, ref)


# ---- torch: autograd through the registered op carries every mask field -------------------------

def _torch_cases(torch, rng, S, H):
    ids = np.repeat([0, 1, 2], [5, 9, S - 14]).astype(np.int32)
    bits = np.array([[1, 0], [1, 1]], dtype=bool)
    dense_bits = rng.random((S, S)) < 0.7
    return {
        "neighborhood": (tessera.mask.neighborhood((4, 6), 3, dilation=(1, 2),
                                                   causal=(False, True)),
                         neighborhood_visible((4, 6), 3, (1, 2), 1, (False, True)), {}, False),
        "documents": (tessera.mask.documents(torch.from_numpy(ids)),
                      ids[:, None] == ids[None, :], {}, False),
        "documents numpy ids": (tessera.mask.documents(ids), ids[:, None] == ids[None, :], {},
                                False),
        "groups": (tessera.mask.groups(8), groups_visible(H, S, 8, True, causal=True)[None],
                   dict(causal=True), True),
        "sinks": (tessera.mask.sinks(3), base_visible(S, S, causal=True, window=(4, -1), sinks=3),
                  dict(causal=True, window=(4, -1)), True),
        "prefix": (tessera.mask.prefix(5), base_visible(S, S, causal=True, prefix=5),
                   dict(causal=True), True),
        "blocks": (tessera.mask.blocks(torch.from_numpy(bits.astype(np.uint8))[None, None], 16,
                                       16),
                   bits[np.arange(S) // 16][:, np.arange(S) // 16], {}, False),
        "dense": (tessera.mask.dense(torch.from_numpy(dense_bits)), dense_bits, {}, False),
    }


CASE_NAMES = ["neighborhood", "documents", "documents numpy ids", "groups", "sinks", "prefix",
              "blocks", "dense", "sigmoid", "tree list"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_torch_autograd_with_masks(rng, case):
    torch = torch_or_skip()
    S, H, D = 24, 2, 8
    sigmoid = None
    if case == "tree list":
        parents = [-1, 0, 0, 1]
        q, k, v = qkv(rng, 1, 4, 10, H, H, D, "f32", "torch")
        m, vis, kw, full = tessera.mask.tree(parents), tree_visible(parents, 10), {}, False
    else:
        q, k, v = qkv(rng, 1, S, S, H, H, D, "f32", "torch")
        if case == "sigmoid":
            m, vis, kw, full, sigmoid = tessera.mask.sigmoid(-1.0), None, {}, False, -1.0
        else:
            m, vis, kw, full = _torch_cases(torch, rng, S, H)[case]
    for x in (q, k, v):
        x.requires_grad_()
    dout = randn(rng, tuple(q.shape), "f32", "torch")
    out = tessera.attention(q, k, v, mask=m, **kw)
    assert out.requires_grad
    out.backward(dout)
    ref_kw = {} if full else kw
    ref_out, _, rdq, rdk, rdv = ref_attention(q, k, v, dout=dout, visible=vis, sigmoid=sigmoid,
                                              **ref_kw)
    assert_close(out, ref_out, *tol("f32"))
    for name, g, r in (("dq", q.grad, rdq), ("dk", k.grad, rdk), ("dv", v.grad, rdv)):
        assert_close(g, r, 5e-5, 5e-5, name=name)
