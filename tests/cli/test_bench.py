# SPDX-License-Identifier: Apache-2.0
"""`tessera bench --op forward|backward`: the JSON and table reports, baselines, errors."""
import json
import unittest

from cli_util import BENCH_KEYS, run_cli


VS_KEYS = ["baseline", "baseline_ms", "baseline_gflops", "speedup", "max_abs_diff"]


class BenchTest(unittest.TestCase):
    def bench_json(self, *args, op="forward", heads=2, kv_heads=1):
        rc, out, err = run_cli("bench", "--op", op, "--batch", 1, "--heads", heads,
                               "--kv-heads", kv_heads, "--seq", 48, "--dim", 32, "--reps", 3,
                               "--threads", 1, "--json", *args)
        self.assertEqual(rc, 0, err)
        return json.loads(out)  # exactly one JSON object: json.loads rejects trailing text

    def test_bench_json_vs_naive(self):
        r = self.bench_json("--vs", "naive", "--seq-k", 40)
        for key in BENCH_KEYS + VS_KEYS:
            self.assertIn(key, r)
        self.assertEqual((r["op"], r["dtype"], r["batch"], r["heads"], r["kv_heads"]),
                         ("forward", "f32", 1, 2, 1))
        self.assertEqual((r["seq_q"], r["seq_k"], r["dim"], r["causal"], r["threads"]),
                         (48, 40, 32, False, 1))
        self.assertGreater(r["ms"], 0)
        self.assertGreater(r["baseline_ms"], 0)
        self.assertGreater(r["peak_gflops"], 1)
        self.assertAlmostEqual(r["gflops"], 4 * 2 * 48 * 40 * 32 / (r["ms"] * 1e-3) * 1e-9,
                               delta=1e-6 * r["gflops"])
        self.assertAlmostEqual(r["frac_peak"], r["gflops"] / r["peak_gflops"], places=9)
        self.assertGreater(r["frac_peak"], 0)
        self.assertLess(r["frac_peak"], 1.5)
        self.assertGreater(r["peak_rss_mb"], 1)
        self.assertLess(r["peak_rss_mb"], 1024)
        self.assertLess(r["max_abs_diff"], 1e-5)
        self.assertAlmostEqual(r["speedup"], r["baseline_ms"] / r["ms"], places=9)
        self.assertTrue(r["simd_target"])
        self.check_blas_fields(r)

    def check_blas_fields(self, r):
        # The baseline's GEMM rate next to a plain sgemm's, and the OpenBLAS core that ran both.
        self.assertGreater(r["baseline_gemm_gflops"], 0)
        self.assertGreater(r["sgemm_gflops"], 0)
        self.assertEqual(r["sgemm_n"], 2048)
        self.assertGreater(r["sgemm_over_baseline_gemm"], 0)
        self.assertGreater(r["sgemm_shapes_gflops"], 0)
        self.assertGreater(r["sgemm_shapes_over_baseline_gemm"], 0)
        self.assertTrue(r["blas_core"])
        self.assertIn("blas_core_forced_from", r)

    def test_bench_blas_fields_only_with_the_naive_baseline(self):
        r = self.bench_json()
        for key in ("baseline_gemm_gflops", "sgemm_gflops", "sgemm_shapes_gflops", "blas_core"):
            self.assertNotIn(key, r)
        self.check_blas_fields(self.bench_json("--baseline-only"))
        self.check_blas_fields(self.bench_json("--vs", "naive", op="backward"))

    def test_bench_causal_f16(self):
        r = self.bench_json("--causal", "--dtype", "f16", "--vs", "naive")
        self.assertEqual((r["dtype"], r["causal"]), ("f16", True))
        # Causal with Sq == Sk counts half the pairs.
        self.assertAlmostEqual(r["flops"], 2 * 2 * 48 * 48 * 32, places=3)
        self.assertLess(r["max_abs_diff"], 2e-3)  # the output is rounded to f16

    def test_bench_baseline_only(self):
        r = self.bench_json("--baseline-only")
        self.assertTrue(r["baseline_only"])
        self.assertNotIn("ms", r)
        self.assertGreater(r["baseline_ms"], 0)
        self.assertGreater(r["baseline_peak_rss_mb"], 1)

    def test_bench_backward_json_vs_naive(self):
        r = self.bench_json("--vs", "naive", "--seq-k", 40, op="backward")
        for key in BENCH_KEYS + VS_KEYS + ["forward_ms", "baseline_forward_ms"]:
            self.assertIn(key, r)
        self.assertEqual((r["op"], r["dtype"], r["heads"], r["kv_heads"], r["seq_q"], r["seq_k"]),
                         ("backward", "f32", 2, 1, 48, 40))
        # 2.5x the forward's 4 * H * Sq * Sk * D.
        self.assertAlmostEqual(r["flops"], 2.5 * 4 * 2 * 48 * 40 * 32, places=3)
        self.assertGreater(r["ms"], 0)
        self.assertGreater(r["baseline_ms"], 0)
        self.assertAlmostEqual(r["gflops"], r["flops"] / (r["ms"] * 1e-3) * 1e-9,
                               delta=1e-6 * r["gflops"])
        self.assertAlmostEqual(r["frac_peak"], r["gflops"] / r["peak_gflops"], places=9)
        self.assertGreater(r["peak_rss_mb"], 1)
        self.assertLess(r["peak_rss_mb"], 1024)
        self.assertLess(r["max_abs_diff"], 1e-5)  # over dq, dk and dv
        self.assertAlmostEqual(r["speedup"], r["baseline_ms"] / r["ms"], places=9)

    def test_bench_backward_causal_gqa_f16_reference_path(self):
        r = self.bench_json("--causal", "--dtype", "f16", "--vs", "naive", "--path", "reference",
                            op="backward", heads=4, kv_heads=2)
        self.assertEqual((r["dtype"], r["causal"], r["path"]), ("f16", True, "reference"))
        self.assertAlmostEqual(r["flops"], 2.5 * 2 * 4 * 48 * 48 * 32, places=3)
        self.assertLess(r["max_abs_diff"], 5e-3)  # the gradients are rounded to f16

    def test_bench_backward_baseline_only(self):
        r = self.bench_json("--baseline-only", "--causal", op="backward")
        self.assertTrue(r["baseline_only"])
        self.assertNotIn("ms", r)
        self.assertGreater(r["baseline_ms"], 0)
        self.assertGreater(r["baseline_peak_rss_mb"], 1)

    def test_bench_human_output(self):
        rc, out, err = run_cli("bench", "--seq", 32, "--heads", 1, "--dim", 16, "--reps", 3,
                               "--threads", 1, "--vs", "naive")
        self.assertEqual(rc, 0, err)
        self.assertIn("tessera", out)
        self.assertIn("naive-openblas", out)
        self.assertIn("speedup", out)

    def test_bench_errors(self):
        for args, needle in ((["--op", "nonsense"], "unknown op"),
                             (["--heads", 3, "--kv-heads", 2], "--kv-heads"),
                             (["--dtype", "f64"], "--dtype"),
                             (["--vs", "ggml"], "--vs")):
            rc, out, err = run_cli("bench", "--seq", 16, "--dim", 8, *args)
            self.assertEqual(rc, 2, "%s: %s" % (args, err))
            self.assertIn(needle, err)
            self.assertEqual(out, "")

    def test_bench_io(self):
        # The traffic model against a count by hand: B=1, H=1, N=Sq=Sk=192 (one query block of
        # the forward), D=16, f32, non-causal: Q and O once, K and V once each (no packing: one
        # block), the LSE.
        rc, out, err = run_cli("bench", "--seq", "192", "--heads", "1", "--dim", "16", "--io",
                               "--reps", "1", "--warmup", "0", "--json")
        self.assertEqual(rc, 0, err)
        r = json.loads(out)
        fwd = r["io_forward"]
        self.assertEqual(fwd["q_bytes"], 192 * 16 * 4)
        self.assertEqual(fwd["out_bytes"], 192 * 16 * 4)
        self.assertEqual(fwd["kv_bytes"], 2 * 192 * 16 * 4)
        self.assertEqual(fwd["other_bytes"], 192 * 4)
        self.assertEqual(r["io_model_bytes"], fwd["total_bytes"])
        if r["io_l2_bytes"] > 0:
            # N^2 d^2 / M elements of 4 bytes, M = L2 / 4.
            self.assertAlmostEqual(r["io_lower_bound_bytes"],
                                   192 * 192 * 16 * 16 / (r["io_l2_bytes"] / 4) * 4)
        self.assertTrue(r["io_measured_bytes"] is None or r["io_measured_bytes"] >= 0)
        if r["io_measured_bytes"] is None:
            self.assertIn("perf_event_open", r["io_measured_unavailable"])
        # The backward reads K and V once and streams Q and dO per key block of 96 keys.
        rc, out, err = run_cli("bench", "--op", "backward", "--seq", "192", "--heads", "1",
                               "--dim", "16", "--io", "--reps", "1", "--warmup", "0", "--json")
        self.assertEqual(rc, 0, err)
        bwd = json.loads(out)["io_backward"]
        self.assertEqual(bwd["kv_bytes"], 2 * 192 * 16 * 4)
        # Delta's pre-pass (O, dO) plus two key blocks each reading Q and dO of all 192 rows.
        self.assertEqual(bwd["q_bytes"], 192 * 2 * 16 * 4 + 2 * 192 * 2 * 16 * 4)
        for args, needle in ((["--op", "linear", "--io"], "--io"),
                             (["--io", "--mask", "sink:4:8"], "--io")):
            with self.subTest(args=args):
                rc, out, err = run_cli("bench", "--seq", "16", "--reps", "1", *args)
                self.assertEqual(rc, 2, "%s: %s" % (args, err))
                self.assertIn(needle, err)
