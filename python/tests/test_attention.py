# SPDX-License-Identifier: Apache-2.0
"""tessera.attention and tessera.attention_backward against the fp64 numpy reference of
conftest.py: dtypes, shapes, modifiers, strided inputs, varlen, attn_mask, determinism, the GIL,
and torch autograd."""
import math
import threading
import time
import tracemalloc

import numpy as np
import pytest

import tessera
from conftest import (assert_close, qkv, randn, ref_attention, to64, tol, torch_or_skip,
                      window_visible)

# (B, Sq, Sk, Hq, Hkv, D)
SHAPES = [
    (1, 1, 1, 1, 1, 8),
    (2, 17, 33, 2, 2, 40),
    (1, 33, 17, 6, 2, 64),
    (2, 5, 70, 6, 2, 128),
    (1, 64, 64, 4, 4, 64),
    (3, 1, 45, 6, 2, 8),
]


def check_forward(q, k, v, dtype, return_lse=True, lse_tol=None, **kw):
    out, lse = tessera.attention(q, k, v, return_lse=True, **kw)
    ref_kw = {name: kw[name] for name in ("causal", "window", "softcap", "scale", "align")
              if name in kw}
    if "alibi_slopes" in kw:
        ref_kw["alibi"] = to64(kw["alibi_slopes"])
    ref_out, ref_lse = ref_attention(q, k, v, **ref_kw)
    atol, rtol = tol(dtype, k.shape[1])
    assert_close(out, ref_out, atol, rtol)
    assert_close(lse, ref_lse, *(lse_tol or (1e-4, 1e-5)), name="lse")
    return out, lse


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_forward_numpy(rng, shape, causal, dtype):
    B, Sq, Sk, Hq, Hkv, D = shape
    q, k, v = qkv(rng, B, Sq, Sk, Hq, Hkv, D, dtype)
    out, lse = check_forward(q, k, v, dtype, causal=causal)
    assert isinstance(out, np.ndarray) and out.dtype == q.dtype and out.shape == (B, Sq, Hq, D)
    assert isinstance(lse, np.ndarray) and lse.dtype == np.float32 and lse.shape == (B, Hq, Sq)


