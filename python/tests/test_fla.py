# SPDX-License-Identifier: Apache-2.0
"""tessera.compat.fla against fp64 references of flash-linear-attention's semantics written here:
the GLA recurrence h_t = diag(exp(g_t)) h_{t-1} + k_t v_t^T, o_t = scale q_t h_t (per-channel,
scalar per head, constant per head, none), RetNet's decay 1 - 2^(-5 - h), BASED's weights
1 + s + s^2 / 2; states, head_first, cu_seqlens, reverse; numpy and torch, f32 and bf16;
gradients against torch autograd through float64 recurrences; bad input."""
import math

import numpy as np
import pytest

from tessera.compat import fla

B, T, H, K, V = 2, 37, 3, 6, 5


def gla_reference(q, k, v, g=None, decay=None, scale=None, h0=None, reverse=False):
    """o [B, T, H, V] and the final state [B, H, K, V] (float64). g: [B, T, H, K] per channel,
    [B, T, H] per head, or None; decay: [H] per-head lambda."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    b_, t_, h_, k_ = q.shape
    scale = k_ ** -0.5 if scale is None else scale
    o = np.zeros(q.shape[:3] + (v.shape[3],))
    ht = np.zeros((b_, h_, k_, v.shape[3]))
    for b in range(b_):
        for h in range(h_):
            st = np.zeros((k_, v.shape[3])) if h0 is None else np.array(h0[b, h], np.float64)
            for t in (range(t_ - 1, -1, -1) if reverse else range(t_)):
                a = np.ones(k_)
                if g is not None:
                    a = np.exp(np.asarray(g, np.float64)[b, t, h]) * np.ones(k_)
                if decay is not None:
                    a = np.full(k_, float(decay[h]))
                st = a[:, None] * st + np.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] = scale * q[b, t, h] @ st
            ht[b, h] = st
    return o, ht


def based_reference(q, k, v, scale=None, use_norm=True):
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = np.einsum("bthk,bshk->bhts", q * scale, k)
    w = (1 + s + 0.5 * s * s) * np.tril(np.ones((q.shape[1], q.shape[1])))
    o = np.einsum("bhts,bshv->bthv", w, v)
    if use_norm:
        o = o / (w.sum(-1).transpose(0, 2, 1)[..., None] + 1e-6)
    return o


def inputs(seed=0, b=B, t=T, h=H, k=K, v=V):
    rng = np.random.default_rng(seed)
    x = dict(q=rng.standard_normal((b, t, h, k)).astype(np.float32) * 0.5,
             k=rng.standard_normal((b, t, h, k)).astype(np.float32) * 0.5,
             v=rng.standard_normal((b, t, h, v)).astype(np.float32),
             h0=rng.standard_normal((b, h, k, v)).astype(np.float32))
    logsig = lambda a: -np.log1p(np.exp(-a))  # noqa: E731
    x["g"] = (logsig(rng.standard_normal((b, t, h, k)) + 2.0)).astype(np.float32)
    x["gs"] = (logsig(rng.standard_normal((b, t, h)) + 2.0)).astype(np.float32)
    x["gs"].reshape(-1)[::6] = -5.0
    return x


def close(got, want, rtol, what=""):
    got = np.asarray(got, np.float64)
    scale = max(np.abs(want).max(), 1e-30)
    err = np.abs(got - want)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert (err <= rtol * (scale + np.abs(want))).all(), f"{what}: worst {err.max():.3g}"


def to_torch(x, dtype="float32"):
    torch = pytest.importorskip("torch")
    return {n: torch.from_numpy(a).to(getattr(torch, dtype) if n in "qkv" else torch.float32)
            for n, a in x.items()}


# ---- Forward, numpy and torch ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_chunk_gla(kind):
    x = inputs()
    a = x if kind == "numpy" else to_torch(x)
    o, ht = fla.chunk_gla(a["q"], a["k"], a["v"], a["g"], initial_state=a["h0"],
                          output_final_state=True)
    want, want_ht = gla_reference(x["q"], x["k"], x["v"], g=x["g"], h0=x["h0"])
    close(np.asarray(o), want, 2e-5, "o")
    close(np.asarray(ht), want_ht, 2e-5, "final state")
    assert str(ht.dtype).endswith("float32")
    o2, none = fla.chunk_gla(a["q"], a["k"], a["v"], a["g"], scale=0.3)
    assert none is None
    close(np.asarray(o2), gla_reference(x["q"], x["k"], x["v"], g=x["g"], scale=0.3)[0], 2e-5,
          "scale 0.3")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("reverse", [False, True])
def test_fused_recurrent_gla(kind, reverse):
    x = inputs(1)
    a = x if kind == "numpy" else to_torch(x)
    o, ht = fla.fused_recurrent_gla(a["q"], a["k"], a["v"], gk=a["g"], initial_state=a["h0"],
                                    output_final_state=True, reverse=reverse)
    want, want_ht = gla_reference(x["q"], x["k"], x["v"], g=x["g"], h0=x["h0"], reverse=reverse)
    close(np.asarray(o), want, 2e-5, "o")
    close(np.asarray(ht), want_ht, 2e-5, "final state")
    o, _ = fla.fused_recurrent_gla(a["q"], a["k"], a["v"], reverse=reverse)  # no gates
    close(np.asarray(o), gla_reference(x["q"], x["k"], x["v"], reverse=reverse)[0], 2e-5,
          "no gates")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_chunk_simple_gla(kind):
    x = inputs(2)
    a = x if kind == "numpy" else to_torch(x)
    o, ht = fla.chunk_simple_gla(a["q"], a["k"], a["v"], a["gs"], initial_state=a["h0"],
                                 output_final_state=True)
    want, want_ht = gla_reference(x["q"], x["k"], x["v"], g=x["gs"], h0=x["h0"])
    close(np.asarray(o), want, 2e-5, "o")
    close(np.asarray(ht), want_ht, 2e-5, "final state")
    gamma = np.log(np.array([0.9, 0.5, 0.99], np.float32))
    if kind == "torch":
        import torch
        gamma_a = torch.from_numpy(gamma)
    else:
        gamma_a = gamma
    o, _ = fla.chunk_simple_gla(a["q"], a["k"], a["v"], g_gamma=gamma_a)
    close(np.asarray(o), gla_reference(x["q"], x["k"], x["v"], decay=np.exp(gamma))[0], 2e-5,
          "g_gamma")
    o, _ = fla.chunk_simple_gla(a["q"], a["k"], a["v"])
    close(np.asarray(o), gla_reference(x["q"], x["k"], x["v"])[0], 2e-5, "no gates")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_chunk_retention(kind):
    x = inputs(3, h=4)
    a = x if kind == "numpy" else to_torch(x)
    o, ht = fla.chunk_retention(a["q"], a["k"], a["v"], initial_state=a["h0"],
                                output_final_state=True)
    lam = np.array([1 - 2.0 ** (-5 - h) for h in range(4)])
    want, want_ht = gla_reference(x["q"], x["k"], x["v"], decay=lam, h0=x["h0"])
    close(np.asarray(o), want, 2e-5, "o")
    close(np.asarray(ht), want_ht, 2e-5, "final state")


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("use_norm", [True, False])
@pytest.mark.parametrize("scale", [None, 0.2])
def test_parallel_based(kind, use_norm, scale):
    x = inputs(4, k=4)
    a = x if kind == "numpy" else to_torch(x)
    o = fla.parallel_based(a["q"], a["k"], a["v"], scale=scale, use_norm=use_norm)
    close(np.asarray(o), based_reference(x["q"], x["k"], x["v"], scale, use_norm), 2e-5, "o")


@pytest.mark.parametrize("fn", ["chunk_gla", "chunk_simple_gla", "parallel_based"])
def test_bfloat16(fn):
    torch = pytest.importorskip("torch")
    x = inputs(5, k=4)
    a = to_torch(x, "bfloat16")
    r = {n: a[n].float().numpy() for n in "qkv"}
    if fn == "chunk_gla":
        o, _ = fla.chunk_gla(a["q"], a["k"], a["v"], a["g"])
        want = gla_reference(r["q"], r["k"], r["v"], g=x["g"])[0]
    elif fn == "chunk_simple_gla":
        o, _ = fla.chunk_simple_gla(a["q"], a["k"], a["v"], a["gs"])
        want = gla_reference(r["q"], r["k"], r["v"], g=x["gs"])[0]
    else:
        o = fla.parallel_based(a["q"], a["k"], a["v"])
        want = based_reference(r["q"], r["k"], r["v"])
    assert o.dtype == torch.bfloat16
    close(o.float().numpy(), want, 8e-3, fn)


def test_head_first_matches_the_default_layout():
    torch = pytest.importorskip("torch")
    a = to_torch(inputs(6))
    hf = {n: a[n].transpose(1, 2).contiguous() for n in ("q", "k", "v", "g", "gs")}
    o1, h1 = fla.chunk_gla(a["q"], a["k"], a["v"], a["g"], output_final_state=True)
    o2, h2 = fla.chunk_gla(hf["q"], hf["k"], hf["v"], hf["g"], output_final_state=True,
                           head_first=True)
    torch.testing.assert_close(o2, o1.transpose(1, 2))
    torch.testing.assert_close(h2, h1)
    o1, _ = fla.chunk_simple_gla(a["q"], a["k"], a["v"], a["gs"])
    o2, _ = fla.chunk_simple_gla(hf["q"], hf["k"], hf["v"], hf["gs"], head_first=True)
    torch.testing.assert_close(o2, o1.transpose(1, 2))
    o1 = fla.parallel_based(a["q"][..., :4], a["k"][..., :4], a["v"])
    o2 = fla.parallel_based(hf["q"][..., :4], hf["k"][..., :4], hf["v"], head_first=True)
    torch.testing.assert_close(o2, o1.transpose(1, 2))


@pytest.mark.parametrize("fn", ["chunk_gla", "fused_recurrent_gla", "chunk_simple_gla",
                                "chunk_retention"])
def test_cu_seqlens_equals_separate_calls(fn):
    torch = pytest.importorskip("torch")
    lens = [5, 0, 23, 17]
    x = inputs(7, b=1, t=sum(lens))
    a = to_torch(x)
    h0 = torch.randn(len(lens), H, K, V)
    cu = torch.tensor([0] + list(np.cumsum(lens)), dtype=torch.long)
    gate = {"chunk_gla": "g", "fused_recurrent_gla": "g", "chunk_simple_gla": "gs"}.get(fn)
    f = getattr(fla, fn)

    def call(q, k, v, g, h, **kw):
        args = (q, k, v) + ((g,) if gate else ())
        return f(*args, initial_state=h, output_final_state=True, **kw)

    o, ht = call(a["q"], a["k"], a["v"], a[gate] if gate else None, h0, cu_seqlens=cu)
    outs, states = [], []
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_i, h_i = call(a["q"][:, s:e], a["k"][:, s:e], a["v"][:, s:e],
                        a[gate][:, s:e] if gate else None, h0[i:i + 1])
        outs.append(o_i)
        states.append(h_i)
    torch.testing.assert_close(o, torch.cat(outs, 1))
    torch.testing.assert_close(ht, torch.cat(states, 0))
    torch.testing.assert_close(ht[1], h0[1])  # the empty sequence hands its state through


# ---- Gradients -------------------------------------------------------------------------------

def torch_gla(q, k, v, g=None, decay=None, scale=None):
    """The GLA recurrence in torch (differentiable), [B, T, H, *] layout."""
    torch = pytest.importorskip("torch")
    b_, t_, h_, k_ = q.shape
    scale = k_ ** -0.5 if scale is None else scale
    st = q.new_zeros((b_, h_, k_, v.shape[-1]))
    outs = []
    for t in range(t_):
        if g is not None:
            a = torch.exp(g[:, t])
            st = (a if g.dim() == 4 else a[..., None])[..., None] * st
        if decay is not None:
            st = decay[None, :, None, None] * st
        st = st + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], st))
    return torch.stack(outs, 1)


def torch_based(q, k, v, scale=None, use_norm=True):
    torch = pytest.importorskip("torch")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bthk,bshk->bhts", q * scale, k)
    mask = torch.tril(torch.ones(q.shape[1], q.shape[1], dtype=torch.bool))
    w = torch.where(mask, 1 + s + 0.5 * s * s, torch.zeros_like(s))
    o = torch.einsum("bhts,bshv->bthv", w, v)
    return o / (w.sum(-1).transpose(1, 2)[..., None] + 1e-6) if use_norm else o


@pytest.mark.parametrize("fn", ["chunk_gla", "fused_recurrent_gla", "chunk_simple_gla",
                                "chunk_simple_gla g_gamma", "chunk_retention",
                                "parallel_based"])
def test_autograd_matches_float64(fn):
    torch = pytest.importorskip("torch")
    x = inputs(8, k=4)
    leaves = {n: torch.from_numpy(x[n]).requires_grad_() for n in ("q", "k", "v")}
    gname = {"chunk_gla": "g", "fused_recurrent_gla": "g", "chunk_simple_gla": "gs"}.get(fn)
    if gname:
        leaves["g"] = torch.from_numpy(x[gname]).requires_grad_()
    if fn == "chunk_simple_gla g_gamma":
        leaves["g"] = torch.log(torch.tensor([0.9, 0.6, 0.97])).requires_grad_()
    q, k, v, g = leaves["q"], leaves["k"], leaves["v"], leaves.get("g")
    if fn == "chunk_gla":
        o, _ = fla.chunk_gla(q, k, v, g)
    elif fn == "fused_recurrent_gla":
        o, _ = fla.fused_recurrent_gla(q, k, v, gk=g, scale=0.4)
    elif fn == "chunk_simple_gla":
        o, _ = fla.chunk_simple_gla(q, k, v, g)
    elif fn == "chunk_simple_gla g_gamma":
        o, _ = fla.chunk_simple_gla(q, k, v, g_gamma=g)
    elif fn == "chunk_retention":
        o, _ = fla.chunk_retention(q, k, v)
    else:
        o = fla.parallel_based(q, k, v, scale=0.3)
    dout = torch.from_numpy(np.random.default_rng(9).standard_normal(o.shape))
    o.backward(dout.float())

    ref = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    rq, rk, rv, rg = ref["q"], ref["k"], ref["v"], ref.get("g")
    if fn == "chunk_gla" or fn == "chunk_simple_gla":
        want = torch_gla(rq, rk, rv, g=rg)
    elif fn == "fused_recurrent_gla":
        want = torch_gla(rq, rk, rv, g=rg, scale=0.4)
    elif fn == "chunk_simple_gla g_gamma":
        want = torch_gla(rq, rk, rv, decay=torch.exp(rg))
    elif fn == "chunk_retention":
        want = torch_gla(rq, rk, rv, decay=torch.tensor([1 - 2.0 ** (-5 - h) for h in range(H)],
                                                        dtype=torch.float64))
    else:
        want = torch_based(rq, rk, rv, scale=0.3)
    want.backward(dout)
    close(o.detach().numpy(), want.detach().numpy(), 2e-5, "o")
    for n in leaves:
        assert leaves[n].grad is not None, n
        close(leaves[n].grad.numpy(), ref[n].grad.numpy(), 1e-4, f"d{n}")


# ---- Bad input -------------------------------------------------------------------------------

def test_bad_input():
    torch = pytest.importorskip("torch")
    a = to_torch(inputs(10))
    q, k, v = a["q"], a["k"], a["v"]
    with pytest.raises(NotImplementedError, match="gv"):
        fla.fused_recurrent_gla(q, k, v, gv=torch.zeros(B, T, H, V))
    with pytest.raises(ValueError, match="g: expected shape"):
        fla.chunk_gla(q, k, v, a["gs"])
    with pytest.raises(ValueError, match="g: expected shape"):
        fla.chunk_simple_gla(q, k, v, a["g"])
    with pytest.raises(ValueError, match="g_gamma"):
        fla.chunk_simple_gla(q, k, v, a["gs"], g_gamma=torch.zeros(H))
    with pytest.raises(ValueError, match="g_gamma"):
        fla.chunk_simple_gla(q, k, v, g_gamma=torch.full((H,), 0.5))
    with pytest.raises(ValueError, match="gates"):
        fla.chunk_gla(q, k, v, -a["g"] + 0.1)
    with pytest.raises(ValueError, match="cu_seqlens"):
        fla.chunk_gla(q, k, v, a["g"], cu_seqlens=torch.tensor([0, 10, T]))
    qg = q.clone().requires_grad_()
    with pytest.raises(ValueError, match="return_state"):
        fla.chunk_gla(qg, k, v, a["g"], output_final_state=True)
    with pytest.raises(ValueError, match="initial_state"):
        fla.chunk_gla(qg, k, v, a["g"], initial_state=a["h0"])
    with pytest.raises(ValueError, match="q"):
        fla.chunk_retention(q[0], k, v)
    with pytest.raises(TypeError, match="k"):
        fla.chunk_retention(q, k.numpy(), v)
    # Inference with states is fine under no_grad.
    with torch.no_grad():
        o, ht = fla.chunk_gla(qg, k, v, a["g"], initial_state=a["h0"], output_final_state=True)
    assert ht.shape == (B, H, K, V) and not o.requires_grad
