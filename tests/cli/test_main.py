"""The command line as a whole: no subcommand, --help."""
import unittest

from cli_util import run_cli


class CommandLineTest(unittest.TestCase):
    def test_no_subcommand_and_help(self):
        rc, _, err = run_cli()
        self.assertEqual(rc, 2)
        self.assertTrue(err)
        rc, out, _ = run_cli("run", "--help")
        self.assertEqual(rc, 0)
        self.assertIn("--window", out)