@pytest.mark.parametrize("shape", SHAPES[1:4], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
def test_forward_torch(rng, shape, dtype):
    torch = torch_or_skip()
    B, Sq, Sk, Hq, Hkv, D = shape
    q, k, v = qkv(rng, B, Sq, Sk, Hq, Hkv, D, dtype, kind="torch")
    out, lse = check_forward(q, k, v, dtype, causal=True)
    assert isinstance(out, torch.Tensor) and out.dtype == q.dtype and out.shape == q.shape
    assert isinstance(lse, torch.Tensor) and lse.dtype == torch.float32
    assert tuple(lse.shape) == (B, Hq, Sq)
    assert not out.requires_grad


@pytest.mark.parametrize("kw", [
    dict(window=(3, 2)),
    dict(window=(5, 0)),
    dict(window=(0, 0)),
    dict(causal=True, window=(4, 3)),
    dict(causal=True, align="top_left"),
    dict(window=(2, 1), align="top_left"),
    dict(softcap=2.0),
    dict(scale=0.7),
    dict(softcap=1.5, causal=True, scale=0.9),
], ids=str)
@pytest.mark.parametrize("sq_sk", [(9, 23), (23, 9), (16, 16)])
def test_forward_modifiers(rng, kw, sq_sk):
    Sq, Sk = sq_sk
    q, k, v = qkv(rng, 2, Sq, Sk, 4, 2, 16)
    check_forward(q, k, v, "f32", **kw)


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("align", ["bottom_right", "top_left"])
def test_forward_alibi(rng, per_batch, align):
    B, Hq = 2, 4
    q, k, v = qkv(rng, B, 7, 19, Hq, 2, 16)
    slopes = rng.uniform(0.05, 0.8, size=(B, Hq) if per_batch else (Hq,)).astype(np.float32)
    check_forward(q, k, v, "f32", alibi_slopes=slopes, align=align)
    check_forward(q, k, v, "f32", alibi_slopes=slopes, align=align, causal=True, softcap=3.0)


def test_forward_rows_without_keys(rng):
    # Sq > Sk bottom-right causal: the first Sq - Sk rows see nothing: out 0, lse -inf.
    q, k, v = qkv(rng, 1, 6, 3, 2, 1, 8)
    out, lse = check_forward(q, k, v, "f32", causal=True)
    assert np.all(out[:, :3] == 0) and np.all(np.isneginf(lse[:, :, :3]))
    assert np.all(np.isfinite(lse[:, :, 3:]))
    # Sk = 0: every row is empty.
    q, k, v = qkv(rng, 1, 4, 0, 2, 2, 8)
    out, lse = tessera.attention(q, k, v, return_lse=True)
    assert np.all(out == 0) and np.all(np.isneginf(lse))


def test_return_lse_shape_and_kind(rng):
    q, k, v = qkv(rng, 2, 5, 7, 6, 3, 8, "f16")
    out = tessera.attention(q, k, v)
    assert isinstance(out, np.ndarray) and out.dtype == np.float16
    out2, lse = tessera.attention(q, k, v, return_lse=True)
    assert lse.shape == (2, 6, 5) and lse.dtype == np.float32
    assert np.array_equal(out, out2)


@pytest.mark.parametrize("path", ["reference", "generic", "fast", "auto"])
@pytest.mark.parametrize("D", [40, 64])
def test_forward_every_path(rng, path, D):
    q, k, v = qkv(rng, 2, 20, 37, 4, 2, D)
    if path == "fast" and D not in (64, 128, 256):
        with pytest.raises(ValueError, match="path"):  # no compile-time kernel for this D
            tessera.attention(q, k, v, path=path)
        return
    check_forward(q, k, v, "f32", causal=True, softcap=4.0, path=path)


# ---- Strided inputs, read in place --------------------------------------------------------------

def test_numpy_swapaxes_and_step_slices(rng):
    # q stored as [B, H, S, D] and viewed as [B, S, H, D]; k, v slices with a step along S.
    B, H, Sq, Sk, D = 2, 4, 13, 21, 40
    q_bhsd = randn(rng, (B, H, Sq, D))
    q = np.swapaxes(q_bhsd, 1, 2)
    k_big = randn(rng, (B, 2 * Sk, H, D))
    v_big = randn(rng, (B, Sk, H, 2 * D))
    k = k_big[:, ::2]
    v = v_big[..., ::2]
    assert not q.flags.c_contiguous and not k.flags.c_contiguous and not v.flags.c_contiguous
    out, lse = tessera.attention(q, k, v, causal=True, return_lse=True)
    ref_out, ref_lse = ref_attention(np.ascontiguousarray(q), np.ascontiguousarray(k),
                                     np.ascontiguousarray(v), causal=True)
    assert_close(out, ref_out, *tol("f32"))
    assert_close(lse, ref_lse, 1e-4, 1e-5, name="lse")
    # The same bits as with contiguous copies (the kernel reads the strided views in place).
    out_c = tessera.attention(np.ascontiguousarray(q), np.ascontiguousarray(k),
                              np.ascontiguousarray(v), causal=True)
    assert np.array_equal(out, out_c)


def test_numpy_broadcast_inputs_stride_zero(rng):
    # K / V shared by the batch through a stride-0 (read-only) view.
    B, S, H, D = 3, 10, 2, 16
    q = randn(rng, (B, S, H, D))
    k = np.broadcast_to(randn(rng, (1, S, H, D)), (B, S, H, D))
    v = np.broadcast_to(randn(rng, (1, S, H, D)), (B, S, H, D))
    assert k.strides[0] == 0 and not k.flags.writeable
    out = tessera.attention(q, k, v, causal=True)
    ref_out, _ = ref_attention(q, np.ascontiguousarray(k), np.ascontiguousarray(v), causal=True)
    assert_close(out, ref_out, *tol("f32"))


def test_numpy_strided_input_is_not_copied(rng):
    # A strided q of 8 MiB: the call allocates the output (4 MiB) and nothing near q's size.
    B, H, S, D = 1, 16, 1024, 64
    q_bhsd = randn(rng, (B, H, S, 2 * D))
    q = np.swapaxes(q_bhsd, 1, 2)[..., ::2]
    k = randn(rng, (B, 16, H, D))
    v = randn(rng, (B, 16, H, D))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = tessera.attention(q, k, v)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (B, S, H, D)
    assert peak < out.nbytes + (1 << 20), f"peak {peak} bytes: a copy of q ({q.nbytes}) was made?"
    ref_out, _ = ref_attention(np.ascontiguousarray(q[:, :64]), k, v)
    assert_close(out[:, :64], ref_out, *tol("f32"))


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_torch_transposed_inputs(rng, dtype):
    torch = torch_or_skip()
    B, H, Sq, Sk, D = 2, 4, 11, 19, 64
    q = randn(rng, (B, H, Sq, D), dtype, "torch").transpose(1, 2)
    k = randn(rng, (B, H, Sk, D), dtype, "torch").transpose(1, 2)
    v = randn(rng, (B, 2 * Sk, H, D), dtype, "torch")[:, 1::2]
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    out = tessera.attention(q, k, v, causal=True)
    assert isinstance(out, torch.Tensor) and out.dtype == q.dtype and out.shape == (B, Sq, H, D)
    ref_out, _ = ref_attention(q, k, v, causal=True)
    assert_close(out, ref_out, *tol(dtype, Sk))
    out_c = tessera.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    assert torch.equal(out, out_c)


# ---- Varlen -------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("packed4", [False, True])
def test_varlen_equals_per_sequence_calls(rng, causal, packed4):
    lens_q = [3, 1, 0, 9, 5]
    lens_k = [7, 1, 4, 9, 2]
    Hq, Hkv, D = 4, 2, 32
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = randn(rng, (int(cu_q[-1]), Hq, D))
    k = randn(rng, (int(cu_k[-1]), Hkv, D))
    v = randn(rng, (int(cu_k[-1]), Hkv, D))
    args = (q[None], k[None], v[None]) if packed4 else (q, k, v)
    out, lse = tessera.attention(*args, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=causal,
                                 return_lse=True)
    assert out.shape == args[0].shape
    assert lse.shape == (Hq, int(cu_q[-1])) and lse.dtype == np.float32
    out = out.reshape(q.shape)
    for s in range(len(lens_q)):
        qs, ks = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        ref_out, ref_lse = ref_attention(q[None, qs], k[None, ks], v[None, ks], causal=causal)
        assert_close(out[qs], ref_out[0], *tol("f32"), name=f"out of sequence {s}")
        assert_close(lse[:, qs], ref_lse[0], 1e-4, 1e-5, name=f"lse of sequence {s}")
        single = tessera.attention(q[None, qs], k[None, ks], v[None, ks], causal=causal)
        assert_close(out[qs], to64(single)[0], 1e-6, 1e-6, name=f"single call {s}")


def test_varlen_torch_and_list_cu_seqlens(rng):
    torch = torch_or_skip()
    lens = [4, 6]
    cu = [0, 4, 10]
    q, k, v = (randn(rng, (10, 2, 16), "f32", "torch") for _ in range(3))
    out = tessera.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=torch.tensor(cu),
                            causal=True)
    assert isinstance(out, torch.Tensor)
    for s in range(len(lens)):
        sl = slice(cu[s], cu[s + 1])
        ref_out, _ = ref_attention(q[None, sl], k[None, sl], v[None, sl], causal=True)
        assert_close(out[sl], ref_out[0], *tol("f32"))


