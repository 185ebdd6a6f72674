# SPDX-License-Identifier: Apache-2.0
"""Bad input: ValueError naming the argument (TypeError for the wrong kind of object), and
nothing written on error (the KV cache, in-place RoPE)."""
import re

import numpy as np
import pytest

import tessera
from conftest import randn, torch_or_skip

F32 = np.float32


def arr(*shape, dtype=F32):
    return np.ones(shape, dtype=dtype)


Q, K, V = arr(1, 4, 4, 8), arr(1, 5, 2, 8), arr(1, 5, 2, 8)


def cu(*offsets):
    return np.array(offsets, dtype=np.int32)


# (id, call, expected exception, a word the message must contain)
ATTENTION_CASES = [
    ("q rank 3", lambda: tessera.attention(Q[0], K, V), "q"),
    ("k rank 3", lambda: tessera.attention(Q, K[0], V), "k"),
    ("q rank 5", lambda: tessera.attention(arr(1, 1, 4, 4, 8), K, V), "q"),
    ("heads not divisible", lambda: tessera.attention(arr(1, 4, 3, 8), K, V), "k"),
    ("head dim mismatch", lambda: tessera.attention(Q, arr(1, 5, 2, 16), arr(1, 5, 2, 16)), "k"),
    ("v shape", lambda: tessera.attention(Q, K, arr(1, 6, 2, 8)), "v"),
    ("head dim 0", lambda: tessera.attention(arr(1, 2, 2, 0), arr(1, 2, 2, 0), arr(1, 2, 2, 0)),
     "q"),
    ("head dim 600", lambda: tessera.attention(*(arr(1, 2, 1, 600),) * 3), "q"),
    ("float64", lambda: tessera.attention(Q.astype(np.float64), K, V), "q"),
    ("int32", lambda: tessera.attention(Q.astype(np.int32), K, V), "q"),
    ("int64", lambda: tessera.attention(Q.astype(np.int64), K, V), "q"),
    ("k dtype differs", lambda: tessera.attention(Q, K.astype(np.float16), V), "k"),
    ("negative strides", lambda: tessera.attention(Q[:, ::-1], K, V), "q"),
    ("cu_seqlens_q only", lambda: tessera.attention(Q[0], K[0], V[0], cu_seqlens_q=cu(0, 4)),
     "cu_seqlens"),
    ("cu_seqlens_k only", lambda: tessera.attention(Q[0], K[0], V[0], cu_seqlens_k=cu(0, 5)),
     "cu_seqlens"),
    ("window of floats", lambda: tessera.attention(Q, K, V, window=[1.5, "x"]), "window"),
    ("cu_seqlens past the tokens",
     lambda: tessera.attention(Q[0], K[0], V[0], cu_seqlens_q=cu(0, 9), cu_seqlens_k=cu(0, 5)),
     "cu_seqlens_q"),
    ("cu_seqlens decreasing",
     lambda: tessera.attention(Q[0], K[0], V[0], cu_seqlens_q=cu(0, 3, 2),
                               cu_seqlens_k=cu(0, 2, 5)), "cu_seqlens_q"),
    ("cu_seqlens not from 0",
     lambda: tessera.attention(Q[0], K[0], V[0], cu_seqlens_q=cu(1, 4), cu_seqlens_k=cu(0, 5)),
     "cu_seqlens_q"),
    ("cu_seqlens float",
     lambda: tessera.attention(Q[0], K[0], V[0], cu_seqlens_q=np.array([0.0, 4.0]),
                               cu_seqlens_k=cu(0, 5)), "cu_seqlens_q"),
    ("cu_seqlens with a batch of 2",
     lambda: tessera.attention(arr(2, 4, 4, 8), arr(2, 5, 2, 8), arr(2, 5, 2, 8),
                               cu_seqlens_q=cu(0, 4), cu_seqlens_k=cu(0, 5)), "q"),
    ("cu_seqlens with attn_mask",
     lambda: tessera.attention(Q[0], Q[0], Q[0], cu_seqlens_q=cu(0, 4), cu_seqlens_k=cu(0, 4),
                               attn_mask=arr(4, dtype=bool)), "attn_mask"),
    ("cu_seqlens with a mask",
     lambda: tessera.attention(Q[0], Q[0], Q[0], cu_seqlens_q=cu(0, 4), cu_seqlens_k=cu(0, 4),
                               mask=tessera.mask.prefix(1)), "mask"),
    ("window -2", lambda: tessera.attention(Q, K, V, window=(-2, 0)), "window_left"),
    ("window right -5", lambda: tessera.attention(Q, K, V, window=(1, -5)), "window_right"),
    ("window of 3", lambda: tessera.attention(Q, K, V, window=(1, 2, 3)), "window"),
    ("window of strings", lambda: tessera.attention(Q, K, V, window="ab"), "window"),
    ("scale nan", lambda: tessera.attention(Q, K, V, scale=float("nan")), "scale"),
    ("softcap negative", lambda: tessera.attention(Q, K, V, softcap=-1.0), "softcap"),
    ("alibi shape", lambda: tessera.attention(Q, K, V, alibi_slopes=arr(3)), "alibi_slopes"),
    ("align", lambda: tessera.attention(Q, K, V, align="center"), "align"),
    ("threads negative", lambda: tessera.attention(Q, K, V, threads=-1), "threads"),
    ("path", lambda: tessera.attention(Q, K, V, path="gpu"), "path"),
    ("attn_mask shape", lambda: tessera.attention(Q, K, V, attn_mask=arr(3, 5, dtype=bool)),
     "attn_mask"),
    ("attn_mask rank 5", lambda: tessera.attention(Q, K, V, attn_mask=arr(1, 1, 1, 4, 5,
                                                                          dtype=bool)),
     "attn_mask"),
    ("attn_mask int", lambda: tessera.attention(Q, K, V, attn_mask=arr(4, 5, dtype=np.int64)),
     "attn_mask"),
    ("dense mask twice",
     lambda: tessera.attention(Q, Q, Q, attn_mask=arr(4, dtype=bool),
                               mask=tessera.mask.dense(arr(4, 4, dtype=bool))), "attn_mask"),
]

