"""The command line as a whole: no subcommand, --help, option values every command refuses."""
import os
import tempfile
import unittest

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