# ---- attn_mask ----------------------------------------------------------------------------------

MASK_SHAPES = {"Sk": lambda B, H, Sq, Sk: (Sk,),
               "SqSk": lambda B, H, Sq, Sk: (Sq, Sk),
               "padding": lambda B, H, Sq, Sk: (B, 1, 1, Sk),
               "heads": lambda B, H, Sq, Sk: (1, H, Sq, Sk),
               "full": lambda B, H, Sq, Sk: (B, H, Sq, Sk),
               "B1SqSk": lambda B, H, Sq, Sk: (B, 1, Sq, Sk)}


@pytest.mark.parametrize("shape_name", list(MASK_SHAPES))
@pytest.mark.parametrize("mask_dtype", ["bool", "f32", "f16"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_attn_mask_broadcast(rng, shape_name, mask_dtype, kind):
    if kind == "torch":
        torch = torch_or_skip()
    B, H, Sq, Sk, D = 2, 4, 7, 12, 16
    q, k, v = qkv(rng, B, Sq, Sk, H, 2, D, "f32", kind)
    mshape = MASK_SHAPES[shape_name](B, H, Sq, Sk)
    if mask_dtype == "bool":
        m = rng.random(mshape) < 0.7
        visible, bias = m, None
    else:
        m = rng.standard_normal(mshape).astype(np.float32)
        m[rng.random(mshape) < 0.2] = -np.inf
        m = m.astype(np.float16 if mask_dtype == "f16" else np.float32)
        visible, bias = None, m.astype(np.float64)
    # broadcast like torch's SDPA: trailing dims align with [B, H, Sq, Sk]
    full_shape = (1,) * (4 - len(mshape)) + mshape
    visible = None if visible is None else visible.reshape(full_shape)
    bias = None if bias is None else bias.reshape(full_shape)
    attn_mask = torch.from_numpy(m) if kind == "torch" else m
    out, lse = tessera.attention(q, k, v, attn_mask=attn_mask, causal=True, return_lse=True)
    ref_out, ref_lse = ref_attention(q, k, v, visible=visible, bias=bias, causal=True)
    assert_close(out, ref_out, *tol("f32"))
    assert_close(lse, ref_lse, 1e-4, 1e-5, name="lse")


def test_padding_mask_is_not_materialized_numpy(rng):
    # [B, 1, 1, Sk] would expand to B * H * Sq * Sk = 16 MiB of bools; the call must stay far
    # below that (the output is 1 MiB).
    B, H, S, D = 2, 8, 1024, 8
    q, k, v = qkv(rng, B, S, S, H, H, D)
    pad = np.ones((B, 1, 1, S), dtype=bool)
    pad[0, ..., 700:] = False
    pad[1, ..., 100:] = False
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = tessera.attention(q, k, v, attn_mask=pad, window=(40, 40))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < out.nbytes + (1 << 20), f"peak {peak} bytes for a {out.nbytes}-byte output"
    rows = np.arange(650, 760)
    band = np.abs(rows[:, None] - np.arange(S)[None, :]) <= 40
    ref_out, _ = ref_attention(q[:, rows], k, v, visible=pad & band)
    assert_close(out[:, rows], ref_out, *tol("f32"))


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_padding_mask_larger_than_memory(rng, kind):
    # B=1, H=8, Sq=Sk=2^17: the expanded bool mask would take 128 GiB. With a (0, 0) window the
    # work is linear, so the call is quick when (and only when) the mask stays a stride-0 view.
    B, H, S, D = 1, 8, 1 << 17, 8
    q = randn(rng, (B, S, H, D), "f32", kind)
    k = randn(rng, (B, S, H, D), "f32", kind)
    v = randn(rng, (B, S, H, D), "f32", kind)
    pad = np.ones((B, 1, 1, S), dtype=bool)
    pad[..., 5::7] = False
    if kind == "torch":
        import torch
        pad = torch.from_numpy(pad)
    out = tessera.attention(q, k, v, attn_mask=pad, window=(0, 0))
    # Each row sees only its own key: out = v[i] where the key is kept, 0 where padded.
    o, vv, keep = to64(out), to64(v), to64(pad)[0, 0, 0]
    assert np.array_equal(o[0, ~keep], np.zeros_like(o[0, ~keep]))
    assert_close(o[0, keep], vv[0, keep], 1e-6, 1e-6)


# ---- Determinism and threads --------------------------------------------------------------------

def test_threads_one_equals_default_bitwise(rng):
    q, k, v = qkv(rng, 2, 300, 300, 4, 2, 64)
    dout = randn(rng, q.shape)
    out1, lse1 = tessera.attention(q, k, v, causal=True, threads=1, return_lse=True)
    out2, lse2 = tessera.attention(q, k, v, causal=True, return_lse=True)
    out3, lse3 = tessera.attention(q, k, v, causal=True, threads=np.int64(3), return_lse=True)
    assert np.array_equal(out1, out2) and np.array_equal(lse1, lse2)
    assert np.array_equal(out1, out3) and np.array_equal(lse1, lse3)
    g1 = tessera.attention_backward(dout, q, k, v, out1, lse1, causal=True, threads=1)
    g2 = tessera.attention_backward(dout, q, k, v, out1, lse1, causal=True)
    for a, b in zip(g1, g2):
        assert np.array_equal(a, b)


def test_gil_is_released(rng):
    # One long call in a worker thread; the main thread must run Python code while it is inside
    # the kernel (with the GIL held it could not run a single bytecode until the call returns).
    q, k, v = qkv(rng, 1, 4096, 4096, 4, 4, 64)  # ~0.1 s on one core
    times = {}

    def work():
        times["start"] = time.perf_counter()
        tessera.attention(q, k, v, threads=1)
        times["end"] = time.perf_counter()

    t = threading.Thread(target=work)
    ticks = []
    t.start()
    while t.is_alive():
        ticks.append(time.perf_counter())
    t.join()
    duration = times["end"] - times["start"]
    assert duration > 0.02, f"the call took {duration} s: too short to tell"
    lo = times["start"] + 0.25 * duration
    hi = times["end"] - 0.25 * duration
    inside = [x for x in ticks if lo < x < hi]
    assert len(inside) > 100, (f"the main thread ran {len(inside)} iterations during the middle "
                               f"half of a {duration:.3f} s call")


def test_two_threads_give_the_same_results(rng):
    q, k, v = qkv(rng, 1, 256, 256, 4, 4, 32)
    expected = tessera.attention(q, k, v, causal=True)
    results = [None, None]

    def work(i):
        results[i] = tessera.attention(q, k, v, causal=True)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(results[0], expected) and np.array_equal(results[1], expected)


# ---- Backward -----------------------------------------------------------------------------------

def test_reference_backward_matches_finite_differences(rng):
    # The analytic fp64 backward of conftest.py against central differences of its forward.
    q, k, v = (to64(x) for x in qkv(rng, 1, 3, 4, 2, 1, 3))
    dout = rng.standard_normal(q.shape)
    kw = dict(causal=True, softcap=1.3, alibi=np.array([0.3, 0.1]), scale=0.8)
    _, _, dq, dk, dv = ref_attention(q, k, v, dout=dout, **kw)

    def loss(qq, kk, vv):
        return float(np.sum(ref_attention(qq, kk, vv, **kw)[0] * dout))

    eps = 1e-6
    for x, grad, which in ((q, dq, 0), (k, dk, 1), (v, dv, 2)):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            args = [q.copy(), k.copy(), v.copy()]
            args[which][idx] += eps
            up = loss(*args)
            args[which][idx] -= 2 * eps
            down = loss(*args)
            num[idx] = (up - down) / (2 * eps)
        assert_close(grad, num, 1e-7, 1e-6, name="dqkv"[0] + "qkv"[which])


@pytest.mark.parametrize("shape", SHAPES[:5], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window=(4, 1), softcap=2.0),
                                dict(causal=True, align="top_left", scale=0.5)], ids=str)
