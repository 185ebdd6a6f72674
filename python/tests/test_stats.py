# SPDX-License-Identifier: Apache-2.0
"""tessera.attention_stats (window statistics of the forward) and decode's probs / accumulated
against fp64 probabilities computed in numpy (include/tessera/attention.h AttentionStats,
decode.h DecodeStats)."""
import math

import numpy as np
import pytest

import tessera
from conftest import _logits, qkv, randn, to64, torch_or_skip, window_visible

STATS_TOL = (1e-6, 5e-5)  # tests/tolerances.h kStatsCeiling: atol, rtol
ENTROPY_TOL = (5e-5, 5e-5)


def ref_probs(q, k, *, causal=False, window=(-1, -1), softcap=0.0, alibi=None,
              align="bottom_right"):
    """fp64 probabilities [B, Hq, Sq, Sk] (0 where masked) and the logits."""
    q, k = to64(q), to64(k)
    Sq, Sk, D = q.shape[1], k.shape[1], q.shape[3]
    scale = float(np.float32(1.0 / math.sqrt(D)))
    s, _ = _logits(q, k, scale, softcap, alibi, align,
                   window_visible(Sq, Sk, causal, window, align), None, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = s.max(axis=-1, keepdims=True)
        m = np.where(np.isneginf(m), 0.0, m)
        e = np.exp(s - m)
        l = e.sum(axis=-1, keepdims=True)
        p = np.where(l > 0, e / np.where(l > 0, l, 1.0), 0.0)
    return p, s


def close(got, want, tol, name):
    got, want = to64(got), np.asarray(want, dtype=np.float64)
    bad = np.abs(got - want) > tol[0] + tol[1] * np.abs(want)
    assert not bad.any(), f"{name}: {int(bad.sum())} elements off, worst at " \
                          f"{np.unravel_index(np.argmax(np.abs(got - want)), got.shape)}"


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("sum_gqa_group", [False, True])
def test_attention_stats(rng, kind, sum_gqa_group):
    if kind == "torch":
        torch_or_skip()
    B, Sq, Sk, Hq, Hkv, D, W = 2, 40, 600, 4, 2, 64, 12
    q, k, v = qkv(rng, B, Sq, Sk, Hq, Hkv, D, "f32", kind)
    out, lse, stats = tessera.attention_stats(q, k, v, W, sum_gqa_group=sum_gqa_group,
                                              causal=True, softcap=20.0, return_lse=True)
    assert isinstance(stats, tessera.AttentionStats)
    assert type(stats.key_mass) is type(q)
    plain = tessera.attention(q, k, v, causal=True, softcap=20.0)
    assert np.array_equal(to64(out), to64(plain))
    p, s = ref_probs(q, k, causal=True, softcap=20.0)
    pw = p[:, :, Sq - W:, :]  # [B, Hq, W, Sk]
    mass, mass_sq = pw.sum(axis=2), (pw ** 2).sum(axis=2)
    if sum_gqa_group:
        mass = mass.reshape(B, Hkv, Hq // Hkv, Sk).sum(axis=2)
        mass_sq = mass_sq.reshape(B, Hkv, Hq // Hkv, Sk).sum(axis=2)
    with np.errstate(invalid="ignore"):
        entropy = -np.where(pw > 0, pw * np.log(np.where(pw > 0, pw, 1.0)), 0.0).sum(axis=-1)
    close(stats.key_mass, mass, STATS_TOL, "key_mass")
    close(stats.key_mass_sq, mass_sq, STATS_TOL, "key_mass_sq")
    close(stats.row_entropy, entropy, ENTROPY_TOL, "row_entropy")


def test_attention_stats_errors(rng):
    q, k, v = qkv(rng, 1, 8, 16, 2, 2, 32)
    with pytest.raises(ValueError, match="stats.window"):
        tessera.attention_stats(q, k, v, 9)
    with pytest.raises(ValueError, match="stats.window"):
        tessera.attention_stats(q, k, v, 0)


@pytest.mark.parametrize("kv_dtype", ["f16", "int8"])
def test_decode_probs_and_accumulated(rng, kv_dtype):
    B, Hkv, Hq, D, Q = 2, 2, 4, 64, 1
    cache = tessera.KVCache(B, Hkv, D, 400, dtype=kv_dtype, page_size=16)
    k = randn(rng, (B, 300, Hkv, D))
    v = randn(rng, (B, 300, Hkv, D))
    cache.append(k, v)
    q = randn(rng, (B, Q, Hq, D))
    S = 310
    probs = np.full((B, Hq, Q, S), -1.0, dtype=np.float32)
    accumulated = np.ones((B, Hkv, S), dtype=np.float32)
    out = tessera.decode(q, cache, probs=probs, accumulated=accumulated, threads=2)
    assert np.array_equal(out, tessera.decode(q, cache))
    assert (probs[..., 300:] == -1.0).all()  # keys past seq_len are not written
    k_read, _ = cache.read(0, kind="numpy")
    p, _ = ref_probs(q[:1], to64(k_read)[None])
    tol = STATS_TOL if kv_dtype == "f16" else (2e-3, 2e-2)  # int8: the quantized query
    close(probs[:1, :, :, :300], p, tol, "probs")
    sums = probs[:1, :, :, :300].reshape(1, Hkv, Hq // Hkv, 300).sum(axis=2)
    close(accumulated[:1, :, :300], 1.0 + sums, STATS_TOL, "accumulated")
    # a second step adds again (H2O's running sum)
    tessera.decode(q, cache, accumulated=accumulated)
    close(accumulated[:1, :, :300], 1.0 + 2 * sums, STATS_TOL, "accumulated twice")


def test_decode_stats_torch_and_errors(rng):
    torch = torch_or_skip()
    cache = tessera.KVCache(1, 1, 32, 64, dtype="bf16")
    cache.append(randn(rng, (1, 50, 1, 32)), randn(rng, (1, 50, 1, 32)))
    q = torch.randn(1, 1, 2, 32)
    probs = torch.zeros(1, 2, 1, 50)
    tessera.decode(q, cache, probs=probs)
    assert abs(float(probs.sum()) - 2.0) < 1e-5  # each row sums to one
    with pytest.raises(ValueError, match="stats.probs"):
        tessera.decode(q, cache, probs=torch.zeros(1, 2, 1, 49))
