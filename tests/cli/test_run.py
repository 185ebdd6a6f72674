# SPDX-License-Identifier: Apache-2.0
"""`tessera run`: the exact forward and backward against the fp64 reference, and bad inputs."""
import math
import os

from cli_util import CliTestBase, random_values, read_npy, round_to, run_cli, write_npy
from reference import reference, reference_backward


class RunTest(CliTestBase):
    def test_f32_gqa_with_lse(self):
        B, Sq, Sk, Hq, Hkv, D = 2, 5, 7, 4, 2, 8
        q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D)
        self.assert_ok(*run_cli("run", *self.io_args(), "--lse", self.path("lse.npy"),
                                "--threads", 2))
        descr, fortran, shape, out, _ = read_npy(self.path("o.npy"))
        self.assertEqual((descr, fortran, shape), ("<f4", False, (B, Sq, Hq, D)))
        ldescr, _, lshape, lse, _ = read_npy(self.path("lse.npy"))
        self.assertEqual((ldescr, lshape), ("<f4", (B, Hq, Sq)))
        want, want_lse = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D)
        self.assert_close(out, want, 1e-5, "out")
        self.assert_close(lse, want_lse, 1e-5, "lse")

    def test_f16_output_dtype_and_values(self):
        B, Sq, Sk, Hq, Hkv, D = 1, 6, 6, 2, 1, 16
        q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D, descr="<f2")
        self.assert_ok(*run_cli("run", *self.io_args(), "--lse", self.path("lse.npy")))
        descr, _, shape, out, _ = read_npy(self.path("o.npy"))
        self.assertEqual((descr, shape), ("<f2", (B, Sq, Hq, D)))
        self.assertEqual(read_npy(self.path("lse.npy"))[0], "<f4")
        want, _ = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D)
        # The output is rounded to f16 (relative 2^-11); |out| <= 1 here.
        self.assert_close(out, want, 1e-3, "f16 out")

    def test_attention_statistics(self):
        # --stats-window: the last W rows' key mass (per KV head, summed over its query heads),
        # its square and the rows' entropy, against probabilities computed here.
        B, Sq, Sk, Hq, Hkv, D, W = 1, 6, 9, 4, 2, 8, 3
        q, k, _ = self.make_inputs(B, Sq, Sk, Hq, Hkv, D)
        self.assert_ok(*run_cli("run", *self.io_args(), "--causal", "--stats-window", W,
                                "--stats-sum-gqa", "--key-mass", self.path("km.npy"),
                                "--key-mass-sq", self.path("km2.npy"),
                                "--row-entropy", self.path("ent.npy")))
        _, _, kshape, mass, _ = read_npy(self.path("km.npy"))
        _, _, _, mass_sq, _ = read_npy(self.path("km2.npy"))
        _, _, eshape, entropy, _ = read_npy(self.path("ent.npy"))
        self.assertEqual((kshape, eshape), ((B, Hkv, Sk), (B, Hq, W)))
        scale = 1.0 / math.sqrt(D)
        want = [0.0] * (Hkv * Sk)
        want_sq = [0.0] * (Hkv * Sk)
        for h in range(Hq):
            g = h // (Hq // Hkv)
            for w in range(W):
                i = Sq - W + w
                seen = range(i + Sk - Sq + 1)  # causal, bottom-right
                s = [scale * sum(q[(i * Hq + h) * D + d] * k[(j * Hkv + g) * D + d]
                                 for d in range(D)) for j in seen]
                m = max(s)
                z = sum(math.exp(x - m) for x in s)
                p = [math.exp(x - m) / z for x in s]
                for j, pj in enumerate(p):
                    want[g * Sk + j] += pj
                    want_sq[g * Sk + j] += pj * pj
                self.assertAlmostEqual(entropy[h * W + w], -sum(x * math.log(x) for x in p),
                                       delta=1e-4)
        self.assert_close(mass, want, 1e-5, "key_mass")
        self.assert_close(mass_sq, want_sq, 1e-5, "key_mass_sq")
        rc, _, err = run_cli("run", *self.io_args("o2.npy"), "--stats-window", W)
        self.assert_error(rc, err, "--key-mass")

    def test_causal_equals_window_bitwise(self):
        B, Sq, Sk, Hq, Hkv, D = 1, 9, 12, 2, 2, 8
        q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D)
        self.assert_ok(*run_cli("run", *self.io_args("causal.npy"), "--causal",
                                "--lse", self.path("lse_c.npy")))
        self.assert_ok(*run_cli("run", *self.io_args("window.npy"), "--window", "-1,0",
                                "--lse", self.path("lse_w.npy")))
        self.assertEqual(read_npy(self.path("causal.npy"))[4],
                         read_npy(self.path("window.npy"))[4])
        self.assertEqual(read_npy(self.path("lse_c.npy"))[4], read_npy(self.path("lse_w.npy"))[4])
        want, want_lse = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D, causal=True)
        self.assert_close(read_npy(self.path("causal.npy"))[3], want, 1e-5, "causal out")
        self.assert_close(read_npy(self.path("lse_c.npy"))[3], want_lse, 1e-5, "causal lse")

    def test_fully_masked_rows(self):
        # Sq > Sk with bottom-right causal: the first Sq - Sk rows see no key.
        B, Sq, Sk, Hq, Hkv, D = 1, 7, 4, 1, 1, 4
        q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D)
        self.assert_ok(*run_cli("run", *self.io_args(), "--causal", "--lse", self.path("l.npy")))
        want, want_lse = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D, causal=True)
        out, lse = read_npy(self.path("o.npy"))[3], read_npy(self.path("l.npy"))[3]
        self.assertEqual(lse[:3], [-math.inf] * 3)
        self.assertEqual(out[:3 * D], [0.0] * (3 * D))
        self.assert_close(out, want, 1e-5, "out")
        self.assert_close(lse, want_lse, 1e-5, "lse")

    def test_window_softcap_scale_alibi(self):
        B, Sq, Sk, Hq, Hkv, D = 1, 8, 8, 4, 2, 8
        q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D)
        slopes = round_to([0.5, 0.25, 0.125, 0.0625], "<f4")
        write_npy(self.path("alibi.npy"), (Hq,), slopes)
        self.assert_ok(*run_cli("run", *self.io_args(), "--window", "3,1", "--softcap", "2.5",
                                "--scale", "0.7", "--alibi", self.path("alibi.npy"),
                                "--lse", self.path("l.npy")))
        want, want_lse = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D, window=(3, 1), softcap=2.5,
                                   scale=0.7, alibi=slopes)
        self.assert_close(read_npy(self.path("o.npy"))[3], want, 1e-5, "out")
        self.assert_close(read_npy(self.path("l.npy"))[3], want_lse, 1e-5, "lse")

    def test_decode_shapes(self):
        # Sq <= 16 goes through the decode path inside AttentionForward.
        for Sq, causal, descr in ((1, False, "<f4"), (4, True, "<f4"), (1, True, "<f2")):
            with self.subTest(Sq=Sq, causal=causal, descr=descr):
                B, Sk, Hq, Hkv, D = 2, 37, 4, 2, 16
                q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D, descr=descr)
                self.assert_ok(*run_cli("run", *self.io_args(), "--lse", self.path("l.npy"),
                                        *(["--causal"] if causal else [])))
                want, want_lse = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D, causal=causal)
                tol = 1e-5 if descr == "<f4" else 1e-3  # f16 output rounding
                self.assert_close(read_npy(self.path("o.npy"))[3], want, tol, "out")
                self.assert_close(read_npy(self.path("l.npy"))[3], want_lse, 1e-5, "lse")

    def test_npy_version_2_input(self):
        B, Sq, Sk, Hq, Hkv, D = 1, 3, 3, 1, 1, 4
        q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D)
        write_npy(self.path("q.npy"), (B, Sq, Hq, D), q, version=2)
        self.assert_ok(*run_cli("run", *self.io_args()))
        want, _ = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D)
        self.assert_close(read_npy(self.path("o.npy"))[3], want, 1e-5, "out")


