# SPDX-License-Identifier: Apache-2.0
"""tessera.ssm_kernel, ssm_scan and SsmStream (the diagonal SSM of include/tessera/longconv.h)
against a float64 reference written here from its formulas: the kernel h[s, c] = Re(sum_m w a^s
b) and the recurrence x_t = a x_{t-1} + b u_t, y_t = Re(sum_m w x_t) + skip u_t in complex128.
Complex and (re, im) pair inputs, numpy and torch; chained scans and streams equal one scan bit
for bit; the scan equals long_conv1d with the kernel; the caller's state is left alone; bad
input."""
import numpy as np
import pytest

import tessera
from conftest import torch_or_skip


def random_ssm(rng, C, n):
    """A stable model as complex64 [C, n] arrays (|a| in [0.5, 0.999]: long and short memories)
    and skip [C] float32."""
    a = rng.uniform(0.5, 0.999, (C, n)) * np.exp(1j * rng.uniform(-3, 3, (C, n)))
    b = 0.3 * (rng.standard_normal((C, n)) + 1j * rng.standard_normal((C, n)))
    w = 0.3 * (rng.standard_normal((C, n)) + 1j * rng.standard_normal((C, n)))
    skip = rng.standard_normal(C).astype(np.float32)
    return a.astype(np.complex64), b.astype(np.complex64), w.astype(np.complex64), skip


def pairs(z):
    """complex [C, n] -> float32 [C, n, 2] (re, im), a fresh contiguous array."""
    return np.stack([z.real, z.imag], axis=-1).astype(np.float32)


def kernel_reference(a, b, w, L):
    """h [L, C] float64 = Re(sum_m w a^s b)."""
    a, b, w = (np.asarray(z, np.complex128) for z in (a, b, w))
    powers = a[None] ** np.arange(L)[:, None, None]  # [L, C, n]
    return (w[None] * powers * b[None]).sum(axis=-1).real


def scan_reference(u, a, b, w, skip=None, state=None):
    """(y [B, T, C], x [B, C, n]) in float64 / complex128 for u [B, T, C]; state [B, C, n, 2]."""
    a, b, w = (np.asarray(z, np.complex128) for z in (a, b, w))
    u = np.asarray(u, np.float64)
    B, T, C = u.shape
    x = np.zeros((B, C, a.shape[1]), np.complex128)
    if state is not None:
        x = state[..., 0].astype(np.float64) + 1j * state[..., 1].astype(np.float64)
    y = np.empty((B, T, C))
    for t in range(T):
        x = a * x + b * u[:, t, :, None]
        y[:, t] = (w * x).sum(axis=-1).real
    if skip is not None:
        y += skip.astype(np.float64) * u
    return y, x


def assert_near(got, ref, rel, name):
    """|got - ref| <= rel x max |ref| (rtol 0): got float32 of ref's shape."""
    got = got.numpy() if hasattr(got, "numpy") else got
    assert got.shape == ref.shape and got.dtype == np.float32, name
    np.testing.assert_allclose(got, ref, rtol=0, atol=rel * np.abs(ref).max(), err_msg=name)


def raises_naming(name):
    """ValueError whose message names the argument ("NAME: expected ...")."""
    return pytest.raises(ValueError, match=rf"(^|\s){name}: expected")


# ---- ssm_kernel ---------------------------------------------------------------------------------

def test_kernel_matches_the_formula_numpy():
    rng = np.random.default_rng(1)
    a, b, w, _ = random_ssm(rng, 5, 3)
    ref = kernel_reference(a, b, w, 40)
    # complex64 (read in place), complex128 (rounded: exact here), pairs, and a strided complex64
    # view (every other mode of a [5, 6] array). One complex128 argument among others: conjugating
    # all three of a, b, w would leave the kernel unchanged.
    wide = np.zeros((5, 6), np.complex64)
    wide[:, ::2] = w
    for label, args in (("complex64", (a, b, w)),
                        ("complex128", (a.astype(np.complex128), b, pairs(w))),
                        ("pairs", (pairs(a), pairs(b), pairs(w))),
                        ("mixed, strided", (a, pairs(b), wide[:, ::2]))):
        h = tessera.ssm_kernel(*args, 40)
        assert isinstance(h, np.ndarray)
        assert_near(h, ref, 1e-6, label)


