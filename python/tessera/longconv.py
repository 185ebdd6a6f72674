# SPDX-License-Identifier: Apache-2.0
"""Long causal convolutions (tessera/longconv.h; docs/longconv.md): one filter per channel, as
long as the sequence, by a direct sum or by FFT (FFTW); their gradients; and the H3 layer built on
them.

    y[b, t, c] = sum_{s <= min(t, L - 1)} h[s, c] * u[b, t - s, c]  (+ bias[c] * u[b, t, c])

H3 (heads of d channels, channel h * d + i of the model is head h, channel i):

    K[b, t, h, i]    = shift conv of k (shift_filter [Ls, H d], shift_bias [H d])
    S[b, t, h, i, j] = ssm conv of K_i v_j (ssm_filter [L, H], ssm_bias [H], one filter per head)
    out[b, t, h, j]  = sum_i q[b, t, h, i] S[b, t, h, i, j]

float32 only (numpy arrays or torch CPU tensors, any strides). With torch tensors that require
grad, long_conv1d and h3 are differentiable in every input (a torch.autograd.Function whose
backward is LongConv1DBackward / H3LayerBackward, computing only the gradients asked for).
"""
from collections import namedtuple

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
