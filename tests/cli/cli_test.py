#!/usr/bin/env python3
"""End-to-end tests of the `tessera` command-line tool (python3 standard library only).

Usage: cli_test.py PATH/TO/tessera

Writes .npy inputs with struct, runs the binary, reads the outputs back and compares them with
a small fp64 reference attention written here (independent of the C++ reference).
"""
import json
import math
import os
import random
import struct
import subprocess
import sys
import tempfile
import unittest

BINARY = None  # set from argv in main()

# ---------------------------------------------------------------------------------------------
# .npy helpers

_FMT = {"<f4": "f", "<f2": "e", "<f8": "d"}


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
# fp64 reference attention. Layouts: q/out [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], lse [B, Hq, Sq].
# Bottom-right alignment: query i sits at position i + Sk - Sq. Modifier order: softcap,
# ALiBi, mask. Fully masked rows: out 0, lse -inf.

def reference(q, k, v, B, Sq, Sk, Hq, Hkv, D, causal=False, window=(-1, -1), softcap=0.0,
              scale=None, alibi=None):
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    wl, wr = window
    if causal:
        wr = 0 if wr < 0 else min(wr, 0)
    group = Hq // Hkv
    out = [0.0] * (B * Sq * Hq * D)
    lse = [0.0] * (B * Hq * Sq)
    for b in range(B):
        for h in range(Hq):
            hk = h // group
            for i in range(Sq):
                pos = i + Sk - Sq
                qo = ((b * Sq + i) * Hq + h) * D
                logits = []
                for j in range(Sk):
                    if wl >= 0 and j < pos - wl:
                        continue
                    if wr >= 0 and j > pos + wr:
                        continue
                    ko = ((b * Sk + j) * Hkv + hk) * D
                    s = scale * sum(q[qo + d] * k[ko + d] for d in range(D))
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if alibi is not None:
                        s -= alibi[h] * abs(pos - j)
                    logits.append((j, s))
                lo = (b * Hq + h) * Sq + i
                if not logits:
                    lse[lo] = -math.inf
                    continue
                m = max(s for _, s in logits)
                weights = [(j, math.exp(s - m)) for j, s in logits]
                total = sum(w for _, w in weights)
                lse[lo] = m + math.log(total)
                for d in range(D):
                    acc = 0.0
                    for j, w in weights:
                        acc += w * v[((b * Sk + j) * Hkv + hk) * D + d]
                    out[qo + d] = acc / total
    return out, lse


# ---------------------------------------------------------------------------------------------

