# SPDX-License-Identifier: Apache-2.0
"""--target of `run` and `bench`: every SIMD target this CPU runs gives the same answers (within
tolerance of the fp64 reference), and a target it cannot run, or the build lacks, is refused."""
import json
import os
import re

from cli_util import CliTestBase, random_values, read_npy, round_to, run_cli, write_npy
from reference import linear_reference, reference


def compiled_targets():
    """The names `run --help` lists for --target (what this build compiled), best first."""
    rc, out, _ = run_cli("run", "--help")
    assert rc == 0
    match = re.search(r"force a SIMD target: one of (.*?), or auto", " ".join(out.split()))
    assert match, out
    return match.group(1).split(", ")


class TargetTest(CliTestBase):
    @classmethod
    def setUpClass(cls):
        cls.compiled = compiled_targets()

    def supported(self):
        """Runs a tiny forward per compiled target; the ones this CPU cannot run must be refused
        by name. Returns the others."""
        write_npy(self.path("t.npy"), (1, 1, 1, 8), [0.5] * 8)
        names = []
        for name in self.compiled:
            rc, _, err = run_cli("run", "--q", self.path("t.npy"), "--k", self.path("t.npy"),
                                 "--v", self.path("t.npy"), "--out", self.path("t_out.npy"),
                                 "--target", name)
            if rc == 0:
                names.append(name)
            else:
                self.assert_error(rc, err, "--target", "cannot run '%s'" % name)
        self.assertIn("scalar" if "scalar" in self.compiled else self.compiled[-1], names)
        return names

    def test_exact_forward_agrees_on_every_target(self):
        B, Sq, Sk, Hq, Hkv, D = 1, 37, 45, 4, 2, 16
        for descr, tol in (("<f4", 2e-5), ("<f2", 2e-3)):
            q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D, descr=descr)
            want, want_lse = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D, causal=True)
            outputs = {}
            for name in ["auto"] + self.supported():
                with self.subTest(descr=descr, target=name):
                    self.assert_ok(*run_cli("run", *self.io_args(), "--causal", "--lse",
                                            self.path("l.npy"), "--target", name))
                    got = read_npy(self.path("o.npy"))[3]
                    self.assert_close(got, round_to(want, descr), tol, "out")
                    self.assert_close(read_npy(self.path("l.npy"))[3], want_lse, 2e-5, "lse")
                    outputs[name] = got
            for name, got in outputs.items():
                self.assert_close(got, outputs["auto"], tol, "%s vs auto" % name)

    def test_linear_forward_agrees_on_every_target(self):
        B, S, Hq, Hkv, Dk, Dv = 1, 37, 2, 2, 8, 8
        q = random_values(B * S * Hq * Dk, 21, "<f4")
        k = random_values(B * S * Hkv * Dk, 22, "<f4")
        v = random_values(B * S * Hkv * Dv, 23, "<f4")
        for name, data, shape in (("q", q, (B, S, Hq, Dk)), ("k", k, (B, S, Hkv, Dk)),
                                  ("v", v, (B, S, Hkv, Dv))):
            write_npy(self.path(name + ".npy"), shape, data)
        want, _, _ = linear_reference(q, k, v, B, S, Hq, Hkv, Dk, Dv, fmap="elu1", normalize=True)
        for name in ["auto"] + self.supported():
            with self.subTest(target=name):
                self.assert_ok(*run_cli("run", "--op", "linear", *self.io_args(),
                                        "--feature-map", "elu1", "--normalize", "--target", name))
                self.assert_close_rel(read_npy(self.path("o.npy"))[3], want, 1e-4, name)

    def test_bench_reports_the_forced_target(self):
        for name in self.supported():
            with self.subTest(target=name):
                rc, out, err = run_cli("bench", "--seq", 32, "--dim", 16, "--heads", 1,
                                       "--reps", 1, "--warmup", 0, "--threads", 1, "--json",
                                       "--target", name)
                self.assertEqual(rc, 0, err)
                self.assertEqual(json.loads(out)["simd_target"].lower(), name)

    def test_unknown_target_is_refused(self):
        self.make_inputs(1, 4, 4, 2, 2, 8)
        for command in (["run"] + self.io_args(), ["run", "--op", "linear"] + self.io_args(),
                        ["bench", "--seq", 16, "--dim", 8], ["bench", "--op", "decode"]):
            with self.subTest(command=command[:3]):
                rc, out, err = run_cli(*command, "--target", "avx9000")
                self.assert_error(rc, err, "--target", "avx9000", self.compiled[-1])
                self.assertEqual(out, "")
        self.assertFalse(os.path.exists(self.path("o.npy")))
