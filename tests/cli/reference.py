# SPDX-License-Identifier: Apache-2.0
"""fp64 references the CLI tests compare against, written from the definitions in
tessera/attention.h, tessera/mask.h and tessera/linear.h, independent of the C++ code:
exact attention (forward and gradients), the mask rules, and linear attention.
"""
import math


# ---------------------------------------------------------------------------------------------
# fp64 reference attention. Layouts: q/out [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], lse [B, Hq, Sq].
# Bottom-right alignment: query i sits at position i + Sk - Sq. Modifier order: softcap,
# ALiBi, mask. Fully masked rows: out 0, lse -inf.

def reference(q, k, v, B, Sq, Sk, Hq, Hkv, D, causal=False, window=(-1, -1), softcap=0.0,
              scale=None, alibi=None):
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    wl, wr = window
    if causal:
        wr = 0 if wr < 0 else min(wr, 0)
    group = Hq // Hkv
    out = [0.0] * (B * Sq * Hq * D)
    lse = [0.0] * (B * Hq * Sq)
    for b in range(B):
        for h in range(Hq):
            hk = h // group
            for i in range(Sq):
                pos = i + Sk - Sq
                qo = ((b * Sq + i) * Hq + h) * D
                logits = []
                for j in range(Sk):
                    if wl >= 0 and j < pos - wl:
                        continue
                    if wr >= 0 and j > pos + wr:
                        continue
                    ko = ((b * Sk + j) * Hkv + hk) * D
                    s = scale * sum(q[qo + d] * k[ko + d] for d in range(D))
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if alibi is not None:
                        s -= alibi[h] * abs(pos - j)
                    logits.append((j, s))
                lo = (b * Hq + h) * Sq + i
                if not logits:
                    lse[lo] = -math.inf
                    continue
                m = max(s for _, s in logits)
                weights = [(j, math.exp(s - m)) for j, s in logits]
                total = sum(w for _, w in weights)
                lse[lo] = m + math.log(total)
                for d in range(D):
                    acc = 0.0
                    for j, w in weights:
                        acc += w * v[((b * Sk + j) * Hkv + hk) * D + d]
                    out[qo + d] = acc / total
    return out, lse