def test_backward_numpy_f32(rng, shape, kw):
    B, Sq, Sk, Hq, Hkv, D = shape
    q, k, v = qkv(rng, B, Sq, Sk, Hq, Hkv, D)
    dout = randn(rng, q.shape)
    out, lse = tessera.attention(q, k, v, return_lse=True, **kw)
    dq, dk, dv = tessera.attention_backward(dout, q, k, v, out, lse, **kw)
    for g, x in ((dq, q), (dk, k), (dv, v)):
        assert isinstance(g, np.ndarray) and g.dtype == x.dtype and g.shape == x.shape
    _, _, rdq, rdk, rdv = ref_attention(q, k, v, dout=dout, **kw)
    scale = max(1.0, float(np.abs(rdq).max()), float(np.abs(rdk).max()))
    for name, g, r in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert_close(g, r, 5e-5 * scale, 5e-5, name=name)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "padding"])
def test_backward_with_attn_mask(rng, mask_kind):
    B, Sq, Sk, H = 2, 9, 12, 4
    q, k, v = qkv(rng, B, Sq, Sk, H, 2, 16)
    dout = randn(rng, q.shape)
    if mask_kind == "bool":
        m = rng.random((Sq, Sk)) < 0.7
        vis, bias = m, None
    elif mask_kind == "float":
        m = rng.standard_normal((1, H, Sq, Sk)).astype(np.float32)
        vis, bias = None, m
    else:
        m = np.ones((B, 1, 1, Sk), dtype=bool)
        m[1, ..., 7:] = False
        vis, bias = m, None
    out, lse = tessera.attention(q, k, v, attn_mask=m, return_lse=True)
    dq, dk, dv = tessera.attention_backward(dout, q, k, v, out, lse, attn_mask=m)
    _, _, rdq, rdk, rdv = ref_attention(q, k, v, dout=dout, visible=vis, bias=bias)
    for name, g, r in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert_close(g, r, 5e-5, 5e-5, name=name)
    if mask_kind == "padding":
        assert np.all(dk[1, 7:] == 0) and np.all(dv[1, 7:] == 0)  # keys nobody sees


