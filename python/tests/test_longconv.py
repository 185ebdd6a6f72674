# SPDX-License-Identifier: Apache-2.0
"""tessera.long_conv1d against a direct fp64 numpy convolution, both paths, numpy and torch,
awkward shapes, and bad input; long_conv1d_backward, h3 and h3_backward against an fp64
reference written here from the formulas of include/tessera/longconv.h (numpy for the forward,
float64 torch autograd for the gradients), strided torch inputs, torch autograd."""
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


# ---- fp64 references from longconv.h, for numpy arrays and (differentiable) torch tensors ------


def _delayed(x, s):
    """x [B, N, ...] delayed by s steps along the sequence, zeros first."""
    if s == 0:
        return x
    parts = [0 * x[:, :s], x[:, :x.shape[1] - s]]
    if isinstance(x, np.ndarray):
        return np.concatenate(parts, axis=1)
    import torch
    return torch.cat(parts, dim=1)


def causal_conv(x, h, bias=None):
    """sum_s h[s] x[:, t - s] (+ bias x); x [B, N, ...], h [L, ...] and bias broadcast over x's
    trailing dims."""
    y = h[0] * x
    for s in range(1, h.shape[0]):
        y = y + h[s] * _delayed(x, s)
    return y if bias is None else y + bias * x


def h3_reference(q, k, v, shift_filter, ssm_filter, shift_bias=None, ssm_bias=None):
    """out [B, N, H, d]: K = shift conv of k; S_ij = ssm conv (one filter per head) of K_i v_j;
    out_j = sum_i q_i S_ij."""
    B, N, H, d = q.shape
    K = causal_conv(k, shift_filter.reshape(-1, H, d),
                    None if shift_bias is None else shift_bias.reshape(H, d))
    outer = K[..., :, None] * v[..., None, :]  # [B, N, H, i, j]
    S = causal_conv(outer, ssm_filter.reshape(-1, H, 1, 1),
                    None if ssm_bias is None else ssm_bias.reshape(H, 1, 1))
    return (q[..., :, None] * S).sum(axis=-2)


def assert_near(got, ref, name):
    """rtol 0, atol 1e-4 x max |ref|."""
    got = got.detach().numpy() if hasattr(got, "detach") else got
    ref = ref.detach().numpy() if hasattr(ref, "detach") else ref
    assert got.shape == ref.shape and got.dtype == np.float32, name
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max(), err_msg=name)


H3_NAMES = ("q", "k", "v", "shift_filter", "shift_bias", "ssm_filter", "ssm_bias")

# B, N, H, d, Ls, L, shift bias, ssm bias
H3_SHAPES = [(2, 13, 1, 1, 1, 13, True, True), (2, 13, 3, 2, 3, 5, False, False),
             (2, 40, 3, 2, 3, 40, True, False), (2, 40, 1, 2, 1, 5, False, True),
             (2, 40, 3, 1, 3, 40, True, True)]


def h3_inputs(rng, B, N, H, d, Ls, L, shift_bias, ssm_bias):
    """A dict of float32 numpy inputs by name (the biases None when not asked for); filters
    scaled so that out stays of order 1."""
    x = {name: rng.standard_normal((B, N, H, d)).astype(np.float32) for name in ("q", "k", "v")}
    x["shift_filter"] = (rng.standard_normal((Ls, H * d)) / Ls).astype(np.float32)
    x["ssm_filter"] = (rng.standard_normal((L, H)) / np.sqrt(L)).astype(np.float32)
    x["shift_bias"] = rng.standard_normal(H * d).astype(np.float32) if shift_bias else None
    x["ssm_bias"] = rng.standard_normal(H).astype(np.float32) if ssm_bias else None
    return x


def call_h3(fn, x, *head, **kw):
    return fn(*head, x["q"], x["k"], x["v"], x["shift_filter"], x["ssm_filter"],
              shift_bias=x["shift_bias"], ssm_bias=x["ssm_bias"], **kw)


def reference_grads(x, g, conv=False):
    """Gradients of sum(out * g) by torch autograd through the float64 reference: a dict by
    name (None for an absent input). conv: x holds u, filter, bias of long_conv1d."""
    import torch
    x64 = {n: None if a is None else torch.tensor(np.asarray(a, np.float64), requires_grad=True)
           for n, a in x.items()}
    if conv:
        out = causal_conv(x64["u"], x64["filter"], x64["bias"])
    else:
        out = call_h3(h3_reference, x64)
    (out * torch.tensor(np.asarray(g, np.float64))).sum().backward()
    return {n: None if t is None else t.grad for n, t in x64.items()}


@pytest.mark.parametrize("path", ["auto", "direct", "fft"])
@pytest.mark.parametrize("shape", H3_SHAPES)
def test_h3_matches_the_reference(path, shape):
    x = h3_inputs(np.random.default_rng(sum(shape[:6])), *shape)
    out = call_h3(tessera.h3, x, path=path)
    x64 = {n: None if a is None else a.astype(np.float64) for n, a in x.items()}
    assert_near(out, call_h3(h3_reference, x64), "out")