def run_cli(*args, timeout=60):
    proc = subprocess.run([BINARY] + [str(a) for a in args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout)
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

    def assert_close(self, got, want, tol, what):
        self.assertEqual(len(got), len(want), what)
        worst = 0.0
        for g, w in zip(got, want):
            if math.isinf(w):
                self.assertEqual(g, w, "%s: expected %r, got %r" % (what, w, g))
                continue
            worst = max(worst, abs(g - w))
        self.assertLessEqual(worst, tol, "%s: max abs error %.3g > %.3g" % (what, worst, tol))


class RunTest(CliTestBase):
    def test_f32_gqa_with_lse(self):
        B, Sq, Sk, Hq, Hkv, D = 2, 5, 7, 4, 2, 8
        q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D)
        self.assert_ok(*run_cli("run", *self.io_args(), "--lse", self.path("lse.npy"),
                                "--threads", 2))
        descr, fortran, shape, out, _ = read_npy(self.path("o.npy"))
        self.assertEqual((descr, fortran, shape), ("<f4", False, (B, Sq, Hq, D)))
        ldescr, _, lshape, lse, _ = read_npy(self.path("lse.npy"))
        self.assertEqual((ldescr, lshape), ("<f4", (B, Hq, Sq)))
        want, want_lse = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D)
        self.assert_close(out, want, 1e-5, "out")
        self.assert_close(lse, want_lse, 1e-5, "lse")

    def test_f16_output_dtype_and_values(self):
        B, Sq, Sk, Hq, Hkv, D = 1, 6, 6, 2, 1, 16
        q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D, descr="<f2")
        self.assert_ok(*run_cli("run", *self.io_args(), "--lse", self.path("lse.npy")))
        descr, _, shape, out, _ = read_npy(self.path("o.npy"))
        self.assertEqual((descr, shape), ("<f2", (B, Sq, Hq, D)))
        self.assertEqual(read_npy(self.path("lse.npy"))[0], "<f4")
        want, _ = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D)
        # The output is rounded to f16 (relative 2^-11); |out| <= 1 here.
        self.assert_close(out, want, 1e-3, "f16 out")

    def test_causal_equals_window_bitwise(self):
        B, Sq, Sk, Hq, Hkv, D = 1, 9, 12, 2, 2, 8
        q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D)
        self.assert_ok(*run_cli("run", *self.io_args("causal.npy"), "--causal",
                                "--lse", self.path("lse_c.npy")))
        self.assert_ok(*run_cli("run", *self.io_args("window.npy"), "--window", "-1,0",
                                "--lse", self.path("lse_w.npy")))
        self.assertEqual(read_npy(self.path("causal.npy"))[4],
                         read_npy(self.path("window.npy"))[4])
        self.assertEqual(read_npy(self.path("lse_c.npy"))[4], read_npy(self.path("lse_w.npy"))[4])
        want, want_lse = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D, causal=True)
        self.assert_close(read_npy(self.path("causal.npy"))[3], want, 1e-5, "causal out")
        self.assert_close(read_npy(self.path("lse_c.npy"))[3], want_lse, 1e-5, "causal lse")

    def test_fully_masked_rows(self):
        # Sq > Sk with bottom-right causal: the first Sq - Sk rows see no key.
        B, Sq, Sk, Hq, Hkv, D = 1, 7, 4, 1, 1, 4
        q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D)
        self.assert_ok(*run_cli("run", *self.io_args(), "--causal", "--lse", self.path("l.npy")))
        want, want_lse = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D, causal=True)
        out, lse = read_npy(self.path("o.npy"))[3], read_npy(self.path("l.npy"))[3]
        self.assertEqual(lse[:3], [-math.inf] * 3)
        self.assertEqual(out[:3 * D], [0.0] * (3 * D))
        self.assert_close(out, want, 1e-5, "out")
        self.assert_close(lse, want_lse, 1e-5, "lse")

    def test_window_softcap_scale_alibi(self):
        B, Sq, Sk, Hq, Hkv, D = 1, 8, 8, 4, 2, 8
        q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D)
        slopes = round_to([0.5, 0.25, 0.125, 0.0625], "<f4")
        write_npy(self.path("alibi.npy"), (Hq,), slopes)
        self.assert_ok(*run_cli("run", *self.io_args(), "--window", "3,1", "--softcap", "2.5",
                                "--scale", "0.7", "--alibi", self.path("alibi.npy"),
                                "--lse", self.path("l.npy")))
        want, want_lse = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D, window=(3, 1), softcap=2.5,
                                   scale=0.7, alibi=slopes)
        self.assert_close(read_npy(self.path("o.npy"))[3], want, 1e-5, "out")
        self.assert_close(read_npy(self.path("l.npy"))[3], want_lse, 1e-5, "lse")

    def test_npy_version_2_input(self):
        B, Sq, Sk, Hq, Hkv, D = 1, 3, 3, 1, 1, 4
        q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D)
        write_npy(self.path("q.npy"), (B, Sq, Hq, D), q, version=2)
        self.assert_ok(*run_cli("run", *self.io_args()))
        want, _ = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D)
        self.assert_close(read_npy(self.path("o.npy"))[3], want, 1e-5, "out")


