# SPDX-License-Identifier: Apache-2.0
"""Long causal convolutions (tessera/longconv.h; docs/longconv.md): one filter per channel, as
long as the sequence, by a direct sum or by FFT (FFTW); their gradients; and the H3 layer built on
them.

    y[b, t, c] = sum_{s <= min(t, L - 1)} h[s, c] * u[b, t - s, c]  (+ bias[c] * u[b, t, c])

H3 (heads of d channels, channel h * d + i of the model is head h, channel i):

    K[b, t, h, i]    = shift conv of k (shift_filter [Ls, H d], shift_bias [H d])
    S[b, t, h, i, j] = ssm conv of K_i v_j (ssm_filter [L, H], ssm_bias [H], one filter per head)
    out[b, t, h, j]  = sum_i q[b, t, h, i] S[b, t, h, i, j]

The diagonal SSM (S4D; H3's SSM), n complex modes per channel:

    x_t[c, m] = a[c, m] x_{t-1}[c, m] + b[c, m] u_t[c]
    y_t[c]    = Re(sum_m w[c, m] x_t[c, m]) + skip[c] u_t[c]

its kernel h[s, c] = Re(sum_m w a^s b) (ssm_kernel, for long_conv1d and h3) and its recurrence
(ssm_scan, SsmStream: streams and decode with the state as the only memory).

float32 only (numpy arrays or torch CPU tensors, any strides; the SSM's a, b, w also complex).
With torch tensors that require grad, long_conv1d and h3 are differentiable in every input (a
torch.autograd.Function whose backward is LongConv1DBackward / H3LayerBackward, computing only
the gradients asked for); ssm_kernel, ssm_scan and SsmStream are not.
"""
from collections import namedtuple

import numpy as np

from . import _C
from . import _arrays as A

PATHS = ("auto", "direct", "fft")

# The gradients of h3 for the loss sum(dout * out); the bias entries are None without the bias.
H3Grads = namedtuple("H3Grads", ["dq", "dk", "dv", "dshift_filter", "dshift_bias",
                                 "dssm_filter", "dssm_bias"])


def _check_path(path):
    if path not in PATHS:
        raise ValueError(f"path: expected one of {', '.join(PATHS)}, got {path!r}")


def _check_rank(name, x, rank, layout):
    if len(x.shape) != rank:
        raise ValueError(f"{name}: expected rank {rank} {layout}, got shape {list(x.shape)}")


def _check_f32(**arrays):
    """float32 only (the library's message would also offer bfloat16 and float16)."""
    for name, x in arrays.items():
        if x is not None and A.dtype_name(x) != "f32":
            raise ValueError(f"{name}: expected dtype float32, got {x.dtype}")


def _needs_grad(kind, *tensors):
    """True when torch autograd has to record the call."""
    if kind != A.TORCH or not A.torch_module().is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


# ---- LongConv1D -------------------------------------------------------------------------------

def conv_forward_raw(kind, u, filter, bias, path, threads):
    """y without autograd (inputs read in place)."""
    y = A.empty(kind, u.shape, dtype="f32")
    _C.long_conv1d(A.detach(u), A.detach(filter), A.detach(bias), y, path, threads)
    return y


def conv_backward_raw(kind, dy, u, filter, bias, want_du, want_dfilter, want_dbias, path,
                      threads):
    """(du, dfilter, dbias), each None unless asked for (dbias also None without a bias)."""
    du = A.empty(kind, u.shape, dtype="f32") if want_du else None
    dfilter = A.empty(kind, filter.shape, dtype="f32") if want_dfilter else None
    dbias = A.empty(kind, bias.shape, dtype="f32") if want_dbias and bias is not None else None
    if du is not None or dfilter is not None or dbias is not None:
        _C.long_conv1d_backward(A.detach(dy), A.detach(u), A.detach(filter), A.detach(bias), du,
                                dfilter, dbias, path, threads)
    return du, dfilter, dbias


def long_conv1d(u, filter, bias=None, *, path="auto", threads=None):
    """y [B, N, C] float32 for u [B, N, C] and filter [L, C] (1 <= L <= N), float32 (numpy or
    torch CPU, any strides); bias [C]: the skip term D. path: auto (by the measured crossover),
    direct (O(N L)) or fft. Differentiable in u, filter and bias under torch autograd."""
    kind = A.common_kind(u=u, filter=filter, bias=bias)
    _check_f32(u=u, filter=filter, bias=bias)
    _check_path(path)
    _check_rank("u", u, 3, "[B, N, C]")
    threads = A.threads_arg(threads)
    if _needs_grad(kind, u, filter, bias):
        from ._torch_longconv import LongConv1DFunction
        return LongConv1DFunction.apply(u, filter, bias, path, threads)
    return conv_forward_raw(kind, u, filter, bias, path, threads)


