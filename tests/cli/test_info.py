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
        for label in ("cpu ", "caches ", "amx ", "kernels", "blas "):
            self.assertIn(label, out)
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
        self.check_machine_fields(r)

    def check_machine_fields(self, r):
        for key in ("cpu_vendor", "cpu_model_name", "cpu_family", "cpu_model", "cpu_stepping",
                    "l1d_bytes", "l2_bytes", "l3_bytes", "amx_present", "amx_usable", "kernels",
                    "blas", "blas_config", "blas_core", "blas_core_forced_from"):
            self.assertIn(key, r)
        self.assertTrue(r["cpu_vendor"])
        self.assertGreater(r["l1d_bytes"], 0)
        self.assertGreaterEqual(r["l2_bytes"], r["l1d_bytes"])
        self.assertTrue(r["amx_present"] or not r["amx_usable"])
        self.assertEqual(r["blas"], "OpenBLAS")
        self.assertTrue(r["blas_core"])
        # One row per (op, dtype); the f32 forward runs the Highway tiles on a dispatched target.
        rows = {(k["op"], k["dtype"]): k["variant"] for k in r["kernels"]}
        for op, dtype in (("forward", "f32"), ("forward", "bf16"), ("forward", "f16"),
                          ("backward", "f32"), ("decode", "f16"), ("decode", "bf16"),
                          ("decode", "int8"), ("linear", "f32")):
            self.assertIn((op, dtype), rows)
        self.assertIn("highway", rows[("forward", "f32")])
        if not r["amx_usable"]:
            self.assertNotIn("AMX", rows[("forward", "bf16")])

    def test_info_target(self):
        # A forced target: its own FMA peak and kernels, and no AMX (the forced target runs).
        rc, out, err = run_cli("info", "--threads", 1, "--json")
        self.assertEqual(rc, 0, err)
        supported = json.loads(out)["simd_targets_supported"]
        target = supported[-1]
        rc, out, err = run_cli("info", "--threads", 1, "--json", "--target", target)
        self.assertEqual(rc, 0, err)
        r = json.loads(out)
        self.assertEqual(r["simd_target"].lower(), target)
        self.assertFalse(r["amx_usable"])
        rows = {(k["op"], k["dtype"]): k["variant"] for k in r["kernels"]}
        self.assertIn("(%s)" % target.upper(), rows[("forward", "f32")])
        self.assertNotIn("AMX", rows[("forward", "bf16")])
        rc, out, err = run_cli("info", "--target", "nosuch")
        self.assertEqual(rc, 2)
        self.assertIn("target", err)

    def test_info_blas_core_forced(self):
        # The re-executed process reports the core tessera forced and the one it replaced; the
        # user's OPENBLAS_CORETYPE is never overridden.
        rc, out, err = run_cli("info", "--threads", 1, "--json",
                               env={"OPENBLAS_CORETYPE": "Haswell",
                                    "TESSERA_BLAS_FORCED_FROM": "Prescott"})
        self.assertEqual(rc, 0, err)
        r = json.loads(out)
        self.assertEqual(r["blas_core"], "Haswell")
        self.assertEqual(r["blas_core_forced_from"], "Prescott")
        rc, out, err = run_cli("info", "--threads", 1, env={"OPENBLAS_CORETYPE": "Prescott"})
        self.assertEqual(rc, 0, err)
        self.assertIn("core Prescott", out)
        self.assertNotIn("forced from", out)