def test_backward_numpy_f16_alibi(rng):
    q, k, v = qkv(rng, 2, 9, 14, 4, 2, 32, "f16")
    dout = randn(rng, q.shape, "f16")
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], dtype=np.float32)
    out, lse = tessera.attention(q, k, v, return_lse=True, causal=True, alibi_slopes=slopes)
    dq, dk, dv = tessera.attention_backward(dout, q, k, v, out, lse, causal=True,
                                            alibi_slopes=slopes)
    assert dq.dtype == np.float16
    _, _, rdq, rdk, rdv = ref_attention(q, k, v, dout=dout, causal=True, alibi=slopes)
    for name, g, r in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert_close(g, r, 1e-2, 1e-2, name=name)


def test_backward_varlen(rng):
    cu = np.array([0, 3, 11], dtype=np.int32)
    q, k, v, dout = (randn(rng, (11, 2, 16)) for _ in range(4))
    out, lse = tessera.attention(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True,
                                 return_lse=True)
    dq, dk, dv = tessera.attention_backward(dout, q, k, v, out, lse, cu_seqlens_q=cu,
                                            cu_seqlens_k=cu, causal=True)
    for s in range(2):
        sl = slice(cu[s], cu[s + 1])
        _, _, rdq, rdk, rdv = ref_attention(q[None, sl], k[None, sl], v[None, sl],
                                            dout=dout[None, sl], causal=True)
        for name, g, r in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
            assert_close(g[sl], r[0], 5e-5, 5e-5, name=f"{name} of sequence {s}")


