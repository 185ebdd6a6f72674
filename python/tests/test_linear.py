# SPDX-License-Identifier: Apache-2.0
"""tessera.linear_attention / linear_attention_recurrent / linear_attention_backward against an
fp64 numpy reference of the recurrence written here (not tessera's own reference), on awkward
shapes (S not a multiple of the chunk, GQA, Dk != Dv, B > 1), numpy and torch, f32 and bf16;
the state hand-over; gradients against torch autograd through a float64 torch recurrence; the
torch ops (opcheck, torch.compile); LRPE (lrpe_theta, position_offset); bad input."""
import math

import numpy as np
import pytest

import tessera

# ---- The fp64 reference: the recurrence, token by token -------------------------------------


def phi(x, feature_map):
    """Feature map over the last axis (float64)."""
    if feature_map == "identity":
        return x
    if feature_map == "elu1":
        return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))
    if feature_map == "relu":
        return np.maximum(x, 0.0)
    assert feature_map == "taylor2"
    d = x.shape[-1]
    outer = x[..., :, None] * x[..., None, :] / math.sqrt(2.0 * d)
    ones = np.ones(x.shape[:-1] + (1,))
    return np.concatenate([ones, x / d ** 0.25, outer.reshape(x.shape[:-1] + (d * d,))], -1)


def lrpe_features(f, theta, position_offset):
    """LRPE's doubling of the features f [S, F0] of one head with its angles theta [F0]:
    [f cos(p theta), f sin(p theta)] at p = position_offset + t (float64)."""
    pos = position_offset + np.arange(f.shape[0], dtype=np.float64)
    angle = pos[:, None] * np.asarray(theta, dtype=np.float64)[None, :]
    return np.concatenate([f * np.cos(angle), f * np.sin(angle)], -1)


def theta_of_head(lrpe_theta, h):
    theta = np.asarray(lrpe_theta)
    return theta if theta.ndim == 1 else theta[h]


