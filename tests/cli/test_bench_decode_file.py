# SPDX-License-Identifier: Apache-2.0
"""`tessera bench --op decode --kv-file`: a KV file built on first use, streamed, and reported."""
import json
import os
import shutil
import tempfile
import unittest

from cli_util import run_cli

FILE_KEYS = ["op", "kv_file", "kv_dtype", "heads", "kv_heads", "queries", "seq_k", "dim",
             "page_size", "threads", "cold", "reader", "direct", "chunks", "file_bytes",
             "bytes_read", "ms", "tokens_per_s", "read_gbps", "disk_gbps", "frac_disk",
             "peak_rss_mib"]


class BenchDecodeFileTest(unittest.TestCase):
    H, HKV, N, D = 4, 2, 1000, 64

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="tessera_cli_kvfile_")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def bench(self, path, *args, kv_dtype="f16"):
        return run_cli("bench", "--op", "decode", "--heads", self.H, "--kv-heads", self.HKV,
                       "--seq-k", self.N, "--dim", self.D, "--kv-dtype", kv_dtype,
                       "--kv-file", path, "--page-size", 16, "--kv-chunk-tokens", 128,
                       "--reps", 2, "--warmup", 0, "--threads", 2, "--json", *args)

    def test_builds_then_reuses_the_file(self):
        path = os.path.join(self.dir, "cache.kv")
        for kv_dtype, reader in (("f16", "threads"), ("int4", "auto")):
            with self.subTest(kv_dtype=kv_dtype):
                if os.path.exists(path):
                    os.remove(path)
                rc, out, err = self.bench(path, "--cold", "--kv-reader", reader,
                                          kv_dtype=kv_dtype)
                self.assertEqual(rc, 0, err)
                self.assertIn("building it from random data", err)
                r = json.loads(out)
                for key in FILE_KEYS:
                    self.assertIn(key, r)
                self.assertEqual((r["kv_dtype"], r["seq_k"], r["page_size"], r["cold"]),
                                 (kv_dtype, self.N, 16, True))
                self.assertEqual(r["chunks"], 8)  # 1000 tokens in chunks of 128
                self.assertEqual(r["file_bytes"], os.path.getsize(path))
                self.assertGreaterEqual(r["bytes_read"], 2 * self.N * self.HKV * self.D //
                                        (1 if kv_dtype == "f16" else 4))
                for key in ("ms", "tokens_per_s", "read_gbps", "disk_gbps", "frac_disk"):
                    self.assertGreater(r[key], 0, key)
                self.assertAlmostEqual(r["frac_disk"], r["read_gbps"] / r["disk_gbps"], places=9)
                self.assertLess(r["peak_rss_mib"], 512)
                if reader == "threads":
                    self.assertEqual(r["reader"], "threads")
                # Second run: the file exists and is reused, not rebuilt.
                rc, out, err = self.bench(path, "--kv-reader", reader, kv_dtype=kv_dtype)
                self.assertEqual(rc, 0, err)
                self.assertNotIn("building", err)
                self.assertEqual(json.loads(out)["file_build_ms"], 0)
                # Block selection: the top 2 chunks per head (the last one included) are read.
                rc, out, err = self.bench(path, "--kv-select-top-k", 2, kv_dtype=kv_dtype)
                self.assertEqual(rc, 0, err)
                r2 = json.loads(out)
                self.assertEqual(r2["chunks_total"], 8)
                self.assertTrue(2 <= r2["chunks"] <= 1 + self.H, r2["chunks"])
                self.assertLess(r2["bytes_read"], r["bytes_read"])

    def test_errors(self):
        path = os.path.join(self.dir, "cache.kv")
        rc, _, err = self.bench(path)
        self.assertEqual(rc, 0, err)
        # A file of another shape is refused by name.
        rc, _, err = self.bench(path, kv_dtype="int8")
        self.assertNotEqual(rc, 0)
        self.assertIn("--kv-file", err)
        # A corrupt file is a clear error naming it.
        with open(path, "r+b") as f:
            f.seek(40)
            f.write(b"\x07")
        rc, _, err = self.bench(path)
        self.assertNotEqual(rc, 0)
        self.assertIn(path, err)
        self.assertIn("checksum", err)
        bad = os.path.join(self.dir, "short.kv")
        with open(bad, "wb") as f:
            f.write(b"tessera?")
        rc, _, err = self.bench(bad)
        self.assertNotEqual(rc, 0)
        self.assertIn("short", err)
        rc, _, err = self.bench(path, "--kv-reader", "mmap")
        self.assertNotEqual(rc, 0)
        self.assertIn("--kv-reader", err)
        rc, _, err = run_cli("bench", "--op", "decode", "--cold", "--seq-k", 100)
        self.assertNotEqual(rc, 0)
        self.assertIn("--cold", err)


if __name__ == "__main__":
    unittest.main()
