# SPDX-License-Identifier: Apache-2.0
"""`tessera run --op linear`: each variant against the fp64 recurrent reference, state
files, the backward, LRPE (--lrpe-theta, --position-offset) and bad inputs.
"""
import math
import os
import random

from cli_util import CliTestBase, random_values, read_npy, round_to, run_cli, write_npy
from reference import linear_feature_dim, linear_phi, linear_reference


# The tiny shape of the linear tests: B, S, Hq, Hkv, Dk, Dv (BASED: Dk = 4, so F = 21).
LINEAR_SHAPE = (1, 37, 2, 2, 8, 8)
BASED_SHAPE = (1, 37, 2, 2, 4, 4)


def gate_values(n, seed):
    """Log-space gates in [-0.5, -0.01], rounded to f32."""
    rng = random.Random(seed)
    return round_to([-rng.uniform(0.01, 0.5) for _ in range(n)], "<f4")


def lrpe_theta_values(Hq, Dk, per_head):
    """RoPE-like angles 10000^(-f / Dk) ([Dk]), or a little different per head ([Hq, Dk]), f32."""
    base = [10000.0 ** (-f / Dk) for f in range(Dk)]
    if not per_head:
        return round_to(base, "<f4")
    return round_to([x * (1.0 + 0.1 * h) for h in range(Hq) for x in base], "<f4")


def lrpe_reference(q, k, v, shape, theta, per_head, offset=0, fmap="identity", scale=None,
                   **options):
    """LRPE in fp64 through linear_reference: phi of every token doubled into
    [phi cos(p theta), phi sin(p theta)] at p = offset + t with its query head's angles (k and v
    repeated over the query heads of their group), then plain linear attention on those 2 Dk
    features with the scale of Dk. Returns (out, state [B, Hq, 2 Dk, Dv], normalizer)."""
    B, S, Hq, Hkv, Dk, Dv = shape
    group = Hq // Hkv
    fq, fk, vv = [], [], []
    for b in range(B):
        for t in range(S):
            p = offset + t
            for h in range(Hq):
                th = theta[h * Dk:(h + 1) * Dk] if per_head else theta
                hk = h // group
                for x, dst in ((q[((b * S + t) * Hq + h) * Dk:][:Dk], fq),
                               (k[((b * S + t) * Hkv + hk) * Dk:][:Dk], fk)):
                    f = linear_phi(x, fmap)
                    dst.extend([fi * math.cos(p * ti) for fi, ti in zip(f, th)])
                    dst.extend([fi * math.sin(p * ti) for fi, ti in zip(f, th)])
                vv.extend(v[((b * S + t) * Hkv + hk) * Dv:][:Dv])
    if scale is None:
        scale = 1.0 / math.sqrt(Dk)
    return linear_reference(fq, fk, vv, B, S, Hq, Hq, 2 * Dk, Dv, scale=scale, **options)


