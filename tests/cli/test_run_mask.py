# SPDX-License-Identifier: Apache-2.0
"""`tessera run --mask`: each form against the same mask materialized in Python."""
import math
import os
import random

from cli_util import CliTestBase, random_values, read_npy, round_to, run_cli, write_npy
from reference import mask_values, natten_window_start, nbhd_rule, reference_masked, s2_rule


class MaskRunTest(CliTestBase):
    N, H, D = 256, 2, 32

    def setUp(self):
        super().setUp()
        self.make_inputs(1, self.N, self.N, self.H, self.H, self.D)

    def run_mask(self, spec, out="o.npy", *extra):
        self.assert_ok(*run_cli("run", *self.io_args(out), "--mask", spec, *extra))
        return read_npy(self.path(out))[3]

    def check_equals_dense(self, spec, rule, *extra, tol=1e-5):
        """The structured spec's output equals that of the same mask materialized here."""
        got = self.run_mask(spec, "structured.npy", *extra)
        write_npy(self.path("dense_mask.npy"), (1, self.H, self.N, self.N),
                  mask_values(rule, self.H, self.N, self.N), "|u1")
        want = self.run_mask("dense:" + self.path("dense_mask.npy"), "dense.npy")
        self.assert_close(got, want, tol, spec)
        return got

    def test_block_all_ones_equals_no_mask(self):
        self.assert_ok(*run_cli("run", *self.io_args("plain.npy")))
        for shape, descr in (((8, 8), "|u1"), ((1, self.H, 8, 8), "|b1")):
            with self.subTest(shape=shape, descr=descr):
                n = 1
                for d in shape:
                    n *= d
                write_npy(self.path("ones.npy"), shape, [1] * n, descr)
                self.run_mask("block:%s:32x32" % self.path("ones.npy"))
                # Every tile full: the unmasked path, bit for bit.
                self.assertEqual(read_npy(self.path("o.npy"))[4],
                                 read_npy(self.path("plain.npy"))[4])

    def test_block_file_equals_dense(self):
        rng = random.Random(5)
        blocks = [1 if rng.random() < 0.4 else 0 for _ in range(self.H * 4 * 4)]
        write_npy(self.path("blocks.npy"), (1, self.H, 4, 4), blocks, "|b1")
        rule = lambda h, i, j: blocks[(h * 4 + i // 64) * 4 + j // 64] == 1
        self.check_equals_dense("block:%s:64x64" % self.path("blocks.npy"), rule)
        # --causal ANDs with the block mask.
        self.check_equals_dense("block:%s:64x64" % self.path("blocks.npy"),
                                lambda h, i, j: rule(h, i, j) and j <= i, "--causal")

    def test_nbhd2d_equals_natten_dense(self):
        # 16 x 16 grid, 5 x 5 window (odd) and 4 x 6 (even): the window shifts at the borders.
        for window in ((5, 5), (4, 6)):
            def rule(h, i, j, kh=window[0], kw=window[1]):
                (yi, xi), (yj, xj) = divmod(i, 16), divmod(j, 16)
                r0, c0 = natten_window_start(yi, 16, kh), natten_window_start(xi, 16, kw)
                return r0 <= yj < r0 + kh and c0 <= xj < c0 + kw
            with self.subTest(window=window):
                self.check_equals_dense("nbhd2d:16x16:%dx%d" % window, rule)

    def test_nbhd_dilation_stride_causal(self):
        cases = (("nbhd1d:256:9:dil=2:stride=3", nbhd_rule([256], [9], [2], [3])),
                 ("nbhd1d:256:16:causal=1:stride=4",
                  nbhd_rule([256], [16], stride=[4], causal=[True])),
                 ("nbhd2d:8x32:3x8:dil=2x3:causal=1x0",
                  nbhd_rule([8, 32], [3, 8], [2, 3], causal=[True, False])),
                 ("nbhd3d:4x8x8:3x3x5:stride=1x3x5:causal=1x0x0",
                  nbhd_rule([4, 8, 8], [3, 3, 5], stride=[1, 3, 5], causal=[True, False, False])))
        for spec, rule in cases:
            with self.subTest(spec=spec):
                self.check_equals_dense(spec, rule)

    def test_sink_prefix_doc(self):
        self.check_equals_dense("sink:4:32", lambda h, i, j: j <= i and (j < 4 or i - j < 32))
        self.check_equals_dense("prefix:40", lambda h, i, j: j <= i or j < 40)
        starts = [0, 100, 150, 256]
        doc = lambda x: max(d for d in range(3) if starts[d] <= x)
        self.check_equals_dense("doc:100,50,106", lambda h, i, j: doc(i) == doc(j))
        self.check_equals_dense("doc:100,50,106", lambda h, i, j: doc(i) == doc(j) and j <= i,
                                "--causal")

    def test_shift_and_group_sink(self):
        G, N = 64, self.N

        def shift_rule(h, i, j):
            # LongLoRA: the second half of the heads rolled by -G/2 (the first G/2 tokens join
            # the last group), causal in the rolled order.
            r = (lambda x: (x - G // 2) % N) if h >= self.H // 2 else (lambda x: x)
            return r(i) // G == r(j) // G and r(j) <= r(i)
        self.check_equals_dense("shift:64", shift_rule)
        self.check_equals_dense("group-sink:64:4",
                                lambda h, i, j: j <= i and (i // G == j // G or j < 4))

    def test_s2(self):
        self.check_equals_dense("s2:32:2:4", s2_rule(self.H, 32, 2, 4))

    def test_combinations(self):
        nbhd = nbhd_rule([16, 16], [5, 5])
        doc = lambda x: 0 if x < 128 else 1
        self.check_equals_dense("nbhd2d:16x16:5x5+doc:128,128",
                                lambda h, i, j: nbhd(h, i, j) and doc(i) == doc(j))
        self.check_equals_dense("sink:8:64+doc:128,128",
                                lambda h, i, j: doc(i) == doc(j) and j <= i and
                                (j < 8 or i - j < 64))
        # sigmoid + a structured mask equals sigmoid + the materialized one.
        got = self.run_mask("sigmoid:-2+nbhd2d:16x16:5x5", "s1.npy")
        write_npy(self.path("m.npy"), (self.N, self.N), mask_values(nbhd, 1, self.N, self.N),
                  "|b1")
        want = self.run_mask("dense:%s+sigmoid:-2" % self.path("m.npy"), "s2.npy")
        self.assert_close(got, want, 1e-5, "sigmoid + nbhd2d")

    def test_tree_chain_equals_causal(self):
        self.assert_ok(*run_cli("run", *self.io_args("causal.npy"), "--causal"))
        got = self.run_mask("tree-chain:%d" % self.N)
        self.assert_close(got, read_npy(self.path("causal.npy"))[3], 1e-5, "tree-chain")

    def test_tree_file_equals_dense(self):
        Sq, Sk = 64, 256
        self.make_inputs(1, Sq, Sk, self.H, self.H, self.D)
        rng = random.Random(3)
        parents = [rng.randrange(-1, t) for t in range(Sq)]
        write_npy(self.path("tree.npy"), (Sq,), parents, "<i4")
        got = self.run_mask("tree:" + self.path("tree.npy"), "tree_out.npy")

        def rule(h, i, j):
            if j < Sk - Sq:
                return True
            t, u = i, j - (Sk - Sq)
            while t >= 0 and t != u:
                t = parents[t]
            return t == u
        write_npy(self.path("tm.npy"), (Sq, Sk), mask_values(rule, 1, Sq, Sk), "|u1")
        want = self.run_mask("dense:" + self.path("tm.npy"), "tree_dense.npy")
        self.assert_close(got, want, 1e-5, "tree")

    def test_select_every_block_equals_unmasked(self):
        for causal in ([], ["--causal"]):
            with self.subTest(causal=causal):
                self.assert_ok(*run_cli("run", *self.io_args("plain.npy"), *causal))
                got = self.run_mask("select:topk=8:32x32", "sel.npy", *causal)
                self.assert_close(got, read_npy(self.path("plain.npy"))[3], 1e-5, "select")
        got = self.run_mask("select:thr=0.5")  # a real selection: runs, finite output
        self.assertTrue(all(math.isfinite(x) for x in got))

    def test_radial(self):
        got = self.run_mask("radial:8:32:32")
        self.assertTrue(all(math.isfinite(x) for x in got))
        self.assertEqual(read_npy(self.path("o.npy"))[2], (1, self.N, self.H, self.D))

    def test_verbose_reports_density(self):
        rc, out, err = run_cli("run", *self.io_args(), "--mask", "nbhd1d:256:32", "--verbose")
        self.assert_ok(rc, out, err)
        self.assertIn("density 0.125", err)

    def test_backward_takes_the_mask(self):
        write_npy(self.path("do.npy"), (1, self.N, self.H, self.D),
                  random_values(self.N * self.H * self.D, 9, "<f4"))
        write_npy(self.path("m.npy"), (self.N, self.N),
                  mask_values(nbhd_rule([256], [32]), 1, self.N, self.N), "|u1")
        dense = "dense:" + self.path("m.npy")
        # The gradients under a structured mask equal those under the same mask materialized;
        # sigmoid attention's backward runs without a log-sum-exp.
        for spec, same in (("nbhd1d:256:32", dense),
                           ("sigmoid:-2+nbhd1d:256:32", "sigmoid:-2+" + dense)):
            with self.subTest(spec=spec):
                grads = {}
                for tag, mask in (("s", spec), ("d", same)):
                    self.assert_ok(*run_cli(
                        "run", *self.io_args("o%s.npy" % tag), "--dout", self.path("do.npy"),
                        "--dq", self.path("dq%s.npy" % tag), "--dk", self.path("dk%s.npy" % tag),
                        "--dv", self.path("dv%s.npy" % tag), "--mask", mask))
                    grads[tag] = [read_npy(self.path("%s%s.npy" % (g, tag)))[3]
                                  for g in ("o", "dq", "dk", "dv")]
                for name, got, want in zip(("o", "dq", "dk", "dv"), grads["s"], grads["d"]):
                    self.assert_close(got, want, 1e-5, "%s: %s" % (spec, name))


class MaskReferenceTest(CliTestBase):
    """dense: and sigmoid against the fp64 reference (small shapes: the reference is Python)."""
    N, H, D = 24, 2, 8

    def setUp(self):
        super().setUp()
        self.q, self.k, self.v = self.make_inputs(1, self.N, self.N, self.H, self.H, self.D)

    def check(self, spec, rule, tol=1e-5, **options):
        self.assert_ok(*run_cli("run", *self.io_args(), "--mask", spec))
        want = reference_masked(self.q, self.k, self.v, self.N, self.N, self.H, self.D, rule,
                                **options)
        self.assert_close(read_npy(self.path("o.npy"))[3], want, tol, spec)

    def test_dense_bool_per_head(self):
        rng = random.Random(7)
        values = [rng.random() < 0.3 for _ in range(self.H * self.N * self.N)]
        values[:self.N] = [False] * self.N  # head 0, row 0 sees nothing: output 0
        write_npy(self.path("m.npy"), (1, self.H, self.N, self.N), values, "|b1")
        self.check("dense:" + self.path("m.npy"),
                   lambda h, i, j: values[(h * self.N + i) * self.N + j])
        self.assertEqual(read_npy(self.path("o.npy"))[3][:self.D], [0.0] * self.D)

    def test_dense_additive_f32(self):
        rng = random.Random(8)
        bias = round_to([-math.inf if rng.random() < 0.2 else rng.uniform(-2, 2)
                         for _ in range(self.N * self.N)], "<f4")
        write_npy(self.path("m.npy"), (self.N, self.N), bias)
        self.check("dense:" + self.path("m.npy"), lambda h, i, j: True, additive=bias)

    def test_sigmoid(self):
        self.check("sigmoid:-1.5", lambda h, i, j: True, sigmoid_bias=-1.5)
        self.check("sigmoid", lambda h, i, j: True, sigmoid_bias=0.0)
        self.check("sigmoid:-1+nbhd1d:24:5", nbhd_rule([24], [5]), sigmoid_bias=-1.0)


class MaskErrorTest(CliTestBase):
    def setUp(self):
        super().setUp()
        self.make_inputs(1, 64, 64, 2, 2, 8)

    def assert_mask_error(self, spec, *needles, extra=()):
        rc, _, err = run_cli("run", *self.io_args(), "--mask", spec, *extra)
        self.assert_error(rc, err, *needles)
        self.assertFalse(os.path.exists(self.path("o.npy")), "nothing may be written on error")
        return err

    def test_bad_specs(self):
        # An empty spec is refused like any empty value (test_main.py).
        for spec, needles in (
                ("checkerboard:4", ["unknown mask form 'checkerboard'", "nbhd2d"]),
                ("nbhd2d:8x8:3", ["nbhd2d", "window", "'3'"]),
                ("nbhd2d:8x8", ["nbhd2d:HxW:KHxKW"]),
                ("nbhd2d:8x8:3x3:dil=0x1", ["dil="]),
                ("nbhd2d:8x8:3x3:causal=2x0", ["causal="]),
                ("nbhd2d:8x8:3x3:stride=4x1", ["stride <= window"]),
                ("nbhd2d:8x8:3x3:size=1x1", ["options"]),
                ("nbhd1d:64:40:dil=2", ["window x dilation <= grid"]),
                ("sink:4", ["sink:S:W"]),
                ("sink:4:0", ["window W"]),
                ("prefix:x", ["prefix length"]),
                ("prefix:65", ["P <= Sk = 64"]),
                ("doc:30,30", ["summing to Sk = 64", "60"]),
                ("doc:30,,34", ["document lengths"]),
                ("shift:6", ["even", "G = 6"]),
                ("group-sink:48:4", ["dividing", "G = 48"]),
                ("s2:24:1:4", ["multiple of 16"]),
                ("radial:4:8", ["FRAMES x TOKENS_PER_FRAME", "32"]),
                ("select:topk=0", ["topk=K"]),
                ("select:thr=1.5", ["thr=T"]),
                ("select:topk=2:20x20", ["BQxBK", "'20x20'"]),
                ("tree-chain:32", ["T = Sq"]),
                ("sigmoid:abc", ["BIAS"]),
                ("block:" + "m.npy", ["block:FILE.npy:BQxBK"]),
                ("s2:16:1:2+select:topk=1", ["'s2' and 'select' both set the block mask"]),
                ("sink:4:8+group-sink:16:4", ["both set the sink tokens"]),
                ("sigmoid+sigmoid:1", ["both set the score function"])):
            with self.subTest(spec=spec):
                err = self.assert_mask_error(spec, *needles)
                self.assertIn("--mask '%s'" % spec, err)

    def test_wrong_npy_dtype_and_shape(self):
        write_npy(self.path("f.npy"), (4, 4), [1.0] * 16)
        self.assert_mask_error("block:%s:16x16" % self.path("f.npy"), "f.npy", "'<f4'", "uint8",
                               "bool")
        write_npy(self.path("b.npy"), (4, 5), [1] * 20, "|u1")
        self.assert_mask_error("block:%s:16x16" % self.path("b.npy"), "b.npy", "(4, 4)",
                               "got (4, 5)")
        write_npy(self.path("b3.npy"), (3, 2, 4, 4), [1] * 96, "|u1")
        self.assert_mask_error("block:%s:16x16" % self.path("b3.npy"), "got (3, 2, 4, 4)")
        write_npy(self.path("t.npy"), (64,), list(range(-1, 63)), "<i8")
        self.assert_mask_error("tree:" + self.path("t.npy"), "t.npy", "'<i8'", "int32")
        write_npy(self.path("t.npy"), (64,), [-1] + [5] * 63, "<i4")
        self.assert_mask_error("tree:" + self.path("t.npy"), "parents[t] in [-1, t)")
        write_npy(self.path("d.npy"), (64, 64), [0.0] * 4096, "<f2")
        self.assert_mask_error("dense:" + self.path("d.npy"), "'<f2'", "float32")
        write_npy(self.path("d.npy"), (64, 63), [1] * (64 * 63), "|b1")
        self.assert_mask_error("dense:" + self.path("d.npy"), "(64, 64)", "got (64, 63)")
        self.assert_mask_error("dense:" + self.path("missing.npy"), "missing.npy")

    def test_grid_product_mismatch(self):
        self.assert_mask_error("nbhd2d:8x4:3x3", "grid", "8x4 = 32", "Sq = 64")
        self.assert_mask_error("nbhd3d:2x4x4:1x3x3", "2x4x4 = 32")

    def test_block_random_is_bench_only(self):
        self.assert_mask_error("block-random:0.5", "block-random", "bench")

    def test_sigmoid_has_no_lse_and_sink_owns_the_window(self):
        self.assert_mask_error("sigmoid", "--lse", "log-sum-exp",
                               extra=("--lse", self.path("l.npy")))
        self.assert_mask_error("sink:4:8", "--window", extra=("--window", "8,0"))

    def test_help_lists_the_forms(self):
        rc, out, _ = run_cli("run", "--help")
        self.assertEqual(rc, 0)
        for form in ("--mask", "block:FILE.npy:BQxBK", "nbhd2d", "group-sink", "tree-chain",
                     "sigmoid"):
            self.assertIn(form, out)