class RunErrorTest(CliTestBase):
    def setUp(self):
        super().setUp()
        self.make_inputs(1, 4, 4, 2, 2, 8)

    def assert_no_output(self):
        self.assertFalse(os.path.exists(self.path("o.npy")), "nothing may be written on error")

    def test_missing_file(self):
        args = self.io_args()
        args[1] = self.path("nope.npy")
        rc, _, err = run_cli("run", *args)
        self.assert_error(rc, err, "nope.npy")
        self.assert_no_output()

    def test_missing_required_flag(self):
        rc, _, err = run_cli("run", "--q", self.path("q.npy"))
        self.assert_error(rc, err)

    def test_mismatched_head_dim(self):
        write_npy(self.path("k.npy"), (1, 4, 2, 6), [0.0] * 48)
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "head dim")
        self.assert_no_output()

    def test_mismatched_k_v(self):
        write_npy(self.path("v.npy"), (1, 5, 2, 8), [0.0] * 80)
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "v:")
        self.assert_no_output()

    def test_heads_not_divisible(self):
        write_npy(self.path("q.npy"), (1, 4, 3, 8), [0.0] * 96)
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "KV head")
        self.assert_no_output()

    def test_bad_window(self):
        for window in ("3", "a,b", "-2,0", "1,2,3", ""):
            rc, _, err = run_cli("run", *self.io_args(), "--window=" + window)
            self.assert_error(rc, err)
            self.assertIn("--window", err, window)
        self.assert_no_output()

    def test_mixed_dtypes(self):
        write_npy(self.path("k.npy"), (1, 4, 2, 8), [0.0] * 64, descr="<f2")
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "dtype")

    def test_unsupported_dtype(self):
        write_npy(self.path("q.npy"), (1, 4, 2, 8), [0.0] * 64, descr="<f8")
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "<f8", "q.npy")

    def test_fortran_order(self):
        write_npy(self.path("q.npy"), (1, 4, 2, 8), [0.0] * 64, fortran=True)
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "Fortran")

    def test_truncated(self):
        with open(self.path("q.npy"), "rb") as f:
            data = f.read()
        with open(self.path("q.npy"), "wb") as f:
            f.write(data[:-5])
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "truncated")

    def test_bad_header(self):
        with open(self.path("q.npy"), "wb") as f:
            f.write(b"\x93NUMPY\x01\x00\x10\x00{'descr': 3}    \n")
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "header")
        with open(self.path("q.npy"), "wb") as f:
            f.write(b"not an npy file")
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "not a .npy")

    def test_wrong_rank(self):
        write_npy(self.path("q.npy"), (4, 2, 8), [0.0] * 64)
        rc, _, err = run_cli("run", *self.io_args())
        self.assert_error(rc, err, "rank-4")

    def test_bad_alibi(self):
        write_npy(self.path("a.npy"), (3,), [0.1, 0.2, 0.3])
        rc, _, err = run_cli("run", *self.io_args(), "--alibi", self.path("a.npy"))
        self.assert_error(rc, err, "alibi")
        write_npy(self.path("a.npy"), (1, 1, 1, 1, 2), [0.1, 0.2])  # rank 5: no crash
        rc, _, err = run_cli("run", *self.io_args(), "--alibi", self.path("a.npy"))
        self.assert_error(rc, err, "alibi")

    def test_unwritable_lse_writes_nothing(self):
        rc, _, err = run_cli("run", *self.io_args(), "--lse",
                             os.path.join(self.dir, "no_such_dir", "l.npy"))
        self.assert_error(rc, err, "no_such_dir")
        self.assert_no_output()
        self.assertEqual(sorted(os.listdir(self.dir)), ["k.npy", "q.npy", "v.npy"])

    def test_bad_path_and_threads(self):
        rc, _, err = run_cli("run", *self.io_args(), "--path", "bogus")
        self.assert_error(rc, err, "--path")
        rc, _, err = run_cli("run", *self.io_args(), "--threads", "-3")
        self.assert_error(rc, err, "--threads")


BENCH_KEYS = ["op", "dtype", "batch", "heads", "kv_heads", "seq_q", "seq_k", "dim", "causal",
              "threads", "ms", "gflops", "peak_gflops", "frac_peak", "peak_rss_mb", "simd_target"]
VS_KEYS = ["baseline", "baseline_ms", "baseline_gflops", "speedup", "max_abs_diff"]