MASK_CASES = [
    ("block_q 8", lambda: tessera.attention(Q, K, V, mask=tessera.mask.blocks(
        arr(1, 1, 1, 1, dtype=np.uint8), 8, 16)), "block_q"),
    ("block_k 2^31", lambda: tessera.attention(Q, K, V, mask=tessera.mask.blocks(
        arr(1, 1, 1, 1, dtype=np.uint8), 16, 2 ** 31)), "block_k"),
    ("blocks shape", lambda: tessera.attention(Q, K, V, mask=tessera.mask.blocks(
        arr(1, 1, 2, 1, dtype=np.uint8), 16, 16)), "blocks"),
    ("blocks dtype", lambda: tessera.attention(Q, K, V, mask=tessera.mask.blocks(
        arr(1, 1, 1, 1, dtype=F32), 16, 16)), "blocks"),
    ("neighborhood Sq != Sk",
     lambda: tessera.attention(Q, K, V, mask=tessera.mask.neighborhood((4,), 3)), "neighborhood"),
    ("neighborhood window > grid",
     lambda: tessera.attention(Q, Q, Q, mask=tessera.mask.neighborhood((4,), 5)), "window"),
    ("neighborhood stride > window",
     lambda: tessera.attention(Q, Q, Q, mask=tessera.mask.neighborhood((4,), 2, stride=3)),
     "stride"),
    ("neighborhood 4 axes", lambda: tessera.mask.neighborhood((1, 1, 2, 2), 1), "grid"),
    ("neighborhood per-axis count", lambda: tessera.mask.neighborhood((2, 2), (1, 1, 1)),
     "window"),
    ("sinks negative", lambda: tessera.mask.sinks(-1), "sink_tokens"),
    ("prefix negative", lambda: tessera.mask.prefix(-3), "prefix_len"),
    ("documents length", lambda: tessera.attention(Q, K, V, mask=tessera.mask.documents(
        np.zeros(4, np.int32))), "document_ids"),
    ("documents decreasing", lambda: tessera.attention(Q, K, V, mask=tessera.mask.documents(
        np.array([0, 1, 0, 1, 1], np.int32))), "document_ids"),
    ("documents float", lambda: tessera.mask.documents(np.zeros(5)), "document_ids"),
    ("tree parent not before", lambda: tessera.attention(Q, K, V, mask=tessera.mask.tree(
        [0, 0, 0, 0])), "tree_parents"),
    ("tree longer than Sk", lambda: tessera.attention(Q, K[:, :3], V[:, :3],
                                                       mask=tessera.mask.tree([-1, 0, 1, 2])),
     "tree_parents"),
    ("groups not dividing", lambda: tessera.attention(Q, Q, Q, mask=tessera.mask.groups(3)),
     "group_size"),
    ("groups 0", lambda: tessera.mask.groups(0), "group_size"),
    ("sigmoid with an lse",
     lambda: tessera.attention_backward(arr(1, 4, 4, 8), Q, arr(1, 4, 4, 8), arr(1, 4, 4, 8),
                                        arr(1, 4, 4, 8), arr(1, 4, 4),
                                        mask=tessera.mask.sigmoid()), "lse"),
    ("mask & mask", lambda: tessera.mask.groups(4) & tessera.mask.groups(8), "mask"),
    ("s2 block 8", lambda: tessera.mask.s2(2, 64, 64, 8), "block"),
    ("s2 local_blocks 0", lambda: tessera.mask.s2(2, 64, 64, 16, local_blocks=0),
     "local_blocks"),
    ("radial decay 0", lambda: tessera.mask.radial(4, 16, 16, decay_factor=0), "decay_factor"),
    ("radial block 24", lambda: tessera.mask.radial(4, 16, 24), "block"),
    ("select top_k negative", lambda: tessera.mask.select_blocks(Q, K, 16, 16, top_k=-1),
     "top_k"),
    ("select threshold 2", lambda: tessera.mask.select_blocks(Q, K, 16, 16, threshold=2.0),
     "threshold"),
    ("select block_q 8", lambda: tessera.mask.select_blocks(Q, K, 8, 16, top_k=1), "block_q"),
    ("select block_k 2^31", lambda: tessera.mask.select_blocks(Q, K, 16, 2 ** 31, top_k=1),
     "block_k"),
    ("select scores shape", lambda: tessera.mask.select_blocks(
        Q, K, 16, 16, top_k=1, scores=arr(1, 4, 2, 1)), "scores"),
]