def test_h3_torch_strided_inputs_and_grads():
    torch = torch_or_skip()
    rng = np.random.default_rng(3)
    B, N, H, d, Ls, L = 2, 40, 3, 2, 3, 40
    # Leaves of other layouts; h3 reads views of them: [B, H, N, d] transposed, every other
    # channel, a transposed filter, every other bias entry.
    leaves = {"q": rng.standard_normal((B, H, N, d)), "k": rng.standard_normal((B, N, H, 2 * d)),
              "v": rng.standard_normal((B, N, H, d)),
              "shift_filter": rng.standard_normal((H * d, Ls)) / Ls,
              "shift_bias": rng.standard_normal(2 * H * d),
              "ssm_filter": rng.standard_normal((H, L)) / np.sqrt(L),
              "ssm_bias": rng.standard_normal(2 * H)}
    leaves = {n: torch.tensor(a, dtype=torch.float32, requires_grad=True)
              for n, a in leaves.items()}

    def views(t):
        return {"q": t["q"].transpose(1, 2), "k": t["k"][..., ::2], "v": t["v"],
                "shift_filter": t["shift_filter"].t(), "shift_bias": t["shift_bias"][::2],
                "ssm_filter": t["ssm_filter"].t(), "ssm_bias": t["ssm_bias"][1::2]}

    x = views(leaves)
    assert not x["q"].is_contiguous() and not x["shift_filter"].is_contiguous()
    g = torch.tensor(rng.standard_normal((B, N, H, d)), dtype=torch.float32)
    out = call_h3(tessera.h3, x, path="fft")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    (out * g).sum().backward()
    leaves64 = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    ref = call_h3(h3_reference, views(leaves64))
    assert_near(out, ref, "out")
    (ref * g.double()).sum().backward()
    for n in leaves:
        assert_near(leaves[n].grad, leaves64[n].grad, "d" + n)


@pytest.mark.parametrize("path", ["direct", "fft"])
@pytest.mark.parametrize("shape", H3_SHAPES)
def test_h3_autograd_matches_the_reference(path, shape):
    torch = torch_or_skip()
    rng = np.random.default_rng(sum(shape[:6]) + 1)
    x = h3_inputs(rng, *shape)
    g = rng.standard_normal(x["q"].shape)
    xt = {n: None if a is None else torch.tensor(a, requires_grad=True) for n, a in x.items()}
    out = call_h3(tessera.h3, xt, path=path)
    (out * torch.tensor(g, dtype=torch.float32)).sum().backward()
    ref = reference_grads(x, g)
    for n in H3_NAMES:
        if x[n] is None:
            continue
        assert_near(xt[n].grad, ref[n], "d" + n)


def test_h3_autograd_computes_only_what_is_asked():
    torch = torch_or_skip()
    rng = np.random.default_rng(4)
    x = h3_inputs(rng, 2, 13, 3, 2, 3, 5, True, True)
    xt = {n: torch.tensor(a) for n, a in x.items()}
    xt["ssm_filter"].requires_grad_()
    out = call_h3(tessera.h3, xt)
    out.sum().backward()  # dout with stride 0, read in place
    ref = reference_grads(x, np.ones(x["q"].shape))
    assert_near(xt["ssm_filter"].grad, ref["ssm_filter"], "dssm_filter")
    assert all(xt[n].grad is None for n in H3_NAMES if n != "ssm_filter")
    with torch.no_grad():
        assert not call_h3(tessera.h3, {n: t.detach().requires_grad_() for n, t in
                                        xt.items()}).requires_grad


@pytest.mark.parametrize("path", ["direct", "fft"])
@pytest.mark.parametrize("shape", [H3_SHAPES[1], H3_SHAPES[4]])
def test_h3_backward_numpy_matches_the_reference(path, shape):
    torch_or_skip()
    rng = np.random.default_rng(sum(shape[:6]) + 2)
    x = h3_inputs(rng, *shape)
    dout = rng.standard_normal(x["q"].shape).astype(np.float32)
    grads = call_h3(tessera.h3_backward, x, dout, path=path)
    assert isinstance(grads, tessera.H3Grads) and len(grads) == 7
    ref = reference_grads(x, dout)
    for n in H3_NAMES:
        if x[n] is None:
            assert getattr(grads, "d" + n) is None, n
        else:
            assert_near(getattr(grads, "d" + n), ref[n], "d" + n)


CONV_SHAPES = [(2, 13, 3, 13, True), (2, 40, 5, 5, False), (1, 40, 2, 1, True)]


def conv_inputs(rng, B, N, C, L, bias):
    return {"u": rng.standard_normal((B, N, C)).astype(np.float32),
            "filter": (rng.standard_normal((L, C)) / np.sqrt(L)).astype(np.float32),
            "bias": rng.standard_normal(C).astype(np.float32) if bias else None}


