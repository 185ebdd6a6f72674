# SPDX-License-Identifier: Apache-2.0
"""Linear-time attention (tessera/linear.h): the chunked form, the recurrent form for decode,
and the backward. Layout [B, S, H, dim]; states float32 [B, Hq, F, Dv]."""
from . import _C
from . import _arrays as A
from ._attention import PATHS

FEATURE_MAPS = ("identity", "elu1", "relu", "taylor2")


def linear_feature_dim(feature_map, dk):
    """F, the feature dim of phi for head dim dk (dk, or 1 + dk + dk^2 for taylor2)."""
    return _C.linear_feature_dim(feature_map, int(dk))


class _LinearOptions:
    def __init__(self, kind, q, v, *, feature_map="identity", scale=None, causal=True,
                 prefix_len=0, normalize=False, eps=1e-6, decay=None, gates=None, window=0,
                 chunk_size=64, threads=None, path="auto"):
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map: expected one of {', '.join(FEATURE_MAPS)}, got "
                             f"{feature_map!r}")
        if path not in PATHS:
            raise ValueError(f"path: expected one of {sorted(PATHS)}, got {path!r}")
        self.feature_map = feature_map
        self.scale = None if scale is None else float(scale)
        self.causal = bool(causal)
        self.prefix_len = int(prefix_len)
        self.normalize = bool(normalize)
        self.eps = float(eps)
        self.decay = A.as_f32(kind, "decay", A.detach(decay))
        self.gates = None if gates is None else A.detach(gates)
        self.window = int(window)
        self.chunk_size = int(chunk_size)
        self.threads = A.threads_arg(threads)
        self.path = PATHS[path]


def _state_shapes(q, v, feature_map):
    B, _, Hq, Dk = q.shape
    F = linear_feature_dim(feature_map, Dk)
    return (B, Hq, F, v.shape[3]), (B, Hq, F)


def _forward(recurrent, q, k, v, initial_state, initial_normalizer, return_state, options):
    kind = A.common_kind(q=q, k=k, v=v, initial_state=initial_state,
                         initial_normalizer=initial_normalizer)
    if len(q.shape) != 4 or len(v.shape) != 4:
        raise ValueError(f"q, v: expected [B, S, H, dim], got {list(q.shape)} and "
                         f"{list(v.shape)}")
    o = _LinearOptions(kind, q, v, **options)
    out = A.empty(kind, tuple(q.shape[:3]) + (v.shape[3],), like=q)
    state = normalizer = None
    if return_state:
        state_shape, norm_shape = _state_shapes(q, v, o.feature_map)
        if state_shape[2] > _C.MAX_LINEAR_FEATURE_DIM:
            raise ValueError(f"q: expected a feature dim of at most "
                             f"{_C.MAX_LINEAR_FEATURE_DIM}, got {state_shape[2]}")
        state = A.empty(kind, state_shape, dtype="f32")
        normalizer = A.empty(kind, norm_shape, dtype="f32") if o.normalize else None
    _C.linear_forward(recurrent, A.detach(q), A.detach(k), A.detach(v), out, o.feature_map,
                      o.scale, o.causal, o.prefix_len, o.normalize, o.eps, o.decay, o.gates,
                      o.window, A.detach(initial_state), A.detach(initial_normalizer), state,
                      normalizer, o.chunk_size, o.threads, o.path)
    if not return_state:
        return out
    return (out, state, normalizer) if o.normalize else (out, state)


def linear_attention(q, k, v, *, feature_map="identity", scale=None, causal=True, prefix_len=0,
                     normalize=False, eps=1e-6, decay=None, gates=None, window=0,
                     initial_state=None, initial_normalizer=None, return_state=False,
                     chunk_size=64, threads=None, path="auto"):
    """Chunked linear attention (Lightning Attention-2's tiling): plain, decayed (decay float32
    [Hq]), gated (GLA: gates float32 [B, S, Hq, Dk], log space, <= 0) or BASED (taylor2 feature
    map, plus exact softmax attention over the last `window` keys). q [B, S, Hq, Dk], k
    [B, S, Hkv, Dk], v [B, S, Hkv, Dv]. Returns out [B, S, Hq, Dv], and with return_state also
    the final state float32 [B, Hq, F, Dv] (and the normalizer [B, Hq, F] with normalize)."""
    return _forward(False, q, k, v, initial_state, initial_normalizer, return_state,
                    dict(feature_map=feature_map, scale=scale, causal=causal,
                         prefix_len=prefix_len, normalize=normalize, eps=eps, decay=decay,
                         gates=gates, window=window, chunk_size=chunk_size, threads=threads,
                         path=path))


def linear_attention_recurrent(q, k, v, *, feature_map="identity", scale=None, causal=True,
                               prefix_len=0, normalize=False, eps=1e-6, decay=None, gates=None,
                               window=0, initial_state=None, initial_normalizer=None,
                               return_state=True, threads=None, path="auto"):
    """The recurrent form (token by token, O(F x Dv) state per head): decode steps are calls with
    S = 1 and the state handed over. Same arguments and results as linear_attention; returns the
    state by default."""
    return _forward(True, q, k, v, initial_state, initial_normalizer, return_state,
                    dict(feature_map=feature_map, scale=scale, causal=causal,
                         prefix_len=prefix_len, normalize=normalize, eps=eps, decay=decay,
                         gates=gates, window=window, threads=threads, path=path))


def linear_attention_backward(dout, q, k, v, *, feature_map="identity", scale=None, causal=True,
                              prefix_len=0, normalize=False, eps=1e-6, decay=None, gates=None,
                              chunk_size=64, threads=None, path="auto"):
    """Gradients of linear_attention: (dq, dk, dv), plus dgates float32 [B, S, Hq, Dk] when gates
    are given. The BASED window and state inputs / outputs are not supported here."""
    kind = A.common_kind(dout=dout, q=q, k=k, v=v, gates=gates)
    o = _LinearOptions(kind, q, v, feature_map=feature_map, scale=scale, causal=causal,
                       prefix_len=prefix_len, normalize=normalize, eps=eps, decay=decay,
                       gates=gates, chunk_size=chunk_size, threads=threads, path=path)
    dq = A.empty(kind, q.shape, like=q)
    dk = A.empty(kind, k.shape, like=k)
    dv = A.empty(kind, v.shape, like=v)
    dgates = A.empty(kind, gates.shape, dtype="f32") if gates is not None else None
    _C.linear_backward(A.detach(dout), A.detach(q), A.detach(k), A.detach(v), dq, dk, dv, dgates,
                       o.feature_map, o.scale, o.causal, o.prefix_len, o.normalize, o.eps,
                       o.decay, o.gates, o.chunk_size, o.threads, o.path)
    return (dq, dk, dv, dgates) if gates is not None else (dq, dk, dv)