def test_kernel_matches_the_formula_torch():
    torch = torch_or_skip()
    rng = np.random.default_rng(2)
    a, b, w, _ = random_ssm(rng, 5, 3)
    ref = kernel_reference(a, b, w, 40)
    # w as a conjugate view of its conjugate: tessera must resolve the conjugation.
    w_conj_view = torch.tensor(np.conj(w)).conj()
    assert w_conj_view.is_conj()
    for label, args in (("complex64", (torch.tensor(a), torch.tensor(b), w_conj_view)),
                        ("complex128", (torch.tensor(a), torch.tensor(b, dtype=torch.complex128),
                                        torch.tensor(pairs(w)))),
                        ("pairs", tuple(torch.tensor(pairs(z)) for z in (a, b, w)))):
        h = tessera.ssm_kernel(*args, 40)
        assert isinstance(h, torch.Tensor) and h.dtype == torch.float32
        assert_near(h, ref, 1e-6, label)


# ---- ssm_scan -----------------------------------------------------------------------------------

B, T, C, N_MODES = 2, 37, 19, 4


def scan_inputs(seed):
    rng = np.random.default_rng(seed)
    a, b, w, skip = random_ssm(rng, C, N_MODES)
    u = rng.standard_normal((B, T, C)).astype(np.float32)
    return u, a, b, w, skip


@pytest.mark.parametrize("with_skip", [False, True])
def test_scan_matches_the_recurrence(with_skip):
    u, a, b, w, skip = scan_inputs(3)
    skip = skip if with_skip else None
    y, state = tessera.ssm_scan(u, a, b, w, skip=skip, return_state=True)
    ref_y, ref_x = scan_reference(u, a, b, w, skip)
    assert_near(y, ref_y, 2e-5, "y")
    assert state.shape == (B, C, N_MODES, 2)
    assert_near(state, np.stack([ref_x.real, ref_x.imag], axis=-1), 2e-5, "state")
    # Without return_state: y alone, the same bits.
    assert np.array_equal(tessera.ssm_scan(u, a, b, w, skip=skip), y)


@pytest.mark.parametrize("with_skip", [False, True])
def test_scan_equals_long_conv1d_with_the_kernel(with_skip):
    u, a, b, w, skip = scan_inputs(4)
    skip = skip if with_skip else None
    y = tessera.ssm_scan(u, a, b, w, skip=skip)
    yc = tessera.long_conv1d(u, tessera.ssm_kernel(a, b, w, T), skip)
    np.testing.assert_allclose(y, yc, rtol=0, atol=5e-5 * np.abs(y).max())


def test_chained_scans_equal_one_scan_bitwise():
    u, a, b, w, skip = scan_inputs(5)
    whole, whole_state = tessera.ssm_scan(u, a, b, w, skip=skip, return_state=True)
    for threads in (1, 3):
        state, pieces, t0 = None, [], 0
        for steps in (1, 5, 31):  # a decode step, then blocks
            y, state = tessera.ssm_scan(u[:, t0:t0 + steps], a, b, w, skip=skip, state=state,
                                        return_state=True, threads=threads)
            pieces.append(y)
            t0 += steps
        assert t0 == T
        assert np.array_equal(np.concatenate(pieces, axis=1), whole), threads
        assert np.array_equal(state, whole_state), threads


@pytest.mark.parametrize("block", [1, 5, 31])
def test_stream_equals_one_scan_bitwise(block):
    u, a, b, w, skip = scan_inputs(6)
    whole, whole_state = tessera.ssm_scan(u, a, b, w, skip=skip, return_state=True)
    stream = tessera.SsmStream(a, b, w, skip=skip, batch=B)
    for _ in range(2):  # the second pass after reset() starts a new sequence
        ys = [stream.push(u[:, t0:t0 + block]) for t0 in range(0, T, block)]
        assert np.array_equal(np.concatenate(ys, axis=1), whole)
        assert np.array_equal(stream.state, whole_state) and stream.tokens_seen == T
        stream.reset()
        assert not stream.state.any() and stream.tokens_seen == 0


def test_state_is_read_not_modified():
    u, a, b, w, skip = scan_inputs(7)
    _, start = tessera.ssm_scan(u[:, :10], a, b, w, return_state=True)
    before = start.copy()
    y, after = tessera.ssm_scan(u[:, 10:], a, b, w, state=start, return_state=True)
    assert np.array_equal(start, before)
    ref_y, ref_x = scan_reference(u[:, 10:], a, b, w, state=start)
    assert_near(y, ref_y, 2e-5, "y")
    assert_near(after, np.stack([ref_x.real, ref_x.imag], axis=-1), 2e-5, "state")
    # Without return_state too; and the stream's state property is a copy.
    tessera.ssm_scan(u[:, 10:], a, b, w, state=start)
    assert np.array_equal(start, before)
    stream = tessera.SsmStream(a, b, w, batch=B)
    held = stream.state
    stream.push(u)
    assert not held.any()


