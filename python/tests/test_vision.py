# SPDX-License-Identifier: Apache-2.0
"""tessera.channel_attention (DaViT) against an fp64 numpy reference written here from
include/tessera/vision.h, numpy and torch, strided and 16-bit inputs, thread counts, the
composition it replaces (tessera.attention on the channel-major views) and bad input; and the
HaloNet and strip-attention calls of docs/vision.md (tessera.attention with a neighborhood mask)
against fp64 references that build each paper's key windows as boxes of the image."""
import math

import numpy as np
import pytest

import tessera
from conftest import TOLERANCES, ref_attention, to64, torch_or_skip


def channel_reference(q, k, v, scale=None):
    """out[b, n, h, c] = sum_c' softmax_c'(scale * sum_n q[b, n, h, c] k[b, n, h, c']) v[.., c']
    in float64."""
    q, k, v = to64(q), to64(k), to64(v)
    dh = q.shape[3]
    if scale is None:
        scale = float(np.float32(1.0 / math.sqrt(dh)))  # the float nearest 1/sqrt(dh)
    s = np.einsum("bnhc,bnhd->bhcd", q, k) * scale
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bhcd,bnhd->bnhc", p, v)


def assert_close(got, ref, dtype="f32"):
    atol, rtol = TOLERANCES[dtype]
    np.testing.assert_allclose(to64(got), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("B,N,H,dh", [(2, 1, 3, 3), (2, 7, 1, 32), (1, 600, 3, 5),
                                      (2, 1300, 1, 16)])
def test_channel_attention_matches_the_reference(B, N, H, dh):
    rng = np.random.default_rng(N * 7 + dh)
    q, k, v = (rng.standard_normal((B, N, H, dh)).astype(np.float32) for _ in range(3))
    out = tessera.channel_attention(q, k, v)
    assert out.shape == q.shape and out.dtype == np.float32
    assert_close(out, channel_reference(q, k, v))
    out = tessera.channel_attention(q, k, v, scale=0.01)
    assert_close(out, channel_reference(q, k, v, scale=0.01))


def test_channel_attention_torch_strided_and_bf16():
    torch = torch_or_skip()
    g = torch.Generator().manual_seed(3)
    # heads-major storage [B, H, N, dh] seen as [B, N, H, dh], and a channel slice of a wider
    # tensor (channel stride 2)
    q = torch.randn(2, 4, 50, 6, generator=g).transpose(1, 2)
    k = torch.randn(2, 50, 4, 12, generator=g)[..., ::2]
    v = torch.randn(2, 4, 50, 6, generator=g).transpose(1, 2)
    out = tessera.channel_attention(q, k, v)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert_close(out, channel_reference(q, k, v))
    qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
    out = tessera.channel_attention(qb, kb, vb)
    assert out.dtype == torch.bfloat16
    assert_close(out, channel_reference(qb, kb, vb), "bf16")


def test_channel_attention_is_attention_on_channel_major_views():
    # For N within the exact kernel's head dim: the channels as tokens, by strides only.
    rng = np.random.default_rng(5)
    B, N, H, dh = 2, 64, 3, 10
    q, k, v = (rng.standard_normal((B, N, H, dh)).astype(np.float32) for _ in range(3))
    channels_as_tokens = (lambda x: x.transpose(0, 3, 2, 1))  # [B, dh, H, N], a view
    composed = tessera.attention(channels_as_tokens(q), channels_as_tokens(k),
                                 channels_as_tokens(v), scale=1.0 / math.sqrt(N))
    out = tessera.channel_attention(q, k, v, scale=1.0 / math.sqrt(N))
    assert_close(out, to64(composed.transpose(0, 3, 2, 1)))


def test_channel_attention_threads_bitwise_equal():
    rng = np.random.default_rng(9)
    q, k, v = (rng.standard_normal((1, 2200, 2, 8)).astype(np.float32) for _ in range(3))
    one = tessera.channel_attention(q, k, v, threads=1)
    two = tessera.channel_attention(q, k, v, threads=2)
    assert np.array_equal(one, two)


def test_channel_attention_bad_input():
    q = np.zeros((1, 4, 2, 3), np.float32)
    with pytest.raises(ValueError, match="q: expected rank 4"):
        tessera.channel_attention(q[0], q, q)
    with pytest.raises(ValueError, match="k: expected shape"):
        tessera.channel_attention(q, np.zeros((1, 4, 2, 4), np.float32), q)
    with pytest.raises(ValueError, match="v: expected dtype f32"):
        tessera.channel_attention(q, q, q.astype(np.float16))
    with pytest.raises(ValueError, match="scale"):
        tessera.channel_attention(q, q, q, scale=float("inf"))
    torch = torch_or_skip()
    t = torch.zeros(1, 4, 2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="no backward"):
        tessera.channel_attention(t, t, t)
    with torch.no_grad():
        assert tessera.channel_attention(t, t, t).shape == t.shape


# ---- HaloNet and strips: tessera.attention with a neighborhood mask ---------------------------


def box_visible(grid_h, grid_w, box):
    """bool [S, S]: query (y, x) sees the keys of box(y, x) = (y0, rows, x0, cols)."""
    S = grid_h * grid_w
    vis = np.zeros((S, S), dtype=bool)
    for y in range(grid_h):
        for x in range(grid_w):
            y0, rows, x0, cols = box(y, x)
            keys = np.zeros((grid_h, grid_w), dtype=bool)
            keys[y0:y0 + rows, x0:x0 + cols] = True
            vis[y * grid_w + x] = keys.reshape(-1)
    return vis


def halo_box(grid_h, grid_w, block, halo):
    """HaloNet's window (the block plus `halo` on each side), shifted inward at the border."""
    w = block + 2 * halo
    return lambda y, x: (min(max(y // block * block - halo, 0), grid_h - w), w,
                         min(max(x // block * block - halo, 0), grid_w - w), w)


@pytest.mark.parametrize("grid_h,grid_w,block,halo", [(10, 13, 4, 1), (9, 8, 3, 2)])
def test_halonet_is_a_neighborhood_mask(grid_h, grid_w, block, halo):
    rng = np.random.default_rng(grid_h * grid_w)
    S = grid_h * grid_w
    q, k, v = (rng.standard_normal((2, S, 3, 16)).astype(np.float32) for _ in range(3))
    window = block + 2 * halo
    mask = tessera.mask.neighborhood(grid=(grid_h, grid_w), window=window, stride=block)
    out = tessera.attention(q, k, v, mask=mask)
    ref, _ = ref_attention(q, k, v,
                           visible=box_visible(grid_h, grid_w, halo_box(grid_h, grid_w, block,
                                                                        halo)))
    assert_close(out, ref)


def test_strip_attention_heads_split_between_rows_and_columns():
    grid_h, grid_w, s = 9, 12, 2
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, grid_h * grid_w, 4, 8)).astype(np.float32)
               for _ in range(3))
    rows = tessera.mask.neighborhood(grid=(grid_h, grid_w), window=(s, grid_w),
                                     stride=(s, grid_w))
    cols = tessera.mask.neighborhood(grid=(grid_h, grid_w), window=(grid_h, s),
                                     stride=(grid_h, s))
    out = np.concatenate([tessera.attention(q[:, :, :2], k[:, :, :2], v[:, :, :2], mask=rows),
                          tessera.attention(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], mask=cols)],
                         axis=2)

    def band(i, n):  # the strip's first row / column, shifted at the border
        return min(i // s * s, n - s)

    ref_rows, _ = ref_attention(q[:, :, :2], k[:, :, :2], v[:, :, :2], visible=box_visible(
        grid_h, grid_w, lambda y, x: (band(y, grid_h), s, 0, grid_w)))
    ref_cols, _ = ref_attention(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], visible=box_visible(
        grid_h, grid_w, lambda y, x: (0, grid_h, band(x, grid_w), s)))
    assert_close(out, np.concatenate([ref_rows, ref_cols], axis=2))
