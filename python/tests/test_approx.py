# SPDX-License-Identifier: Apache-2.0
"""tessera.approx_attention / approx_attention_backward: every method from numpy and torch, the
settings under which a method is exact (against this suite's fp64 reference of attention), the
Performer estimate against a numpy FAVOR+ with the same projection, torch autograd, and bad
input."""
import math

import numpy as np
import pytest

import tessera
from conftest import qkv, ref_attention, torch_or_skip

METHODS = ("wersa", "hyper", "performer", "agent", "routing", "hilo")
B, S, HQ, HKV, D = 2, 64, 4, 2, 16  # S = 64: an 8 x 8 grid for HiLo


def rel_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def centroids(rng, clusters):
    c = rng.standard_normal((HQ, clusters, D)).astype(np.float32)
    return c / np.linalg.norm(c, axis=-1, keepdims=True)


def options(method, rng):
    return {"routing": {"centroids": centroids(rng, 4), "clusters": 4},
            "hilo": {"grid_h": 8, "grid_w": 8, "window": 2, "lofi_heads": 2},
            "agent": {"agents": 8}}.get(method, {})


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_is_deterministic(method):
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, B, S, S, HQ, HKV, D)
    opts = options(method, rng)
    out = tessera.approx_attention(q, k, v, method=method, seed=7, **opts)
    assert out.shape == (B, S, HQ, D) and out.dtype == np.float32
    assert np.isfinite(out).all()
    again = tessera.approx_attention(q, k, v, method=method, seed=7, threads=1, **opts)
    np.testing.assert_array_equal(out, again)


def test_exact_settings():
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, B, S, S, HQ, HKV, D)
    want, want_lse = ref_attention(q, k, v, causal=True)
    out, lse = tessera.approx_attention(q, k, v, method="hyper", causal=True, return_lse=True)
    assert rel_error(out, want) < 1e-5
    np.testing.assert_allclose(lse, want_lse, atol=1e-4)
    out = tessera.approx_attention(q, k, v, method="routing", causal=True, clusters=1, window=S,
                                   centroids=centroids(rng, 1))
    assert rel_error(out, want) < 1e-5
    full = ref_attention(q, k, v)[0]
    out = tessera.approx_attention(q, k, v, method="hilo", grid_h=8, grid_w=8, window=8,
                                   lofi_heads=0)
    assert rel_error(out, full) < 1e-5


def favor_reference(q, k, v, projection, causal):
    """FAVOR+ with the given projection [m, D], fp64: phi(x) = exp(w.x' - |x'|^2 / 2) / sqrt(m),
    x' = x / D^(1/4), then normalized linear attention (the stabilizers cancel)."""
    q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, projection))
    m = w.shape[0]
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    c = q.shape[-1] ** -0.25

    def phi(x):
        x = x * c
        return np.exp(x @ w.T - (x * x).sum(-1, keepdims=True) / 2) / math.sqrt(m)

    fq, fk = phi(q), phi(k)  # [B, S, H, m]
    scores = np.einsum("bshm,bthm->bhst", fq, fk)
    if causal:
        scores = np.tril(scores)
    out = np.einsum("bhst,bthd->bshd", scores, v)
    return out / scores.sum(-1).transpose(0, 2, 1)[..., None]


@pytest.mark.parametrize("causal", [False, True])
def test_performer_matches_favor_with_the_same_projection(causal):
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 1, 40, 40, 2, 1, 8)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    out = tessera.approx_attention(q, k, v, method="performer", causal=causal, projection=w)
    np.testing.assert_allclose(out, favor_reference(q, k, v, w, causal), rtol=2e-4, atol=2e-4)


def test_torch_autograd_matches_the_backward():
    torch = torch_or_skip()
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, 1, 32, 32, 2, 1, 8)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    for method in ("performer", "wersa"):
        tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
        out = tessera.approx_attention(tq, tk, tv, method=method, causal=True, seed=5,
                                       features=16)
        np.testing.assert_array_equal(
            out.detach().numpy(),
            tessera.approx_attention(q, k, v, method=method, causal=True, seed=5, features=16))
        (out * torch.tensor(dout)).sum().backward()
        dq, dk, dv = tessera.approx_attention_backward(dout, q, k, v, method=method, causal=True,
                                                       seed=5, features=16)
        for got, want in ((tq.grad, dq), (tk.grad, dk), (tv.grad, dv)):
            np.testing.assert_array_equal(got.numpy(), want)


def test_bad_input():
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, 1, 32, 32, 2, 1, 8)
    with pytest.raises(ValueError, match="method"):
        tessera.approx_attention(q, k, v, method="flash")
    with pytest.raises(TypeError, match="features"):
        tessera.approx_attention(q, k, v, method="hyper", features=8)
    with pytest.raises(TypeError, match="block"):
        tessera.approx_attention(q, k, v, method="hyper", block=16.0)
    with pytest.raises(ValueError, match="return_lse"):
        tessera.approx_attention(q, k, v, method="performer", return_lse=True)
    with pytest.raises(ValueError, match="update_centroids"):
        tessera.approx_attention(q, k, v, method="hyper", update_centroids=True)
    with pytest.raises(ValueError, match="block"):
        tessera.approx_attention(q, k, v, method="hyper", block=20)
    with pytest.raises(ValueError, match="features"):
        tessera.approx_attention(q, k, v, method="performer", features=0)
    with pytest.raises(ValueError, match="dtype f32"):
        tessera.approx_attention(q.astype(np.float16), k.astype(np.float16),
                                 v.astype(np.float16), method="performer")
    with pytest.raises(ValueError, match="backward"):
        tessera.approx_attention_backward(q, q, k, v, method="hyper")