B4 = arr(1, 4, 4, 8)
BACKWARD_CASES = [
    ("lse missing", lambda: tessera.attention_backward(B4, Q, B4.copy(), B4.copy(), B4.copy(),
                                                       None), "lse"),
    ("lse shape", lambda: tessera.attention_backward(B4, Q, B4.copy(), B4.copy(), B4.copy(),
                                                     arr(1, 4, 3)), "lse"),
    ("lse f16", lambda: tessera.attention_backward(B4, Q, B4.copy(), B4.copy(), B4.copy(),
                                                   arr(1, 4, 4, dtype=np.float16)), "lse"),
    ("dout shape", lambda: tessera.attention_backward(arr(1, 4, 4, 4), Q, B4.copy(), B4.copy(),
                                                      B4.copy(), arr(1, 4, 4)), "dout"),
    ("dout dtype", lambda: tessera.attention_backward(arr(1, 4, 4, 8, dtype=np.float16), Q,
                                                      B4.copy(), B4.copy(), B4.copy(),
                                                      arr(1, 4, 4)), "dout"),
    ("out shape", lambda: tessera.attention_backward(B4, Q, B4.copy(), B4.copy(),
                                                     arr(1, 4, 4, 4), arr(1, 4, 4)), "out"),
]


def assert_names(word, error):
    """The message names the argument: `word` (or a name starting with it, e.g. k_new for k, or
    a field of it, mask.block_q) followed by ':' or ','."""
    message = str(error)
    pattern = r"(?<![\w.])(\w+\.)*" + re.escape(word) + r"\w*(\[\d+\])?(\.\w+)*[:,]"
    assert re.search(pattern, message), f"{word!r} is not named in: {message}"