# Paths the backward tests run: the fp64 reference forced through --path (the CLI's plumbing
# checked independently of the kernel), the default path, and the generic kernel.
BACKWARD_PATHS = ("reference", None, "generic")


class RunBackwardTest(CliTestBase):
    def make_dout(self, B, Sq, Hq, D, descr="<f4", seed=11):
        dout = random_values(B * Sq * Hq * D, seed, descr)
        write_npy(self.path("do.npy"), (B, Sq, Hq, D), dout, descr)
        return dout

    def grad_args(self, tag=""):
        return ["--dout", self.path("do.npy"), "--dq", self.path("dq%s.npy" % tag),
                "--dk", self.path("dk%s.npy" % tag), "--dv", self.path("dv%s.npy" % tag)]

    def run_backward(self, path, *args, tag=""):
        """Runs forward + backward; returns {name: read_npy(...)} for o, dq, dk, dv."""
        extra = ["--path", path] if path else []
        self.assert_ok(*run_cli("run", *self.io_args("o%s.npy" % tag), *self.grad_args(tag),
                                *extra, *args))
        return {name: read_npy(self.path("%s%s.npy" % (name, tag)))
                for name in ("o", "dq", "dk", "dv")}

    def check_backward(self, shape, descr="<f4", rtol=1e-5, paths=BACKWARD_PATHS, args=(),
                       **options):
        B, Sq, Sk, Hq, Hkv, D = shape
        q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D, descr=descr)
        dout = self.make_dout(B, Sq, Hq, D, descr=descr)
        out, dq, dk, dv = reference_backward(q, k, v, dout, B, Sq, Sk, Hq, Hkv, D, **options)
        want = {"o": (out, (B, Sq, Hq, D)), "dq": (dq, (B, Sq, Hq, D)),
                "dk": (dk, (B, Sk, Hkv, D)), "dv": (dv, (B, Sk, Hkv, D))}
        results = {}
        for path in paths:
            tag = "_" + (path or "default")
            got = self.run_backward(path, *args, tag=tag)
            for name, (values, want_shape) in want.items():
                descr_got, fortran, shape_got, values_got, _ = got[name]
                what = "%s (path %s)" % (name, path or "default")
                self.assertEqual((descr_got, fortran, shape_got), (descr, False, want_shape),
                                 what)
                self.assert_close_rel(values_got, values, rtol, what)
            results[path] = got
        return results

    def test_f32_gqa(self):
        # No --lse: the CLI allocates the forward's LSE for the backward by itself.
        self.check_backward((2, 5, 7, 4, 2, 8), args=("--threads", 2))
        self.assertFalse([f for f in os.listdir(self.dir) if "lse" in f or ".tmp" in f])

    def test_causal_mqa_with_masked_rows(self):
        # Sq > Sk, bottom-right causal: the first Sq - Sk query rows see no key, so dq = 0 there.
        B, Sq, Sk, Hq, Hkv, D = 1, 7, 4, 2, 1, 8
        got = self.check_backward((B, Sq, Sk, Hq, Hkv, D), args=("--causal",), causal=True)
        for path, result in got.items():
            self.assertEqual(result["dq"][3][:3 * Hq * D], [0.0] * (3 * Hq * D), path)

    def test_causal_square_gqa(self):
        self.check_backward((2, 9, 9, 4, 2, 16), args=("--causal",), causal=True)

    def test_window_softcap_scale_alibi(self):
        B, Sq, Sk, Hq, Hkv, D = 1, 8, 8, 4, 2, 8
        slopes = round_to([0.5, 0.25, 0.125, 0.0625], "<f4")
        write_npy(self.path("alibi.npy"), (Hq,), slopes)
        self.check_backward((B, Sq, Sk, Hq, Hkv, D),
                            args=("--window", "3,1", "--softcap", "2.5", "--scale", "0.7",
                                  "--alibi", self.path("alibi.npy")),
                            window=(3, 1), softcap=2.5, scale=0.7, alibi=slopes)

    def test_fast_head_dim(self):
        # D = 64 has a compile-time instantiation: the default path takes it.
        self.check_backward((1, 6, 10, 2, 1, 64), paths=(None, "fast"), causal=True,
                            args=("--causal",))

    def test_f16(self):
        # Gradients are written in f16 (relative 2^-11) from fp32 accumulation.
        self.check_backward((1, 6, 6, 2, 1, 16), descr="<f2", rtol=2e-3, paths=(None,))

    def test_lse_and_determinism_across_threads(self):
        B, Sq, Sk, Hq, Hkv, D = 1, 33, 40, 4, 2, 8
        self.make_inputs(B, Sq, Sk, Hq, Hkv, D)
        self.make_dout(B, Sq, Hq, D)
        one = self.run_backward(None, "--threads", 1, "--lse", self.path("l1.npy"), tag="1")
        two = self.run_backward(None, "--threads", 2, "--lse", self.path("l2.npy"), tag="2")
        for name in one:
            self.assertEqual(one[name][4], two[name][4], name + ": threads 1 vs 2, bitwise")
        # --lse next to the backward is the forward's own LSE.
        self.assert_ok(*run_cli("run", *self.io_args("o3.npy"), "--lse", self.path("l3.npy")))
        self.assertEqual(read_npy(self.path("l1.npy"))[4], read_npy(self.path("l3.npy"))[4])
        self.assertEqual(read_npy(self.path("l2.npy"))[4], read_npy(self.path("l3.npy"))[4])

    def test_verbose_reports_backward(self):
        self.make_inputs(1, 4, 4, 1, 1, 8)
        self.make_dout(1, 4, 1, 8)
        rc, out, err = run_cli("run", *self.io_args(), *self.grad_args(), "--verbose")
        self.assert_ok(rc, out, err)
        self.assertIn("backward", err)


