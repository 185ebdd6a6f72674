# SPDX-License-Identifier: Apache-2.0
"""tessera's torch operators: torch.library.opcheck, autograd, and torch.compile(fullgraph=True)
tracing through tessera.attention without graph breaks."""
import pytest

torch = pytest.importorskip("torch")

import tessera  # noqa: E402
from tessera import _torch  # noqa: E402
from tessera._attention import AttentionOptions  # noqa: E402


def rand(*shape, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(grad)


OPTION_SETS = [
    dict(),
    dict(causal=True, window=(7, 0)),
    dict(softcap=4.0, scale=0.25),
    dict(attn_mask="padding"),
    dict(mask="neighborhood"),
]


def op_args(opts, q, k):
    opts = dict(opts)
    if opts.get("attn_mask") == "padding":
        keep = torch.ones(q.shape[0], 1, 1, k.shape[1], dtype=torch.bool)
        keep[..., -3:] = False
        opts["attn_mask"] = keep
    if opts.get("mask") == "neighborhood":
        opts["mask"] = tessera.mask.neighborhood(grid=k.shape[1], window=5)
    return AttentionOptions("torch", q, k, **opts)


@pytest.mark.parametrize("opts", OPTION_SETS)
def test_opcheck(opts):
    q, k, v = rand(2, 24, 4, 16, seed=1), rand(2, 24, 2, 16, seed=2), rand(2, 24, 2, 16, seed=3)
    tensors, ints, floats = _torch._pack(op_args(opts, q, k))
    torch.library.opcheck(torch.ops.tessera.attention_fwd.default, (q, k, v, tensors, ints, floats))
    out, lse = torch.ops.tessera.attention_fwd(q, k, v, tensors, ints, floats)
    dout = rand(*out.shape, seed=4, grad=False)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, tensors, ints, floats)
    torch.library.opcheck(torch.ops.tessera.attention_bwd.default, bwd_args)


def test_autograd_matches_attention_backward():
    q, k, v = rand(1, 30, 4, 32, seed=5), rand(1, 30, 2, 32, seed=6), rand(1, 30, 2, 32, seed=7)
    dout = rand(1, 30, 4, 32, seed=8, grad=False)
    out, lse = tessera.attention(q, k, v, causal=True, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    out.backward(dout)
    dq, dk, dv = tessera.attention_backward(dout, q.detach(), k.detach(), v.detach(),
                                            out.detach(), lse, causal=True)
    assert torch.equal(q.grad, dq) and torch.equal(k.grad, dk) and torch.equal(v.grad, dv)


def test_torch_compile_fullgraph_forward_and_backward():
    def loss(q, k, v, keep):
        out = tessera.attention(q, k, v, causal=True, attn_mask=keep)
        return (out * out).sum()

    q, k, v = rand(2, 20, 4, 16, seed=9), rand(2, 20, 2, 16, seed=10), rand(2, 20, 2, 16, seed=11)
    keep = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    keep[1, ..., :4] = False
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(q, k, v, keep).backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    loss(q, k, v, keep).backward()
    for got, want in zip(grads, (q.grad, k.grad, v.grad)):
        assert torch.equal(got, want)


def test_inference_call_skips_the_dispatcher_but_training_does_not():
    q = rand(1, 8, 2, 16, seed=12, grad=False)
    assert not _torch.needs_op(q, q, q, None)
    with torch.no_grad():
        assert not _torch.needs_op(q.requires_grad_(), q, q, None)
    assert _torch.needs_op(q, q, q, None)