class LinearTestBase(CliTestBase):
    def make_linear(self, shape=LINEAR_SHAPE, descr="<f4", seed=21, tag=""):
        B, S, Hq, Hkv, Dk, Dv = shape
        q = random_values(B * S * Hq * Dk, seed, descr)
        k = random_values(B * S * Hkv * Dk, seed + 1, descr)
        v = random_values(B * S * Hkv * Dv, seed + 2, descr)
        write_npy(self.path("q%s.npy" % tag), (B, S, Hq, Dk), q, descr)
        write_npy(self.path("k%s.npy" % tag), (B, S, Hkv, Dk), k, descr)
        write_npy(self.path("v%s.npy" % tag), (B, S, Hkv, Dv), v, descr)
        return q, k, v

    def make_gates(self, shape=LINEAR_SHAPE, seed=31, name="g.npy"):
        B, S, Hq, _, Dk, _ = shape
        g = gate_values(B * S * Hq * Dk, seed)
        write_npy(self.path(name), (B, S, Hq, Dk), g)
        return g

    def linear_args(self, out="o.npy", tag=""):
        return ["--op", "linear", "--q", self.path("q%s.npy" % tag),
                "--k", self.path("k%s.npy" % tag), "--v", self.path("v%s.npy" % tag),
                "--out", self.path(out)]

    def run_linear(self, *args, out="o.npy", tag=""):
        self.assert_ok(*run_cli("run", *self.linear_args(out, tag), *args))
        descr, fortran, shape, values, _ = read_npy(self.path(out))
        self.assertFalse(fortran)
        return descr, shape, values

    def check_linear(self, args, shape=LINEAR_SHAPE, rtol=1e-4, forms=("chunked", "recurrent"),
                     **options):
        """Runs each form (default chunk and --chunk 16 for the chunked one) against the
        reference; returns the reference output."""
        B, S, Hq, Hkv, Dk, Dv = shape
        q, k, v = self.make_linear(shape)
        if "gates" in options and options["gates"] is True:
            options["gates"] = self.make_gates(shape)
            args = list(args) + ["--gates", self.path("g.npy")]
        want, _, _ = linear_reference(q, k, v, B, S, Hq, Hkv, Dk, Dv, **options)
        runs = []
        for form in forms:
            runs.append(("--form", form))
            if form == "chunked":
                runs.append(("--form", form, "--chunk", "16"))
        for extra in runs:
            descr, got_shape, got = self.run_linear(*args, *extra)
            self.assertEqual((descr, got_shape), ("<f4", (B, S, Hq, Dv)), extra)
            self.assert_close_rel(got, want, rtol, " ".join(map(str, list(args) + list(extra))))
        return want

    SPLIT = 20  # split_inputs: tokens [0, SPLIT) as tag "1", the rest as tag "2"

    def split_inputs(self, shape, q, k, v, g=None):
        B, S, Hq, Hkv, Dk, Dv = shape
        assert B == 1  # the layout's first token dim is then contiguous
        P = self.SPLIT
        for tag, lo, hi in (("1", 0, P), ("2", P, S)):
            n = hi - lo
            write_npy(self.path("q%s.npy" % tag), (B, n, Hq, Dk), q[lo * Hq * Dk:hi * Hq * Dk])
            write_npy(self.path("k%s.npy" % tag), (B, n, Hkv, Dk), k[lo * Hkv * Dk:hi * Hkv * Dk])
            write_npy(self.path("v%s.npy" % tag), (B, n, Hkv, Dv), v[lo * Hkv * Dv:hi * Hkv * Dv])
            if g is not None:
                write_npy(self.path("g%s.npy" % tag), (B, n, Hq, Dk), g[lo * Hq * Dk:hi * Hq * Dk])


