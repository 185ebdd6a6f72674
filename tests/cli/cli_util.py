# SPDX-License-Identifier: Apache-2.0
"""Shared helpers of the `tessera` CLI tests: .npy files, running the binary, a test base.

The .npy reader and writer here use struct alone (python3 standard library only), so the
tests need no NumPy. cli_test.py sets BINARY before any test runs.
"""
import math
import os
import random
import struct
import subprocess
import tempfile
import unittest


BINARY = None  # the tessera binary, set by cli_test.py

# ---------------------------------------------------------------------------------------------
# .npy helpers

_FMT = {"<f4": "f", "<f2": "e", "<f8": "d", "|u1": "B", "|b1": "?", "<i4": "i", "<i8": "q"}


def write_npy(path, shape, values, descr="<f4", fortran=False, version=1):
    header = "{'descr': '%s', 'fortran_order': %s, 'shape': (%s), }" % (
        descr, "True" if fortran else "False",
        "".join("%d, " % d for d in shape).rstrip(" ") if len(shape) != 1 else "%d," % shape[0])
    prefix = 10 if version == 1 else 12
    pad = (64 - (prefix + len(header) + 1) % 64) % 64
    header = header + " " * pad + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY" + bytes([version, 0]))
        f.write(struct.pack("<H" if version == 1 else "<I", len(header)))
        f.write(header.encode("latin1"))
        f.write(struct.pack("<%d%s" % (len(values), _FMT[descr]), *values))


def read_npy(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:6] == b"\x93NUMPY", "bad magic"
    major = data[6]
    if major == 1:
        (hlen,), start = struct.unpack("<H", data[8:10]), 10
    else:
        (hlen,), start = struct.unpack("<I", data[8:12]), 12
    header = data[start:start + hlen].decode("latin1")
    assert (start + hlen) % 64 == 0, "payload not 64-byte aligned"
    assert header.endswith("\n")
    meta = eval(header, {"__builtins__": {}}, {"True": True, "False": False})  # trusted: ours
    shape = tuple(meta["shape"])
    n = 1
    for d in shape:
        n *= d
    payload = data[start + hlen:]
    itemsize = struct.calcsize(_FMT[meta["descr"]])
    assert len(payload) == n * itemsize, "payload size %d != %d" % (len(payload), n * itemsize)
    values = list(struct.unpack("<%d%s" % (n, _FMT[meta["descr"]]), payload))
    return meta["descr"], meta["fortran_order"], shape, values, payload


def round_to(values, descr):
    fmt = "<%d%s" % (len(values), _FMT[descr])
    return list(struct.unpack(fmt, struct.pack(fmt, *values)))


def random_values(n, seed, descr):
    rng = random.Random(seed)
    return round_to([rng.uniform(-1.0, 1.0) for _ in range(n)], descr)


# ---------------------------------------------------------------------------------------------

def run_cli(*args, timeout=60, cwd=None, env=None):
    """Runs the binary; env: variables to set on top of this process's environment."""
    full_env = None if env is None else dict(os.environ, **env)
    proc = subprocess.run([BINARY] + [str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout, cwd=cwd, env=full_env)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


class CliTestBase(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="tessera_cli_")
        self.dir = self._tmp.name

    def tearDown(self):
        self._tmp.cleanup()

    def path(self, name):
        return os.path.join(self.dir, name)

    def make_inputs(self, B, Sq, Sk, Hq, Hkv, D, descr="<f4", seed=1):
        q = random_values(B * Sq * Hq * D, seed, descr)
        k = random_values(B * Sk * Hkv * D, seed + 1, descr)
        v = random_values(B * Sk * Hkv * D, seed + 2, descr)
        write_npy(self.path("q.npy"), (B, Sq, Hq, D), q, descr)
        write_npy(self.path("k.npy"), (B, Sk, Hkv, D), k, descr)
        write_npy(self.path("v.npy"), (B, Sk, Hkv, D), v, descr)
        return q, k, v

    def io_args(self, out="o.npy"):
        return ["--q", self.path("q.npy"), "--k", self.path("k.npy"), "--v", self.path("v.npy"),
                "--out", self.path(out)]

    def assert_ok(self, rc, out, err):
        self.assertEqual(rc, 0, "exit %d, stderr: %s" % (rc, err))
        self.assertEqual(out, "", "stdout must stay clean on success")

    def assert_error(self, rc, err, *needles):
        self.assertEqual(rc, 2, "expected exit code 2, got %d (stderr: %r)" % (rc, err))
        self.assertTrue(err.strip(), "an error must print a message on stderr")
        for needle in needles:
            self.assertIn(needle, err)

    def assert_close_rel(self, got, want, rtol, what):
        """Max abs error <= rtol * max |want| (the tensor's scale; gradients have no fixed one)."""
        scale = max([abs(w) for w in want] + [1e-30])
        self.assert_close(got, want, rtol * scale, what)

    def assert_close(self, got, want, tol, what):
        self.assertEqual(len(got), len(want), what)
        worst = 0.0
        for g, w in zip(got, want):
            if math.isinf(w):
                self.assertEqual(g, w, "%s: expected %r, got %r" % (what, w, g))
                continue
            worst = max(worst, abs(g - w))
        self.assertLessEqual(worst, tol, "%s: max abs error %.3g > %.3g" % (what, worst, tol))


# Keys every `bench --op forward|backward --json` result has.
BENCH_KEYS = ["op", "dtype", "batch", "heads", "kv_heads", "seq_q", "seq_k", "dim", "causal",
              "threads", "ms", "gflops", "peak_gflops", "frac_peak", "peak_rss_mb", "simd_target"]
