# SPDX-License-Identifier: Apache-2.0
"""tessera.compat.sdpa against PyTorch's own scaled_dot_product_attention run in float64."""
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from tessera.compat import sdpa  # noqa: E402


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def torch_ref(q, k, v, **kw):
    """PyTorch's SDPA in float64 (its math path): the oracle for the semantics."""
    mask = kw.pop("attn_mask", None)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                          **kw)


def assert_close(got, want, tol):
    err = (got.double() - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"max error {err}"


B, H, L, S, E = 2, 4, 13, 21, 32


def masks():
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(B, 1, 1, S, generator=g) > 0.3
    keep[..., 0] = True  # every row sees a key (torch gives NaN for rows that see none)
    return {
        "padding_bool": keep,
        "padding_float": torch.where(keep, 0.0, float("-inf")),
        "keys_only": keep[0, 0],
        "full_bool": torch.rand(L, S, generator=g) > 0.2,
        "per_head_float": torch.randn(1, H, L, S, generator=g),
        "batch_head_float": torch.randn(B, H, L, S, generator=g),
        "float_bias_bf16": torch.randn(B, 1, L, S, generator=g).to(torch.bfloat16),
    }


@pytest.mark.parametrize("name", list(masks()))
def test_masks_match_torch(name):
    q, k, v = rand(B, H, L, E, seed=1), rand(B, H, S, E, seed=2), rand(B, H, S, E, seed=3)
    mask = masks()[name]
    got = sdpa.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert got.shape == (B, H, L, E) and got.is_contiguous()
    assert_close(got, torch_ref(q, k, v, attn_mask=mask), 2e-5)


@pytest.mark.parametrize("L_, S_", [(13, 21), (21, 13), (1, 9), (16, 16)])
def test_is_causal_is_top_left(L_, S_):
    q, k, v = rand(1, 2, L_, E, seed=4), rand(1, 2, S_, E, seed=5), rand(1, 2, S_, E, seed=6)
    got = sdpa.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close(got, torch_ref(q, k, v, is_causal=True), 2e-5)


def test_scale_gqa_and_three_dims():
    q, k, v = rand(B, 8, L, E, seed=7), rand(B, 2, S, E, seed=8), rand(B, 2, S, E, seed=9)
    got = sdpa.scaled_dot_product_attention(q, k, v, scale=0.2, enable_gqa=True)
    assert_close(got, torch_ref(q, k, v, scale=0.2, enable_gqa=True), 2e-5)
    with pytest.raises(ValueError, match="enable_gqa"):
        sdpa.scaled_dot_product_attention(q, k, v)
    q3, k3, v3 = q[0], k[0].repeat_interleave(4, 0), v[0].repeat_interleave(4, 0)
    got = sdpa.scaled_dot_product_attention(q3, k3, v3, is_causal=True)
    assert got.shape == q3.shape
    assert_close(got, torch_ref(q3, k3, v3, is_causal=True), 2e-5)


def test_bf16_error_within_three_times_torchs():
    q, k, v = (rand(1, 4, 128, 64, seed=s, dtype=torch.bfloat16) for s in (10, 11, 12))
    want = torch_ref(q, k, v, is_causal=True)
    ours = (sdpa.scaled_dot_product_attention(q, k, v, is_causal=True).double() - want).abs()
    theirs = (F.scaled_dot_product_attention(q, k, v, is_causal=True).double() - want).abs()
    assert ours.max() <= 3 * max(theirs.max().item(), 2 ** -9)


def test_gradients_match_torch():
    q = rand(B, H, L, E, seed=13).requires_grad_()
    k = rand(B, H, S, E, seed=14).requires_grad_()
    v = rand(B, H, S, E, seed=15).requires_grad_()
    mask = masks()["padding_bool"]
    dout = rand(B, H, L, E, seed=16)
    sdpa.scaled_dot_product_attention(q, k, v, attn_mask=mask).backward(dout)
    q2, k2, v2 = (x.detach().double().requires_grad_() for x in (q, k, v))
    F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask).backward(dout.double())
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert_close(got, want, 5e-5)


def test_patch_routes_supported_calls_and_restores():
    original = F.scaled_dot_product_attention
    q, k, v = rand(1, 2, 8, 16, seed=17), rand(1, 2, 8, 16, seed=18), rand(1, 2, 8, 16, seed=19)
    before = dict(sdpa.calls)
    with sdpa.patch():
        assert F.scaled_dot_product_attention is not original
        with sdpa.patch():  # nests
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        assert F.scaled_dot_product_attention is not original
        # dropout is PyTorch's: routed to the original function
        torch.manual_seed(0)
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        # so is a float64 call
        F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert F.scaled_dot_product_attention is original
    assert sdpa.calls["tessera"] == before["tessera"] + 1
    assert sdpa.calls["torch"] == before["torch"] + 2
    assert_close(out, torch_ref(q, k, v, is_causal=True), 2e-5)


def test_patch_restores_after_an_exception():
    original = F.scaled_dot_product_attention
    with pytest.raises(RuntimeError):
        with sdpa.patch():
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is original


def test_direct_call_rejects_what_it_cannot_do():
    q = rand(1, 1, 4, 8)
    with pytest.raises(ValueError, match="dropout"):
        sdpa.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="dtype"):
        sdpa.scaled_dot_product_attention(q.double(), q.double(), q.double())
