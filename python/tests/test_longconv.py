# SPDX-License-Identifier: Apache-2.0
"""tessera.long_conv1d against a direct fp64 numpy convolution, both paths, numpy and torch,
awkward shapes, and bad input."""
import numpy as np
import pytest

import tessera
from conftest import torch_or_skip


def reference(u, h, bias=None):
    u, h = u.astype(np.float64), h.astype(np.float64)
    B, N, C = u.shape
    y = np.zeros((B, N, C))
    for s in range(h.shape[0]):
        y[:, s:, :] += h[s] * u[:, :N - s, :]
    if bias is not None:
        y += bias.astype(np.float64) * u
    return y


@pytest.mark.parametrize("path", ["auto", "direct", "fft"])
@pytest.mark.parametrize("B,N,C,L", [(1, 1, 1, 1), (2, 37, 3, 37), (1, 300, 5, 17)])
def test_matches_the_reference(path, B, N, C, L):
    rng = np.random.default_rng(N + C)
    u = rng.standard_normal((B, N, C)).astype(np.float32)
    h = rng.standard_normal((L, C)).astype(np.float32)
    bias = rng.standard_normal(C).astype(np.float32)
    y = tessera.long_conv1d(u, h, bias, path=path)
    ref = reference(u, h, bias)
    assert y.shape == u.shape and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)


def test_torch_and_strides():
    torch = torch_or_skip()
    rng = np.random.default_rng(1)
    u = rng.standard_normal((2, 64, 8)).astype(np.float32)
    h = rng.standard_normal((64, 8)).astype(np.float32)
    y = tessera.long_conv1d(torch.tensor(u)[:, :, ::2], torch.tensor(h)[:, ::2])
    assert isinstance(y, torch.Tensor)
    ref = reference(u[:, :, ::2], h[:, ::2])
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-4 * np.abs(ref).max(), rtol=0)


def test_bad_input():
    u = np.zeros((1, 8, 2), np.float32)
    with pytest.raises(ValueError, match="filter"):
        tessera.long_conv1d(u, np.zeros((9, 2), np.float32))
    with pytest.raises(ValueError, match="path"):
        tessera.long_conv1d(u, np.zeros((4, 2), np.float32), path="fast")
    with pytest.raises(ValueError, match="u"):
        tessera.long_conv1d(np.zeros((8, 2), np.float32), np.zeros((4, 2), np.float32))
