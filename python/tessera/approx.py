# SPDX-License-Identifier: Apache-2.0
"""Approximate and sub-quadratic attention (tessera/approx.h; docs/approx.md).

    out = tessera.approx_attention(q, k, v, method="performer", causal=True, features=256)

q [B, S, Hq, D], k, v [B, S, Hkv, D], float32 (numpy arrays or torch CPU tensors, any strides).
`method` is one of METHODS; the method's options are keyword arguments named like the fields of
its options struct (OPTIONS lists them). Random draws come from `seed`. With torch tensors that
require grad, the methods with a backward (wersa, performer) are differentiable in q, k and v.
"""
import numbers

from . import _C
from . import _arrays as A

METHODS = ("wersa", "hyper", "performer", "agent", "routing", "hilo")
# Each method's options: name -> "int", "float" or "array" (float32 tensors, inputs unless
# named in _OUTPUT_OPTIONS).
OPTIONS = {
    "wersa": {"levels": "int", "gates": "array", "level_weights": "array", "features": "int",
              "bandwidth": "float", "projection": "array"},
    "performer": {"features": "int", "projection": "array"},
    "hyper": {"block": "int", "samples": "int", "lsh_bits": "int", "min_seq_len": "int"},
    "agent": {"agents": "int", "agent_bias": "array", "query_bias": "array", "dwc": "array"},
    "routing": {"clusters": "int", "window": "int", "centroids": "array", "ema": "float"},
    "hilo": {"grid_h": "int", "grid_w": "int", "window": "int", "lofi_heads": "int"},
}
# The methods whose output is a softmax over a set of keys: they can return its LSE.
LSE_METHODS = ("hyper", "routing", "hilo")
BACKWARD_METHODS = ("wersa", "performer")


def _options(kind, method, options):
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    known = OPTIONS[method]
    out = {}
    for name, value in options.items():
        if name not in known:
            raise TypeError(f"{name}: not an option of method {method!r} (its options: "
                            f"{', '.join(sorted(known))})")
        if value is None:
            continue
        what = known[name]
        if what == "int":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
            out[name] = int(value)
        elif what == "float":
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
            out[name] = float(value)
        else:
            out[name] = A.as_f32(kind, name, value)
    # A given projection fixes the feature count: [features, D] (performer), [D, features]
    # (wersa).
    projection = out.get("projection")
    if projection is not None and "features" not in out and len(projection.shape) == 2:
        out["features"] = int(projection.shape[0 if method == "performer" else 1])
    return out


def _seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise TypeError(f"seed: expected a non-negative int, got {seed!r}")
    return int(seed)


def _check_rank4(**arrays):
    for name, x in arrays.items():
        if len(x.shape) != 4:
            raise ValueError(f"{name}: expected rank 4 [B, S, H, D], got shape {list(x.shape)}")


def _forward_raw(kind, method, q, k, v, causal, scale, seed, opts, return_lse,
                 update_centroids, threads):
    out = A.empty(kind, q.shape, dtype="f32")
    lse = A.empty(kind, (q.shape[0], q.shape[2], q.shape[1]), dtype="f32") if return_lse else None
    updated = None
    if update_centroids:
        centroids = opts.get("centroids")
        if centroids is None:
            raise ValueError("update_centroids: expected the centroids option with it")
        updated = A.empty(kind, centroids.shape, dtype="f32")
        opts = dict(opts, updated_centroids=updated)
    _C.approx_forward(method, A.detach(q), A.detach(k), A.detach(v), out, lse, scale, causal,
                      seed, {n: A.detach(x) for n, x in opts.items()}, threads)
    return out, lse, updated


def approx_attention(q, k, v, *, method, causal=False, scale=None, seed=0, return_lse=False,
                     update_centroids=False, threads=None, **options):
    """Approximate softmax attention by `method` (see METHODS and docs/approx.md).

    Returns out [B, S, Hq, D] float32; with return_lse (hyper, routing, hilo) also the LSE
    float32 [B, Hq, S]; with update_centroids (routing) also the EMA-updated centroids
    [Hq, C, D]. Options (keyword arguments, per method: OPTIONS):
      wersa:     levels, gates [B, S, levels], level_weights [levels], features, bandwidth,
                 projection [D, features] (features then defaults to its columns)
      performer: features, projection [features, D] (features then defaults to its rows)
      hyper:     block (a multiple of 16), samples, lsh_bits, min_seq_len
      agent:     agents, agent_bias [Hq, agents, S], query_bias [Hq, S, agents], dwc [B, S, Hq, D]
      routing:   clusters, window, centroids [Hq, C, D] (required), ema
      hilo:      grid_h, grid_w, window, lofi_heads
    """
    kind = A.common_kind(q=q, k=k, v=v)
    _check_rank4(q=q, k=k, v=v)
    opts = _options(kind, method, options)
    seed = _seed(seed)
    threads = A.threads_arg(threads)
    if return_lse and method not in LSE_METHODS:
        raise ValueError(f"return_lse: method {method!r} has no LSE (those with one: "
                         f"{', '.join(LSE_METHODS)})")
    if update_centroids and method != "routing":
        raise ValueError("update_centroids: only with method 'routing'")
    scale = None if scale is None else float(scale)
    needs_grad = kind == A.TORCH and any(x.requires_grad for x in (q, k, v))
    if needs_grad:
        if method not in BACKWARD_METHODS:
            raise ValueError(f"method {method!r} has no backward (those with one: "
                             f"{', '.join(BACKWARD_METHODS)}); pass tensors without "
                             f"requires_grad")
        if return_lse or update_centroids:
            raise ValueError("return_lse / update_centroids: not with tensors that require grad")
        from ._torch_approx import ApproxFunction
        return ApproxFunction.apply(q, k, v, (method, bool(causal), scale, seed, opts, threads))
    out, lse, updated = _forward_raw(kind, method, q, k, v, bool(causal), scale, seed, opts,
                                     return_lse, update_centroids, threads)
    result = (out,) + ((lse,) if return_lse else ()) + ((updated,) if update_centroids else ())
    return result[0] if len(result) == 1 else result


def approx_attention_backward(dout, q, k, v, *, method, causal=False, scale=None, seed=0,
                              threads=None, **options):
    """Gradients (dq, dk, dv) of approx_attention for the loss sum(dout * out), float32, with the
    same random draws (same seed and options). Methods with a backward: BACKWARD_METHODS."""
    kind = A.common_kind(dout=dout, q=q, k=k, v=v)
    _check_rank4(dout=dout, q=q, k=k, v=v)
    opts = _options(kind, method, options)
    return backward_raw(kind, method, dout, q, k, v, bool(causal),
                        None if scale is None else float(scale), _seed(seed), opts,
                        A.threads_arg(threads))


def backward_raw(kind, method, dout, q, k, v, causal, scale, seed, opts, threads):
    dq = A.empty(kind, q.shape, dtype="f32")
    dk = A.empty(kind, k.shape, dtype="f32")
    dv = A.empty(kind, v.shape, dtype="f32")
    _C.approx_backward(method, A.detach(dout), A.detach(q), A.detach(k), A.detach(v), dq, dk, dv,
                       scale, causal, seed, {n: A.detach(x) for n, x in opts.items()}, threads)
    return dq, dk, dv
