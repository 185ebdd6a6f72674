# SPDX-License-Identifier: Apache-2.0
"""Shared helpers of the Python tests: random inputs, an fp64 numpy reference of attention
(materialized softmax(scale * q k^T + modifiers) v, forward and analytic backward) and the
tolerance check |got - ref| <= atol + rtol * |ref| (docs/testing.md §2).

The reference follows include/tessera/attention.h and mask.h on its own: positions pos(i) =
i + Sk - Sq (bottom-right) or i (top-left), the window test, softcap, then ALiBi, then the mask;
a row that sees no key gets 0 and LSE -inf. It takes the inputs after their rounding to the
input dtype, widened exactly to float64, so a comparison measures tessera's error only.
"""
import math

import numpy as np
import pytest

# |err| <= atol + rtol * |ref| per input dtype, for outputs of magnitude ~1 (attention of N(0, 1)
# values). bf16 / f16 outputs carry their own rounding (2^-9 / 2^-12 relative) on top of the f32
# accumulation.
TOLERANCES = {"f32": (2e-5, 2e-5), "f16": (2e-3, 2e-3), "bf16": (1.2e-2, 1.2e-2)}


def torch_or_skip():
    return pytest.importorskip("torch")


def dtype_name(x):
    if isinstance(x, np.ndarray):
        return {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16",
                np.dtype(np.float64): "f64"}[x.dtype]
    import torch
    return {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16",
            torch.float64: "f64"}[x.dtype]