@pytest.mark.parametrize("path", ["direct", "fft"])
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_long_conv1d_autograd_matches_the_reference(path, shape):
    torch = torch_or_skip()
    rng = np.random.default_rng(sum(shape[:4]))
    x = conv_inputs(rng, *shape)
    g = rng.standard_normal(x["u"].shape)
    xt = {n: None if a is None else torch.tensor(a, requires_grad=True) for n, a in x.items()}
    y = tessera.long_conv1d(xt["u"], xt["filter"], xt["bias"], path=path)
    (y * torch.tensor(g, dtype=torch.float32)).sum().backward()
    ref = reference_grads(x, g, conv=True)
    for n in ("u", "filter", "bias"):
        if x[n] is not None:
            assert_near(xt[n].grad, ref[n], "d" + n)
    # Only the filter: u's gradient is not asked for.
    u = torch.tensor(x["u"])
    h = torch.tensor(x["filter"], requires_grad=True)
    tessera.long_conv1d(u, h, path=path).sum().backward()
    ref = reference_grads({"u": x["u"], "filter": x["filter"], "bias": None},
                          np.ones(x["u"].shape), conv=True)
    assert_near(h.grad, ref["filter"], "dfilter")
    assert u.grad is None


@pytest.mark.parametrize("path", ["auto", "direct", "fft"])
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_long_conv1d_backward_numpy_matches_the_reference(path, shape):
    torch_or_skip()
    rng = np.random.default_rng(sum(shape[:4]) + 1)
    x = conv_inputs(rng, *shape)
    dy = rng.standard_normal(x["u"].shape).astype(np.float32)
    du, dfilter, dbias = tessera.long_conv1d_backward(dy, x["u"], x["filter"], x["bias"],
                                                      path=path)
    ref = reference_grads(x, dy, conv=True)
    assert_near(du, ref["u"], "du")
    assert_near(dfilter, ref["filter"], "dfilter")
    if x["bias"] is None:
        assert dbias is None
    else:
        assert_near(dbias, ref["bias"], "dbias")


def raises_naming(name):
    """ValueError whose message names the argument (the library's "NAME: expected ...")."""
    return pytest.raises(ValueError, match=rf"(^|\s){name}: expected")


def test_h3_bad_input():
    x = h3_inputs(np.random.default_rng(5), 2, 8, 3, 2, 3, 5, True, True)

    def call(fn=tessera.h3, head=(), **changes):
        return call_h3(fn, {**x, **changes}, *head)

    with raises_naming("q"):
        call(q=x["q"][0])
    with raises_naming("k"):
        call(k=x["k"][:, :, :2])
    with raises_naming("v"):
        call(v=x["v"].astype(np.float64))
    with raises_naming("shift_filter"):
        call(shift_filter=x["shift_filter"][:, :5])
    with raises_naming("shift_bias"):
        call(shift_bias=x["shift_bias"][:5])
    with raises_naming("ssm_filter"):
        call(ssm_filter=np.zeros((9, 3), np.float32))  # L > N
    with raises_naming("ssm_bias"):
        call(ssm_bias=np.zeros(2, np.float32))
    with raises_naming("path"):
        call_h3(tessera.h3, x, path="fast")
    with raises_naming("dout"):
        call(tessera.h3_backward, (x["q"][:, :7],))
    with raises_naming("dout"):
        call(tessera.h3_backward, (x["q"].astype(np.float64),))
    with raises_naming("q"):
        call(tessera.h3_backward, (x["q"],), q=x["q"][::-1])  # negative strides
    with pytest.raises(TypeError, match="k"):
        call(k=[[1.0]])


def test_long_conv1d_backward_bad_input():
    u = np.zeros((1, 8, 2), np.float32)
    h = np.zeros((4, 2), np.float32)
    with raises_naming("dy"):
        tessera.long_conv1d_backward(u[:, :7], u, h)
    with raises_naming("dy"):
        tessera.long_conv1d_backward(u.astype(np.float64), u, h)
    with raises_naming("filter"):
        tessera.long_conv1d_backward(u, u, np.zeros((9, 2), np.float32))
    with raises_naming("bias"):
        tessera.long_conv1d_backward(u, u, h, np.zeros(3, np.float32))
    with raises_naming("path"):
        tessera.long_conv1d_backward(u, u, h, path="fast")


def test_bad_input_under_autograd():
    torch = torch_or_skip()
    x = h3_inputs(np.random.default_rng(6), 2, 8, 3, 2, 3, 5, False, False)
    xt = {n: None if a is None else torch.tensor(a, requires_grad=True) for n, a in x.items()}
    with raises_naming("ssm_filter"):
        call_h3(tessera.h3, {**xt, "ssm_filter": torch.zeros(5, 2, requires_grad=True)})
    with raises_naming("filter"):
        tessera.long_conv1d(xt["q"][:, :, 0], torch.zeros(4, 3, requires_grad=True))