def long_conv1d_backward(dy, u, filter, bias=None, *, path="auto", threads=None):
    """Gradients of long_conv1d for the loss sum(dy * y): (du [B, N, C], dfilter [L, C], dbias
    [C] or None without a bias), float32, the kind of the inputs."""
    kind = A.common_kind(dy=dy, u=u, filter=filter, bias=bias)
    _check_f32(dy=dy, u=u, filter=filter, bias=bias)
    _check_path(path)
    _check_rank("u", u, 3, "[B, N, C]")
    _check_rank("filter", filter, 2, "[L, C]")
    if bias is not None:
        _check_rank("bias", bias, 1, "[C]")
    return conv_backward_raw(kind, dy, u, filter, bias, True, True, True, path,
                             A.threads_arg(threads))


# ---- H3 ---------------------------------------------------------------------------------------

def _check_h3(q, k, v, shift_filter, ssm_filter, shift_bias, ssm_bias):
    _check_f32(q=q, k=k, v=v, shift_filter=shift_filter, ssm_filter=ssm_filter,
               shift_bias=shift_bias, ssm_bias=ssm_bias)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_rank(name, x, 4, "[B, N, H, d]")
    _check_rank("shift_filter", shift_filter, 2, "[Ls, H d]")
    _check_rank("ssm_filter", ssm_filter, 2, "[L, H]")
    for name, x, layout in (("shift_bias", shift_bias, "[H d]"), ("ssm_bias", ssm_bias, "[H]")):
        if x is not None:
            _check_rank(name, x, 1, layout)


def h3_forward_raw(kind, q, k, v, shift_filter, shift_bias, ssm_filter, ssm_bias, path,
                   threads):
    """out without autograd (inputs read in place)."""
    out = A.empty(kind, q.shape, dtype="f32")
    _C.h3(A.detach(q), A.detach(k), A.detach(v), A.detach(shift_filter), A.detach(shift_bias),
          A.detach(ssm_filter), A.detach(ssm_bias), out, path, threads)
    return out


def h3_backward_raw(kind, dout, q, k, v, shift_filter, shift_bias, ssm_filter, ssm_bias, wanted,
                    path, threads):
    """H3Grads; wanted: 7 bools in H3Grads' order (a bias gradient is None without its bias)."""
    shapes = (q.shape, k.shape, v.shape, shift_filter.shape,
              None if shift_bias is None else shift_bias.shape, ssm_filter.shape,
              None if ssm_bias is None else ssm_bias.shape)
    grads = [A.empty(kind, shape, dtype="f32") if want and shape is not None else None
             for want, shape in zip(wanted, shapes)]
    if any(g is not None for g in grads):
        _C.h3_backward(A.detach(dout), A.detach(q), A.detach(k), A.detach(v),
                       A.detach(shift_filter), A.detach(shift_bias), A.detach(ssm_filter),
                       A.detach(ssm_bias), *grads, path, threads)
    return H3Grads(*grads)


def h3(q, k, v, shift_filter, ssm_filter, *, shift_bias=None, ssm_bias=None, path="auto",
       threads=None):
    """The H3 layer between its projections: out [B, N, H, d] float32.

    q, k, v [B, N, H, d]; shift_filter [Ls, H d] (1 <= Ls <= N) and shift_bias [H d]: the shift
    SSM over k; ssm_filter [L, H] (1 <= L <= N) and ssm_bias [H]: the diagonal SSM's kernel, one
    per head, over the d x d outer products of the shifted keys and v. float32 (numpy or torch
    CPU, any strides). path (auto, direct or fft) applies to both convolutions. Differentiable
    in every input under torch autograd."""
    kind = A.common_kind(q=q, k=k, v=v, shift_filter=shift_filter, ssm_filter=ssm_filter,
                         shift_bias=shift_bias, ssm_bias=ssm_bias)
    _check_path(path)
    _check_h3(q, k, v, shift_filter, ssm_filter, shift_bias, ssm_bias)
    threads = A.threads_arg(threads)
    if _needs_grad(kind, q, k, v, shift_filter, shift_bias, ssm_filter, ssm_bias):
        from ._torch_longconv import H3Function
        return H3Function.apply(q, k, v, shift_filter, shift_bias, ssm_filter, ssm_bias, path,
                                threads)
    return h3_forward_raw(kind, q, k, v, shift_filter, shift_bias, ssm_filter, ssm_bias, path,
                          threads)