def _params(cases):
    return [pytest.param(call, word, id=name) for name, call, word in cases]


@pytest.mark.parametrize("call,word", _params(ATTENTION_CASES + MASK_CASES + BACKWARD_CASES))
def test_value_error_names_the_argument(call, word):
    with pytest.raises(ValueError) as info:
        call()
    assert_names(word, info.value)


def test_dtype_message_names_the_dtype():
    with pytest.raises(ValueError, match="float64"):
        tessera.attention(Q.astype(np.float64), K, V)


TYPE_CASES = [
    ("list q", lambda: tessera.attention(Q.tolist(), K, V), "q"),
    ("tuple k", lambda: tessera.attention(Q, tuple(K.ravel()), V), "k"),
    ("mask not a Mask", lambda: tessera.attention(Q, K, V, mask=arr(4, 5, dtype=bool)), "mask"),
    ("mask a dict", lambda: tessera.attention(Q, K, V, mask={"prefix_len": 1}), "mask"),
    ("threads float", lambda: tessera.attention(Q, K, V, threads=1.5), "threads"),
    ("threads bool", lambda: tessera.attention(Q, K, V, threads=True), "threads"),
    ("mask builder int arg", lambda: tessera.mask.prefix(1.5), "prefix_len"),
    ("blocks not an array", lambda: tessera.mask.blocks([[1]], 16, 16), "block_mask"),
    ("decode cache not a KVCache", lambda: tessera.decode(arr(1, 1, 2, 8), "cache"), "cache"),
    ("append list", lambda: tessera.KVCache(1, 1, 8, 4).append(arr(1, 1, 1, 8).tolist(),
                                                              arr(1, 1, 1, 8)), "k"),
    ("merge not arrays", lambda: tessera.merge_states("a", "b"), "outs"),
    ("rotary list", lambda: tessera.apply_rotary(arr(1, 2, 1, 8).tolist()), "x"),
    ("cache batch float", lambda: tessera.KVCache(1.0, 1, 8, 4), "batch"),
]


@pytest.mark.parametrize("call,word", _params(TYPE_CASES))
def test_type_error(call, word):
    with pytest.raises(TypeError) as info:
        call()
    assert_names(word, info.value)