def test_scan_torch_matches_numpy_bitwise():
    torch = torch_or_skip()
    u, a, b, w, skip = scan_inputs(8)
    y, state = tessera.ssm_scan(u, a, b, w, skip=skip, return_state=True)
    # u as every other channel of a wider tensor; a as pairs, b complex64, w complex128.
    wide = torch.zeros(B, T, 2 * C)
    wide[..., ::2] = torch.tensor(u)
    ut = wide[..., ::2]
    at, bt, wt = (torch.tensor(pairs(a)), torch.tensor(b),
                  torch.tensor(w, dtype=torch.complex128))
    half = torch.tensor(state) * 0.5
    half_before = half.clone()
    yt, st = tessera.ssm_scan(ut, at, bt, wt, skip=torch.tensor(skip), return_state=True)
    assert isinstance(yt, torch.Tensor) and isinstance(st, torch.Tensor)
    assert np.array_equal(yt.numpy(), y) and np.array_equal(st.numpy(), state)
    tessera.ssm_scan(ut, at, bt, wt, state=half)
    assert torch.equal(half, half_before)
    stream = tessera.SsmStream(at, bt, wt, skip=torch.tensor(skip), batch=B)
    ys = torch.cat([stream.push(ut[:, :1]), stream.push(ut[:, 1:])], dim=1)
    assert np.array_equal(ys.numpy(), y) and np.array_equal(stream.state.numpy(), state)


def test_no_gradient():
    torch = torch_or_skip()
    u, a, b, w, skip = scan_inputs(9)
    at = torch.tensor(a, requires_grad=True)
    ut = torch.tensor(u, requires_grad=True)
    with raises_naming("a"):
        tessera.ssm_kernel(at, torch.tensor(b), torch.tensor(w), 8)
    with raises_naming("u"):
        tessera.ssm_scan(ut, torch.tensor(a), torch.tensor(b), torch.tensor(w))
    with raises_naming("a"):
        tessera.SsmStream(at, torch.tensor(b), torch.tensor(w))
    with torch.no_grad():  # inference with parameters that require grad
        y = tessera.ssm_scan(ut, at, torch.tensor(b), torch.tensor(w))
        stream = tessera.SsmStream(at, torch.tensor(b), torch.tensor(w), batch=B)
        assert np.array_equal(stream.push(ut).numpy(), y.numpy())
    assert np.array_equal(y.numpy(), tessera.ssm_scan(u, a, b, w))


def test_bad_input():
    u, a, b, w, skip = scan_inputs(10)
    unstable = a.copy()
    unstable[3, 1] = 1.01
    nan_b = pairs(b)
    nan_b[2, 0, 1] = np.nan
    with raises_naming("a"):
        tessera.ssm_scan(u, unstable, b, w)
    with raises_naming("a"):
        tessera.ssm_kernel(unstable, b, w, 8)
    with raises_naming("b"):
        tessera.ssm_scan(u, a, nan_b, w)
    with raises_naming("b"):
        tessera.ssm_kernel(a, nan_b, w, 8)
    with raises_naming("w"):
        tessera.ssm_scan(u, a, b, w[:, :3])  # n differs from a's
    with raises_naming("a"):
        tessera.ssm_scan(u, a[:5], b[:5], w[:5])  # C differs from u's
    with raises_naming("a"):
        tessera.ssm_kernel(pairs(a)[..., :1], b, w, 8)  # not [C, n, 2]
    with raises_naming("a"):
        tessera.ssm_kernel(pairs(a).astype(np.float64), b, w, 8)
    with raises_naming("a"):
        tessera.ssm_kernel(a[None], b, w, 8)  # complex, rank 3
    with raises_naming("skip"):
        tessera.ssm_scan(u, a, b, w, skip=skip[:4])
    with raises_naming("skip"):
        tessera.ssm_scan(u, a, b, w, skip=np.full(C, np.nan, np.float32))
    with raises_naming("u"):
        tessera.ssm_scan(u.astype(np.float64), a, b, w)
    with raises_naming("u"):
        tessera.ssm_scan(u[0], a, b, w)
    with raises_naming("u"):
        tessera.ssm_scan(u[:, :0], a, b, w)
    with raises_naming("state"):
        tessera.ssm_scan(u, a, b, w, state=np.zeros((B, C, 3, 2), np.float32))
    with raises_naming("state"):
        tessera.ssm_scan(u, a, b, w, state=np.zeros((B, C, N_MODES, 2)))
    with raises_naming("length"):
        tessera.ssm_kernel(a, b, w, 0)
    stream = tessera.SsmStream(a, b, w, batch=B)
    with raises_naming("u"):
        stream.push(u[:1])
    with raises_naming("u"):
        stream.push(u[..., :5])
    with raises_naming("batch"):
        tessera.SsmStream(a, b, w, batch=0)
    with pytest.raises(TypeError, match="b"):
        tessera.ssm_scan(u, a, [[1.0]], w)
    assert not stream.state.any()  # nothing was written by the refused pushes
