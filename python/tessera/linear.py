# SPDX-License-Identifier: Apache-2.0
"""Linear-time attention (tessera/linear.h): the chunked form, the recurrent form for decode,
and the backward. Layout [B, S, H, dim]; states float32 [B, Hq, F, Dv].

    o_t = sum_{s <= t} decay(t, s) * scale * phi(q_t) . phi(k_s) * v_s

with decay(t, s) = 1 (plain), lambda_h^(t - s) (decay float32 [Hq]) or exp(sum_{r in (s, t]} g_r)
(gates, log space, <= 0: float32 [B, S, Hq, Dk] per key channel (GLA) or [B, S, Hq] one per
token and head (scalar gates, GLA's simple form)). LRPE (lrpe_theta float32 [Dk] or [Hq, Dk])
doubles phi into [phi cos(p theta), phi sin(p theta)] at positions p = position_offset + t, so
F = 2 Dk. With torch tensors that require grad, linear_attention is differentiable (q, k, v and
gates; the backward is tessera's LinearAttentionBackward).
"""
import math
import operator

from . import _C
from . import _arrays as A
from ._attention import PATHS

FEATURE_MAPS = ("identity", "elu1", "relu", "taylor2")
# Linear attention has no "reference" path in the library (its fp64 reference is test-only).
_LINEAR_PATHS = ("auto", "generic", "fast")


def linear_feature_dim(feature_map, dk, lrpe=False):
    """F, the feature dim of phi for head dim dk (dk, or 1 + dk + dk^2 for taylor2); twice that
    with LRPE (lrpe=True: an lrpe_theta is given)."""
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map: expected one of {', '.join(FEATURE_MAPS)}, got "
                         f"{feature_map!r}")
    if lrpe and feature_map == "taylor2":
        raise ValueError("lrpe: LRPE takes the identity, elu1 or relu feature map, not taylor2")
    return _C.linear_feature_dim(feature_map, int(dk), bool(lrpe))


def _int(name, x):
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}") from None


def _float(name, x):
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {type(x).__name__}") from None


class LinearOptions:
    """The options of one linear-attention call, checked, in the form the extension takes (and
    packed to flat lists for the torch ops)."""

    __slots__ = ("feature_map", "scale", "causal", "prefix_len", "normalize", "eps", "window",
                 "chunk_size", "threads", "path", "position_offset")

    def __init__(self, *, feature_map="identity", scale=None, causal=True, prefix_len=0,
                 normalize=False, eps=1e-6, window=0, chunk_size=64, threads=None, path="auto",
                 position_offset=0):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map: expected one of {', '.join(FEATURE_MAPS)}, got "
                             f"{feature_map!r}")
        if path not in _LINEAR_PATHS:
            raise ValueError(f"path: expected one of {', '.join(_LINEAR_PATHS)} for linear "
                             f"attention, got {path!r}")
        self.feature_map = feature_map
        self.scale = None if scale is None else _float("scale", scale)
        self.causal = bool(causal)
        self.prefix_len = _int("prefix_len", prefix_len)
        self.normalize = bool(normalize)
        self.eps = _float("eps", eps)
        self.window = _int("window", window)
        self.chunk_size = _int("chunk_size", chunk_size)
        self.threads = A.threads_arg(threads)
        self.path = PATHS[path]
        # LRPE's position of token 0 (the library checks its range); a torch op argument of its
        # own, not packed with the ints.
        self.position_offset = _int("position_offset", position_offset)

    def pack(self):
        ints = [int(self.causal), self.prefix_len, int(self.normalize), self.window,
                self.chunk_size, self.threads, self.path]
        floats = [math.nan if self.scale is None else self.scale, self.eps]
        return self.feature_map, ints, floats

    @classmethod
    def unpack(cls, feature_map, ints, floats, position_offset=0):
        o = cls.__new__(cls)
        o.feature_map = feature_map
        o.position_offset = position_offset
        causal, o.prefix_len, normalize, o.window, o.chunk_size, o.threads, o.path = ints
        o.causal, o.normalize = bool(causal), bool(normalize)
        scale, o.eps = floats
        o.scale = None if math.isnan(scale) else scale
        return o

    def forward(self, recurrent, q, k, v, out, decay, gates, lrpe_theta, initial_state,
                initial_normalizer, final_state, final_normalizer):
        _C.linear_forward(recurrent, q, k, v, out, self.feature_map, self.scale, self.causal,
                          self.prefix_len, self.normalize, self.eps, decay, gates, self.window,
                          initial_state, initial_normalizer, final_state, final_normalizer,
                          self.chunk_size, lrpe_theta, self.position_offset, self.threads,
                          self.path)

    def backward(self, dout, q, k, v, dq, dk, dv, dgates, decay, gates, lrpe_theta):
        if self.window:
            raise ValueError(f"window: expected 0 in the backward (the gradient of BASED's "
                             f"sliding-window part is not implemented), got {self.window}")
        _C.linear_backward(dout, q, k, v, dq, dk, dv, dgates, self.feature_map, self.scale,
                           self.causal, self.prefix_len, self.normalize, self.eps, decay, gates,
                           self.chunk_size, lrpe_theta, self.position_offset, self.threads,
                           self.path)