class LinearRunTest(LinearTestBase):
    def test_plain(self):
        self.check_linear(["--variant", "plain", "--threads", 2])

    def test_default_variant_is_plain_and_causal(self):
        self.check_linear(["--causal"], forms=("chunked",))

    def test_gqa(self):
        self.check_linear(["--variant", "plain"], shape=(1, 37, 2, 1, 8, 8))

    def test_value_dim_differs(self):
        self.check_linear(["--variant", "plain"], shape=(2, 37, 2, 1, 8, 5))

    def test_feature_maps_and_normalize(self):
        # elu1 keeps every feature positive, so the normalizer is well away from 0.
        self.check_linear(["--feature-map", "elu1", "--normalize"], fmap="elu1", normalize=True)
        self.check_linear(["--feature-map", "relu"], fmap="relu")
        self.check_linear(["--feature-map", "taylor2", "--scale", "0.5"], shape=BASED_SHAPE,
                          fmap="taylor2", scale=0.5)

    def test_scale(self):
        self.check_linear(["--scale", "0.25"], scale=0.25)

    def test_non_causal(self):
        self.check_linear(["--non-causal"], causal=False)
        self.check_linear(["--non-causal", "--feature-map", "elu1", "--normalize"], causal=False,
                          fmap="elu1", normalize=True)

    def test_prefix(self):
        self.check_linear(["--prefix", 10], prefix=10)
        self.check_linear(["--prefix", 37], prefix=37, forms=("chunked",))

    def test_decay_per_head_and_broadcast(self):
        self.check_linear(["--variant", "decay", "--decay", "0.9,0.6"], decay=[0.9, 0.6])
        self.check_linear(["--variant", "decay", "--decay", "0.95"], decay=[0.95, 0.95])
        # Rates are f32: 0.97 is read as the float nearest it, within the tolerance here.
        self.check_linear(["--variant", "decay", "--decay", "0.97,1", "--feature-map", "elu1",
                           "--normalize"], decay=[0.97, 1.0], fmap="elu1", normalize=True)

    def test_gla(self):
        self.check_linear(["--variant", "gla"], gates=True)
        self.check_linear(["--variant", "gla", "--normalize"], shape=(1, 37, 2, 1, 8, 8),
                          gates=True, normalize=True)

    def test_gla_scalar_gates(self):
        # One gate per token and head [B, S, Hq]: the per-channel form with the gate repeated
        # over the Dk channels.
        B, S, Hq, Hkv, Dk, Dv = LINEAR_SHAPE
        q, k, v = self.make_linear()
        g = gate_values(B * S * Hq, 33)
        write_npy(self.path("g3.npy"), (B, S, Hq), g)
        per_channel = [x for x in g for _ in range(Dk)]
        want, _, _ = linear_reference(q, k, v, B, S, Hq, Hkv, Dk, Dv, gates=per_channel)
        for form in ("chunked", "recurrent"):
            descr, shape, got = self.run_linear("--variant", "gla", "--gates", self.path("g3.npy"),
                                                "--form", form)
            self.assertEqual(shape, (B, S, Hq, Dv))
            self.assert_close_rel(got, want, 1e-4, form)

    def test_based(self):
        # Taylor map, normalized, window 64 (> S: every earlier key) by default.
        self.check_linear(["--variant", "based"], shape=BASED_SHAPE, fmap="taylor2",
                          normalize=True, window=64)
        self.check_linear(["--variant", "based", "--window", 8], shape=BASED_SHAPE,
                          fmap="taylor2", normalize=True, window=8)
        self.check_linear(["--variant", "based", "--window", 0, "--no-normalize"],
                          shape=BASED_SHAPE, fmap="taylor2")
        self.check_linear(["--variant", "based", "--window", 5], shape=(1, 37, 2, 1, 4, 6),
                          fmap="taylor2", normalize=True, window=5)

    def test_window_with_other_variants(self):
        self.check_linear(["--variant", "decay", "--decay", "0.8", "--window", 4],
                          decay=[0.8, 0.8], window=4)

    def test_f16_inputs(self):
        B, S, Hq, Hkv, Dk, Dv = LINEAR_SHAPE
        q, k, v = self.make_linear(descr="<f2")
        descr, shape, got = self.run_linear("--feature-map", "elu1", "--normalize")
        self.assertEqual((descr, shape), ("<f2", (B, S, Hq, Dv)))
        want, _, _ = linear_reference(q, k, v, B, S, Hq, Hkv, Dk, Dv, fmap="elu1", normalize=True)
        self.assert_close_rel(got, want, 2e-3, "f16 out")  # rounded to f16 (2^-11 relative)

    def test_recurrent_equals_chunked(self):
        q, k, v = self.make_linear()
        g = self.make_gates()
        for args in (["--variant", "plain"], ["--variant", "decay", "--decay", "0.9,0.8"],
                     ["--variant", "gla", "--gates", self.path("g.npy")],
                     ["--feature-map", "elu1", "--normalize", "--prefix", 20]):
            _, _, chunked = self.run_linear(*args, "--chunk", 16, out="c.npy")
            _, _, recurrent = self.run_linear(*args, "--form", "recurrent", out="r.npy")
            self.assert_close_rel(recurrent, chunked, 1e-5, " ".join(map(str, args)))

    def test_verbose(self):
        self.make_linear()
        rc, out, err = run_cli("run", *self.linear_args(), "--variant", "decay", "--decay", "0.9",
                               "--verbose")
        self.assert_ok(rc, out, err)
        for needle in ("linear decay", "ms", "peak RSS"):
            self.assertIn(needle, err)