def _torch_reference(torch, q, k, v, causal=False, softcap=0.0, window=(-1, -1)):
    """attention in fp64 torch ops (autograd differentiates it)."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kk = k.repeat_interleave(G, dim=2)
    vv = v.repeat_interleave(G, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * float(np.float32(1 / math.sqrt(D)))
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    vis = torch.from_numpy(window_visible(Sq, Sk, causal, window))
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("bhij,bjhd->bihd", p, vv)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("kw", [dict(causal=True), dict(softcap=3.0, window=(5, 2))], ids=str)
def test_torch_autograd(rng, dtype, kw):
    torch = torch_or_skip()
    B, Sq, Sk, Hq, Hkv, D = 2, 9, 13, 6, 2, 40
    q, k, v = (x.requires_grad_() for x in qkv(rng, B, Sq, Sk, Hq, Hkv, D, dtype, "torch"))
    dout = randn(rng, (B, Sq, Hq, D), dtype, "torch")
    out = tessera.attention(q, k, v, **kw)
    assert out.requires_grad and out.dtype == q.dtype
    out.backward(dout)
    grads = (q.grad, k.grad, v.grad)
    # the same gradients as tessera.attention_backward
    with torch.no_grad():
        out2, lse = tessera.attention(q.detach(), k.detach(), v.detach(), return_lse=True, **kw)
    assert torch.equal(out.detach(), out2)
    direct = tessera.attention_backward(dout, q.detach(), k.detach(), v.detach(), out2, lse, **kw)
    for g, d in zip(grads, direct):
        assert g.dtype == d.dtype and torch.equal(g, d)
    # and as torch autograd through an fp64 torch reference
    q64, k64, v64 = (torch.from_numpy(to64(x)).requires_grad_() for x in (q, k, v))
    ref = _torch_reference(torch, q64, k64, v64, **kw)
    ref.backward(torch.from_numpy(to64(dout)))
    assert_close(out, ref.detach().numpy(), *tol(dtype))
    gtol = {"f32": (1e-4, 1e-4), "f16": (1e-2, 1e-2), "bf16": (6e-2, 3e-2)}[dtype]
    for name, g, r in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                       ("dv", v.grad, v64.grad)):
        assert_close(g, r.numpy(), *gtol, name=name)
    # and as the numpy fp64 analytic backward
    _, _, rdq, rdk, rdv = ref_attention(q, k, v, dout=dout, **kw)
    assert_close(q.grad, rdq, *gtol, name="dq vs numpy")
    assert_close(k.grad, rdk, *gtol, name="dk vs numpy")
    assert_close(v.grad, rdv, *gtol, name="dv vs numpy")


def test_torch_autograd_lse_has_no_gradient_but_out_does(rng):
    torch = torch_or_skip()
    q, k, v = (x.requires_grad_() for x in qkv(rng, 1, 4, 4, 2, 2, 8, "f32", "torch"))
    out, lse = tessera.attention(q, k, v, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_torch_autograd_with_masks_alibi_and_varlen(rng):
    torch = torch_or_skip()
    B, Sq, Sk, Hq, Hkv, D = 2, 8, 11, 4, 2, 16
    q, k, v = (x.requires_grad_() for x in qkv(rng, B, Sq, Sk, Hq, Hkv, D, "f32", "torch"))
    dout = randn(rng, (B, Sq, Hq, D), "f32", "torch")
    pad = torch.ones(B, 1, 1, Sk, dtype=torch.bool)
    pad[0, ..., 9:] = False
    slopes = torch.tensor([0.3, 0.2, 0.1, 0.05])
    out = tessera.attention(q, k, v, attn_mask=pad, alibi_slopes=slopes, causal=True,
                            mask=tessera.mask.prefix(3))
    out.backward(dout)
    j = np.arange(Sk)
    pos = np.arange(Sq) + Sk - Sq
    base = (j[None, :] <= pos[:, None]) | (j[None, :] < 3)  # causal OR the prefix
    _, _, rdq, rdk, rdv = ref_attention(q, k, v, dout=dout, alibi=slopes.numpy(),
                                        visible=base & pad.numpy())
    for name, g, r in (("dq", q.grad, rdq), ("dk", k.grad, rdk), ("dv", v.grad, rdv)):
        assert_close(g, r, 5e-5, 5e-5, name=name)
    # varlen through the autograd op
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    qv, kv, vv = (randn(rng, (8, 2, 16), "f32", "torch").requires_grad_() for _ in range(3))
    do = randn(rng, (8, 2, 16), "f32", "torch")
    tessera.attention(qv, kv, vv, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True).backward(do)
    for s in range(2):
        sl = slice(int(cu[s]), int(cu[s + 1]))
        _, _, rdq, rdk, rdv = ref_attention(qv[None, sl], kv[None, sl], vv[None, sl],
                                            dout=do[None, sl], causal=True)
        for name, g, r in (("dq", qv.grad, rdq), ("dk", kv.grad, rdk), ("dv", vv.grad, rdv)):
            assert_close(g[sl], r[0], 5e-5, 5e-5, name=f"{name} of sequence {s}")
