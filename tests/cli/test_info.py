# SPDX-License-Identifier: Apache-2.0
"""`tessera info`: the version, SIMD targets, threads and the measured peaks."""
import json
import unittest

from cli_util import run_cli


class InfoTest(unittest.TestCase):
    def test_info(self):
        rc, out, err = run_cli("info")
        self.assertEqual(rc, 0, err)
        self.assertIn("simd target", out)
        self.assertIn("compiled targets", out)
        self.assertIn("supported targets", out)
        self.assertIn("read bandwidth", out)
        self.assertIn("GB/s", out)
        rc, out, err = run_cli("info", "--json", "--threads", 1)
        self.assertEqual(rc, 0, err)
        r = json.loads(out)
        for key in ("version", "simd_target", "simd_targets_compiled", "simd_targets_supported",
                    "hardware_threads", "threads", "peak_gflops_1t", "peak_gflops_all",
                    "peak_gbps_1t", "peak_gbps_all", "peak_gbps"):
            self.assertIn(key, r)
        # Dispatch picks the best target the CPU supports, among the ones the build compiled.
        supported = r["simd_targets_supported"]
        self.assertTrue(supported)
        self.assertTrue(set(supported) <= set(r["simd_targets_compiled"]))
        self.assertEqual(r["simd_target"].lower(), supported[0])
        self.assertEqual(r["threads"], 1)
        self.assertGreaterEqual(r["hardware_threads"], 1)
        self.assertGreater(r["peak_gflops_1t"], 1)
        self.assertGreater(r["peak_gflops_all"], 0.5 * r["peak_gflops_1t"])
        # Read bandwidth: GB/s of DRAM, single digits on the slowest machines we run on.
        self.assertGreater(r["peak_gbps_1t"], 1)
        self.assertLess(r["peak_gbps_1t"], 2000)
        self.assertGreater(r["peak_gbps_all"], 0.5 * r["peak_gbps_1t"])
        self.assertEqual(r["peak_gbps"], r["peak_gbps_1t"])  # --threads 1