def state_shapes(q, v, feature_map, lrpe=False):
    """(state shape [B, Hq, F, Dv], normalizer shape [B, Hq, F]) for q [B, S, Hq, Dk]; F doubles
    with LRPE."""
    B, _, Hq, Dk = q.shape
    F = Dk if feature_map != "taylor2" else 1 + Dk + Dk * Dk
    if lrpe:
        F *= 2
    return (B, Hq, F, v.shape[3]), (B, Hq, F)


def _check_rank4(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if len(x.shape) != 4:
            raise ValueError(f"{name}: expected rank 4 [B, S, H, dim], got shape "
                             f"{list(x.shape)}")


def _gates_arg(kind, gates):
    """The gates as float32 (converted when given in another float dtype; torch keeps autograd
    through the conversion), rank 3 [B, S, Hq] or rank 4 [B, S, Hq, Dk]."""
    if gates is None:
        return None
    if A.kind_of("gates", gates) != kind:
        raise TypeError(f"gates: expected a {kind} array like q")
    if len(gates.shape) not in (3, 4):
        raise ValueError(f"gates: expected rank 4 [B, S, Hq, Dk] (per channel) or rank 3 "
                         f"[B, S, Hq] (scalar per token and head), got shape "
                         f"{list(gates.shape)}")
    name = A.dtype_name(gates)
    if name not in ("f32", "f64", "f16", "bf16"):
        raise ValueError(f"gates: expected a float dtype (float32 preferred), got {name}")
    if name == "f32":
        return gates
    if kind == A.TORCH:
        return gates.float()
    return gates.astype("float32")


def _decay_arg(kind, decay):
    if decay is None:
        return None
    if A.is_torch(decay):
        if kind != A.TORCH:
            raise TypeError("decay: expected a numpy array or a list like q, got a torch tensor")
        return decay if decay.dtype == A.torch_module().float32 else decay.float()
    return A.as_f32(kind, "decay", decay)


def _lrpe_theta_arg(kind, lrpe_theta):
    """LRPE's angles as float32 (a torch tensor converted keeps autograd, which linear_op then
    refuses: the angles get no gradient). An empty one would read as 'off' in the library."""
    if lrpe_theta is None:
        return None
    if A.is_torch(lrpe_theta):
        if kind != A.TORCH:
            raise TypeError("lrpe_theta: expected a numpy array or a list like q, got a torch "
                            "tensor")
        theta = lrpe_theta if lrpe_theta.dtype == A.torch_module().float32 else lrpe_theta.float()
    else:
        theta = A.as_f32(kind, "lrpe_theta", lrpe_theta)
    if len(theta.shape) not in (1, 2) or 0 in tuple(theta.shape):
        raise ValueError(f"lrpe_theta: expected float32 [Dk] or [Hq, Dk] angles, got shape "
                         f"{list(theta.shape)}")
    return theta


def _prepare(q, k, v, decay, gates, lrpe_theta, initial_state, initial_normalizer, options):
    kind = A.common_kind(q=q, k=k, v=v, initial_state=initial_state,
                         initial_normalizer=initial_normalizer)
    _check_rank4(q, k, v)
    opts = LinearOptions(**options)
    return (kind, opts, _decay_arg(kind, decay), _gates_arg(kind, gates),
            _lrpe_theta_arg(kind, lrpe_theta))


def forward_raw(kind, recurrent, q, k, v, decay, gates, lrpe_theta, initial_state,
                initial_normalizer, return_state, opts):
    """The forward without autograd: allocates out (and the final state when asked)."""
    out = A.empty(kind, tuple(q.shape[:3]) + (v.shape[3],), like=q)
    state = normalizer = None
    if return_state:
        state_shape, norm_shape = state_shapes(q, v, opts.feature_map, lrpe_theta is not None)
        if state_shape[2] > _C.MAX_LINEAR_FEATURE_DIM:
            raise ValueError(f"q: expected a feature dim of at most "
                             f"{_C.MAX_LINEAR_FEATURE_DIM}, got {state_shape[2]}")
        state = A.empty(kind, state_shape, dtype="f32")
        normalizer = A.empty(kind, norm_shape, dtype="f32") if opts.normalize else None
    opts.forward(recurrent, A.detach(q), A.detach(k), A.detach(v), out, A.detach(decay),
                 A.detach(gates), A.detach(lrpe_theta), A.detach(initial_state),
                 A.detach(initial_normalizer), state, normalizer)
    return out, state, normalizer


def _forward(recurrent, q, k, v, decay, gates, lrpe_theta, initial_state, initial_normalizer,
             return_state, options):
    kind, opts, decay, gates, lrpe_theta = _prepare(q, k, v, decay, gates, lrpe_theta,
                                                    initial_state, initial_normalizer, options)
    if kind == A.TORCH:
        from . import _torch_linear
        if _torch_linear.needs_op(q, k, v, decay, gates, lrpe_theta, initial_state,
                                  initial_normalizer):
            out, state, normalizer = _torch_linear.linear_op(
                recurrent, q, k, v, decay, gates, lrpe_theta, initial_state, initial_normalizer,
                return_state, opts)
        else:
            out, state, normalizer = forward_raw(kind, recurrent, q, k, v, decay, gates,
                                                 lrpe_theta, initial_state, initial_normalizer,
                                                 return_state, opts)
    else:
        out, state, normalizer = forward_raw(kind, recurrent, q, k, v, decay, gates, lrpe_theta,
                                             initial_state, initial_normalizer, return_state,
                                             opts)
    if not return_state:
        return out
    return (out, state, normalizer) if opts.normalize else (out, state)


def linear_attention(q, k, v, *, feature_map="identity", scale=None, causal=True, prefix_len=0,
                     normalize=False, eps=1e-6, decay=None, gates=None, window=0,
                     initial_state=None, initial_normalizer=None, return_state=False,
                     chunk_size=64, threads=None, path="auto", lrpe_theta=None,
                     position_offset=0):
    """Chunked linear attention (Lightning Attention-2's tiling).

    q [B, S, Hq, Dk], k [B, S, Hkv, Dk], v [B, S, Hkv, Dv] (Hq a multiple of Hkv; float32,
    bfloat16 or float16, any strides). Variants: plain; decayed (decay float32 [Hq], lambda in
    (0, 1]); gated (gates, log space, <= 0: float32 [B, S, Hq, Dk] per key channel, GLA, or
    [B, S, Hq] one per token and head, GLA's simple form; identity feature map); BASED (taylor2
    feature map, normalize, plus exact softmax attention over the last `window` keys).
    feature_map: identity, elu1, relu or taylor2. scale: multiplies phi(q) . phi(k) (default
    1/sqrt(Dk), 1 for taylor2). normalize: divide by the same sum without v (+ eps).
    prefix_len: keys before it are visible to every query (plain form only).

    lrpe_theta: LRPE (TransNormer's linear relative positional encoding), float32 angles [Dk]
    (every head) or [Hq, Dk]: phi(x_t) becomes [phi cos(p theta), phi sin(p theta)] with
    p = position_offset + t, so phi(q_t) . phi(k_s) depends on t - s only; F and the states
    double (identity, elu1 or relu map; no gates). position_offset (>= 0): the position of
    token 0, i.e. the tokens before this call when it continues a state.

    Returns out [B, S, Hq, Dv] (dtype of q), and with return_state also the final state float32
    [B, Hq, F, Dv] (and the normalizer [B, Hq, F] with normalize). initial_state /
    initial_normalizer continue from an earlier call's state.

    With torch tensors that require grad the result is differentiable in q, k, v and gates
    (decay, lrpe_theta, states and the window part are not: they raise ValueError then).
    """
    return _forward(False, q, k, v, decay, gates, lrpe_theta, initial_state, initial_normalizer,
                    return_state,
                    dict(feature_map=feature_map, scale=scale, causal=causal,
                         prefix_len=prefix_len, normalize=normalize, eps=eps, window=window,
                         chunk_size=chunk_size, threads=threads, path=path,
                         position_offset=position_offset))


def linear_attention_recurrent(q, k, v, *, feature_map="identity", scale=None, causal=True,
                               prefix_len=0, normalize=False, eps=1e-6, decay=None, gates=None,
                               window=0, initial_state=None, initial_normalizer=None,
                               return_state=True, threads=None, path="auto", lrpe_theta=None,
                               position_offset=0):
    """The recurrent form (token by token, O(F x Dv) state per head): decode steps are calls with
    S = 1 and the state handed over (with LRPE, position_offset = the tokens seen so far). Same
    arguments and results as linear_attention; returns the state by default."""
    return _forward(True, q, k, v, decay, gates, lrpe_theta, initial_state, initial_normalizer,
                    return_state,
                    dict(feature_map=feature_map, scale=scale, causal=causal,
                         prefix_len=prefix_len, normalize=normalize, eps=eps, window=window,
                         threads=threads, path=path, position_offset=position_offset))


def linear_attention_backward(dout, q, k, v, *, feature_map="identity", scale=None, causal=True,
                              prefix_len=0, normalize=False, eps=1e-6, decay=None, gates=None,
                              chunk_size=64, threads=None, path="auto", lrpe_theta=None,
                              position_offset=0):
    """Gradients of linear_attention for the loss sum(dout * out): (dq, dk, dv) in the dtypes of
    q, k, v (dk, dv summed over the query heads of a GQA group), plus dgates float32 in the shape
    of the gates ([B, S, Hq, Dk], or [B, S, Hq] for scalar gates) when gates are given. With
    lrpe_theta (and position_offset) the gradients of the LRPE forward; none for the angles. The
    BASED window and state inputs / outputs are not supported here."""
    kind = A.common_kind(dout=dout, q=q, k=k, v=v)
    _check_rank4(q, k, v)
    opts = LinearOptions(feature_map=feature_map, scale=scale, causal=causal,
                         prefix_len=prefix_len, normalize=normalize, eps=eps,
                         chunk_size=chunk_size, threads=threads, path=path,
                         position_offset=position_offset)
    decay = _decay_arg(kind, decay)
    gates = _gates_arg(kind, gates)
    lrpe_theta = _lrpe_theta_arg(kind, lrpe_theta)
    dq = A.empty(kind, q.shape, like=q)
    dk = A.empty(kind, k.shape, like=k)
    dv = A.empty(kind, v.shape, like=v)
    dgates = A.empty(kind, gates.shape, dtype="f32") if gates is not None else None
    opts.backward(A.detach(dout), A.detach(q), A.detach(k), A.detach(v), dq, dk, dv, dgates,
                  A.detach(decay), A.detach(gates), A.detach(lrpe_theta))
    return (dq, dk, dv, dgates) if gates is not None else (dq, dk, dv)
