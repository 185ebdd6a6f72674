# SPDX-License-Identifier: Apache-2.0
"""`tessera bench --mask`: densities, FLOPs and --vs dense."""
import json
import os
import tempfile
import unittest

from cli_util import BENCH_KEYS, run_cli, write_npy
from reference import causal_rule, mask_values, nbhd_rule, s2_rule


class MaskBenchTest(unittest.TestCase):
    N, H, D = 256, 2, 32

    def bench(self, spec, *args, op="forward", seq=None, seq_k=None):
        rc, out, err = run_cli("bench", "--op", op, "--heads", self.H, "--seq", seq or self.N,
                               "--seq-k", seq_k or seq or self.N, "--dim", self.D, "--reps", 2,
                               "--warmup", 0, "--threads", 1, "--json", "--mask", spec, *args)
        self.assertEqual(rc, 0, "%s: %s" % (spec, err))
        return json.loads(out)

    def check_density(self, r, rule, Sq=None, Sk=None):
        Sq, Sk = Sq or self.N, Sk or Sq or self.N
        want = sum(mask_values(rule, self.H, Sq, Sk)) / float(self.H * Sq * Sk)
        self.assertTrue(r["density_exact"])
        self.assertAlmostEqual(r["density"], want, places=12, msg=r["mask"])
        # GFLOP/s counts the visible pairs only: 4 * D per pair.
        self.assertAlmostEqual(r["flops"], 4 * self.D * want * self.H * Sq * Sk,
                               delta=1e-9 * r["flops"])
        self.assertAlmostEqual(r["gflops"], r["flops"] / (r["ms"] * 1e-3) * 1e-9,
                               delta=1e-6 * r["gflops"])

    def test_density_of_structured_forms(self):
        G = 64
        shift = lambda h, i, j: (
            ((i - G // 2) % 256) // G == ((j - G // 2) % 256) // G and
            (j - G // 2) % 256 <= (i - G // 2) % 256) if h >= 1 else (i // G == j // G and j <= i)
        cases = (
            ("nbhd2d:16x16:5x5", nbhd_rule([16, 16], [5, 5]), False),
            ("nbhd1d:256:16:causal=1:stride=4", nbhd_rule([256], [16], stride=[4],
                                                          causal=[True]), False),
            ("sink:4:32", lambda h, i, j: j <= i and (j < 4 or i - j < 32), True),
            ("prefix:40", lambda h, i, j: j <= i or j < 40, True),
            ("doc:100,156", lambda h, i, j: (i < 100) == (j < 100), False),
            ("shift:64", shift, True),
            ("group-sink:64:4", lambda h, i, j: j <= i and (i // G == j // G or j < 4), True),
            ("s2:32:2:4", s2_rule(self.H, 32, 2, 4), True),
            ("tree-chain:256", causal_rule, False),
            ("sigmoid:-3+doc:100,156", lambda h, i, j: (i < 100) == (j < 100), False))
        for spec, rule, causal in cases:
            with self.subTest(spec=spec):
                r = self.bench(spec)
                self.assertEqual((r["mask"], r["causal"]), (spec, causal))
                self.check_density(r, rule)

    def test_block_file_and_causal(self):
        with tempfile.TemporaryDirectory(prefix="tessera_cli_") as tmp:
            path = os.path.join(tmp, "blocks.npy")
            blocks = [1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1]
            write_npy(path, (4, 4), blocks, "|u1")
            rule = lambda h, i, j: blocks[(i // 64) * 4 + j // 64] == 1
            self.check_density(self.bench("block:%s:64x64" % path), rule)
            r = self.bench("block:%s:64x64" % path, "--causal")
            self.assertTrue(r["causal"])
            self.check_density(r, lambda h, i, j: rule(h, i, j) and j <= i)

    def test_vs_dense(self):
        r = self.bench("nbhd2d:16x16:5x5", "--vs", "dense")
        for key in BENCH_KEYS + ["baseline", "baseline_ms", "baseline_gflops", "speedup",
                                 "density", "mask", "flops"]:
            self.assertIn(key, r)
        self.assertEqual(r["baseline"], "dense")
        self.assertEqual(r["baseline_reps"], r["reps"])
        self.assertGreater(r["baseline_ms"], 0)
        self.assertAlmostEqual(r["speedup"], r["baseline_ms"] / r["ms"], places=9)
        self.assertAlmostEqual(r["density"], 25.0 / 256.0, places=12)
        self.assertAlmostEqual(r["baseline_gflops"],
                               4 * self.H * self.N * self.N * self.D /
                               (r["baseline_ms"] * 1e-3) * 1e-9,
                               delta=1e-6 * r["baseline_gflops"])
        # A causal form compares with the causal dense kernel (half the pairs).
        r = self.bench("sink:4:32", "--vs", "dense")
        self.assertTrue(r["baseline_causal"])
        self.assertAlmostEqual(r["baseline_flops"], 2 * self.H * self.N * self.N * self.D)

    def test_block_random(self):
        # 8 x 8 blocks, round(0.3 * 8) = 2 per query-block row, the diagonal always among them.
        r = self.bench("block-random:0.3:32x32", "--seed", 7)
        self.assertAlmostEqual(r["density"], 2.0 / 8.0, places=12)
        # Causal: only blocks at or below the diagonal; row 0 keeps just the diagonal block,
        # whose lower triangle (and diagonal) is visible.
        r = self.bench("block-random:0.3:32x32", "--causal")
        pairs = 32 * 33 / 2 + 7 * (32 * 33 / 2 + 32 * 32)  # per head
        self.assertAlmostEqual(r["density"], pairs / (256.0 * 256.0), places=12)
        # The same seed draws the same mask; the dense run needs no mask file.
        self.assertEqual(self.bench("block-random:0.5", "--seed", 3)["density"],
                         self.bench("block-random:0.5", "--seed", 3)["density"])

    def test_select_reports_selection_time(self):
        r = self.bench("select:topk=2:32x32", "--vs", "dense")
        self.assertGreater(r["select_ms"], 0)
        self.assertLess(r["select_ms"], r["ms"])  # ms includes the selection
        self.assertAlmostEqual(r["density"], 2.0 / 8.0, places=12)
        r = self.bench("select:topk=2:32x32", "--causal")
        self.assertLess(r["density"], 0.5)
        self.assertGreater(r["density"], 0)

    def test_radial_and_tree(self):
        r = self.bench("radial:8:32:32")
        self.assertGreater(r["density"], 0)
        self.assertLessEqual(r["density"], 1)
        with tempfile.TemporaryDirectory(prefix="tessera_cli_") as tmp:
            path = os.path.join(tmp, "tree.npy")
            parents = [-1, 0, 0, 1, 1, 2, 5, -1] * 4
            parents = [p if p < 0 else p + 8 * (t // 8) for t, p in enumerate(parents)]
            write_npy(path, (32,), parents, "<i4")

            def rule(h, i, j):
                if j < 224:
                    return True
                t = i
                while t >= 0 and t != j - 224:
                    t = parents[t]
                return t >= 0
            r = self.bench("tree:" + path, seq=32, seq_k=256)
            self.check_density(r, rule, Sq=32, Sk=256)

    def test_backward_takes_the_mask(self):
        r = self.bench("nbhd2d:16x16:5x5", "--vs", "dense", op="backward")
        # 2.5x the forward's 4 * D per visible pair (25 keys per query), and of the dense pairs.
        self.assertAlmostEqual(r["flops"], 2.5 * 4 * self.D * self.H * self.N * 25,
                               delta=1e-6 * r["flops"])
        self.assertAlmostEqual(r["baseline_flops"], 2.5 * 4 * self.D * self.H * self.N * self.N,
                               delta=1e-6 * r["baseline_flops"])
        self.assertEqual(r["baseline"], "dense")
        self.assertAlmostEqual(r["speedup"], r["baseline_ms"] / r["ms"], places=9)

    def test_human_output(self):
        rc, out, err = run_cli("bench", "--heads", 2, "--seq", 64, "--dim", 16, "--reps", 2,
                               "--threads", 1, "--mask", "nbhd1d:64:8", "--vs", "dense")
        self.assertEqual(rc, 0, err)
        for needle in ("tessera masked", "tessera dense", "density 0.1250", "speedup"):
            self.assertIn(needle, out)

    def test_errors(self):
        base = ["bench", "--heads", 2, "--seq", 64, "--dim", 8, "--reps", 1]
        for args, needle in ((["--mask", "nbhd2d:8x4:3x3"], "8x4 = 32"),
                             (["--mask", "bogus"], "unknown mask form"),
                             (["--mask", "nbhd1d:64:8", "--vs", "naive"], "--vs dense"),
                             (["--mask", "nbhd1d:64:8", "--baseline-only"], "--baseline-only"),
                             (["--vs", "dense", "--baseline-only"], "--baseline-only"),
                             (["--vs", "sparse"], "'naive' or 'dense'"),
                             (["--mask", "nbhd1d:64:8", "--op", "decode"], "--op decode"),
                             (["--mask", "block-random:0"], "RHO in (0, 1]")):
            with self.subTest(args=args):
                rc, out, err = run_cli(*base, *args)
                self.assertEqual(rc, 2, "%s: %s" % (args, err))
                self.assertIn(needle, err)
                self.assertEqual(out, "")