class LinearStateTest(LinearTestBase):
    """--state-out of a run over tokens [0, P) then --state-in for [P, S) equals one run."""

    def check_continuation(self, args, shape=LINEAR_SHAPE, gla=False, **options):
        B, S, Hq, Hkv, Dk, Dv = shape
        F = linear_feature_dim(options.get("fmap", "identity"), Dk)
        q, k, v = self.make_linear(shape)
        g = self.make_gates(shape) if gla else None
        self.split_inputs(shape, q, k, v, g)
        normalize = options.get("normalize", False)
        for form in ("chunked", "recurrent"):
            with self.subTest(args=args, form=form):
                common = list(args) + ["--form", form, "--chunk", 16]
                state = lambda name, tag: ["--state-%s" % name, self.path("s%s.npy" % tag)] + (
                    ["--normalizer-%s" % name, self.path("z%s.npy" % tag)] if normalize else [])
                gates = lambda tag: ["--gates", self.path("g%s.npy" % tag)] if gla else []
                _, _, full = self.run_linear(*common, *gates(""), *state("out", "_full"),
                                             out="full.npy")
                _, _, first = self.run_linear(*common, *gates("1"), *state("out", "1"),
                                              out="o1.npy", tag="1")
                _, _, second = self.run_linear(*common, *gates("2"), *state("in", "1"),
                                               *state("out", "2"), out="o2.npy", tag="2")
                self.assert_close_rel(first + second, full, 1e-5, "continued vs one run")
                want, want_state, want_norm = linear_reference(
                    q, k, v, B, S, Hq, Hkv, Dk, Dv, gates=g, **options)
                self.assert_close_rel(full, want, 1e-4, "one run vs reference")
                for tag in ("_full", "2"):
                    descr, _, sshape, svals, _ = read_npy(self.path("s%s.npy" % tag))
                    self.assertEqual((descr, sshape), ("<f4", (B, Hq, F, Dv)))
                    self.assert_close_rel(svals, want_state, 1e-4, "final state " + tag)
                    if normalize:
                        descr, _, zshape, zvals, _ = read_npy(self.path("z%s.npy" % tag))
                        self.assertEqual((descr, zshape), ("<f4", (B, Hq, F)))
                        self.assert_close_rel(zvals, want_norm, 1e-4, "final normalizer " + tag)

    def test_plain(self):
        self.check_continuation(["--variant", "plain"])

    def test_decay_gqa(self):
        self.check_continuation(["--variant", "decay", "--decay", "0.9,0.7"],
                                shape=(1, 37, 2, 1, 8, 8), decay=[0.9, 0.7])

    def test_gla(self):
        self.check_continuation(["--variant", "gla"], gla=True)

    def test_based_normalized(self):
        # The window part sees only the keys of its own call, so continuation needs --window 0.
        self.check_continuation(["--variant", "based", "--window", 0], shape=BASED_SHAPE,
                                fmap="taylor2", normalize=True)

    def test_state_in_reference(self):
        # An arbitrary initial state: the reference carries it through the decay.
        B, S, Hq, Hkv, Dk, Dv = LINEAR_SHAPE
        q, k, v = self.make_linear()
        s0 = random_values(B * Hq * Dk * Dv, 41, "<f4")
        write_npy(self.path("s0.npy"), (B, Hq, Dk, Dv), s0)
        _, _, got = self.run_linear("--variant", "decay", "--decay", "0.9,0.8",
                                    "--state-in", self.path("s0.npy"))
        want, _, _ = linear_reference(q, k, v, B, S, Hq, Hkv, Dk, Dv, decay=[0.9, 0.8], state0=s0)
        self.assert_close_rel(got, want, 1e-4, "out with an initial state")


class LinearBackwardTest(LinearTestBase):
    def make_dout(self, shape=LINEAR_SHAPE, seed=51):
        B, S, Hq, _, _, Dv = shape
        dout = random_values(B * S * Hq * Dv, seed, "<f4")
        write_npy(self.path("do.npy"), (B, S, Hq, Dv), dout)
        return dout

    def grad_args(self):
        return ["--dout", self.path("do.npy"), "--dq", self.path("dq.npy"),
                "--dk", self.path("dk.npy"), "--dv", self.path("dv.npy")]

    def check_gradients(self, args, shape=LINEAR_SHAPE, gla=False, samples=5, **options):
        """Shapes, dtypes and finiteness of every gradient, and a central finite difference of
        the fp64 reference's loss sum(out * dout) at a few elements of each."""
        B, S, Hq, Hkv, Dk, Dv = shape
        q, k, v = self.make_linear(shape)
        dout = self.make_dout(shape)
        inputs = {"q": q, "k": k, "v": v}
        extra = []
        if gla:
            inputs["g"] = self.make_gates(shape)
            extra = ["--gates", self.path("g.npy"), "--dgates", self.path("dg.npy")]
        self.assert_ok(*run_cli("run", *self.linear_args(), *args, *extra, *self.grad_args()))
        shapes = {"q": (B, S, Hq, Dk), "k": (B, S, Hkv, Dk), "v": (B, S, Hkv, Dv),
                  "g": (B, S, Hq, Dk)}

        def loss(values):
            out, _, _ = linear_reference(values["q"], values["k"], values["v"], B, S, Hq, Hkv,
                                         Dk, Dv, gates=values.get("g"), **options)
            return sum(o * d for o, d in zip(out, dout))

        rng = random.Random(7)
        for name in inputs:
            descr, fortran, gshape, grad, _ = read_npy(self.path("d%s.npy" % name))
            self.assertEqual((descr, fortran, gshape), ("<f4", False, shapes[name]), name)
            self.assertTrue(all(math.isfinite(x) for x in grad), "d%s not finite" % name)
            scale = max(abs(x) for x in grad)
            self.assertGreater(scale, 0.0, "d%s is all zero" % name)
            for i in rng.sample(range(len(grad)), samples):
                h = 1e-4
                plus = dict(inputs)
                minus = dict(inputs)
                plus[name] = list(inputs[name])
                minus[name] = list(inputs[name])
                plus[name][i] += h
                minus[name][i] -= h
                fd = (loss(plus) - loss(minus)) / (2 * h)
                self.assertLessEqual(abs(grad[i] - fd), 1e-3 * scale + 1e-6,
                                     "d%s[%d]: tessera %r, finite difference %r" %
                                     (name, i, grad[i], fd))

    def test_plain(self):
        self.check_gradients(["--variant", "plain"])

    def test_plain_gqa_non_causal(self):
        self.check_gradients(["--non-causal"], shape=(1, 37, 2, 1, 8, 8), causal=False)

    def test_decay_normalized(self):
        self.check_gradients(["--variant", "decay", "--decay", "0.9,0.7", "--feature-map", "elu1",
                              "--normalize"], decay=[0.9, 0.7], fmap="elu1", normalize=True)

    def test_gla_dgates(self):
        self.check_gradients(["--variant", "gla", "--chunk", 16], gla=True, samples=4)

    def test_based_without_window(self):
        self.check_gradients(["--variant", "based", "--window", 0], shape=BASED_SHAPE,
                             fmap="taylor2", normalize=True, samples=3)


