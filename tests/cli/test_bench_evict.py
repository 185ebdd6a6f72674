# SPDX-License-Identifier: Apache-2.0
"""`tessera bench --op evict`: every policy end to end on small shapes, .npz data, bad options."""
import json
import os
import zipfile

from cli_util import CliTestBase, random_values, run_cli, write_npy

POLICIES = ["cake", "h2o", "tova", "snapkv", "pyramidkv", "streaming"]
EVICT_KEYS = ["op", "policy", "budget", "budget_tokens", "layers", "seq", "held_out", "heads",
              "kv_heads", "dim", "kv_dtype", "window", "stats_source", "stats_ms", "ms", "ms_min", "reps",
              "out_error", "out_error_per_layer", "kept_fraction", "freed_pages",
              "layer_budgets", "per_layer"]


class BenchEvictTest(CliTestBase):
    SMALL = ["--seq", 96, "--heads", 4, "--kv-heads", 2, "--dim", 16, "--layers", 3,
             "--held-out", 5, "--window", 8, "--threads", 2, "--json"]

    def evict(self, policy, *args, budget=0.25):
        rc, out, err = run_cli("bench", "--op", "evict", "--policy", policy, "--budget", budget,
                               *self.SMALL, *args)
        self.assertEqual(rc, 0, err)
        r = json.loads(out)
        for key in EVICT_KEYS:
            self.assertIn(key, r)
        return r

    def test_every_policy(self):
        for policy in POLICIES:
            with self.subTest(policy=policy):
                r = self.evict(policy, "--causal")
                self.assertEqual((r["op"], r["policy"], r["layers"], r["seq"], r["held_out"]),
                                 ("evict", policy, 3, 96, 5))
                self.assertEqual(r["budget_tokens"], 24)
                self.assertEqual(sum(r["layer_budgets"]), 3 * 24)
                self.assertEqual(len(r["out_error_per_layer"]), 3)
                self.assertAlmostEqual(r["kept_fraction"], 24 / 96, places=9)
                self.assertAlmostEqual(r["out_error"], sum(r["out_error_per_layer"]) / 3,
                                       places=9)
                self.assertGreater(r["out_error"], 0.0)
                self.assertGreaterEqual(r["ms"], r["ms_min"])
                self.assertGreater(r["ms_min"], 0.0)
                self.assertEqual(r["reps"], 5)
                if policy in ("h2o", "snapkv"):
                    self.assertEqual(r["layer_budgets"], [24, 24, 24])
                if policy == "cake":  # every layer keeps at least its window
                    self.assertTrue(all(b >= 8 for b in r["layer_budgets"]), r["layer_budgets"])

    def test_full_budget_is_exact(self):
        r = self.evict("snapkv", budget=1.0)
        self.assertEqual(r["out_error"], 0.0)
        self.assertEqual(r["kept_fraction"], 1.0)

    def test_paged_quantized(self):
        r = self.evict("h2o", "--kv-dtype", "int8", "--page-size", 16)
        self.assertEqual((r["kv_dtype"], r["page_size"]), ("int8", 16))
        # 96 tokens in 6 pages, 24 kept in 2: 4 freed per layer.
        self.assertEqual(r["freed_pages"], 3 * 4)

    def write_npz(self, name, L, S, Hq, Hkv, D, stored=True):
        arrays = {"q": (L, S, Hq, D), "k": (L, S, Hkv, D), "v": (L, S, Hkv, D)}
        path = self.path(name)
        method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
        with zipfile.ZipFile(path, "w", method) as z:
            for i, (key, shape) in enumerate(arrays.items()):
                n = 1
                for d in shape:
                    n *= d
                write_npy(self.path(key + ".npy"), shape, random_values(n, 7 + i, "<f4"))
                z.write(self.path(key + ".npy"), key + ".npy")
        return path

    def test_npz_data(self):
        path = self.write_npz("qkv.npz", 2, 40, 4, 2, 8)
        rc, out, err = run_cli("bench", "--op", "evict", "--policy", "cake", "--budget", 0.5,
                               "--data", path, "--held-out", 4, "--window", 4, "--json")
        self.assertEqual(rc, 0, err)
        r = json.loads(out)
        self.assertEqual((r["layers"], r["seq"], r["heads"], r["kv_heads"], r["dim"]),
                         (2, 36, 4, 2, 8))
        self.assertEqual(sum(r["layer_budgets"]), 2 * 18)
        rc, _, err = run_cli("bench", "--op", "evict", "--policy", "h2o", "--data", path,
                             "--layers", 3)
        self.assert_error(rc, err, "--layers")

    def test_bad_options(self):
        cases = [
            (["--op", "evict", "--policy", "lru"], "--policy"),
            (["--op", "evict", "--policy", "h2o", "--budget", 0], "--budget"),
            (["--op", "evict", "--policy", "h2o", "--queries", 2], "--queries"),
            (["--op", "decode", "--policy", "h2o"], "--policy"),
            (["--op", "evict", "--policy", "h2o", "--data", self.path("missing.npz")],
             "missing.npz"),
            (["--op", "evict", "--policy", "h2o", "--data",
              self.write_npz("deflated.npz", 1, 8, 2, 2, 4, stored=False)], "compressed"),
        ]
        for args, needle in cases:
            with self.subTest(args=args):
                rc, _, err = run_cli("bench", *args)
                self.assert_error(rc, err, needle)