def reference_backward(q, k, v, dout, B, Sq, Sk, Hq, Hkv, D, causal=False, window=(-1, -1),
                       softcap=0.0, scale=None, alibi=None):
    """fp64 gradients (dq, dk, dv) of sum(out * dout); dk, dv summed over each GQA group.

    With P = softmax(s), dP_j = dout_i . v_j and Delta_i = dout_i . out_i: ds_j = P_j (dP_j -
    Delta_i); through the softcap s = c tanh(x / c) of x = scale q_i . k_j, dx_j = ds_j (1 -
    (s_j / c)^2); then dq_i = scale sum_j dx_j k_j, dk_j += scale dx_j q_i, dv_j += P_j dout_i.
    ALiBi adds a constant, so it changes P but not the chain rule. Rows with no visible key
    contribute nothing (dq = 0).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    wl, wr = window
    if causal:
        wr = 0 if wr < 0 else min(wr, 0)
    group = Hq // Hkv
    out = [0.0] * (B * Sq * Hq * D)
    dq = [0.0] * (B * Sq * Hq * D)
    dk = [0.0] * (B * Sk * Hkv * D)
    dv = [0.0] * (B * Sk * Hkv * D)
    for b in range(B):
        for h in range(Hq):
            hk = h // group
            for i in range(Sq):
                pos = i + Sk - Sq
                qo = ((b * Sq + i) * Hq + h) * D
                qi, doi = q[qo:qo + D], dout[qo:qo + D]
                rows = []  # (key offset, logit after softcap and ALiBi, d logit / d x)
                for j in range(Sk):
                    if (wl >= 0 and j < pos - wl) or (wr >= 0 and j > pos + wr):
                        continue
                    ko = ((b * Sk + j) * Hkv + hk) * D
                    s = scale * sum(qi[d] * k[ko + d] for d in range(D))
                    dsdx = 1.0
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                        dsdx = 1.0 - (s / softcap) ** 2
                    if alibi is not None:
                        s -= alibi[h] * abs(pos - j)
                    rows.append((ko, s, dsdx))
                if not rows:
                    continue
                m = max(s for _, s, _ in rows)
                total = sum(math.exp(s - m) for _, s, _ in rows)
                probs = [math.exp(s - m) / total for _, s, _ in rows]
                oi = [sum(p * v[ko + d] for p, (ko, _, _) in zip(probs, rows)) for d in range(D)]
                out[qo:qo + D] = oi
                delta = sum(doi[d] * oi[d] for d in range(D))
                for p, (ko, _, dsdx) in zip(probs, rows):
                    dp = sum(doi[d] * v[ko + d] for d in range(D))
                    dx = p * (dp - delta) * dsdx
                    for d in range(D):
                        dq[qo + d] += scale * dx * k[ko + d]
                        dk[ko + d] += scale * dx * qi[d]
                        dv[ko + d] += p * doi[d]
    return out, dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Masks (--mask). Each structured form is checked against the same mask materialized here, in
# Python, from the rules of tessera/mask.h and docs/masks.md, and passed as dense:FILE
# (whose own semantics are checked against the fp64 reference on small shapes); bench reports
# the visible fraction those Python masks give.

def natten_window_start(x, L, K):
    """NATTEN, stride 1, dilation 1, non-causal: the K-wide window centred on x, shifted (never
    shrunk) at the borders."""
    return min(max(x - K // 2, 0), L - K)


def nbhd_axis(x, y, L, K, d=1, s=1, causal=False):
    """docs/masks.md's neighborhood rule on one axis: dilation groups, stride leaders, border
    shift, causal."""
    if x % d != y % d:
        return False
    g, xp, yp = x % d, x // d, y // d
    lg = L // d + (1 if g < L % d else 0)
    if causal:
        leader = min(xp // s * s + s - 1, lg - 1)
        return yp <= xp and leader - yp < K
    wl, wr = K // 2, K // 2 + K % 2 - 1
    leader = min(xp // s * s + s // 2, lg - 1)
    c = min(max(leader, wl), lg - 1 - wr)
    return c - wl <= yp <= c + wr


def grid_coords(t, grid):
    coords = []
    for L in reversed(grid):
        coords.append(t % L)
        t //= L
    return coords[::-1]


def nbhd_rule(grid, window, dil=None, stride=None, causal=None):
    n = len(grid)
    dil, stride, causal = dil or [1] * n, stride or [1] * n, causal or [False] * n

    def visible(h, i, j):
        ci, cj = grid_coords(i, grid), grid_coords(j, grid)
        return all(nbhd_axis(ci[a], cj[a], grid[a], window[a], dil[a], stride[a], causal[a])
                   for a in range(n))
    return visible


def mask_values(rule, H, Sq, Sk):
    """uint8 [1, H, Sq, Sk] (flattened) of rule(h, i, j)."""
    return [1 if rule(h, i, j) else 0 for h in range(H) for i in range(Sq) for j in range(Sk)]


def reference_masked(q, k, v, Sq, Sk, H, D, rule, additive=None, sigmoid_bias=None):
    """fp64 attention of a batch of one with Hq == Hkv: visible(h, i, j) = rule(h, i, j); an
    additive [Sq, Sk] bias; sigmoid weights (no normalization) when sigmoid_bias is set."""
    scale = 1.0 / math.sqrt(D)
    out = [0.0] * (Sq * H * D)
    for h in range(H):
        for i in range(Sq):
            qo = (i * H + h) * D
            terms = []
            for j in range(Sk):
                if not rule(h, i, j):
                    continue
                ko = (j * H + h) * D
                s = scale * sum(q[qo + d] * k[ko + d] for d in range(D))
                if additive is not None:
                    s += additive[i * Sk + j]
                if s != -math.inf:
                    terms.append((ko, s))
            if not terms:
                continue
            if sigmoid_bias is not None:
                weights = [(ko, 1.0 / (1.0 + math.exp(-(s + sigmoid_bias)))) for ko, s in terms]
                total = 1.0
            else:
                m = max(s for _, s in terms)
                weights = [(ko, math.exp(s - m)) for ko, s in terms]
                total = sum(w for _, w in weights)
            for d in range(D):
                out[qo + d] = sum(w * v[ko + d] for ko, w in weights) / total
    return out


def causal_rule(h, i, j):
    return j <= i


def s2_rule(H, block, local, vstride):
    sigma = max(1, vstride // H)

    def visible(h, i, j):
        qb, kb = i // block, j // block
        return j <= i and (qb - kb < local or (kb + h * sigma) % vstride == 0)
    return visible


# ---------------------------------------------------------------------------------------------
# Linear attention (run / bench --op linear). The reference below is the recurrent form in fp64,
# token by token with an F x Dv state per (sequence, query head), written from the definitions of
# tessera/linear.h; the kernels under test are the chunked form (and the recurrent one, checked
# against both).

def linear_phi(x, fmap):
    dk = len(x)
    if fmap == "identity":
        return list(x)
    if fmap == "elu1":
        return [xi + 1.0 if xi > 0 else math.exp(xi) for xi in x]
    if fmap == "relu":
        return [xi if xi > 0 else 0.0 for xi in x]
    assert fmap == "taylor2", fmap
    lin = dk ** -0.25
    quad = 1.0 / (math.sqrt(2.0) * math.sqrt(dk))
    return [1.0] + [xi * lin for xi in x] + [xi * xj * quad for xi in x for xj in x]


def linear_feature_dim(fmap, dk):
    return 1 + dk + dk * dk if fmap == "taylor2" else dk


def linear_reference(q, k, v, B, S, Hq, Hkv, Dk, Dv, fmap="identity", scale=None, causal=True,
                     prefix=0, normalize=False, eps=1e-6, decay=None, gates=None, window=0,
                     state0=None, norm0=None):
    """Recurrent form in fp64; returns (out [B,S,Hq,Dv], state [B,Hq,F,Dv], normalizer [B,Hq,F]).

    State S_t = decay_t * S_{t-1} + phi(k_t) v_t^T (decay_t: 1, lambda_h, or exp(g_t) per key
    channel), o_t = scale phi(q_t) S_t, over (scale phi(q_t) z_t + eps) with normalize. Prefix and
    non-causal: the keys every query sees are in the state before the first query. The window part
    adds exact causal softmax attention over keys [t - W + 1, t] with scale 1/sqrt(Dk).
    """
    if scale is None:
        scale = 1.0 if fmap == "taylor2" else 1.0 / math.sqrt(Dk)
    F = linear_feature_dim(fmap, Dk)
    group = Hq // Hkv
    out = [0.0] * (B * S * Hq * Dv)
    state_out = [0.0] * (B * Hq * F * Dv)
    norm_out = [0.0] * (B * Hq * F)
    for b in range(B):
        for h in range(Hq):
            hk = h // group
            qrow = lambda t: q[((b * S + t) * Hq + h) * Dk:((b * S + t) * Hq + h + 1) * Dk]
            krow = lambda t: k[((b * S + t) * Hkv + hk) * Dk:((b * S + t) * Hkv + hk + 1) * Dk]
            vrow = lambda t: v[((b * S + t) * Hkv + hk) * Dv:((b * S + t) * Hkv + hk + 1) * Dv]
            so = (b * Hq + h) * F
            st = [[state0[(so + c) * Dv + d] if state0 else 0.0 for d in range(Dv)]
                  for c in range(F)]
            z = [norm0[so + c] if norm0 else 0.0 for c in range(F)]

            def add_key(s):
                fk, vs = linear_phi(krow(s), fmap), vrow(s)
                for c in range(F):
                    z[c] += fk[c]
                    for d in range(Dv):
                        st[c][d] += fk[c] * vs[d]

            seen = 0  # keys [0, seen) are in the state
            first = S if not causal else prefix
            while seen < first:
                add_key(seen)
                seen += 1
            for t in range(S):
                if seen <= t:
                    # Decay the state by token t (the prefix form has none), then add key t.
                    if decay is not None or gates is not None:
                        for c in range(F):
                            f = decay[h] if decay is not None else \
                                math.exp(gates[((b * S + t) * Hq + h) * Dk + c])
                            z[c] *= f
                            for d in range(Dv):
                                st[c][d] *= f
                    add_key(t)
                    seen = t + 1
                fq = linear_phi(qrow(t), fmap)
                num = [scale * sum(fq[c] * st[c][d] for c in range(F)) for d in range(Dv)]
                if normalize:
                    den = scale * sum(fq[c] * z[c] for c in range(F)) + eps
                    num = [x / den for x in num]
                if window > 0:
                    ws = 1.0 / math.sqrt(Dk)
                    keys = range(max(0, t - window + 1), t + 1)
                    logits = [ws * sum(a * c for a, c in zip(qrow(t), krow(j))) for j in keys]
                    m = max(logits)
                    p = [math.exp(x - m) for x in logits]
                    total = sum(p)
                    for j, pj in zip(keys, p):
                        for d, x in enumerate(vrow(j)):
                            num[d] += pj / total * x
                o = ((b * S + t) * Hq + h) * Dv
                out[o:o + Dv] = num
            for c in range(F):
                norm_out[so + c] = z[c]
                state_out[(so + c) * Dv:(so + c + 1) * Dv] = st[c]
    return out, state_out, norm_out