class LinearLrpeTest(LinearTestBase):
    """--lrpe-theta THETA.npy [--position-offset N] against lrpe_reference."""

    def write_theta(self, shape, per_head, name="theta.npy"):
        _, _, Hq, _, Dk, _ = shape
        theta = lrpe_theta_values(Hq, Dk, per_head)
        write_npy(self.path(name), (Hq, Dk) if per_head else (Dk,), theta)
        return theta

    def check_lrpe(self, args, shape=LINEAR_SHAPE, per_head=False, offset=0, **options):
        B, S, Hq, Hkv, Dk, Dv = shape
        q, k, v = self.make_linear(shape)
        theta = self.write_theta(shape, per_head)
        want, want_state, want_norm = lrpe_reference(q, k, v, shape, theta, per_head, offset,
                                                     **options)
        # LRPE reaches the output: the same run without it differs.
        plain, _, _ = linear_reference(q, k, v, B, S, Hq, Hkv, Dk, Dv, **options)
        self.assertGreater(max(abs(a - b) for a, b in zip(plain, want)),
                           0.01 * max(abs(w) for w in want))
        normalize = options.get("normalize", False)
        lrpe = ["--lrpe-theta", self.path("theta.npy")] + (
            ["--position-offset", offset] if offset else [])
        state = ["--state-out", self.path("s.npy")] + (
            ["--normalizer-out", self.path("z.npy")] if normalize else [])
        for extra in (["--form", "chunked"], ["--form", "chunked", "--chunk", 16],
                      ["--form", "recurrent"]):
            with self.subTest(args=args, extra=extra):
                descr, got_shape, got = self.run_linear(*args, *lrpe, *state, *extra)
                self.assertEqual((descr, got_shape), ("<f4", (B, S, Hq, Dv)))
                self.assert_close_rel(got, want, 1e-4, "out")
                descr, _, sshape, svals, _ = read_npy(self.path("s.npy"))
                self.assertEqual((descr, sshape), ("<f4", (B, Hq, 2 * Dk, Dv)))
                self.assert_close_rel(svals, want_state, 1e-4, "final state")
                if normalize:
                    _, _, zshape, zvals, _ = read_npy(self.path("z.npy"))
                    self.assertEqual(zshape, (B, Hq, 2 * Dk))
                    self.assert_close_rel(zvals, want_norm, 1e-4, "final normalizer")

    def test_shared_theta(self):
        self.check_lrpe(["--variant", "plain"], shape=(2, 37, 2, 2, 8, 8))

    def test_per_head_theta_decay_normalized_gqa_offset(self):
        self.check_lrpe(["--variant", "decay", "--decay", "0.9,0.7", "--feature-map", "elu1",
                         "--normalize"], shape=(1, 37, 2, 1, 8, 6), per_head=True, offset=1000,
                        decay=[0.9, 0.7], fmap="elu1", normalize=True)

    def test_relu_prefix(self):
        self.check_lrpe(["--feature-map", "relu", "--prefix", 9], per_head=True, offset=70,
                        fmap="relu", prefix=9)

    def test_continuation_at_the_offset(self):
        # [0, 20) with --state-out, then [20, 37) from that state at --position-offset 20 (both
        # shifted by 500) equals one run; without the offset the second part differs.
        B, S, Hq, Hkv, Dk, Dv = LINEAR_SHAPE
        q, k, v = self.make_linear()
        theta = self.write_theta(LINEAR_SHAPE, True)
        self.split_inputs(LINEAR_SHAPE, q, k, v)
        P = self.SPLIT
        lrpe = ["--lrpe-theta", self.path("theta.npy"), "--variant", "decay", "--decay", "0.95"]
        for form in ("chunked", "recurrent"):
            with self.subTest(form=form):
                common = lrpe + ["--form", form, "--chunk", 16]
                _, _, full = self.run_linear(*common, "--position-offset", 500,
                                             "--state-out", self.path("s_full.npy"),
                                             out="full.npy")
                _, _, first = self.run_linear(*common, "--position-offset", 500,
                                              "--state-out", self.path("s1.npy"), out="o1.npy",
                                              tag="1")
                _, _, second = self.run_linear(*common, "--position-offset", 500 + P,
                                               "--state-in", self.path("s1.npy"),
                                               "--state-out", self.path("s2.npy"), out="o2.npy",
                                               tag="2")
                self.assert_close_rel(first + second, full, 1e-5, "continued vs one run")
                want, want_state, _ = lrpe_reference(q, k, v, LINEAR_SHAPE, theta, True, 500,
                                                     decay=[0.95, 0.95])
                self.assert_close_rel(full, want, 1e-4, "one run vs reference")
                _, _, _, s2, _ = read_npy(self.path("s2.npy"))
                self.assert_close_rel(s2, want_state, 1e-4, "final state after the hand-off")
                _, _, wrong = self.run_linear(*common, "--position-offset", 500,
                                              "--state-in", self.path("s1.npy"), out="w.npy",
                                              tag="2")
                self.assertGreater(max(abs(a - b) for a, b in zip(wrong, second)),
                                   0.01 * max(abs(x) for x in second))

    def test_backward(self):
        # The gradients against a central finite difference of the reference's loss.
        shape = (1, 21, 2, 1, 4, 3)
        B, S, Hq, Hkv, Dk, Dv = shape
        q, k, v = self.make_linear(shape)
        theta = self.write_theta(shape, True)
        dout = random_values(B * S * Hq * Dv, 51, "<f4")
        write_npy(self.path("do.npy"), (B, S, Hq, Dv), dout)
        self.assert_ok(*run_cli(
            "run", *self.linear_args(), "--lrpe-theta", self.path("theta.npy"),
            "--position-offset", 300, "--feature-map", "elu1", "--normalize", "--chunk", 16,
            "--dout", self.path("do.npy"), "--dq", self.path("dq.npy"), "--dk",
            self.path("dk.npy"), "--dv", self.path("dv.npy")))
        inputs = {"q": q, "k": k, "v": v}

        def loss(values):
            out, _, _ = lrpe_reference(values["q"], values["k"], values["v"], shape, theta, True,
                                       300, fmap="elu1", normalize=True)
            return sum(o * d for o, d in zip(out, dout))

        rng = random.Random(9)
        for name in inputs:
            _, _, _, grad, _ = read_npy(self.path("d%s.npy" % name))
            self.assertEqual(len(grad), len(inputs[name]))
            scale = max(abs(x) for x in grad)
            self.assertGreater(scale, 0.0)
            for i in rng.sample(range(len(grad)), 4):
                h = 1e-4
                plus, minus = list(inputs[name]), list(inputs[name])
                plus[i] += h
                minus[i] -= h
                fd = (loss(dict(inputs, **{name: plus})) -
                      loss(dict(inputs, **{name: minus}))) / (2 * h)
                self.assertLessEqual(abs(grad[i] - fd), 1e-3 * scale + 1e-6,
                                     "d%s[%d]: tessera %r, finite difference %r" %
                                     (name, i, grad[i], fd))

    def test_verbose(self):
        self.make_linear()
        self.write_theta(LINEAR_SHAPE, False)
        rc, _, err = run_cli("run", *self.linear_args(), "--lrpe-theta", self.path("theta.npy"),
                             "--position-offset", 12, "--verbose")
        self.assertEqual(rc, 0, err)
        self.assertIn("LRPE from position 12", err)
        self.assertIn("F 16", err)


