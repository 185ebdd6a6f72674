# SPDX-License-Identifier: Apache-2.0
"""Publishing outputs (`run`, exact and linear): all of them or none, never over an input, a
non-regular file or another output, through unpredictable temporary files."""
import os
import stat
import subprocess
import unittest

from cli_util import CliTestBase, read_npy, run_cli, write_npy

OLD = b"old contents, not an .npy file"


class OutputTest(CliTestBase):
    def setUp(self):
        super().setUp()
        self.make_inputs(1, 4, 4, 2, 2, 8)
        write_npy(self.path("do.npy"), (1, 4, 2, 8), [0.5] * 64)

    def plant(self, name, data=OLD):
        with open(self.path(name), "wb") as f:
            f.write(data)

    def contents(self, name):
        with open(self.path(name), "rb") as f:
            return f.read()

    def grad_args(self, dv="dv.npy"):
        return ["--dout", self.path("do.npy"), "--dq", self.path("dq.npy"),
                "--dk", self.path("dk.npy"), "--dv", self.path(dv)]

    def assert_files(self, *names):
        """The folder holds the inputs and exactly `names`: no temporary file is left behind."""
        self.assertEqual(sorted(os.listdir(self.dir)),
                         sorted(["do.npy", "k.npy", "q.npy", "v.npy"] + list(names)))

    def test_failing_output_leaves_the_others_untouched(self):
        self.plant("o.npy")
        os.mkdir(self.path("l.npy"))
        rc, _, err = run_cli("run", *self.io_args(), "--lse", self.path("l.npy"))
        self.assert_error(rc, err, "--lse", "l.npy", "directory")
        self.assertEqual(self.contents("o.npy"), OLD)
        self.assert_files("o.npy", "l.npy")

    def test_failing_gradient_leaves_the_others_untouched(self):
        for name in ("o.npy", "dq.npy", "dk.npy"):
            self.plant(name)
        os.mkdir(self.path("dv.npy"))
        rc, _, err = run_cli("run", *self.io_args(), *self.grad_args())
        self.assert_error(rc, err, "--dv", "dv.npy")
        for name in ("o.npy", "dq.npy", "dk.npy"):
            self.assertEqual(self.contents(name), OLD, name)
        self.assert_files("o.npy", "dq.npy", "dk.npy", "dv.npy")

    def test_one_file_under_two_spellings(self):
        for out, lse in (("o.npy", "./o.npy"), ("o.npy", "sub/../o.npy"),
                         (self.path("o.npy"), "o.npy")):
            os.makedirs(self.path("sub"), exist_ok=True)
            for exists in (False, True):
                if exists:
                    self.plant("o.npy")
                with self.subTest(out=out, lse=lse, exists=exists):
                    rc, _, err = run_cli("run", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy",
                                         "--out", out, "--lse", lse, cwd=self.dir)
                    self.assert_error(rc, err, "--out and --lse", "same file")
                    if exists:
                        self.assertEqual(self.contents("o.npy"), OLD)
                    else:
                        self.assertFalse(os.path.exists(self.path("o.npy")))
            os.remove(self.path("o.npy"))
        # A second name (hard link) of the same file counts too.
        self.plant("o.npy")
        os.link(self.path("o.npy"), self.path("o2.npy"))
        rc, _, err = run_cli("run", *self.io_args(), "--lse", self.path("o2.npy"))
        self.assert_error(rc, err, "--out and --lse", "same file")
        self.assertEqual(self.contents("o.npy"), OLD)

    def test_never_replaces_a_fifo_or_a_symlink(self):
        os.mkfifo(self.path("fifo"))
        rc, _, err = run_cli("run", *self.io_args("fifo"))
        self.assert_error(rc, err, "--out", "fifo", "not a regular file")
        self.assertTrue(stat.S_ISFIFO(os.lstat(self.path("fifo")).st_mode))
        self.plant("target.npy")
        os.symlink(self.path("target.npy"), self.path("link.npy"))
        rc, _, err = run_cli("run", *self.io_args(), "--lse", self.path("link.npy"))
        self.assert_error(rc, err, "--lse", "link.npy", "symbolic link")
        self.assertTrue(os.path.islink(self.path("link.npy")))
        self.assertEqual(self.contents("target.npy"), OLD)
        self.assert_files("fifo", "target.npy", "link.npy")

    def test_output_is_never_an_input(self):
        q = self.contents("q.npy")
        for out in ("q.npy", "./q.npy"):
            rc, _, err = run_cli("run", "--q", "q.npy", "--k", "k.npy", "--v", "v.npy",
                                 "--out", out, cwd=self.dir)
            self.assert_error(rc, err, "--out", "--q")
            self.assertEqual(self.contents("q.npy"), q)
        rc, _, err = run_cli("run", *self.io_args(), *self.grad_args(dv="v.npy"))
        self.assert_error(rc, err, "--dv", "--v")
        os.link(self.path("k.npy"), self.path("k2.npy"))
        rc, _, err = run_cli("run", *self.io_args(), "--lse", self.path("k2.npy"))
        self.assert_error(rc, err, "--lse", "--k")
        self.assert_files("k2.npy")

    def test_linear_outputs(self):
        rc, _, err = run_cli("run", "--op", "linear", *self.io_args("v.npy"))
        self.assert_error(rc, err, "--out", "--v")
        os.mkfifo(self.path("s.npy"))
        self.plant("o.npy")
        rc, _, err = run_cli("run", "--op", "linear", *self.io_args(),
                             "--state-out", self.path("s.npy"))
        self.assert_error(rc, err, "--state-out", "not a regular file")
        self.assertEqual(self.contents("o.npy"), OLD)
        rc, _, err = run_cli("run", "--op", "linear", "--q", "q.npy", "--k", "k.npy", "--v",
                             "v.npy", "--out", "o.npy", "--state-out", "./o.npy", cwd=self.dir)
        self.assert_error(rc, err, "--out and --state-out", "same file")
        self.assertEqual(self.contents("o.npy"), OLD)
        self.assert_files("o.npy", "s.npy")

    def test_replaces_a_regular_file_and_keeps_its_mode(self):
        self.plant("o.npy")
        os.chmod(self.path("o.npy"), 0o600)
        self.assert_ok(*run_cli("run", *self.io_args(), "--lse", self.path("l.npy")))
        self.assertEqual(read_npy(self.path("o.npy"))[2], (1, 4, 2, 8))
        self.assertEqual(stat.S_IMODE(os.stat(self.path("o.npy")).st_mode), 0o600)
        # A new file: 0644 less the umask.
        mask = os.umask(0o027)
        try:
            self.assert_ok(*run_cli("run", *self.io_args("new.npy")))
        finally:
            os.umask(mask)
        self.assertEqual(stat.S_IMODE(os.stat(self.path("new.npy")).st_mode), 0o640)
        self.assert_files("o.npy", "l.npy", "new.npy")

    def test_missing_directory_and_bad_names(self):
        for out, needle in ((os.path.join(self.dir, "no_such_dir", "o.npy"), "no_such_dir"),
                            (self.dir + "/", "file name"),
                            (os.path.join(self.dir, "."), "file name")):
            rc, _, err = run_cli("run", *self.io_args(), "--lse", out)
            self.assert_error(rc, err, "--lse", needle)
            self.assert_files()

    def test_failed_rename_puts_the_earlier_outputs_back(self):
        # An immutable --lse passes every check but refuses the rename, after --out's.
        self.plant("l.npy")
        try:
            immutable = subprocess.run(["chattr", "+i", self.path("l.npy")],
                                       stderr=subprocess.DEVNULL).returncode == 0
        except OSError:
            immutable = False
        if not immutable:
            raise unittest.SkipTest("needs chattr +i (root on ext4 or the like)")
        try:
            for existing in (True, False):
                if existing:
                    self.plant("o.npy")
                rc, _, err = run_cli("run", *self.io_args(), "--lse", self.path("l.npy"))
                self.assert_error(rc, err, "--lse", "no output was changed")
                if existing:
                    self.assertEqual(self.contents("o.npy"), OLD)
                    self.assert_files("o.npy", "l.npy")
                    os.remove(self.path("o.npy"))
                else:
                    self.assert_files("l.npy")
        finally:
            subprocess.run(["chattr", "-i", self.path("l.npy")])
        self.assertEqual(self.contents("l.npy"), OLD)
