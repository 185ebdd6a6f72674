# SPDX-License-Identifier: Apache-2.0
"""`tessera run --op longconv` against a direct fp64 sum, bad inputs, and `tessera bench --op
longconv --vs direct` on a tiny shape.
"""
import json
import os

from cli_util import CliTestBase, random_values, read_npy, run_cli, write_npy


def longconv_reference(u, h, d, B, N, C, L):
    """y[b, t, c] = sum_{s <= min(t, L - 1)} h[s, c] u[b, t - s, c] (+ d[c] u[b, t, c])."""
    y = []
    for b in range(B):
        for t in range(N):
            for c in range(C):
                acc = sum(h[s * C + c] * u[(b * N + t - s) * C + c] for s in range(min(t + 1, L)))
                if d is not None:
                    acc += d[c] * u[(b * N + t) * C + c]
                y.append(acc)
    return y


class LongConvRunTest(CliTestBase):
    def make(self, B=2, N=37, C=3, L=20):
        u = random_values(B * N * C, 1, "<f4")
        h = random_values(L * C, 2, "<f4")
        d = random_values(C, 3, "<f4")
        write_npy(self.path("u.npy"), (B, N, C), u)
        write_npy(self.path("h.npy"), (L, C), h)
        write_npy(self.path("d.npy"), (C,), d)
        return u, h, d

    def test_matches_reference_on_every_path(self):
        B, N, C, L = 2, 37, 3, 20
        u, h, d = self.make(B, N, C, L)
        want = longconv_reference(u, h, d, B, N, C, L)
        for path in ("auto", "direct", "fft"):
            rc, out, err = run_cli("run", "--op", "longconv", "--u", self.path("u.npy"),
                                   "--filter", self.path("h.npy"), "--bias", self.path("d.npy"),
                                   "--conv-path", path, "--out", self.path("y.npy"))
            self.assert_ok(rc, out, err)
            descr, _, shape, got, _ = read_npy(self.path("y.npy"))
            self.assertEqual(shape, (B, N, C))
            self.assert_close_rel(got, want, 1e-5, "y (%s)" % path)

    def test_filter_longer_than_sequence(self):
        self.make(1, 5, 2, 6)
        rc, _, err = run_cli("run", "--op", "longconv", "--u", self.path("u.npy"), "--filter",
                             self.path("h.npy"), "--out", self.path("y.npy"))
        self.assert_error(rc, err, "filter")
        self.assertFalse(os.path.exists(self.path("y.npy")))

    def test_attention_options_refused(self):
        self.make()
        rc, _, err = run_cli("run", "--op", "longconv", "--u", self.path("u.npy"), "--filter",
                             self.path("h.npy"), "--q", self.path("u.npy"), "--out",
                             self.path("y.npy"))
        self.assert_error(rc, err, "--q")
        rc, _, err = run_cli("run", "--u", self.path("u.npy"), "--out", self.path("y.npy"))
        self.assert_error(rc, err, "--u")


class LongConvBenchTest(CliTestBase):
    def test_bench_vs_direct(self):
        for path in ("fft", "stream"):
            rc, out, err = run_cli("bench", "--op", "longconv", "--seq", "300", "--channels", "5",
                                   "--conv-path", path, "--conv-block", "64", "--vs", "direct",
                                   "--reps", "2", "--warmup", "0", "--json")
            self.assertEqual(rc, 0, err)
            r = json.loads(out)
            self.assertEqual(r["op"], "longconv")
            self.assertGreater(r["speedup"], 0.0)
            self.assertLessEqual(r["max_abs_diff"], 1e-4)

    def test_bench_longconv_option_refused_elsewhere(self):
        rc, _, err = run_cli("bench", "--op", "linear", "--channels", "4")
        self.assert_error(rc, err, "--channels")
