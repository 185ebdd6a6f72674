# SPDX-License-Identifier: Apache-2.0
"""Long causal convolutions (tessera/longconv.h; docs/longconv.md): one filter per channel, as
long as the sequence, by a direct sum or by FFT (FFTW).

    y[b, t, c] = sum_{s <= min(t, L - 1)} h[s, c] * u[b, t - s, c]  (+ bias[c] * u[b, t, c])
"""
from . import _C
from . import _arrays as A

PATHS = ("auto", "direct", "fft")


def long_conv1d(u, filter, bias=None, *, path="auto", threads=None):
    """y [B, N, C] float32 for u [B, N, C] and filter [L, C] (1 <= L <= N), float32 (numpy or
    torch CPU, any strides); bias [C]: the skip term D. path: auto (by the measured crossover),
    direct (O(N L)) or fft."""
    kind = A.common_kind(u=u, filter=filter, bias=bias)
    if path not in PATHS:
        raise ValueError(f"path: expected one of {', '.join(PATHS)}, got {path!r}")
    if len(u.shape) != 3:
        raise ValueError(f"u: expected rank 3 [B, N, C], got shape {list(u.shape)}")
    y = A.empty(kind, u.shape, dtype="f32")
    _C.long_conv1d(A.detach(u), A.detach(filter), A.detach(bias), y, path,
                   A.threads_arg(threads))
    return y