def to64(x):
    """An fp64 numpy copy of a numpy array or torch tensor (exact for f32 / bf16 / f16)."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return x.copy() if x.dtype == np.bool_ else x.astype(np.float64)
    import torch
    x = x.detach()
    if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
        x = x.to(torch.float32)
    if x.dtype == torch.bool:
        return x.numpy().copy()
    return x.numpy().astype(np.float64)


def randn(rng, shape, dtype="f32", kind="numpy", scale=1.0):
    """Random normal values of `dtype` ('f32', 'f16', 'bf16'), numpy or torch."""
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if kind == "numpy":
        return x.astype({"f32": np.float32, "f16": np.float16}[dtype])
    import torch
    t = torch.from_numpy(x)
    return t.to({"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype])


def qkv(rng, B, Sq, Sk, Hq, Hkv, D, dtype="f32", kind="numpy"):
    return (randn(rng, (B, Sq, Hq, D), dtype, kind), randn(rng, (B, Sk, Hkv, D), dtype, kind),
            randn(rng, (B, Sk, Hkv, D), dtype, kind))


def positions(Sq, Sk, align="bottom_right"):
    """pos(i) of every query row."""
    offset = Sk - Sq if align == "bottom_right" else 0
    return np.arange(Sq) + offset


def window_visible(Sq, Sk, causal=False, window=(-1, -1), align="bottom_right"):
    """bool [Sq, Sk]: the causal / sliding-window test of attention.h (-1: unbounded; causal
    caps the right bound at 0)."""
    wl, wr = window
    if causal:
        wr = 0 if wr < 0 else min(wr, 0)
    pos = positions(Sq, Sk, align)[:, None]
    j = np.arange(Sk)[None, :]
    vis = np.ones((Sq, Sk), dtype=bool)
    if wl >= 0:
        vis &= j >= pos - wl
    if wr >= 0:
        vis &= j <= pos + wr
    return vis


def _logits(q, k, scale, softcap, alibi, align, window_vis, visible, bias):
    """fp64 logits [B, Hq, Sq, Sk] after softcap, ALiBi and the masks, and the capped logits'
    tanh (for the backward). q [B, Sq, Hq, D], k [B, Sk, Hkv, D] fp64."""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kk = np.repeat(k, G, axis=2)  # query head h reads KV head h // G
    s = np.einsum("bihd,bjhd->bhij", q, kk) * scale
    t = None
    if softcap:
        t = np.tanh(s / softcap)
        s = softcap * t
    if alibi is not None:
        slopes = np.asarray(alibi, dtype=np.float64)
        slopes = np.broadcast_to(slopes.reshape((-1, Hq)) if slopes.ndim == 2 else slopes[None],
                                 (B, Hq))
        dist = np.abs(positions(Sq, Sk, align)[:, None] - np.arange(Sk)[None, :])
        s = s - slopes[:, :, None, None] * dist[None, None]
    if bias is not None:
        s = s + np.broadcast_to(np.asarray(bias, dtype=np.float64), s.shape)
    vis = np.broadcast_to(window_vis, s.shape)
    if visible is not None:
        vis = vis & np.broadcast_to(visible, s.shape)
    s = np.where(vis, s, -np.inf)
    return s, t


def ref_attention(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, alibi=None, scale=None,
                  align="bottom_right", visible=None, bias=None, sigmoid=None, dout=None):
    """The fp64 reference: returns (out [B, Sq, Hq, D], lse [B, Hq, Sq]) and, with dout, also
    (dq, dk, dv) from the analytic backward. `visible` (bool) and `bias` (float, -inf hides) are
    anything broadcastable to [B, Hq, Sq, Sk]; `sigmoid` is None (softmax) or the sigmoid bias b
    (weights 1 / (1 + exp(-(s + b))), no normalization, lse None)."""
    q, k, v = to64(q), to64(k), to64(v)
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if scale is None:
        scale = float(np.float32(1.0 / math.sqrt(D)))  # the float nearest 1/sqrt(D)
    wvis = window_visible(Sq, Sk, causal, window, align)
    s, t = _logits(q, k, scale, softcap, alibi, align, wvis, visible, bias)
    vv = np.repeat(v, G, axis=2)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if sigmoid is not None:
            p = np.where(np.isneginf(s), 0.0, 1.0 / (1.0 + np.exp(-(s + sigmoid))))
            lse = None
        else:
            m = s.max(axis=-1, keepdims=True)
            m_safe = np.where(np.isneginf(m), 0.0, m)
            e = np.exp(s - m_safe)
            l = e.sum(axis=-1, keepdims=True)
            p = np.where(l > 0, e / np.where(l > 0, l, 1.0), 0.0)
            lse = np.where(l[..., 0] > 0, (m_safe + np.log(np.where(l > 0, l, 1.0)))[..., 0],
                           -np.inf)
    out = np.einsum("bhij,bjhd->bihd", p, vv)
    if dout is None:
        return out, lse
    do = to64(dout)
    dvv = np.einsum("bhij,bihd->bjhd", p, do)
    dp = np.einsum("bihd,bjhd->bhij", do, vv)
    if sigmoid is not None:
        ds = dp * p * (1.0 - p)
    else:
        delta = np.einsum("bihd,bihd->bhi", do, out)[..., None]
        ds = p * (dp - delta)
    if softcap:
        ds = ds * np.where(np.isneginf(s), 0.0, 1.0 - np.nan_to_num(t) ** 2)
    kk = np.repeat(k, G, axis=2)
    dq = scale * np.einsum("bhij,bjhd->bihd", ds, kk)
    dkk = scale * np.einsum("bhij,bihd->bjhd", ds, q)
    dk = dkk.reshape(B, Sk, Hkv, G, D).sum(axis=3)
    dv = dvv.reshape(B, Sk, Hkv, G, D).sum(axis=3)
    return out, lse, dq, dk, dv


def assert_close(got, ref, atol, rtol=None, name="out"):
    """|got - ref| <= atol + rtol * |ref| everywhere (NaN never passes; -inf must match -inf)."""
    rtol = atol if rtol is None else rtol
    g, r = to64(got), np.asarray(ref, dtype=np.float64)
    assert g.shape == r.shape, f"{name}: shape {g.shape} != reference {r.shape}"
    both_inf = np.isinf(r) & (g == r)
    with np.errstate(invalid="ignore"):
        err = np.where(both_inf, 0.0, np.abs(g - r))
    bound = atol + rtol * np.where(np.isinf(r), 0.0, np.abs(r))
    bad = ~(err <= bound)
    if bad.any():
        idx = tuple(int(x) for x in np.argwhere(bad)[0])
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} elements off; first at "
                             f"{idx}: got {g[idx]!r}, reference {r[idx]!r}; max err "
                             f"{np.nanmax(np.where(np.isinf(err), np.nan, err)) if err.size else 0}"
                             f" (atol {atol}, rtol {rtol})")


def tol(dtype, keys=1):
    """(atol, rtol) for outputs of an input dtype, widened with sqrt of the key count for long
    rows of low-precision inputs."""
    atol, rtol = TOLERANCES[dtype]
    if dtype != "f32" and keys > 64:
        f = math.sqrt(keys / 64)
        atol, rtol = atol * f, rtol * f
    return atol, rtol


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name: every test draws its own fixed inputs."""
    seed = sum(ord(c) * (i + 1) for i, c in enumerate(request.node.name)) % (2 ** 32)
    return np.random.default_rng(seed)