def h3_backward(dout, q, k, v, shift_filter, ssm_filter, *, shift_bias=None, ssm_bias=None,
                path="auto", threads=None):
    """Gradients of h3 for the loss sum(dout * out): H3Grads(dq, dk, dv, dshift_filter,
    dshift_bias, dssm_filter, dssm_bias), a named tuple of float32 arrays of the inputs' kind
    and shapes (the filter and bias gradients summed over the batch); dshift_bias / dssm_bias
    are None without that bias."""
    kind = A.common_kind(dout=dout, q=q, k=k, v=v, shift_filter=shift_filter,
                         ssm_filter=ssm_filter, shift_bias=shift_bias, ssm_bias=ssm_bias)
    _check_f32(dout=dout)
    _check_path(path)
    _check_h3(q, k, v, shift_filter, ssm_filter, shift_bias, ssm_bias)
    return h3_backward_raw(kind, dout, q, k, v, shift_filter, shift_bias, ssm_filter, ssm_bias,
                           (True,) * 7, path, A.threads_arg(threads))


# ---- The diagonal SSM -------------------------------------------------------------------------

def _check_no_grad(**arrays):
    """The SSM's functions compute no gradient: a torch input that requires grad (under grad mode)
    is refused rather than silently detached."""
    for name, x in arrays.items():
        if _needs_grad(A.TORCH if A.is_torch(x) else A.NUMPY, x):
            raise ValueError(f"{name}: expected a tensor without requires_grad (the diagonal SSM "
                             f"computes no gradient: call it under torch.no_grad(), or train "
                             f"through long_conv1d with the kernel as its filter)")


def _ssm_modes(name, x):
    """x as float32 [C, n, 2] (re, im) of its own kind: float32 pairs as they are, complex64 as a
    view of its memory, other complex dtypes rounded into a float32 copy."""
    A.kind_of(name, x)
    if A.is_torch(x):
        torch = A.torch_module()
        if x.is_complex():
            _check_rank(name, x, 2, "[C, n] (complex) or [C, n, 2] (float32 re, im pairs)")
            pairs = torch.view_as_real(A.detach(x).resolve_conj())
            return pairs if pairs.dtype == torch.float32 else pairs.to(torch.float32)
    elif np.iscomplexobj(x):
        _check_rank(name, x, 2, "[C, n] (complex) or [C, n, 2] (float32 re, im pairs)")
        if x.dtype == np.complex64:
            return x[..., None].view(np.float32)  # [C, n, 1] complex64 -> [C, n, 2] float32
        pairs = np.empty(x.shape + (2,), np.float32)
        pairs[..., 0], pairs[..., 1] = x.real, x.imag
        return pairs
    if A.dtype_name(x) != "f32":
        raise ValueError(f"{name}: expected dtype float32 (re, im pairs) or a complex dtype, got "
                         f"{x.dtype}")
    _check_rank(name, x, 3, "[C, n, 2] (float32 re, im pairs) or [C, n] (complex)")
    return A.detach(x)


def _ssm_params(a, b, w, skip):
    """(a, b, w) as float32 [C, n, 2] and skip checked: float32 [C] or None."""
    _check_f32(skip=skip)
    if skip is not None:
        _check_rank("skip", skip, 1, "[C]")
    return _ssm_modes("a", a), _ssm_modes("b", b), _ssm_modes("w", w)


def _zeros(kind, shape):
    if kind == A.NUMPY:
        return np.zeros(shape, np.float32)
    torch = A.torch_module()
    return torch.zeros(shape, dtype=torch.float32)


def ssm_kernel(a, b, w, length, *, threads=None):
    """The diagonal SSM's kernel, filter [length, C] float32: h[s, c] = Re(sum_m w[c, m]
    a[c, m]^s b[c, m]), computed in fp64 (DiagonalSsmKernel). a, b, w: float32 [C, n, 2] (re, im
    pairs) or complex [C, n] (complex64 read in place, complex128 rounded to float32 first),
    numpy or torch CPU; |a| <= 1 and every value finite. The filter feeds long_conv1d (bias: the
    skip term) and h3. Not differentiable in a, b, w (torch inputs that require grad are refused
    under grad mode)."""
    kind = A.common_kind(a=a, b=b, w=w)
    if isinstance(length, (bool, np.bool_)) or not isinstance(length, (int, np.integer)) \
            or length < 1:
        raise ValueError(f"length: expected an int >= 1, got {length!r}")
    _check_no_grad(a=a, b=b, w=w)
    a, b, w = _ssm_params(a, b, w, None)
    threads = A.threads_arg(threads)
    filter = A.empty(kind, (int(length), a.shape[0]), dtype="f32")
    _C.ssm_kernel(a, b, w, None, filter, threads)
    return filter


def _check_state(state, B, C, n):
    if tuple(state.shape) != (B, C, n, 2):
        raise ValueError(f"state: expected shape [{B}, {C}, {n}, 2] ([B, C, n, 2]), got "
                         f"{list(state.shape)}")