class BenchInfoTest(unittest.TestCase):
    def bench_json(self, *args):
        rc, out, err = run_cli("bench", "--op", "forward", "--batch", 1, "--heads", 2,
                               "--kv-heads", 1, "--seq", 48, "--dim", 32, "--reps", 3,
                               "--threads", 1, "--json", *args)
        self.assertEqual(rc, 0, err)
        return json.loads(out)  # exactly one JSON object: json.loads rejects trailing text

    def test_bench_json_vs_naive(self):
        r = self.bench_json("--vs", "naive", "--seq-k", 40)
        for key in BENCH_KEYS + VS_KEYS:
            self.assertIn(key, r)
        self.assertEqual((r["op"], r["dtype"], r["batch"], r["heads"], r["kv_heads"]),
                         ("forward", "f32", 1, 2, 1))
        self.assertEqual((r["seq_q"], r["seq_k"], r["dim"], r["causal"], r["threads"]),
                         (48, 40, 32, False, 1))
        self.assertGreater(r["ms"], 0)
        self.assertGreater(r["baseline_ms"], 0)
        self.assertGreater(r["peak_gflops"], 1)
        self.assertAlmostEqual(r["gflops"], 4 * 2 * 48 * 40 * 32 / (r["ms"] * 1e-3) * 1e-9,
                               delta=1e-6 * r["gflops"])
        self.assertAlmostEqual(r["frac_peak"], r["gflops"] / r["peak_gflops"], places=9)
        self.assertGreater(r["frac_peak"], 0)
        self.assertLess(r["frac_peak"], 1.5)
        self.assertGreater(r["peak_rss_mb"], 1)
        self.assertLess(r["peak_rss_mb"], 1024)
        self.assertLess(r["max_abs_diff"], 1e-5)
        self.assertAlmostEqual(r["speedup"], r["baseline_ms"] / r["ms"], places=9)
        self.assertTrue(r["simd_target"])

    def test_bench_causal_f16(self):
        r = self.bench_json("--causal", "--dtype", "f16", "--vs", "naive")
        self.assertEqual((r["dtype"], r["causal"]), ("f16", True))
        # Causal with Sq == Sk counts half the pairs.
        self.assertAlmostEqual(r["flops"], 2 * 2 * 48 * 48 * 32, places=3)
        self.assertLess(r["max_abs_diff"], 2e-3)  # the output is rounded to f16

    def test_bench_baseline_only(self):
        r = self.bench_json("--baseline-only")
        self.assertTrue(r["baseline_only"])
        self.assertNotIn("ms", r)
        self.assertGreater(r["baseline_ms"], 0)
        self.assertGreater(r["baseline_peak_rss_mb"], 1)

    def test_bench_human_output(self):
        rc, out, err = run_cli("bench", "--seq", 32, "--heads", 1, "--dim", 16, "--reps", 3,
                               "--threads", 1, "--vs", "naive")
        self.assertEqual(rc, 0, err)
        self.assertIn("tessera", out)
        self.assertIn("naive-openblas", out)
        self.assertIn("speedup", out)

    def test_bench_errors(self):
        for args, needle in ((["--op", "backward"], "unsupported op"),
                             (["--op", "decode"], "unsupported op"),
                             (["--op", "nonsense"], "unknown op"),
                             (["--heads", 3, "--kv-heads", 2], "--kv-heads"),
                             (["--dtype", "f64"], "--dtype"),
                             (["--vs", "ggml"], "--vs")):
            rc, out, err = run_cli("bench", "--seq", 16, "--dim", 8, *args)
            self.assertEqual(rc, 2, "%s: %s" % (args, err))
            self.assertIn(needle, err)
            self.assertEqual(out, "")

    def test_info(self):
        rc, out, err = run_cli("info")
        self.assertEqual(rc, 0, err)
        self.assertIn("simd target", out)
        rc, out, err = run_cli("info", "--json", "--threads", 1)
        self.assertEqual(rc, 0, err)
        r = json.loads(out)
        for key in ("version", "simd_target", "hardware_threads", "threads", "peak_gflops_1t",
                    "peak_gflops_all"):
            self.assertIn(key, r)
        self.assertEqual(r["threads"], 1)
        self.assertGreaterEqual(r["hardware_threads"], 1)
        self.assertGreater(r["peak_gflops_1t"], 1)
        self.assertGreater(r["peak_gflops_all"], 0.5 * r["peak_gflops_1t"])

    def test_no_subcommand_and_help(self):
        rc, _, err = run_cli()
        self.assertEqual(rc, 2)
        self.assertTrue(err)
        rc, out, _ = run_cli("run", "--help")
        self.assertEqual(rc, 0)
        self.assertIn("--window", out)


def main():
    global BINARY
    if len(sys.argv) < 2:
        print("usage: cli_test.py PATH/TO/tessera [unittest args]", file=sys.stderr)
        return 2
    BINARY = os.path.abspath(sys.argv[1])
    program = unittest.main(argv=[sys.argv[0]] + sys.argv[2:], exit=False, verbosity=2)
    return 0 if program.result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