class RunErrorTest(CliTestBase):
    def setUp(self):
        super().setUp()
        self.make_inputs(1, 4, 4, 2, 2, 8)

    def assert_no_output(self):
        self.assertFalse(os.path.exists(self.path("o.npy")), "nothing may be written on error")

    def test_missing_file(self):
        args = self.io_args()
        args[1] = self.path("nope.npy")
        rc, _, err = run_cli("run", *args)
        self.assert_error(rc, err, "nope.npy")
        self.assert_no_output()

    def test_missing_required_flag(self):
        rc, _, err = run_cli("run", "--q", self.path("q.npy"))
        self.assert_error(rc, err)

    def test_mismatched_head_dim(self):
        write_npy(self.path("k.npy"), (1, 4, 2, 6), [0.0] * 48)
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "head dim")
        self.assert_no_output()

    def test_mismatched_k_v(self):
        write_npy(self.path("v.npy"), (1, 5, 2, 8), [0.0] * 80)
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "v:")
        self.assert_no_output()

    def test_heads_not_divisible(self):
        write_npy(self.path("q.npy"), (1, 4, 3, 8), [0.0] * 96)
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "KV head")
        self.assert_no_output()

    def test_bad_window(self):
        for window in ("3", "a,b", "-2,0", "1,2,3", ""):
            rc, _, err = run_cli("run", *self.io_args(), "--window=" + window)
            self.assert_error(rc, err)
            self.assertIn("--window", err, window)
        self.assert_no_output()

    def test_mixed_dtypes(self):
        write_npy(self.path("k.npy"), (1, 4, 2, 8), [0.0] * 64, descr="<f2")
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "dtype")

    def test_unsupported_dtype(self):
        write_npy(self.path("q.npy"), (1, 4, 2, 8), [0.0] * 64, descr="<f8")
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "<f8", "q.npy")

    def test_fortran_order(self):
        write_npy(self.path("q.npy"), (1, 4, 2, 8), [0.0] * 64, fortran=True)
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "Fortran")

    def test_truncated(self):
        with open(self.path("q.npy"), "rb") as f:
            data = f.read()
        with open(self.path("q.npy"), "wb") as f:
            f.write(data[:-5])
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "truncated")

    def test_bad_header(self):
        with open(self.path("q.npy"), "wb") as f:
            f.write(b"\x93NUMPY\x01\x00\x10\x00{'descr': 3}    \n")
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "header")
        with open(self.path("q.npy"), "wb") as f:
            f.write(b"not an npy file")
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "not a .npy")

    def test_wrong_rank(self):
        write_npy(self.path("q.npy"), (4, 2, 8), [0.0] * 64)
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "rank-4")

    def test_bad_alibi(self):
        write_npy(self.path("a.npy"), (3,), [0.1, 0.2, 0.3])
        rc, _, err = run_cli("run", *self.io_args(), "--alibi", self.path("a.npy"))
        self.assert_error(rc, err, "alibi")
        write_npy(self.path("a.npy"), (1, 1, 1, 1, 2), [0.1, 0.2])  # rank 5: no crash
        rc, _, err = run_cli("run", *self.io_args(), "--alibi", self.path("a.npy"))
        self.assert_error(rc, err, "alibi")

    def test_unwritable_lse_writes_nothing(self):
        rc, _, err = run_cli("run", *self.io_args(), "--lse",
                             os.path.join(self.dir, "no_such_dir", "l.npy"))
        self.assert_error(rc, err, "no_such_dir")
        self.assert_no_output()
        self.assertEqual(sorted(os.listdir(self.dir)), ["k.npy", "q.npy", "v.npy"])

    def grad_args(self):
        return ["--dout", self.path("do.npy"), "--dq", self.path("dq.npy"),
                "--dk", self.path("dk.npy"), "--dv", self.path("dv.npy")]

    def assert_only_inputs(self, *extra):
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(["k.npy", "q.npy", "v.npy"] +
                                                               list(extra)))

    def test_partial_backward_flags(self):
        write_npy(self.path("do.npy"), (1, 4, 2, 8), [0.5] * 64)
        flags = self.grad_args()
        for drop in ((0,), (1,), (3,), (1, 2, 3), (0, 2)):
            args = [a for i, a in enumerate(flags) if i // 2 not in drop]
            rc, _, err = run_cli("run", *self.io_args(), *args)
            self.assert_error(rc, err, "--dout, --dq, --dk and --dv together")
            for i in drop:
                self.assertIn(flags[2 * i], err.split("without")[-1], (drop, err))
            self.assert_only_inputs("do.npy")

    def test_bad_dout(self):
        for shape, descr, needle in (((1, 4, 2, 6), "<f4", "dout"),
                                     ((1, 4, 2, 8), "<f2", "dtype"),
                                     ((4, 2, 8), "<f4", "rank-4")):
            n = 1
            for d in shape:
                n *= d
            write_npy(self.path("do.npy"), shape, [0.5] * n, descr)
            rc, _, err = run_cli("run", *self.io_args(), *self.grad_args())
            self.assert_error(rc, err, needle)
            self.assert_only_inputs("do.npy")
        os.remove(self.path("do.npy"))
        rc, _, err = run_cli("run", *self.io_args(), *self.grad_args())
        self.assert_error(rc, err, "do.npy")
        self.assert_only_inputs()

    def test_unwritable_gradient_writes_nothing(self):
        write_npy(self.path("do.npy"), (1, 4, 2, 8), [0.5] * 64)
        args = self.grad_args()
        args[-1] = os.path.join(self.dir, "no_such_dir", "dv.npy")
        rc, _, err = run_cli("run", *self.io_args(), "--lse", self.path("l.npy"), *args)
        self.assert_error(rc, err, "no_such_dir")
        self.assert_only_inputs("do.npy")

    def test_same_output_twice(self):
        write_npy(self.path("do.npy"), (1, 4, 2, 8), [0.5] * 64)
        args = self.grad_args()
        args[5] = args[3]  # --dk on --dq's file
        rc, _, err = run_cli("run", *self.io_args(), *args)
        self.assert_error(rc, err, "--dq and --dk")
        rc, _, err = run_cli("run", *self.io_args(), "--lse", self.path("o.npy"))
        self.assert_error(rc, err, "--out and --lse")
        self.assert_only_inputs("do.npy")

    def test_bad_path_and_threads(self):
        rc, _, err = run_cli("run", *self.io_args(), "--path", "bogus")
        self.assert_error(rc, err, "--path")
        rc, _, err = run_cli("run", *self.io_args(), "--threads", "-3")
        self.assert_error(rc, err, "--threads")