class LinearErrorTest(LinearTestBase):
    def setUp(self):
        super().setUp()
        self.make_linear()
        self.inputs = sorted(os.listdir(self.dir))

    def check_error(self, args, *needles, extra_files=()):
        rc, out, err = run_cli("run", *self.linear_args(), *args)
        self.assert_error(rc, err, *needles)
        self.assertEqual(out, "")
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(self.inputs + list(extra_files)),
                         "nothing may be written on error (%s)" % (args,))

    def test_variant_and_its_inputs(self):
        self.check_error(["--variant", "mamba"], "--variant", "mamba")
        self.check_error(["--variant", "decay"], "--decay")
        self.check_error(["--decay", "0.9"], "--decay", "--variant decay")
        self.check_error(["--variant", "gla"], "--gates")
        self.make_gates()
        self.check_error(["--variant", "plain", "--gates", self.path("g.npy")], "--gates",
                         extra_files=["g.npy"])

    def test_bad_decay(self):
        for value in ("0.9,0.8,0.7", "1.5", "0", "x", "0.9,", "nan"):
            with self.subTest(value=value):
                self.check_error(["--variant", "decay", "--decay", value], "--decay")

    def test_bad_gates(self):
        B, S, Hq, _, Dk, _ = LINEAR_SHAPE
        for shape, descr, values, needle in (
                ((B, S, Hq, Dk + 1), "<f4", None, "(1, 37, 2, 8)"),
                ((B, S - 1, Hq, Dk), "<f4", None, "[B, S, Hq, Dk]"),
                ((S, Hq, Dk), "<f4", None, "[B, S, Hq] (from q)"),
                ((B, S * Hq * Dk), "<f4", None, "[B, S, Hq, Dk] or [B, S, Hq]"),
                ((B, S, Hq, Dk), "<f2", None, "dtype"),
                ((B, S, Hq, Dk), "<f4", 0.5, "<= 0")):
            n = 1
            for extent in shape:
                n *= extent
            fill = values if values is not None else -0.1
            write_npy(self.path("g.npy"), shape, [fill] * n, descr)
            with self.subTest(shape=shape, descr=descr):
                self.check_error(["--variant", "gla", "--gates", self.path("g.npy")], "--gates",
                                 needle, extra_files=["g.npy"])

    def test_feature_map(self):
        self.check_error(["--feature-map", "softmax"], "--feature-map", "softmax")
        self.check_error(["--variant", "gla", "--feature-map", "relu"], "--feature-map")
        self.check_error(["--variant", "based", "--feature-map", "elu1"], "--feature-map",
                         "taylor2")

    def test_integers_and_form(self):
        for args, needle in ((["--chunk", 20], "--chunk"), (["--chunk", -16], "--chunk"),
                             (["--chunk", "x"], "--chunk"), (["--prefix", 38], "--prefix"),
                             (["--prefix", -1], "--prefix"), (["--window", "2,0"], "--window"),
                             (["--window", -1], "--window"), (["--window="], "--window"),
                             (["--form", "parallel"], "--form"), (["--threads", -1], "--threads"),
                             (["--scale", "inf"], "--scale"), (["--path", "reference"], "--path")):
            with self.subTest(args=args):
                self.check_error(args, needle)

    def test_causality(self):
        self.check_error(["--causal", "--non-causal"], "--causal", "--non-causal")
        self.check_error(["--variant", "based", "--non-causal"], "--non-causal", "--window 0")
        self.check_error(["--variant", "decay", "--decay", "0.9", "--non-causal"],
                         "--non-causal", "causal order")
        self.check_error(["--variant", "gla", "--gates", self.path("q.npy"), "--prefix", 4],
                         "--prefix", "causal order")
        self.check_error(["--non-causal", "--state-out", self.path("s.npy")], "--state-out")

    def test_state_files(self):
        B, S, Hq, Hkv, Dk, Dv = LINEAR_SHAPE
        write_npy(self.path("s.npy"), (B, Hq, Dk, Dv + 1), [0.0] * (B * Hq * Dk * (Dv + 1)))
        write_npy(self.path("z.npy"), (B, Hq, Dk), [0.0] * (B * Hq * Dk))
        files = ["s.npy", "z.npy"]
        self.check_error(["--state-in", self.path("s.npy")], "--state-in", "(1, 2, 8, 8)",
                         extra_files=files)
        self.check_error(["--normalizer-in", self.path("z.npy")], "--normalizer-in",
                         "--normalize", extra_files=files)
        self.check_error(["--normalize", "--feature-map", "elu1", "--state-out",
                          self.path("s2.npy")], "--normalizer-out", extra_files=files)
        self.check_error(["--normalize", "--feature-map", "elu1", "--normalizer-in",
                          self.path("z.npy")], "--state-in", extra_files=files)
        self.check_error(["--state-out", self.path("o.npy")], "--out and --state-out",
                         extra_files=files)
        self.check_error(["--state-out", os.path.join(self.dir, "no_such_dir", "s.npy")],
                         "no_such_dir", extra_files=files)

    def test_backward(self):
        B, S, Hq, Hkv, Dk, Dv = LINEAR_SHAPE
        write_npy(self.path("do.npy"), (B, S, Hq, Dv), [0.5] * (B * S * Hq * Dv))
        grads = ["--dout", self.path("do.npy"), "--dq", self.path("dq.npy"),
                 "--dk", self.path("dk.npy"), "--dv", self.path("dv.npy")]
        files = ["do.npy"]
        self.check_error(grads[:4], "--dout, --dq, --dk and --dv together", extra_files=files)
        self.check_error(["--dgates", self.path("dg.npy")], "--dgates", extra_files=files)
        self.check_error(grads + ["--dgates", self.path("dg.npy")], "--dgates", "gla",
                         extra_files=files)
        self.check_error(grads + ["--variant", "based"], "--window 0", extra_files=files)
        self.check_error(grads + ["--state-out", self.path("s.npy")], "--state-out",
                         extra_files=files)
        write_npy(self.path("do.npy"), (B, S, Hq, Dv + 1), [0.5] * (B * S * Hq * (Dv + 1)))
        self.check_error(grads, "dout", extra_files=files)

    def test_lrpe(self):
        B, S, Hq, Hkv, Dk, Dv = LINEAR_SHAPE
        theta = self.path("t.npy")
        files = ["t.npy"]
        write_npy(theta, (Dk,), lrpe_theta_values(Hq, Dk, False))
        lrpe = ["--lrpe-theta", theta]
        self.check_error(["--position-offset", 5], "--position-offset", "--lrpe-theta",
                         extra_files=files)
        for args, needles in (
                (["--position-offset", -1], ("--position-offset",)),
                (["--position-offset", "x"], ("--position-offset",)),
                (["--position-offset", str(2 ** 53)], ("--position-offset", "2^52")),
                (["--variant", "gla", "--gates", self.path("q.npy")], ("--lrpe-theta", "gla")),
                (["--variant", "based"], ("--lrpe-theta", "taylor2")),
                (["--feature-map", "taylor2"], ("--lrpe-theta", "taylor2")),
                (["--state-in", self.path("s.npy")], ("--state-in", "(1, 2, 16, 8)", "LRPE"))):
            with self.subTest(args=args):
                write_npy(self.path("s.npy"), (B, Hq, Dk, Dv), [0.0] * (B * Hq * Dk * Dv))
                self.check_error(lrpe + args, *needles, extra_files=files + ["s.npy"])
        os.remove(self.path("s.npy"))
        for tshape, descr, fill, needles in (
                ((Dk + 1,), "<f4", 0.5, ("--lrpe-theta", "(8,) or (2, 8)")),
                ((Hq + 1, Dk), "<f4", 0.5, ("--lrpe-theta", "got (3, 8)")),
                ((1, Hq, Dk), "<f4", 0.5, ("--lrpe-theta",)),
                ((Dk,), "<f2", 0.5, ("--lrpe-theta", "dtype")),
                ((Dk,), "<f4", float("nan"), ("--lrpe-theta", "finite"))):
            n = 1
            for extent in tshape:
                n *= extent
            write_npy(theta, tshape, [fill] * n, descr)
            with self.subTest(shape=tshape, descr=descr, fill=fill):
                self.check_error(lrpe, *needles, extra_files=files)
        # The other ops, and LASP-2 (each shard would need its global offset), refuse it by name.
        for op in ("exact", "approx"):
            rc, _, err = run_cli("run", "--op", op, "--q", self.path("q.npy"), "--k",
                                 self.path("k.npy"), "--v", self.path("v.npy"), "--out",
                                 self.path("o.npy"), *lrpe)
            self.assert_error(rc, err, "--lrpe-theta", "--op linear")
        rc, _, err = run_cli("run", *self.linear_args(), "--dist", "lasp2", *lrpe)
        self.assert_error(rc, err, "--lrpe-theta")
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(self.inputs + files))

    def test_options_of_the_other_op(self):
        for args in (["--lse", self.path("l.npy")], ["--mask", "sink:4:8"],
                     ["--softcap", 5], ["--alibi", self.path("a.npy")]):
            with self.subTest(args=args):
                self.check_error(args, args[0], "--op exact")
        rc, _, err = run_cli("run", "--q", self.path("q.npy"), "--k", self.path("k.npy"),
                             "--v", self.path("v.npy"), "--out", self.path("o.npy"),
                             "--variant", "gla")
        self.assert_error(rc, err, "--variant", "--op linear")
        rc, _, err = run_cli("run", "--op", "sparse", "--q", self.path("q.npy"), "--k",
                             self.path("k.npy"), "--v", self.path("v.npy"), "--out",
                             self.path("o.npy"))
        self.assert_error(rc, err, "--op", "sparse")
        self.assertEqual(sorted(os.listdir(self.dir)), self.inputs)

    def test_help_lists_the_linear_options(self):
        rc, out, _ = run_cli("run", "--help")
        self.assertEqual(rc, 0)
        for needle in ("--op", "--variant", "--decay", "--gates", "--state-in", "--form"):
            self.assertIn(needle, out)