def test_mixing_numpy_and_torch_is_a_type_error():
    torch = torch_or_skip()
    tk = torch.from_numpy(K)
    with pytest.raises(TypeError, match="k"):
        tessera.attention(Q, tk, V)
    with pytest.raises(TypeError, match="q"):
        tessera.attention(torch.from_numpy(Q), K, tk)
    with pytest.raises(TypeError, match="attn_mask"):
        tessera.attention(Q, K, V, attn_mask=torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask.dense"):
        tessera.attention(Q, Q, Q, mask=tessera.mask.dense(torch.ones(4, 4, dtype=torch.bool)))
    with pytest.raises(TypeError, match="v"):
        tessera.KVCache(1, 2, 8, 8).append(K, torch.from_numpy(V))
    with pytest.raises(TypeError, match="lses"):
        tessera.merge_states(arr(2, 3, 2, 8), torch.ones(2, 3, 2))
    with pytest.raises(TypeError, match=r"outs\[1\]"):
        tessera.merge_states([arr(3, 2, 8), torch.ones(3, 2, 8)], [arr(3, 2), arr(3, 2)])
    with pytest.raises(TypeError, match="scores"):
        tessera.mask.select_blocks(Q, K, 16, 16, top_k=1, scores=torch.ones(1, 4, 1, 1))


def test_torch_bad_dtypes_and_devices():
    torch = torch_or_skip()
    t64 = torch.ones(1, 2, 2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="q"):
        tessera.attention(t64, t64, t64)
    ti = torch.ones(1, 2, 2, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="q"):
        tessera.attention(ti, ti, ti)
    meta = torch.empty(1, 2, 2, 8, device="meta")
    with pytest.raises(ValueError, match="CPU"):
        tessera.attention(meta, meta, meta)
    # an additive mask that requires grad: tessera has no gradient for it
    qkv = (torch.ones(1, 2, 2, 8, requires_grad=True),) * 3
    with pytest.raises(ValueError, match="attn_mask"):
        tessera.attention(*qkv, attn_mask=torch.zeros(2, 2, requires_grad=True))
    with torch.no_grad():  # no gradient asked for: fine
        tessera.attention(*qkv, attn_mask=torch.zeros(2, 2, requires_grad=True))


def test_cuda_tensors_are_rejected():
    torch = torch_or_skip()
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    t = torch.ones(1, 2, 2, 8, device="cuda")
    with pytest.raises(ValueError, match="CPU"):
        tessera.attention(t, t, t)


# ---- decode, KV cache, merge, RoPE --------------------------------------------------------------

def cache(dtype="f16", **kw):
    return tessera.KVCache(2, 2, 8, 10, dtype=dtype, **kw)


KV = arr(2, 3, 2, 8)


def filled(dtype="f16", **kw):
    c = cache(dtype, **kw)
    c.append(KV, KV)
    return c


DECODE_CASES = [
    ("cache dtype", lambda: cache("int2"), "dtype"),
    ("cache batch 0", lambda: tessera.KVCache(0, 2, 8, 10), "batch"),
    ("cache heads 0", lambda: tessera.KVCache(1, 0, 8, 10), "num_kv_heads"),
    ("cache head_dim 0", lambda: tessera.KVCache(1, 2, 0, 10), "head_dim"),
    ("cache head_dim 1000", lambda: tessera.KVCache(1, 2, 1000, 10), "head_dim"),
    ("cache max_tokens 0", lambda: tessera.KVCache(1, 2, 8, 0), "max_tokens"),
    ("cache page 0", lambda: cache(page_size=0), "page_size"),
    ("cache page 300", lambda: cache(page_size=300), "page_size"),
    ("cache num_pages contiguous", lambda: cache(num_pages=3), "num_pages"),
    ("append overflow", lambda: filled().append(arr(2, 8, 2, 8), arr(2, 8, 2, 8)), "k"),
    ("append batch", lambda: cache().append(arr(1, 3, 2, 8), arr(1, 3, 2, 8)), "k"),
    ("append heads", lambda: cache().append(arr(2, 3, 1, 8), arr(2, 3, 1, 8)), "k"),
    ("append head dim", lambda: cache().append(arr(2, 3, 2, 4), arr(2, 3, 2, 4)), "k"),
    ("append v shape", lambda: cache().append(KV, arr(2, 2, 2, 8)), "v"),
    ("append rank", lambda: cache().append(KV[0], KV[0]), "k"),
    ("append float64", lambda: cache().append(KV.astype(np.float64), KV.astype(np.float64)),
     "k"),
    ("append dtypes differ", lambda: cache().append(KV, KV.astype(np.float16)), "v"),
    ("append rotary odd", lambda: cache().append(KV, KV, rotary_dim=3), "rotary_dim"),
    ("append rotary > D", lambda: cache().append(KV, KV, rotary_dim=10), "rotary_dim"),
    ("append pool exhausted", lambda: cache(page_size=2, num_pages=3).append(KV, KV), "k"),
    ("decode Q 17", lambda: tessera.decode(arr(2, 17, 4, 8), filled()), "q"),
    ("decode heads", lambda: tessera.decode(arr(2, 1, 3, 8), filled()), "q"),
    ("decode head dim", lambda: tessera.decode(arr(2, 1, 4, 16), filled()), "q"),
    ("decode batch", lambda: tessera.decode(arr(3, 1, 4, 8), filled()), "q"),
    ("decode rank", lambda: tessera.decode(arr(1, 4, 8), filled()), "q"),
    ("decode float64", lambda: tessera.decode(arr(2, 1, 4, 8, dtype=np.float64), filled()), "q"),
    ("decode window -3", lambda: tessera.decode(arr(2, 1, 4, 8), filled(), window_left=-3),
     "window_left"),
    ("decode alibi", lambda: tessera.decode(arr(2, 1, 4, 8), filled(), alibi_slopes=arr(3)),
     "alibi_slopes"),
    ("decode softcap", lambda: tessera.decode(arr(2, 1, 4, 8), filled(), softcap=-2.0),
     "softcap"),
    ("decode path", lambda: tessera.decode(arr(2, 1, 4, 8), filled(), path="x"), "path"),
    ("read b", lambda: filled().read(2), "b"),
    ("merge lse shape", lambda: tessera.merge_states(arr(2, 3, 2, 8), arr(2, 3, 3)), "lse"),
    ("merge rank", lambda: tessera.merge_states(arr(3, 2, 8), arr(3, 2)), "outs"),
    ("merge +inf", lambda: tessera.merge_states(arr(2, 3, 2, 8), np.full((2, 3, 2), np.inf, F32)),
     "lse"),
    ("merge nan", lambda: tessera.merge_states(arr(2, 3, 2, 8), np.full((2, 3, 2), np.nan, F32)),
     "lse"),
    ("merge lse f16", lambda: tessera.merge_states(arr(2, 3, 2, 8), arr(2, 3, 2,
                                                                        dtype=np.float16)),
     "lse"),
    ("merge empty list", lambda: tessera.merge_states([], []), "outs"),
    ("rotary odd", lambda: tessera.apply_rotary(KV, rotary_dim=3), "rotary_dim"),
    ("rotary > D", lambda: tessera.apply_rotary(KV, rotary_dim=10), "rotary_dim"),
    ("rotary positions shape", lambda: tessera.apply_rotary(KV, np.zeros(3, np.int32)),
     "positions"),
    ("rotary positions float", lambda: tessera.apply_rotary(KV, np.zeros(2)), "positions"),
    ("rotary rank", lambda: tessera.apply_rotary(KV[0]), "x"),
    ("rotary float64", lambda: tessera.apply_rotary(KV.astype(np.float64)), "x"),
]


@pytest.mark.parametrize("call,word", _params(DECODE_CASES))
def test_decode_value_errors(call, word):
    with pytest.raises(ValueError) as info:
        call()
    assert_names(word, info.value)


# ---- Nothing is written on error ----------------------------------------------------------------

def snapshot(c):
    reads = [tuple(x.copy() for x in c.read(b, kind="numpy")) for b in range(c.batch)]
    return c.seq_lens, c.block_table, reads


def assert_unchanged(c, snap):
    seq_lens, table, reads = snap
    assert np.array_equal(c.seq_lens, seq_lens)
    if table is not None:
        assert np.array_equal(c.block_table, table)
    for b, (k, v) in enumerate(reads):
        k2, v2 = c.read(b, kind="numpy")
        assert np.array_equal(k2, k) and np.array_equal(v2, v)


@pytest.mark.parametrize("dtype", ["f16", "int8", "int4"])
@pytest.mark.parametrize("page_size", [None, 2])
def test_failed_append_leaves_the_cache_unchanged(rng, dtype, page_size):
    B, H, D = 2, 2, 8
    good = [randn(rng, (B, n, H, D)) for n in (3, 2)]
    c = tessera.KVCache(B, H, D, 12, dtype=dtype, page_size=page_size)
    fresh = tessera.KVCache(B, H, D, 12, dtype=dtype, page_size=page_size)
    bad_nan = good[0].copy()
    bad_nan[1, 2, 1, 3] = np.nan
    failures = [
        (lambda: c.append(good[0], good[0][:, :2]), ValueError),        # v shape
        (lambda: c.append(good[0].astype(np.float64), good[0]), ValueError),  # dtype
        (lambda: c.append(good[0], good[0], rotary_dim=5), ValueError),
        (lambda: c.append(randn(rng, (B, 13, H, D)), randn(rng, (B, 13, H, D))), ValueError),
    ]
    if dtype != "f16":
        # a non-finite value in a quantized cache's first append: no calibration is kept either
        failures.append((lambda: c.append(bad_nan, good[0]), ValueError))
        failures.append((lambda: c.append(good[0], bad_nan), ValueError))
    for step in range(2):
        snap = snapshot(c)
        for call, exc in failures:
            with pytest.raises(exc):
                call()
            assert_unchanged(c, snap)
        c.append(good[step], good[step])
        fresh.append(good[step], good[step])
        # the same state as a cache that never saw the failures
        assert np.array_equal(c.seq_lens, fresh.seq_lens)
        if page_size:
            assert np.array_equal(c.block_table, fresh.block_table)
        for b in range(B):
            for x, y in zip(c.read(b), fresh.read(b)):
                assert np.array_equal(x, y)


def test_paged_pool_exhaustion_leaves_pages_free(rng):
    B, H, D = 2, 1, 8
    c = tessera.KVCache(B, H, D, 16, dtype="f32", page_size=4, num_pages=5)
    c.append(randn(rng, (B, 4, H, D)), randn(rng, (B, 4, H, D)))  # 2 pages
    snap = snapshot(c)
    with pytest.raises(ValueError, match="pages"):
        c.append(randn(rng, (B, 9, H, D)), randn(rng, (B, 9, H, D)))  # 6 more pages: 3 free
    assert_unchanged(c, snap)
    # the 3 free pages are still there: 1 more page each for both sequences fits
    c.append(randn(rng, (B, 4, H, D)), randn(rng, (B, 4, H, D)))
    assert c.seq_lens.tolist() == [8, 8]
    assert len(set(c.block_table[:, :2].ravel().tolist())) == 4


def test_failed_decode_leaves_the_cache_unchanged(rng):
    c = filled("int8")
    snap = snapshot(c)
    with pytest.raises(ValueError):
        tessera.decode(arr(2, 17, 4, 8), c)
    with pytest.raises(ValueError):
        tessera.decode(arr(2, 1, 3, 8), c)
    assert_unchanged(c, snap)


def test_failed_inplace_rotary_leaves_x_unchanged(rng):
    x = randn(rng, (2, 4, 2, 8))
    before = x.copy()
    for kw in (dict(positions=np.zeros(3, np.int32)), dict(rotary_dim=7), dict(rotary_dim=10),
               dict(positions=np.zeros((2, 1), np.int32))):
        with pytest.raises(ValueError):
            tessera.apply_rotary(x, inplace=True, **kw)
        assert np.array_equal(x, before), kw


def test_nan_is_not_an_error_and_propagates(rng):
    # A NaN in a visible element is no argument error: it reaches the outputs it touches.
    q, k, v = (randn(rng, (1, 4, 1, 8)) for _ in range(3))
    q[0, 2, 0, 3] = np.nan
    out, lse = tessera.attention(q, k, v, return_lse=True)
    assert np.isnan(out[0, 2]).all() and np.isnan(lse[0, 0, 2])
    rows = [0, 1, 3]
    assert np.isfinite(out[0, rows]).all() and np.isfinite(lse[0, 0, rows]).all()