def ssm_scan(u, a, b, w, *, skip=None, state=None, return_state=False, threads=None):
    """The diagonal SSM's recurrence over u [B, T, C] float32 (T >= 1; T = 1 is a decode step):
    y [B, T, C] float32, and with return_state also the state after the last token, [B, C, n, 2]
    float32 (re, im). a, b, w as for ssm_kernel; skip [C] float32: the skip term D. state: the
    state before the first token (not modified: the call updates a copy); None: zero.

    Scans chained through the returned state equal one scan over the concatenated tokens bit for
    bit, and equal long_conv1d(u, ssm_kernel(a, b, w, T), skip) to rounding. Work O(B T C n),
    memory the state alone (DiagonalSsmScan). For inference and streaming: no gradient (torch
    inputs that require grad are refused under grad mode); to train, use ssm_kernel and
    long_conv1d, which is differentiable in u and in the filter."""
    kind = A.common_kind(u=u, a=a, b=b, w=w, skip=skip, state=state)
    _check_f32(u=u, state=state)
    _check_rank("u", u, 3, "[B, T, C]")
    _check_no_grad(u=u, a=a, b=b, w=w, skip=skip, state=state)
    a, b, w = _ssm_params(a, b, w, skip)
    threads = A.threads_arg(threads)
    B, _, C = (int(s) for s in u.shape)
    n = int(a.shape[1])
    new_state = None
    if state is not None:
        _check_state(state, B, C, n)
        new_state = _zeros(kind, (B, C, n, 2))
        new_state[...] = state
    elif return_state:
        new_state = _zeros(kind, (B, C, n, 2))
    y = A.empty(kind, u.shape, dtype="f32")
    _C.ssm_scan(a, b, w, A.detach(skip), A.detach(u), y, new_state, threads)
    return (y, new_state) if return_state else y


class SsmStream:
    """A diagonal SSM over a stream pushed in blocks of any length (T = 1: decode), holding the
    state [batch, C, n, 2] float32 between pushes: push(u) equals ssm_scan over every token
    pushed since the last reset, bit for bit. a, b, w and skip as for ssm_scan, copied at
    construction (later changes to the caller's arrays do not reach the stream); numpy or torch,
    and every pushed block of the same kind. No gradient."""

    def __init__(self, a, b, w, skip=None, batch=1, *, threads=None):
        self._kind = A.common_kind(a=a, b=b, w=w, skip=skip)
        _check_no_grad(a=a, b=b, w=w, skip=skip)
        a, b, w = _ssm_params(a, b, w, skip)
        if isinstance(batch, (bool, np.bool_)) or not isinstance(batch, (int, np.integer)) \
                or batch < 1:
            raise ValueError(f"batch: expected an int >= 1, got {batch!r}")
        self._threads = A.threads_arg(threads)
        copy = (lambda x: x.copy()) if self._kind == A.NUMPY else (lambda x: x.detach().clone())
        self._a, self._b, self._w = copy(a), copy(b), copy(w)
        self._skip = None if skip is None else copy(skip)
        self._channels, self._modes = int(a.shape[0]), int(a.shape[1])
        self._state = _zeros(self._kind, (int(batch), self._channels, self._modes, 2))
        self._tokens = 0

    def push(self, u):
        """y [batch, T, C] float32 for the next T >= 1 tokens u [batch, T, C] float32; the state
        moves past them."""
        if A.kind_of("u", u) != self._kind:
            raise TypeError(f"u: expected a {self._kind} array like the stream's parameters")
        _check_f32(u=u)
        _check_rank("u", u, 3, "[batch, T, C]")
        _check_no_grad(u=u)
        batch = int(self._state.shape[0])
        if int(u.shape[0]) != batch or int(u.shape[2]) != self._channels:
            raise ValueError(f"u: expected shape [{batch}, T, {self._channels}] (the stream's "
                             f"batch and channels), got {list(u.shape)}")
        y = A.empty(self._kind, u.shape, dtype="f32")
        _C.ssm_scan(self._a, self._b, self._w, self._skip, A.detach(u), y, self._state,
                    self._threads)
        self._tokens += int(u.shape[1])
        return y

    def reset(self):
        """Forgets every token pushed (a zero state: a new sequence)."""
        self._state[...] = 0
        self._tokens = 0

    @property
    def state(self):
        """A copy of the state after the tokens pushed so far, [batch, C, n, 2] float32."""
        return self._state.copy() if self._kind == A.NUMPY else self._state.clone()

    @property
    def tokens_seen(self):
        """Tokens pushed since construction or the last reset."""
        return self._tokens
