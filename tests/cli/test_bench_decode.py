# SPDX-License-Identifier: Apache-2.0
"""`tessera bench --op decode`: bytes, bandwidth and the baselines over each KV dtype."""
import json
import unittest

from cli_util import run_cli


KV_ROW_BYTES = {"f32": lambda d: 4 * d, "bf16": lambda d: 2 * d, "f16": lambda d: 2 * d,
                "int8": lambda d: d, "int4": lambda d: (d + 1) // 2}
DECODE_KEYS = ["op", "kv_dtype", "batch", "heads", "kv_heads", "queries", "seq_k", "dim",
               "paged", "page_size", "threads", "bytes", "flops", "ms", "gbps", "peak_gbps",
               "frac_bw", "gflops", "peak_rss_mb", "simd_target"]


class BenchDecodeTest(unittest.TestCase):
    B, H, HKV, N, D = 2, 4, 2, 300, 64

    def bench_decode(self, *args, kv_dtype="f16", vs=True):
        rc, out, err = run_cli("bench", "--op", "decode", "--batch", self.B, "--heads", self.H,
                               "--kv-heads", self.HKV, "--seq-k", self.N, "--dim", self.D,
                               "--kv-dtype", kv_dtype, "--reps", 5, "--threads", 2, "--json",
                               *(["--vs", "naive"] if vs else []), *args)
        self.assertEqual(rc, 0, err)
        r = json.loads(out)  # exactly one JSON object
        for key in DECODE_KEYS + (["naive_ms", "baseline_ms", "speedup", "max_abs_diff"]
                                  if vs else []):
            self.assertIn(key, r)
        for key in ("ms", "gbps", "peak_gbps", "frac_bw", "gflops"):
            self.assertGreater(r[key], 0, key)
        self.assertEqual((r["op"], r["kv_dtype"], r["batch"], r["heads"], r["kv_heads"], r["dim"]),
                         ("decode", kv_dtype, self.B, self.H, self.HKV, self.D))
        lens = r.get("lens", [self.N] * self.B)
        quantized = kv_dtype in ("int8", "int4")
        want_bytes = sum(lens) * self.HKV * 2 * (KV_ROW_BYTES[kv_dtype](self.D) +
                                                (8 if quantized else 0))
        self.assertEqual(r["bytes"], want_bytes)
        self.assertAlmostEqual(r["flops"], 4 * r["queries"] * self.H * self.D * sum(lens),
                               places=3)
        self.assertAlmostEqual(r["gbps"], r["bytes"] / (r["ms"] * 1e-3) * 1e-9,
                               delta=1e-6 * r["gbps"])
        self.assertAlmostEqual(r["frac_bw"], r["gbps"] / r["peak_gbps"], places=9)
        self.assertLess(r["peak_rss_mb"], 512)  # the bandwidth probe's buffer is not counted
        if vs:
            self.assertGreater(r["naive_ms"], 0)
            self.assertAlmostEqual(r["speedup"], r["naive_ms"] / r["ms"], places=9)
            # Both read the same stored values and compute in f32, except that tessera quantizes
            # q to int8 per row against an int8 / int4 cache (error ~ 1/254 of a logit).
            self.assertLess(r["max_abs_diff"], 5e-3 if quantized else 1e-4)
        return r

    def test_every_kv_dtype(self):
        for kv_dtype in ("f32", "bf16", "f16", "int8", "int4"):
            with self.subTest(kv_dtype=kv_dtype):
                r = self.bench_decode(kv_dtype=kv_dtype)
                self.assertEqual((r["queries"], r["seq_k"], r["paged"]), (1, self.N, False))

    def test_paged(self):
        r = self.bench_decode("--page-size", 16, kv_dtype="int8")
        self.assertEqual((r["paged"], r["page_size"]), (True, 16))

    def test_lens(self):
        r = self.bench_decode("--lens", "100,300", "--page-size", 32)
        self.assertEqual((r["lens"], r["seq_k"]), ([100, 300], 300))

    def test_split_tokens(self):
        # The default: 2048 keys, 512 for pages of 1-3 tokens; or as given.
        for extra, want in (([], 2048), (["--page-size", 16], 2048), (["--page-size", 2], 512),
                            (["--split-tokens", 64], 64)):
            with self.subTest(extra=extra):
                r = self.bench_decode(*extra, vs=False)
                self.assertEqual(r["split_tokens"], want)

    def test_queries_causal(self):
        r = self.bench_decode("--queries", 4, "--causal", kv_dtype="bf16")
        self.assertEqual((r["queries"], r["causal"]), (4, True))

    def test_vs_stream(self):
        # Paired with a plain read of the same bytes: contiguous, paged over shuffled pages with
        # ragged lengths, and quantized (whose scales are read too).
        for kv_dtype, extra in (("f16", []), ("bf16", ["--lens", "100,300", "--page-size", 16]),
                                ("int8", ["--page-size", 32])):
            with self.subTest(kv_dtype=kv_dtype, extra=extra):
                r = self.bench_decode(*extra, "--vs", "stream", kv_dtype=kv_dtype, vs=False)
                self.assertEqual(r["baseline"], "stream")
                for key in ("baseline_ms", "paired_ms", "baseline_gbps", "baseline_frac_bw"):
                    self.assertGreater(r[key], 0, key)
                self.assertEqual(r["baseline_reps"], r["reps"])
                self.assertAlmostEqual(r["frac_stream"], r["baseline_ms"] / r["paired_ms"],
                                       places=9)
                self.assertAlmostEqual(r["baseline_gbps"],
                                       r["bytes"] / (r["baseline_ms"] * 1e-3) * 1e-9,
                                       delta=1e-6 * r["baseline_gbps"])
        rc, out, err = run_cli("bench", "--op", "decode", "--batch", 1, "--heads", 2, "--seq-k",
                               64, "--baseline-only", "--vs", "stream")
        self.assertEqual(rc, 2, err)
        self.assertIn("--vs stream", err)
        self.assertEqual(out, "")

    def test_baseline_only_and_human_output(self):
        rc, out, err = run_cli("bench", "--op", "decode", "--batch", 1, "--heads", 2, "--seq-k",
                               64, "--dim", 32, "--reps", 5, "--threads", 1, "--baseline-only",
                               "--json")
        self.assertEqual(rc, 0, err)
        r = json.loads(out)
        self.assertTrue(r["baseline_only"])
        self.assertNotIn("ms", r)
        self.assertGreater(r["baseline_ms"], 0)
        rc, out, err = run_cli("bench", "--op", "decode", "--batch", 1, "--heads", 2, "--seq-k",
                               64, "--dim", 32, "--reps", 5, "--threads", 1, "--vs", "naive")
        self.assertEqual(rc, 0, err)
        self.assertEqual(len(out.strip().splitlines()), 1, out)
        for needle in ("decode", "GB/s", "naive", "speedup"):
            self.assertIn(needle, out)

    def test_errors(self):
        base = ["bench", "--op", "decode", "--batch", 2, "--heads", 4, "--seq-k", 64]
        for args, needle in ((["--kv-dtype", "int3"], "--kv-dtype"),
                             (["--lens", "10,20,30"], "--lens"),
                             (["--lens", "10,0"], "--lens"),
                             (["--lens", "10,x"], "--lens"),
                             (["--queries", 0], "--queries"),
                             (["--queries", 17], "--queries"),
                             (["--page-size", -1], "--page-size"),
                             (["--split-tokens", -1], "--split-tokens"),
                             (["--seq-k", 0], "--seq-k"),
                             (["--kv-heads", 3], "--kv-heads"),
                             (["--vs", "dense"], "--vs"),
                             (["--dim", 0], "--dim")):
            rc, out, err = run_cli(*base, *args)
            self.assertEqual(rc, 2, "%s: %s" % (args, err))
            self.assertIn(needle, err)
            self.assertEqual(out, "")
        # Decode's options are refused by name elsewhere, not ignored.
        for op in ("forward", "backward"):
            for flag, value in (("--page-size", 16), ("--split-tokens", 64), ("--queries", 2),
                                ("--kv-dtype", "int8"), ("--lens", "10,20")):
                rc, out, err = run_cli("bench", "--op", op, "--seq", 64, flag, value)
                self.assertEqual(rc, 2, "%s %s: %s" % (op, flag, err))
                self.assertIn(flag + ": only with --op decode", err)
                self.assertEqual(out, "")