def reference(q, k, v, *, feature_map="identity", scale=None, causal=True, prefix_len=0,
              normalize=False, eps=1e-6, decay=None, gates=None, window=0, initial_state=None,
              initial_normalizer=None, lrpe_theta=None, position_offset=0):
    """out [B, S, Hq, Dv], final state [B, Hq, F, Dv], normalizer [B, Hq, F] in float64."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, S, Hq, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    group = Hq // Hkv
    if scale is None:
        scale = 1.0 if feature_map == "taylor2" else float(np.float32(1.0 / math.sqrt(Dk)))
    fq, fk = phi(q, feature_map), phi(k, feature_map)
    F = fq.shape[-1] * (2 if lrpe_theta is not None else 1)
    out = np.zeros((B, S, Hq, Dv))
    states = np.zeros((B, Hq, F, Dv))
    norms = np.zeros((B, Hq, F))
    # Keys [0, first) enter the state before any query reads it (prefix / non-causal).
    first = S if not causal else prefix_len
    for b in range(B):
        for h in range(Hq):
            kv = h // group
            # The features of this (sequence, query head): LRPE's angles are the query head's.
            fq_h, fk_h = fq[b, :, h], fk[b, :, kv]
            if lrpe_theta is not None:
                theta = theta_of_head(lrpe_theta, h)
                fq_h = lrpe_features(fq_h, theta, position_offset)
                fk_h = lrpe_features(fk_h, theta, position_offset)
            st = np.zeros((F, Dv)) if initial_state is None else np.array(
                initial_state[b, h], dtype=np.float64)
            z = np.zeros(F) if initial_normalizer is None else np.array(
                initial_normalizer[b, h], dtype=np.float64)

            def add(t, decayed):
                nonlocal st, z
                a = np.ones(F)
                if decayed and decay is not None:
                    a = np.full(F, float(decay[h]))
                if decayed and gates is not None:
                    g = np.asarray(gates, dtype=np.float64)
                    a = np.exp(g[b, t, h]) * np.ones(F)
                st = a[:, None] * st + np.outer(fk_h[t], v[b, t, kv])
                z = a * z + fk_h[t]

            for t in range(first):
                add(t, False)
            for t in range(S):
                if t >= first:
                    add(t, True)
                o = scale * fq_h[t] @ st
                if normalize:
                    o = o / (scale * fq_h[t] @ z + eps)
                if window:
                    lo = max(0, t - window + 1)
                    s = q[b, t, h] @ k[b, lo:t + 1, kv].T / math.sqrt(Dk)
                    p = np.exp(s - s.max())
                    o = o + (p / p.sum()) @ v[b, lo:t + 1, kv]
                out[b, t, h] = o
            states[b, h], norms[b, h] = st, z
    return out, states, norms


# ---- Inputs ----------------------------------------------------------------------------------

SHAPE = dict(B=2, S=37, Hq=4, Hkv=2, Dk=6, Dv=5)


def make_inputs(seed=0, B=2, S=37, Hq=4, Hkv=2, Dk=6, Dv=5, positive=False):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, S, Hq, Dk)).astype(np.float32) * 0.5
    k = rng.standard_normal((B, S, Hkv, Dk)).astype(np.float32) * 0.5
    v = rng.standard_normal((B, S, Hkv, Dv)).astype(np.float32)
    if positive:
        q, k = np.abs(q), np.abs(k)
    gates = (-np.log1p(np.exp(-rng.standard_normal((B, S, Hq, Dk)))) / 4).astype(np.float32)
    gates.reshape(-1)[::7] = -8.0  # a few strongly negative gates
    scalar = (-np.log1p(np.exp(-rng.standard_normal((B, S, Hq)))) / 4).astype(np.float32)
    scalar.reshape(-1)[::5] = -6.0
    decay = np.array([1.0 - 2.0 ** (-2 - h) for h in range(Hq)], dtype=np.float32)
    return dict(q=q, k=k, v=v, gates=gates, scalar_gates=scalar, decay=decay)


# name -> (options from the inputs, Dk override, positive q/k)
VARIANTS = {
    "plain": (lambda x: {}, None, False),
    "elu1 normalized": (lambda x: dict(feature_map="elu1", normalize=True), None, False),
    "relu non-causal": (lambda x: dict(feature_map="relu", causal=False), None, False),
    "elu1 prefix 9 normalized": (
        lambda x: dict(feature_map="elu1", prefix_len=9, normalize=True), None, False),
    "decay": (lambda x: dict(decay=x["decay"]), None, False),
    "gla": (lambda x: dict(gates=x["gates"]), None, False),
    "gla scalar": (lambda x: dict(gates=x["scalar_gates"], scale=0.7), None, False),
    "gla scalar normalized": (
        lambda x: dict(gates=x["scalar_gates"], normalize=True), None, True),
    "based window 5": (
        lambda x: dict(feature_map="taylor2", normalize=True, window=5), 4, False),
}


def case(name, seed=0):
    opts_of, dk, positive = VARIANTS[name]
    shape = dict(SHAPE)
    if dk is not None:
        shape["Dk"] = dk
    x = make_inputs(seed, positive=positive, **shape)
    return x, opts_of(x)


def assert_close(got, want, rtol, what=""):
    got = np.asarray(got, dtype=np.float64)
    scale = max(np.abs(want).max(), 1e-30)
    err = np.abs(got - want)
    tol = rtol * scale + rtol * np.abs(want)
    bad = np.argwhere(err > tol)
    assert bad.size == 0, (f"{what}: {bad.shape[0]} elements off, worst {err.max():.3g} at "
                           f"{np.unravel_index(err.argmax(), err.shape)} (scale {scale:.3g})")


# ---- Forward, numpy ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_forward_numpy_matches_recurrence(name, form):
    x, opts = case(name)
    want, want_state, want_norm = reference(x["q"], x["k"], x["v"], **opts)
    if form == "chunked":
        got = tessera.linear_attention(x["q"], x["k"], x["v"], chunk_size=16, **opts)
    else:
        got = tessera.linear_attention_recurrent(x["q"], x["k"], x["v"], return_state=False,
                                                 **opts)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    assert got.shape == want.shape
    assert_close(got, want, 2e-5, f"{name} {form}")
    if opts.get("causal", True):
        res = tessera.linear_attention(x["q"], x["k"], x["v"], return_state=True, **opts)
        assert len(res) == (3 if opts.get("normalize") else 2)
        assert res[1].dtype == np.float32 and res[1].shape == want_state.shape
        assert_close(res[1], want_state, 2e-5, f"{name} state")
        if opts.get("normalize"):
            assert_close(res[2], want_norm, 2e-5, f"{name} normalizer")


def test_chunked_equals_recurrent_across_chunk_sizes():
    x, opts = case("gla scalar")
    rec = tessera.linear_attention_recurrent(x["q"], x["k"], x["v"], return_state=False, **opts)
    for chunk in (16, 32, 64, 256):
        got = tessera.linear_attention(x["q"], x["k"], x["v"], chunk_size=chunk, **opts)
        np.testing.assert_allclose(got, rec, rtol=1e-5, atol=1e-5 * np.abs(rec).max())


def test_strided_and_float16_inputs():
    x, opts = case("gla")
    # Non-contiguous views are read in place.
    big = np.zeros((2, 37, 4, 12), np.float32)
    big[..., ::2] = x["q"]
    q = big[..., ::2]
    got = tessera.linear_attention(q, x["k"], x["v"], **opts)
    want, _, _ = reference(x["q"], x["k"], x["v"], **opts)
    assert_close(got, want, 2e-5, "strided q")
    # float16: the reference reads the same rounded inputs.
    q16, k16, v16 = (x[n].astype(np.float16) for n in ("q", "k", "v"))
    got = tessera.linear_attention(q16, k16, v16, **opts)
    assert got.dtype == np.float16
    want, _, _ = reference(q16, k16, v16, **opts)
    assert_close(got, want, 3e-3, "f16")


# ---- State hand-over -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["plain", "elu1 normalized", "decay", "gla", "gla scalar",
                                  "gla scalar normalized"])
def test_prefill_then_decode_equals_one_call(name):
    x, opts = case(name)
    q, k, v = x["q"], x["k"], x["v"]
    whole = tessera.linear_attention(q, k, v, **opts)
    split = 21
    first = {kk: (vv[:, :split] if kk == "gates" else vv) for kk, vv in opts.items()}
    res = tessera.linear_attention(q[:, :split], k[:, :split], v[:, :split], return_state=True,
                                   chunk_size=16, **first)
    outs = [res[0]]
    state = res[1]
    norm = res[2] if opts.get("normalize") else None
    for t in range(split, q.shape[1]):
        step = {kk: (vv[:, t:t + 1] if kk == "gates" else vv) for kk, vv in opts.items()}
        res = tessera.linear_attention_recurrent(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1],
                                                 initial_state=state, initial_normalizer=norm,
                                                 **step)
        outs.append(res[0])
        state = res[1]
        norm = res[2] if opts.get("normalize") else None
    got = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(got, whole, rtol=2e-5, atol=2e-5 * np.abs(whole).max())
    _, want_state, _ = reference(q, k, v, **opts)
    assert_close(state, want_state, 2e-5, "final state after decode")


# ---- Torch: forward in f32 and bf16 ------------------------------------------------------------

@pytest.mark.parametrize("name", ["plain", "elu1 normalized", "decay", "gla", "gla scalar",
                                  "based window 5"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_torch(name, dtype):
    torch = pytest.importorskip("torch")
    x, opts = case(name)
    dt = getattr(torch, dtype)
    q, k, v = (torch.from_numpy(x[n]).to(dt) for n in ("q", "k", "v"))
    topts = {kk: (torch.from_numpy(vv) if isinstance(vv, np.ndarray) else vv)
             for kk, vv in opts.items()}
    got = tessera.linear_attention(q, k, v, chunk_size=16, **topts)
    assert isinstance(got, torch.Tensor) and got.dtype == dt
    rec = tessera.linear_attention_recurrent(q, k, v, return_state=False, **topts)
    want, _, _ = reference(q.float().numpy(), k.float().numpy(), v.float().numpy(), **opts)
    rtol = 2e-5 if dtype == "float32" else 8e-3
    assert_close(got.float().numpy(), want, rtol, f"{name} {dtype} chunked")
    assert_close(rec.float().numpy(), want, rtol, f"{name} {dtype} recurrent")


# ---- Gradients: torch autograd vs a float64 torch recurrence ----------------------------------

def torch_phi(x, feature_map):
    torch = pytest.importorskip("torch")
    if feature_map == "identity":
        return x
    if feature_map == "elu1":
        return torch.nn.functional.elu(x) + 1.0
    if feature_map == "relu":
        return torch.relu(x)
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :] / math.sqrt(2.0 * d)).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, outer], -1)


def torch_recurrence(q, k, v, *, feature_map="identity", scale=None, normalize=False, eps=1e-6,
                     decay=None, gates=None, lrpe_theta=None, position_offset=0):
    """Causal linear attention, token by token, differentiable (float64 in, float64 out); with
    lrpe_theta the features doubled as LRPE does (lrpe_features)."""
    torch = pytest.importorskip("torch")
    B, S, Hq, Dk = q.shape
    group = Hq // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    if scale is None:
        scale = 1.0 if feature_map == "taylor2" else float(np.float32(1.0 / math.sqrt(Dk)))
    fq, fk = torch_phi(q, feature_map), torch_phi(k, feature_map)
    if lrpe_theta is not None:
        pos = position_offset + torch.arange(S, dtype=torch.float64)
        # [S, Hq, F0] (a shared [Dk] theta broadcasts over the heads).
        angle = pos[:, None, None] * torch.as_tensor(lrpe_theta, dtype=torch.float64)
        angle = angle.expand(S, Hq, fq.shape[-1])
        fq = torch.cat([fq * torch.cos(angle), fq * torch.sin(angle)], -1)
        fk = torch.cat([fk * torch.cos(angle), fk * torch.sin(angle)], -1)
    F, Dv = fq.shape[-1], v.shape[-1]
    st = q.new_zeros((B, Hq, F, Dv))
    z = q.new_zeros((B, Hq, F))
    outs = []
    for t in range(S):
        if gates is not None:
            a = torch.exp(gates[:, t])
            a = a if gates.dim() == 4 else a[..., None].expand(B, Hq, F)
            st = a[..., None] * st
            z = a * z
        elif decay is not None:
            st = decay[None, :, None, None] * st
            z = decay[None, :, None] * z
        st = st + fk[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + fk[:, t]
        o = scale * torch.einsum("bhf,bhfd->bhd", fq[:, t], st)
        if normalize:
            o = o / (scale * (fq[:, t] * z).sum(-1, keepdim=True) + eps)
        outs.append(o)
    return torch.stack(outs, dim=1)


GRAD_VARIANTS = ["plain", "elu1 normalized", "decay", "gla", "gla scalar",
                 "gla scalar normalized", "based (no window)"]


def grad_case(name):
    if name == "based (no window)":
        x, _ = case("based window 5")
        return x, dict(feature_map="taylor2", normalize=True)
    return case(name)


@pytest.mark.parametrize("name", GRAD_VARIANTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_autograd_matches_float64_recurrence(name, dtype):
    torch = pytest.importorskip("torch")
    x, opts = grad_case(name)
    dt = getattr(torch, dtype)
    names = ["q", "k", "v"] + (["gates"] if "gates" in opts else [])
    leaves = {n: torch.from_numpy(np.asarray(opts[n] if n == "gates" else x[n])).to(
        torch.float32 if n == "gates" else dt).requires_grad_() for n in names}
    rest = {kk: (torch.from_numpy(vv) if isinstance(vv, np.ndarray) else vv)
            for kk, vv in opts.items() if kk != "gates"}
    out = tessera.linear_attention(leaves["q"], leaves["k"], leaves["v"],
                                   gates=leaves.get("gates"), chunk_size=16, **rest)
    dout = torch.from_numpy(np.random.default_rng(3).standard_normal(out.shape)).to(dt)
    out.backward(dout)

    ref = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    rest64 = {kk: (vv.double() if isinstance(vv, torch.Tensor) else vv)
              for kk, vv in rest.items()}
    want = torch_recurrence(ref["q"], ref["k"], ref["v"], gates=ref.get("gates"), **rest64)
    want.backward(dout.double())
    rtol = 2e-5 if dtype == "float32" else 1e-2
    assert_close(out.detach().float().numpy(), want.detach().numpy(), rtol, "out")
    for n in names:
        g = leaves[n].grad
        assert g is not None and g.dtype == leaves[n].dtype and g.shape == leaves[n].shape
        # bf16 gradients are rounded once more on the way out; gates accumulate over the
        # sequence (a reverse cumulative sum).
        assert_close(g.float().numpy(), ref[n].grad.numpy(), rtol * (4 if n == "gates" else 1),
                     f"d{n}")


def test_backward_function_numpy_matches_autograd():
    torch = pytest.importorskip("torch")
    x, opts = case("gla scalar")
    dout = np.random.default_rng(4).standard_normal((2, 37, 4, 5)).astype(np.float32)
    dq, dk, dv, dg = tessera.linear_attention_backward(dout, x["q"], x["k"], x["v"],
                                                       chunk_size=16, **opts)
    assert dg.shape == x["scalar_gates"].shape and dg.dtype == np.float32
    ref = {n: torch.from_numpy(x[n]).double().requires_grad_() for n in ("q", "k", "v")}
    g = torch.from_numpy(x["scalar_gates"]).double().requires_grad_()
    out = torch_recurrence(ref["q"], ref["k"], ref["v"], gates=g, scale=opts["scale"])
    out.backward(torch.from_numpy(dout).double())
    for got, want, n in ((dq, ref["q"].grad, "dq"), (dk, ref["k"].grad, "dk"),
                         (dv, ref["v"].grad, "dv"), (dg, g.grad, "dgates")):
        assert_close(got, want.numpy(), 4e-5, n)


def test_inference_call_skips_the_op_and_no_grad_allows_states():
    torch = pytest.importorskip("torch")
    x, opts = case("decay")
    q, k, v = (torch.from_numpy(x[n]).requires_grad_() for n in ("q", "k", "v"))
    with torch.no_grad():
        out, state = tessera.linear_attention(q, k, v, decay=torch.from_numpy(x["decay"]),
                                              return_state=True)
    assert out.grad_fn is None and state.shape == (2, 4, 6, 5)
    out = tessera.linear_attention(q.detach(), k.detach(), v.detach())
    assert out.grad_fn is None


# ---- The torch ops: opcheck, torch.compile --------------------------------------------------

def test_opcheck_linear_ops():
    torch = pytest.importorskip("torch")
    import tessera._torch_linear as TL
    from tessera.linear import LinearOptions
    x, _ = case("gla scalar")
    q, k, v = (torch.from_numpy(x[n][:1, :20]).requires_grad_() for n in ("q", "k", "v"))
    g = torch.from_numpy(x["scalar_gates"][:1, :20]).requires_grad_()
    fm, ints, floats = LinearOptions(chunk_size=16, threads=1).pack()
    torch.library.opcheck(TL.linear_fwd, (q, k, v, None, g, None, None, None, fm, ints, floats,
                                          0, False, False))
    # With a state in and out (no gradient then), and the normalizer.
    fm, ints2, floats2 = LinearOptions(normalize=True, feature_map="elu1", threads=1).pack()
    s0 = torch.randn(1, 4, 6, 5)
    z0 = torch.rand(1, 4, 6)
    torch.library.opcheck(TL.linear_fwd, (q.detach(), k.detach(), v.detach(), None, None, None,
                                          s0, z0, fm, ints2, floats2, 0, True, True),
                          test_utils=("test_schema", "test_faketensor"))
    dout = torch.randn(1, 20, 4, 5)
    torch.library.opcheck(TL.linear_bwd, (dout, q.detach(), k.detach(), v.detach(), None,
                                          g.detach(), None, "identity", ints, floats, 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_forward_and_backward():
    torch = pytest.importorskip("torch")
    x, opts = case("gla")
    q, k, v = (torch.from_numpy(x[n]).requires_grad_() for n in ("q", "k", "v"))
    g = torch.from_numpy(x["gates"]).requires_grad_()

    def f(q, k, v, g):
        return tessera.linear_attention(q * 1.0, k, v, gates=g, chunk_size=16).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(q, k, v, g)
    grads = torch.autograd.grad(loss, (q, k, v, g))
    loss_e = f(q, k, v, g)
    grads_e = torch.autograd.grad(loss_e, (q, k, v, g))
    torch.testing.assert_close(loss, loss_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


# ---- LRPE: lrpe_theta and position_offset ----------------------------------------------------

def lrpe_theta_of(per_head, Hq=4, Dk=6):
    """RoPE-like angles 10000^(-f / Dk), a little different per head ([Hq, Dk]), or head 0's row
    as the [Dk] every head shares (float32)."""
    base = 10000.0 ** (-np.arange(Dk) / Dk)
    theta = np.stack([base * (1.0 + 0.1 * h) for h in range(Hq)]).astype(np.float32)
    return theta if per_head else theta[0].copy()


# name -> (options, per-head theta, position_offset); every case on SHAPE (GQA, B = 2, S = 37).
LRPE_VARIANTS = {
    "identity": (dict(), False, 0),
    "identity per-head offset 1000": (dict(), True, 1000),
    "elu1 normalized decay per-head offset 1000": (
        dict(feature_map="elu1", normalize=True, decay=True), True, 1000),
    "elu1 normalized decay offset 0": (dict(feature_map="elu1", normalize=True, decay=True),
                                       False, 0),
    "identity decay offset 1000": (dict(decay=True), False, 1000),
}


def lrpe_case(name, seed=0):
    opts, per_head, offset = LRPE_VARIANTS[name]
    x = make_inputs(seed, **SHAPE)
    opts = dict(opts)
    if opts.pop("decay", False):
        opts["decay"] = x["decay"]
    return x, dict(opts, lrpe_theta=lrpe_theta_of(per_head), position_offset=offset)


def test_lrpe_feature_dim():
    assert tessera.linear_feature_dim("identity", 6) == 6
    assert tessera.linear_feature_dim("elu1", 6, lrpe=True) == 12
    assert tessera.linear_feature_dim("relu", 128, lrpe=True) == 256
    with pytest.raises(ValueError, match="taylor2"):
        tessera.linear_feature_dim("taylor2", 4, lrpe=True)


@pytest.mark.parametrize("name", list(LRPE_VARIANTS))
@pytest.mark.parametrize("form", ["chunked", "recurrent"])
def test_lrpe_forward_matches_reference(name, form):
    x, opts = lrpe_case(name)
    q, k, v = x["q"], x["k"], x["v"]
    want, want_state, want_norm = reference(q, k, v, **opts)
    # The reference itself: LRPE changes the result (the angles reach the output).
    plain = dict(opts, lrpe_theta=None)
    assert np.abs(reference(q, k, v, **plain)[0] - want).max() > 1e-2 * np.abs(want).max()
    if form == "chunked":
        res = tessera.linear_attention(q, k, v, chunk_size=16, return_state=True, **opts)
    else:
        res = tessera.linear_attention_recurrent(q, k, v, **opts)
    assert len(res) == (3 if opts.get("normalize") else 2)
    assert res[0].dtype == np.float32 and res[0].shape == want.shape
    assert_close(res[0], want, 2e-5, f"{name} {form}")
    # States of F = 2 Dk features: the cosine rows, then the sine rows.
    assert res[1].shape == (2, 4, 12, 5) == want_state.shape
    assert_close(res[1], want_state, 2e-5, f"{name} {form} state")
    if opts.get("normalize"):
        assert res[2].shape == (2, 4, 12)
        assert_close(res[2], want_norm, 2e-5, f"{name} {form} normalizer")


@pytest.mark.parametrize("name", ["identity per-head offset 1000",
                                  "elu1 normalized decay offset 0"])
def test_lrpe_prefill_then_decode_equals_one_call(name):
    # The prefill's state continues at position_offset + 21 (chunked), then token by token.
    x, opts = lrpe_case(name)
    q, k, v = x["q"], x["k"], x["v"]
    offset = opts["position_offset"]
    whole = tessera.linear_attention(q, k, v, return_state=True, **opts)
    split = 21
    prefill = tessera.linear_attention(q[:, :split], k[:, :split], v[:, :split],
                                       return_state=True, chunk_size=16, **opts)
    outs = [prefill[0]]
    state_norm = prefill[1:]
    for t in range(split, q.shape[1]):
        step = dict(opts, position_offset=offset + t)
        res = tessera.linear_attention_recurrent(
            q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], initial_state=state_norm[0],
            initial_normalizer=state_norm[1] if opts.get("normalize") else None, **step)
        outs.append(res[0])
        state_norm = res[1:]
    got = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(got, whole[0], rtol=2e-5, atol=2e-5 * np.abs(whole[0]).max())
    for a, b in zip(state_norm, whole[1:]):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(b).max())
    # One chunked continuation at position_offset + split does the same; one that forgets the
    # split (the angles of positions 0..) does not.
    rest = (q[:, split:], k[:, split:], v[:, split:])
    hand_off = dict(initial_state=prefill[1],
                    initial_normalizer=prefill[2] if opts.get("normalize") else None)
    cont = tessera.linear_attention(*rest, chunk_size=16, **hand_off,
                                    **dict(opts, position_offset=offset + split))
    tail = whole[0][:, split:]
    np.testing.assert_allclose(cont, tail, rtol=2e-5, atol=2e-5 * np.abs(tail).max())
    wrong = tessera.linear_attention(*rest, chunk_size=16, **hand_off, **opts)
    assert np.abs(wrong - tail).max() > 1e-2 * np.abs(tail).max()


@pytest.mark.parametrize("name", ["identity per-head offset 1000",
                                  "elu1 normalized decay per-head offset 1000",
                                  "elu1 normalized decay offset 0"])
def test_lrpe_autograd_matches_float64_recurrence(name):
    torch = pytest.importorskip("torch")
    x, opts = lrpe_case(name)
    leaves = {n: torch.from_numpy(x[n]).requires_grad_() for n in ("q", "k", "v")}
    rest = {kk: (torch.from_numpy(vv) if isinstance(vv, np.ndarray) else vv)
            for kk, vv in opts.items()}
    out = tessera.linear_attention(leaves["q"], leaves["k"], leaves["v"], chunk_size=16, **rest)
    dout = torch.from_numpy(np.random.default_rng(3).standard_normal(out.shape)).float()
    out.backward(dout)

    ref = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    rest64 = {kk: (vv.double() if isinstance(vv, torch.Tensor) else vv)
              for kk, vv in rest.items()}
    want = torch_recurrence(ref["q"], ref["k"], ref["v"], **rest64)
    want.backward(dout.double())
    assert_close(out.detach().numpy(), want.detach().numpy(), 2e-5, "out")
    for n in ("q", "k", "v"):
        assert_close(leaves[n].grad.numpy(), ref[n].grad.numpy(), 4e-5, f"d{n}")
    # The numpy backward function agrees with autograd.
    grads = tessera.linear_attention_backward(dout.numpy(), x["q"], x["k"], x["v"],
                                              chunk_size=16, **opts)
    for got, n in zip(grads, ("q", "k", "v")):
        assert_close(got, ref[n].grad.numpy(), 4e-5, f"d{n} (backward function)")


def test_lrpe_torch_ops():
    torch = pytest.importorskip("torch")
    import tessera._torch_linear as TL
    from tessera.linear import LinearOptions
    x, opts = lrpe_case("identity per-head offset 1000")
    q, k, v = (torch.from_numpy(x[n][:1, :20]) for n in ("q", "k", "v"))
    theta = torch.from_numpy(opts["lrpe_theta"])
    fm, ints, floats = LinearOptions(normalize=True, feature_map="elu1", threads=1).pack()
    s0, z0 = torch.randn(1, 4, 12, 5), torch.rand(1, 4, 12)
    # The fake implementation's states have F = 2 Dk, as the kernel's.
    torch.library.opcheck(TL.linear_fwd, (q, k, v, None, None, theta, s0, z0, fm, ints, floats,
                                          1000, True, True),
                          test_utils=("test_schema", "test_faketensor"))
    fm, ints, floats = LinearOptions(chunk_size=16, threads=1).pack()
    torch.library.opcheck(TL.linear_bwd, (torch.randn(1, 20, 4, 5), q, k, v, None, None, theta,
                                          fm, ints, floats, 7),
                          test_utils=("test_schema", "test_faketensor"))
    # Under no_grad the state comes back doubled, and angles that require grad are refused.
    with torch.no_grad():
        _, state = tessera.linear_attention(q, k, v, lrpe_theta=theta, return_state=True)
    assert state.shape == (1, 4, 12, 5)
    with pytest.raises(ValueError, match="lrpe_theta"):
        tessera.linear_attention(q.clone().requires_grad_(), k, v,
                                 lrpe_theta=theta.clone().requires_grad_())


def test_lrpe_bad_input_names_the_argument():
    x, opts = lrpe_case("identity")
    q, k, v = x["q"], x["k"], x["v"]
    theta = opts["lrpe_theta"]
    for bad in (np.zeros(7, np.float32), np.zeros((3, 6), np.float32),
                np.zeros((1, 4, 6), np.float32), np.zeros(0, np.float32),
                np.full(6, np.nan, np.float32)):
        with pytest.raises(ValueError, match="lrpe_theta"):
            tessera.linear_attention(q, k, v, lrpe_theta=bad)
    with pytest.raises(ValueError, match="lrpe_theta"):
        tessera.linear_attention(q[..., :4], k[..., :4], v, feature_map="taylor2",
                                 lrpe_theta=theta[:4])
    with pytest.raises(ValueError, match="lrpe_theta"):
        tessera.linear_attention(q, k, v, gates=x["gates"], lrpe_theta=theta)
    with pytest.raises(ValueError, match="lrpe_theta"):
        tessera.linear_attention_recurrent(q, k, v, lrpe_theta=theta[:5])
    with pytest.raises(ValueError, match="lrpe_theta"):
        tessera.linear_attention_backward(np.ones((2, 37, 4, 5), np.float32), q, k, v,
                                          lrpe_theta=theta[:5])
    with pytest.raises(ValueError, match="position_offset"):
        tessera.linear_attention(q, k, v, lrpe_theta=theta, position_offset=-1)
    with pytest.raises(TypeError, match="position_offset"):
        tessera.linear_attention(q, k, v, lrpe_theta=theta, position_offset=1.5)


# ---- Bad input -------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    x, _ = case("plain")
    q, k, v = x["q"], x["k"], x["v"]
    with pytest.raises(ValueError, match="gates"):
        tessera.linear_attention(q, k, v, gates=np.full((2, 37, 4), 0.5, np.float32))
    with pytest.raises(ValueError, match="gates"):
        tessera.linear_attention(q, k, v, gates=np.full((2, 37, 5), -0.5, np.float32))
    with pytest.raises(ValueError, match="gates"):
        tessera.linear_attention(q, k, v, gates=np.full((2, 37), -0.5, np.float32))
    with pytest.raises(ValueError, match="gates"):
        tessera.linear_attention(q, k, v, gates=np.full((2, 37, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match="k"):
        tessera.linear_attention(q, k[:, :, :, :5], v)
    with pytest.raises(ValueError, match="v"):
        tessera.linear_attention(q, k, v[:, :30])
    with pytest.raises(ValueError, match="q"):
        tessera.linear_attention(q[0], k, v)
    with pytest.raises(ValueError, match="decay"):
        tessera.linear_attention(q, k, v, decay=np.array([1.5, 0.5, 0.5, 0.5], np.float32))
    with pytest.raises(ValueError, match="feature_map"):
        tessera.linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="path"):
        tessera.linear_attention(q, k, v, path="reference")
    with pytest.raises(ValueError, match="chunk_size"):
        tessera.linear_attention(q, k, v, chunk_size=24)
    with pytest.raises(ValueError, match="initial_state"):
        tessera.linear_attention(q, k, v, initial_state=np.zeros((2, 4, 6, 4), np.float32))
    with pytest.raises(TypeError, match="q"):
        tessera.linear_attention(q.tolist(), k, v)
    with pytest.raises(TypeError, match="chunk_size"):
        tessera.linear_attention(q, k, v, chunk_size="64")


def test_bad_torch_input():
    torch = pytest.importorskip("torch")
    x, _ = case("plain")
    q, k, v = (torch.from_numpy(x[n]) for n in ("q", "k", "v"))
    with pytest.raises(TypeError, match="k"):
        tessera.linear_attention(q, x["k"], v)
    with pytest.raises(TypeError, match="gates"):
        tessera.linear_attention(q, k, v, gates=x["scalar_gates"])
    qg = q.clone().requires_grad_()
    with pytest.raises(ValueError, match="decay"):
        tessera.linear_attention(q, k, v, decay=torch.full((4,), 0.9, requires_grad=True))
    with pytest.raises(ValueError, match="initial_state"):
        tessera.linear_attention(qg, k, v, initial_state=torch.zeros(2, 4, 6, 5))
    with pytest.raises(ValueError, match="return_state"):
        tessera.linear_attention(qg, k, v, return_state=True)
    with pytest.raises(ValueError, match="window"):
        tessera.linear_attention(qg[..., :4], k[..., :4], v, feature_map="taylor2", window=3)
    with pytest.raises(ValueError, match="gates"):
        tessera.linear_attention(qg, k, v, gates=torch.full((2, 37, 4), 0.1))
