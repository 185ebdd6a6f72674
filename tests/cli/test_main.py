# SPDX-License-Identifier: Apache-2.0
"""The command line as a whole: no subcommand, --help, option values every command refuses."""
import os
import subprocess
import tempfile
import unittest

import cli_util
from cli_util import run_cli, write_npy


class CommandLineTest(unittest.TestCase):
    def test_no_subcommand_and_help(self):
        rc, _, err = run_cli()
        self.assertEqual(rc, 2)
        self.assertTrue(err)
        rc, out, _ = run_cli("run", "--help")
        self.assertEqual(rc, 0)
        self.assertIn("--window", out)

    def test_empty_values_are_errors(self):
        # An empty value must not read as "not given" (no window, no --lse) or as 0.
        with tempfile.TemporaryDirectory(prefix="tessera_cli_") as tmp:
            for name in ("q.npy", "k.npy", "v.npy"):
                write_npy(os.path.join(tmp, name), (1, 4, 2, 8), [0.25] * 64)
            io = ["--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--out", "o.npy"]
            cases = [["run"] + io + [flag, ""] for flag in (
                "--window", "--threads", "--softcap", "--scale", "--lse", "--alibi", "--dout",
                "--dq", "--mask", "--path")]
            cases += [["run", "--op", "linear"] + io + [flag, ""] for flag in (
                "--prefix", "--chunk", "--decay", "--gates", "--feature-map", "--state-in",
                "--state-out", "--window")]
            cases += [["bench", "--seq", "16", "--dim", "8", flag, ""] for flag in (
                "--vs", "--seed", "--threads", "--batch", "--mask", "--reps")]
            cases += [["bench", "--op", "decode", "--seq", "16", "--dim", "8", flag, ""]
                      for flag in ("--lens", "--kv-dtype", "--page-size")]
            cases += [["info", "--threads", ""]]
            for args in cases:
                with self.subTest(args=args):
                    rc, out, err = run_cli(*args, cwd=tmp)
                    self.assertEqual(rc, 2, err)
                    self.assertIn(args[-2] + ": expected a value, got ''", err)
                    self.assertEqual(out, "")
                    self.assertEqual(sorted(os.listdir(tmp)), ["k.npy", "q.npy", "v.npy"])

    def test_garbage_integers_and_rates(self):
        with tempfile.TemporaryDirectory(prefix="tessera_cli_") as tmp:
            for name in ("q.npy", "k.npy", "v.npy"):
                write_npy(os.path.join(tmp, name), (1, 4, 2, 8), [0.25] * 64)
            io = ["--q", "q.npy", "--k", "k.npy", "--v", "v.npy", "--out", "o.npy"]
            cases = [["run"] + io + ["--window", w] for w in (" 1,2", "+1,2", "1, 2", "1,2 ")]
            cases += [["run", "--op", "linear"] + io + [flag, value] for flag, value in (
                ("--prefix", " 1"), ("--chunk", "+64"), ("--window", " 4"))]
            cases += [["run", "--op", "linear", "--variant", "decay"] + io + ["--decay", " 0.5"]]
            cases += [["bench", "--op", "decode", "--seq", "16", "--dim", "8", "--lens", " 16"]]
            for args in cases:
                with self.subTest(args=args):
                    rc, out, err = run_cli(*args, cwd=tmp)
                    self.assertEqual(rc, 2, err)
                    self.assertIn(args[-2] + ":", err)
                    self.assertEqual(sorted(os.listdir(tmp)), ["k.npy", "q.npy", "v.npy"])

    def test_threads_are_capped(self):
        for args in (["bench", "--seq", "16", "--dim", "8"],
                     ["bench", "--op", "decode", "--seq", "16", "--dim", "8"],
                     ["bench", "--op", "linear", "--seq", "16", "--dim", "8"],
                     ["info"]):
            with self.subTest(args=args):
                rc, out, err = run_cli(*args, "--threads", 100000)
                self.assertEqual(rc, 2, err)
                self.assertIn("--threads: expected at most", err)
                self.assertIn("got 100000", err)
                self.assertEqual(out, "")
        with tempfile.TemporaryDirectory(prefix="tessera_cli_") as tmp:
            for name in ("q.npy", "k.npy", "v.npy"):
                write_npy(os.path.join(tmp, name), (1, 4, 2, 8), [0.25] * 64)
            for op in ("exact", "linear"):
                rc, _, err = run_cli("run", "--op", op, "--q", "q.npy", "--k", "k.npy", "--v",
                                     "v.npy", "--out", "o.npy", "--threads", 100000, cwd=tmp)
                self.assertEqual(rc, 2, err)
                self.assertIn("--threads: expected at most", err)
                self.assertFalse(os.path.exists(os.path.join(tmp, "o.npy")))

    def test_sizes_that_overflow_are_refused(self):
        big = 4294967296
        for args in (["--batch", big, "--heads", big],
                     ["--batch", big, "--seq", big, "--heads", 1, "--dim", 1],
                     ["--op", "backward", "--seq", big, "--heads", big],
                     ["--op", "decode", "--batch", big, "--heads", big, "--seq-k", 1],
                     ["--op", "decode", "--heads", big, "--dim", big, "--seq-k", 1],
                     ["--op", "linear", "--batch", big, "--seq", big],
                     ["--op", "linear", "--seq", 16, "--dim", big, "--dim-v", big]):
            with self.subTest(args=args):
                rc, out, err = run_cli("bench", "--reps", 1, "--warmup", 0, "--threads", 1, *args,
                                       timeout=30)
                self.assertEqual(rc, 2, err)
                self.assertIn("too large", err)
                self.assertEqual(out, "")

    def test_allocation_failure_exits_2(self):
        # A 6 GiB request under a 3 GiB address-space limit: std::bad_alloc (or a null
        # allocation), reported with exit code 2 instead of an abort.
        import resource

        def limit():
            resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

        args = ["bench", "--op", "linear", "--seq", 100000000, "--heads", 1, "--dim", 16,
                "--reps", 1, "--warmup", 0, "--threads", 1]
        proc = subprocess.run([cli_util.BINARY] + [str(a) for a in args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, preexec_fn=limit, timeout=60)
        err = proc.stderr.decode()
        if "Sanitizer" in err:  # a sanitized build reserves terabytes of shadow memory at start
            raise unittest.SkipTest("the address-space limit stops a sanitized binary")
        self.assertEqual(proc.returncode, 2, err)
        self.assertIn("allocate", err)
