# SPDX-License-Identifier: Apache-2.0
"""`tessera bench --op linear`: the variants, forms, --lrpe and --vs exact."""
import json
import unittest

from cli_util import run_cli


LINEAR_BENCH_KEYS = ["op", "variant", "form", "dtype", "batch", "heads", "kv_heads", "seq",
                     "dim_qk", "dim_v", "feature_map", "feature_dim", "lrpe", "normalize", "causal",
                     "window", "chunk", "threads", "flops", "peak_gflops", "ms", "ms_min", "reps",
                     "tokens_per_s", "gflops", "frac_peak", "peak_rss_mb", "simd_target"]


class LinearBenchTest(unittest.TestCase):
    def bench_linear(self, variant, *args, seq=64, heads=2, dim=16):
        rc, out, err = run_cli("bench", "--op", "linear", "--variant", variant, "--batch", 1,
                               "--heads", heads, "--seq", seq, "--dim", dim, "--reps", 2,
                               "--warmup", 1, "--threads", 1, "--json", *args)
        self.assertEqual(rc, 0, err)
        r = json.loads(out)  # exactly one JSON object
        for key in LINEAR_BENCH_KEYS:
            self.assertIn(key, r)
        self.assertEqual((r["op"], r["variant"], r["seq"], r["heads"]),
                         ("linear", variant, seq, heads))
        self.assertGreater(r["ms"], 0)
        self.assertAlmostEqual(r["tokens_per_s"], r["batch"] * seq / (r["ms"] * 1e-3),
                               delta=1e-6 * r["tokens_per_s"])
        self.assertAlmostEqual(r["gflops"], r["flops"] / (r["ms"] * 1e-3) * 1e-9,
                               delta=1e-6 * r["gflops"])
        self.assertLess(r["peak_rss_mb"], 1024)
        return r

    def test_variants(self):
        r = self.bench_linear("plain")
        self.assertEqual((r["feature_map"], r["feature_dim"], r["normalize"], r["window"],
                          r["form"], r["dim_qk"], r["dim_v"]),
                         ("identity", 16, False, 0, "chunked", 16, 16))
        self.assertAlmostEqual(r["flops"], 2 * 64 * 4 * 16 * 16, places=3)
        r = self.bench_linear("decay", "--kv-heads", 1, heads=4)
        self.assertEqual((r["kv_heads"], len(r["decay"])), (1, 4))
        self.assertTrue(all(0 < x < 1 for x in r["decay"]))
        self.bench_linear("gla", "--normalize", "--chunk", 32)
        # BASED: q/k at --feature-dim (16 by default, F = 273), normalized, window 64.
        r = self.bench_linear("based")
        self.assertEqual((r["feature_map"], r["dim_qk"], r["feature_dim"], r["normalize"],
                          r["window"]), ("taylor2", 16, 273, True, 64))
        r = self.bench_linear("based", "--feature-dim", 4, "--dim-v", 8, "--window", 0,
                              "--no-normalize")
        self.assertEqual((r["dim_qk"], r["dim_v"], r["feature_dim"], r["normalize"],
                          r["window"]), (4, 8, 21, False, 0))

    def test_lrpe(self):
        # F = 2 Dk, so the FLOP count doubles (4 * N * F * Dv per head).
        r = self.bench_linear("plain", "--lrpe")
        self.assertEqual((r["lrpe"], r["feature_map"], r["dim_qk"], r["feature_dim"]),
                         (True, "identity", 16, 32))
        self.assertAlmostEqual(r["flops"], 2 * 64 * 4 * 32 * 16, places=3)
        self.assertIs(self.bench_linear("plain")["lrpe"], False)
        r = self.bench_linear("decay", "--lrpe", "--feature-map", "elu1", "--normalize",
                              "--form", "recurrent", "--kv-heads", 1, heads=4)
        self.assertEqual((r["lrpe"], r["feature_dim"], r["normalize"], r["form"]),
                         (True, 32, True, "recurrent"))
        self.assertAlmostEqual(r["flops"], 4 * 64 * (4 * 32 * 16 + 4 * 32), places=3)
        rc, out, err = run_cli("bench", "--op", "linear", "--lrpe", "--seq", 64, "--heads", 1,
                               "--dim", 16, "--reps", 1, "--threads", 1)
        self.assertEqual(rc, 0, err)
        self.assertIn("lrpe=yes", out)
        self.assertIn("F=32", out)

    def test_recurrent_form(self):
        r = self.bench_linear("decay", "--form", "recurrent")
        self.assertEqual(r["form"], "recurrent")

    def test_vs_exact(self):
        r = self.bench_linear("plain", "--vs", "exact", seq=128)
        for key in ("baseline", "baseline_ms", "baseline_tokens_per_s", "speedup"):
            self.assertIn(key, r)
        self.assertEqual((r["baseline"], r["baseline_causal"], r["baseline_dim"]),
                         ("exact", True, 16))
        self.assertGreater(r["baseline_ms"], 0)
        self.assertEqual(r["baseline_reps"], r["reps"])
        self.assertAlmostEqual(r["speedup"], r["baseline_ms"] / r["ms"], places=9)

    def test_human_output(self):
        rc, out, err = run_cli("bench", "--op", "linear", "--variant", "gla", "--seq", 64,
                               "--heads", 1, "--dim", 16, "--reps", 2, "--threads", 1,
                               "--vs", "exact")
        self.assertEqual(rc, 0, err)
        for needle in ("variant=gla", "tokens/s", "tessera linear", "tessera exact", "speedup"):
            self.assertIn(needle, out)

    def test_errors(self):
        base = ["bench", "--op", "linear", "--seq", 32, "--dim", 8, "--reps", 1, "--threads", 1]
        for args, needle in ((["--variant", "rwkv"], "--variant"),
                             (["--vs", "naive"], "--vs"),
                             (["--feature-dim", 4], "--feature-dim"),
                             (["--seq-k", 16], "--seq-k"),
                             (["--mask", "sink:4:8"], "--mask"),
                             (["--baseline-only"], "--baseline-only"),
                             (["--chunk", 24], "--chunk"),
                             (["--form", "scan"], "--form"),
                             (["--feature-map", "cos"], "--feature-map"),
                             (["--variant", "based", "--non-causal"], "--non-causal"),
                             (["--variant", "gla", "--non-causal"], "--non-causal"),
                             (["--heads", 3, "--kv-heads", 2], "--kv-heads")):
            with self.subTest(args=args):
                rc, out, err = run_cli(*base, *args)
                self.assertEqual(rc, 2, "%s: %s" % (args, err))
                self.assertIn(needle, err)
                self.assertEqual(out, "")
        rc, out, err = run_cli("bench", "--op", "forward", "--seq", 32, "--dim", 8, "--variant",
                               "gla")
        self.assertEqual(rc, 2, err)
        self.assertIn("--variant", err)

    def test_lrpe_errors(self):
        # Refused by name with the other ops, gates, the Taylor map and LASP-2.
        for args, needles in (
                (["--op", "forward"], ("--lrpe", "only with --op linear")),
                (["--op", "decode"], ("--lrpe", "only with --op linear")),
                (["--op", "linear", "--variant", "gla"], ("--lrpe", "gla")),
                (["--op", "linear", "--variant", "based"], ("--lrpe", "taylor2")),
                (["--op", "linear", "--feature-map", "taylor2"], ("--lrpe", "taylor2")),
                (["--op", "linear", "--dist", "lasp2"], ("--lrpe",))):
            with self.subTest(args=args):
                rc, out, err = run_cli("bench", *args, "--lrpe", "--seq", 32, "--dim", 8,
                                       "--reps", 1, "--threads", 1)
                self.assertEqual(rc, 2, "%s: %s" % (args, err))
                for needle in needles:
                    self.assertIn(needle, err)
                self.assertEqual(out, "")
