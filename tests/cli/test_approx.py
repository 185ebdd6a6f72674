# SPDX-License-Identifier: Apache-2.0
"""`tessera bench --op approx` and `tessera run --op approx`: every method end to end, the
settings under which a method is exact against the fp64 reference, and the knob checks."""
import json
import math
import unittest

from cli_util import CliTestBase, read_npy, run_cli
from reference import reference

METHODS = ["wersa", "hyper", "performer", "agent", "routing", "hilo"]
LSE_METHODS = ["hyper", "routing", "hilo"]
# B, S, Hq, Hkv, D: S = 64 is an 8 x 8 grid for HiLo.
SHAPE = (1, 64, 4, 2, 16)


def rel_error(got, want):
    num = sum((a - b) ** 2 for a, b in zip(got, want))
    den = sum(b * b for b in want)
    return math.sqrt(num / den)


class ApproxBenchTest(unittest.TestCase):
    def bench(self, method, *args, seq=256):
        rc, out, err = run_cli("bench", "--op", "approx", "--method", method, "--seq", seq,
                               "--heads", 4, "--kv-heads", 2, "--dim", 32, "--reps", 1,
                               "--warmup", 0, "--threads", 1, "--vs", "exact", "--json", *args)
        self.assertEqual(rc, 0, err)
        r = json.loads(out)
        for key in ("op", "method", "ms", "baseline_ms", "speedup", "rel_error", "tokens_per_s",
                    "peak_rss_mb", "baseline_frac_peak"):
            self.assertIn(key, r)
        self.assertEqual((r["op"], r["method"], r["seq"]), ("approx", method, seq))
        self.assertTrue(math.isfinite(r["rel_error"]), r)
        self.assertGreater(r["speedup"], 0)
        self.assertEqual("lse_error" in r, method in LSE_METHODS)
        return r

    def test_every_method(self):
        for method in METHODS:
            with self.subTest(method=method):
                self.bench(method)
        for method in ("performer", "wersa", "hyper", "routing"):
            with self.subTest(method=method, causal=True):
                self.assertTrue(self.bench(method, "--causal")["causal"])
        r = self.bench("performer", "--inputs", "peaked", "--features", 64)
        self.assertEqual((r["inputs"], r["features"]), ("peaked", 64))

    def test_exact_settings(self):
        # HyperAttention below min_seq_len is the exact kernel.
        r = self.bench("hyper", "--causal")
        self.assertLess(r["rel_error"], 1e-5)
        self.assertLess(r["lse_error"], 1e-4)
        # One routing cluster holding every token is (causal) attention.
        r = self.bench("routing", "--clusters", 1, "--window", 256, "--causal")
        self.assertLess(r["rel_error"], 1e-5)
        # One HiLo window covering the grid (Hi-Fi heads only) is full attention.
        r = self.bench("hilo", "--grid", "16x16", "--window", 16, "--lofi-heads", 0)
        self.assertLess(r["rel_error"], 1e-5)

    def test_bad_knobs(self):
        cases = [
            (["--op", "approx"], "--method"),
            (["--op", "approx", "--method", "flash"], "--method"),
            (["--op", "approx", "--method", "hyper", "--features", 8], "--features"),
            (["--op", "approx", "--method", "performer", "--block", 16], "--block"),
            (["--op", "approx", "--method", "performer", "--inputs", "spiky"], "--inputs"),
            (["--op", "approx", "--method", "performer", "--seq-k", 9], "--seq-k"),
            (["--op", "approx", "--method", "performer", "--dtype", "bf16"], "--dtype"),
            (["--op", "approx", "--method", "hilo", "--grid", "8by8"], "--grid"),
            (["--op", "forward", "--method", "hyper"], "--method"),
            (["--op", "approx", "--method", "hyper", "--block", 20, "--seq", 64], "block"),
        ]
        for args, needle in cases:
            with self.subTest(args=args):
                rc, out, err = run_cli("bench", *args, "--reps", 1, "--warmup", 0)
                self.assertEqual(rc, 2, err)
                self.assertIn(needle, err)
                self.assertEqual(out, "")


class ApproxRunTest(CliTestBase):
    def setUp(self):
        super().setUp()
        B, S, Hq, Hkv, D = SHAPE
        self.q, self.k, self.v = self.make_inputs(B, S, S, Hq, Hkv, D)

    def run_approx(self, method, *args, out="o.npy"):
        self.assert_ok(*run_cli("run", "--op", "approx", "--method", method,
                                *self.io_args(out), *args))
        _, _, shape, values, _ = read_npy(self.path(out))
        return shape, values

    def exact(self, causal=False):
        B, S, Hq, Hkv, D = SHAPE
        return reference(self.q, self.k, self.v, B, S, S, Hq, Hkv, D, causal=causal)

    def test_every_method_writes_its_output(self):
        B, S, Hq, Hkv, D = SHAPE
        for method in METHODS:
            with self.subTest(method=method):
                shape, values = self.run_approx(method, "--seed", 3)
                self.assertEqual(shape, (B, S, Hq, D))
                self.assertTrue(all(math.isfinite(x) for x in values))
                # Deterministic: the same seed gives the same bits.
                _, again = self.run_approx(method, "--seed", 3, out="o2.npy")
                self.assertEqual(values, again)

    def test_exact_settings_match_the_reference(self):
        B, S, Hq, Hkv, D = SHAPE
        out = self.exact(causal=True)[0]
        _, got = self.run_approx("hyper", "--causal")
        self.assertLess(rel_error(got, out), 1e-5)
        _, got = self.run_approx("routing", "--causal", "--clusters", 1, "--window", S)
        self.assertLess(rel_error(got, out), 1e-5)
        full = self.exact(causal=False)[0]
        _, got = self.run_approx("hilo", "--grid", "8x8", "--window", 8, "--lofi-heads", 0)
        self.assertLess(rel_error(got, full), 1e-5)
        # Lo-Fi heads with s = 1 pool nothing: full attention too.
        _, got = self.run_approx("hilo", "--grid", "8x8", "--window", 1, "--lofi-heads", Hq)
        self.assertLess(rel_error(got, full), 1e-5)

    def test_lse_and_centroids(self):
        B, S, Hq, Hkv, D = SHAPE
        self.assert_ok(*run_cli("run", "--op", "approx", "--method", "hyper", *self.io_args(),
                                "--lse", self.path("lse.npy")))
        _, _, shape, lse, _ = read_npy(self.path("lse.npy"))
        self.assertEqual(shape, (B, Hq, S))
        _, want = self.exact()
        self.assertLess(max(abs(a - b) for a, b in zip(lse, want)), 1e-4)
        self.assert_ok(*run_cli("run", "--op", "approx", "--method", "routing", *self.io_args(),
                                "--clusters", 4, "--centroids-out", self.path("c.npy")))
        _, _, shape, _, _ = read_npy(self.path("c.npy"))
        self.assertEqual(shape, (Hq, 4, D))

    def test_backward(self):
        B, S, Hq, Hkv, D = SHAPE
        for method in ("performer", "wersa"):
            with self.subTest(method=method):
                self.assert_ok(*run_cli("run", "--op", "approx", "--method", method,
                                        *self.io_args(), "--seed", 1))
                args = ["--dout", self.path("o.npy"), "--dq", self.path("dq.npy"),
                        "--dk", self.path("dk.npy"), "--dv", self.path("dv.npy")]
                self.assert_ok(*run_cli("run", "--op", "approx", "--method", method,
                                        *self.io_args("o2.npy"), "--seed", 1, *args))
                # The forward's output comes with the gradients, the same bits.
                self.assertEqual(read_npy(self.path("o2.npy"))[3], read_npy(self.path("o.npy"))[3])
                for name, want in (("dq", (B, S, Hq, D)), ("dk", (B, S, Hkv, D)),
                                   ("dv", (B, S, Hkv, D))):
                    _, _, shape, values, _ = read_npy(self.path(name + ".npy"))
                    self.assertEqual(shape, want)
                    self.assertTrue(all(math.isfinite(x) for x in values))
        rc, _, err = run_cli("run", "--op", "approx", "--method", "hyper",
                             *self.io_args("o3.npy"), "--dout", self.path("o.npy"),
                             "--dq", self.path("dq.npy"), "--dk", self.path("dk.npy"),
                             "--dv", self.path("dv.npy"))
        self.assert_error(rc, err, "backward")

    def test_bad_options(self):
        cases = [
            (["--method", "hyper", "--clusters", 3], "--clusters"),
            (["--method", "performer", "--centroids-out", self.path("c.npy")], "--centroids-out"),
            (["--method", "hyper", "--wersa-gates", self.path("q.npy")], "--wersa-gates"),
            (["--method", "performer", "--softcap", 1], "--softcap"),
            (["--method", "performer", "--features", 0], "features"),
        ]
        for args, needle in cases:
            with self.subTest(args=args):
                rc, _, err = run_cli("run", "--op", "approx", *self.io_args(), *args)
                self.assert_error(rc, err, needle)
        rc, _, err = run_cli("run", *self.io_args(), "--method", "hyper")
        self.assert_error(rc, err, "--method")


if __name__ == "__main__":
    unittest.main()
