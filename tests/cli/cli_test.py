#!/usr/bin/env python3
"""End-to-end tests of the `tessera` command-line tool (python3 standard library only).

Usage: cli_test.py PATH/TO/tessera

Writes .npy inputs with struct, runs the binary, reads the outputs back and compares them with
a small fp64 reference attention (forward and gradients) written here, independent of the C++
reference.
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


def reference_backward(q, k, v, dout, B, Sq, Sk, Hq, Hkv, D, causal=False, window=(-1, -1),
                       softcap=0.0, scale=None, alibi=None):
    """fp64 gradients (dq, dk, dv) of sum(out * dout); dk, dv summed over each GQA group.

    With P = softmax(s), dP_j = dout_i . v_j and Delta_i = dout_i . out_i: ds_j = P_j (dP_j -
    Delta_i); through the softcap s = c tanh(x / c) of x = scale q_i . k_j, dx_j = ds_j (1 -
    (s_j / c)^2); then dq_i = scale sum_j dx_j k_j, dk_j += scale dx_j q_i, dv_j += P_j dout_i.
    ALiBi adds a constant, so it changes P but not the chain rule. Rows with no visible key
    contribute nothing (dq = 0).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    wl, wr = window
    if causal:
        wr = 0 if wr < 0 else min(wr, 0)
    group = Hq // Hkv
    out = [0.0] * (B * Sq * Hq * D)
    dq = [0.0] * (B * Sq * Hq * D)
    dk = [0.0] * (B * Sk * Hkv * D)
    dv = [0.0] * (B * Sk * Hkv * D)
    for b in range(B):
        for h in range(Hq):
            hk = h // group
            for i in range(Sq):
                pos = i + Sk - Sq
                qo = ((b * Sq + i) * Hq + h) * D
                qi, doi = q[qo:qo + D], dout[qo:qo + D]
                rows = []  # (key offset, logit after softcap and ALiBi, d logit / d x)
                for j in range(Sk):
                    if (wl >= 0 and j < pos - wl) or (wr >= 0 and j > pos + wr):
                        continue
                    ko = ((b * Sk + j) * Hkv + hk) * D
                    s = scale * sum(qi[d] * k[ko + d] for d in range(D))
                    dsdx = 1.0
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                        dsdx = 1.0 - (s / softcap) ** 2
                    if alibi is not None:
                        s -= alibi[h] * abs(pos - j)
                    rows.append((ko, s, dsdx))
                if not rows:
                    continue
                m = max(s for _, s, _ in rows)
                total = sum(math.exp(s - m) for _, s, _ in rows)
                probs = [math.exp(s - m) / total for _, s, _ in rows]
                oi = [sum(p * v[ko + d] for p, (ko, _, _) in zip(probs, rows)) for d in range(D)]
                out[qo:qo + D] = oi
                delta = sum(doi[d] * oi[d] for d in range(D))
                for p, (ko, _, dsdx) in zip(probs, rows):
                    dp = sum(doi[d] * v[ko + d] for d in range(D))
                    dx = p * (dp - delta) * dsdx
                    for d in range(D):
                        dq[qo + d] += scale * dx * k[ko + d]
                        dk[ko + d] += scale * dx * qi[d]
                        dv[ko + d] += p * doi[d]
    return out, dq, dk, dv


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

    def test_decode_shapes(self):
        # Sq <= 16 goes through the decode path inside AttentionForward.
        for Sq, causal, descr in ((1, False, "<f4"), (4, True, "<f4"), (1, True, "<f2")):
            with self.subTest(Sq=Sq, causal=causal, descr=descr):
                B, Sk, Hq, Hkv, D = 2, 37, 4, 2, 16
                q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D, descr=descr)
                self.assert_ok(*run_cli("run", *self.io_args(), "--lse", self.path("l.npy"),
                                        *(["--causal"] if causal else [])))
                want, want_lse = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D, causal=causal)
                tol = 1e-5 if descr == "<f4" else 1e-3  # f16 output rounding
                self.assert_close(read_npy(self.path("o.npy"))[3], want, tol, "out")
                self.assert_close(read_npy(self.path("l.npy"))[3], want_lse, 1e-5, "lse")

    def test_npy_version_2_input(self):
        B, Sq, Sk, Hq, Hkv, D = 1, 3, 3, 1, 1, 4
        q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D)
        write_npy(self.path("q.npy"), (B, Sq, Hq, D), q, version=2)
        self.assert_ok(*run_cli("run", *self.io_args()))
        want, _ = reference(q, k, v, B, Sq, Sk, Hq, Hkv, D)
        self.assert_close(read_npy(self.path("o.npy"))[3], want, 1e-5, "out")


# Paths the backward tests run: the fp64 reference forced through --path (the CLI's plumbing
# checked independently of the kernel), the default path, and the generic kernel.
BACKWARD_PATHS = ("reference", None, "generic")


class RunBackwardTest(CliTestBase):
    def make_dout(self, B, Sq, Hq, D, descr="<f4", seed=11):
        dout = random_values(B * Sq * Hq * D, seed, descr)
        write_npy(self.path("do.npy"), (B, Sq, Hq, D), dout, descr)
        return dout

    def grad_args(self, tag=""):
        return ["--dout", self.path("do.npy"), "--dq", self.path("dq%s.npy" % tag),
                "--dk", self.path("dk%s.npy" % tag), "--dv", self.path("dv%s.npy" % tag)]

    def run_backward(self, path, *args, tag=""):
        """Runs forward + backward; returns {name: read_npy(...)} for o, dq, dk, dv."""
        extra = ["--path", path] if path else []
        self.assert_ok(*run_cli("run", *self.io_args("o%s.npy" % tag), *self.grad_args(tag),
                                *extra, *args))
        return {name: read_npy(self.path("%s%s.npy" % (name, tag)))
                for name in ("o", "dq", "dk", "dv")}

    def check_backward(self, shape, descr="<f4", rtol=1e-5, paths=BACKWARD_PATHS, args=(),
                       **options):
        B, Sq, Sk, Hq, Hkv, D = shape
        q, k, v = self.make_inputs(B, Sq, Sk, Hq, Hkv, D, descr=descr)
        dout = self.make_dout(B, Sq, Hq, D, descr=descr)
        out, dq, dk, dv = reference_backward(q, k, v, dout, B, Sq, Sk, Hq, Hkv, D, **options)
        want = {"o": (out, (B, Sq, Hq, D)), "dq": (dq, (B, Sq, Hq, D)),
                "dk": (dk, (B, Sk, Hkv, D)), "dv": (dv, (B, Sk, Hkv, D))}
        results = {}
        for path in paths:
            tag = "_" + (path or "default")
            got = self.run_backward(path, *args, tag=tag)
            for name, (values, want_shape) in want.items():
                descr_got, fortran, shape_got, values_got, _ = got[name]
                what = "%s (path %s)" % (name, path or "default")
                self.assertEqual((descr_got, fortran, shape_got), (descr, False, want_shape),
                                 what)
                self.assert_close_rel(values_got, values, rtol, what)
            results[path] = got
        return results

    def test_f32_gqa(self):
        # No --lse: the CLI allocates the forward's LSE for the backward by itself.
        self.check_backward((2, 5, 7, 4, 2, 8), args=("--threads", 2))
        self.assertFalse([f for f in os.listdir(self.dir) if "lse" in f or ".tmp" in f])

    def test_causal_mqa_with_masked_rows(self):
        # Sq > Sk, bottom-right causal: the first Sq - Sk query rows see no key, so dq = 0 there.
        B, Sq, Sk, Hq, Hkv, D = 1, 7, 4, 2, 1, 8
        got = self.check_backward((B, Sq, Sk, Hq, Hkv, D), args=("--causal",), causal=True)
        for path, result in got.items():
            self.assertEqual(result["dq"][3][:3 * Hq * D], [0.0] * (3 * Hq * D), path)

    def test_causal_square_gqa(self):
        self.check_backward((2, 9, 9, 4, 2, 16), args=("--causal",), causal=True)

    def test_window_softcap_scale_alibi(self):
        B, Sq, Sk, Hq, Hkv, D = 1, 8, 8, 4, 2, 8
        slopes = round_to([0.5, 0.25, 0.125, 0.0625], "<f4")
        write_npy(self.path("alibi.npy"), (Hq,), slopes)
        self.check_backward((B, Sq, Sk, Hq, Hkv, D),
                            args=("--window", "3,1", "--softcap", "2.5", "--scale", "0.7",
                                  "--alibi", self.path("alibi.npy")),
                            window=(3, 1), softcap=2.5, scale=0.7, alibi=slopes)

    def test_fast_head_dim(self):
        # D = 64 has a compile-time instantiation: the default path takes it.
        self.check_backward((1, 6, 10, 2, 1, 64), paths=(None, "fast"), causal=True,
                            args=("--causal",))

    def test_f16(self):
        # Gradients are written in f16 (relative 2^-11) from fp32 accumulation.
        self.check_backward((1, 6, 6, 2, 1, 16), descr="<f2", rtol=2e-3, paths=(None,))

    def test_lse_and_determinism_across_threads(self):
        B, Sq, Sk, Hq, Hkv, D = 1, 33, 40, 4, 2, 8
        self.make_inputs(B, Sq, Sk, Hq, Hkv, D)
        self.make_dout(B, Sq, Hq, D)
        one = self.run_backward(None, "--threads", 1, "--lse", self.path("l1.npy"), tag="1")
        two = self.run_backward(None, "--threads", 2, "--lse", self.path("l2.npy"), tag="2")
        for name in one:
            self.assertEqual(one[name][4], two[name][4], name + ": threads 1 vs 2, bitwise")
        # --lse next to the backward is the forward's own LSE.
        self.assert_ok(*run_cli("run", *self.io_args("o3.npy"), "--lse", self.path("l3.npy")))
        self.assertEqual(read_npy(self.path("l1.npy"))[4], read_npy(self.path("l3.npy"))[4])
        self.assertEqual(read_npy(self.path("l2.npy"))[4], read_npy(self.path("l3.npy"))[4])

    def test_verbose_reports_backward(self):
        self.make_inputs(1, 4, 4, 1, 1, 8)
        self.make_dout(1, 4, 1, 8)
        rc, out, err = run_cli("run", *self.io_args(), *self.grad_args(), "--verbose")
        self.assert_ok(rc, out, err)
        self.assertIn("backward", err)


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

    def grad_args(self):
        return ["--dout", self.path("do.npy"), "--dq", self.path("dq.npy"),
                "--dk", self.path("dk.npy"), "--dv", self.path("dv.npy")]

    def assert_only_inputs(self, *extra):
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(["k.npy", "q.npy", "v.npy"] +
                                                               list(extra)))

    def test_partial_backward_flags(self):
        write_npy(self.path("do.npy"), (1, 4, 2, 8), [0.5] * 64)
        flags = self.grad_args()
        for drop in ((0,), (1,), (3,), (1, 2, 3), (0, 2)):
            args = [a for i, a in enumerate(flags) if i // 2 not in drop]
            rc, _, err = run_cli("run", *self.io_args(), *args)
            self.assert_error(rc, err, "--dout, --dq, --dk and --dv together")
            for i in drop:
                self.assertIn(flags[2 * i], err.split("without")[-1], (drop, err))
            self.assert_only_inputs("do.npy")

    def test_bad_dout(self):
        for shape, descr, needle in (((1, 4, 2, 6), "<f4", "dout"),
                                     ((1, 4, 2, 8), "<f2", "dtype"),
                                     ((4, 2, 8), "<f4", "rank-4")):
            n = 1
            for d in shape:
                n *= d
            write_npy(self.path("do.npy"), shape, [0.5] * n, descr)
            rc, _, err = run_cli("run", *self.io_args(), *self.grad_args())
            self.assert_error(rc, err, needle)
            self.assert_only_inputs("do.npy")
        os.remove(self.path("do.npy"))
        rc, _, err = run_cli("run", *self.io_args(), *self.grad_args())
        self.assert_error(rc, err, "do.npy")
        self.assert_only_inputs()

    def test_unwritable_gradient_writes_nothing(self):
        write_npy(self.path("do.npy"), (1, 4, 2, 8), [0.5] * 64)
        args = self.grad_args()
        args[-1] = os.path.join(self.dir, "no_such_dir", "dv.npy")
        rc, _, err = run_cli("run", *self.io_args(), "--lse", self.path("l.npy"), *args)
        self.assert_error(rc, err, "no_such_dir")
        self.assert_only_inputs("do.npy")

    def test_same_output_twice(self):
        write_npy(self.path("do.npy"), (1, 4, 2, 8), [0.5] * 64)
        args = self.grad_args()
        args[5] = args[3]  # --dk on --dq's file
        rc, _, err = run_cli("run", *self.io_args(), *args)
        self.assert_error(rc, err, "--dq and --dk")
        rc, _, err = run_cli("run", *self.io_args(), "--lse", self.path("o.npy"))
        self.assert_error(rc, err, "--out and --lse")
        self.assert_only_inputs("do.npy")

    def test_bad_path_and_threads(self):
        rc, _, err = run_cli("run", *self.io_args(), "--path", "bogus")
        self.assert_error(rc, err, "--path")
        rc, _, err = run_cli("run", *self.io_args(), "--threads", "-3")
        self.assert_error(rc, err, "--threads")


BENCH_KEYS = ["op", "dtype", "batch", "heads", "kv_heads", "seq_q", "seq_k", "dim", "causal",
              "threads", "ms", "gflops", "peak_gflops", "frac_peak", "peak_rss_mb", "simd_target"]
VS_KEYS = ["baseline", "baseline_ms", "baseline_gflops", "speedup", "max_abs_diff"]


class BenchInfoTest(unittest.TestCase):
    def bench_json(self, *args, op="forward", heads=2, kv_heads=1):
        rc, out, err = run_cli("bench", "--op", op, "--batch", 1, "--heads", heads,
                               "--kv-heads", kv_heads, "--seq", 48, "--dim", 32, "--reps", 3,
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

    def test_bench_backward_json_vs_naive(self):
        r = self.bench_json("--vs", "naive", "--seq-k", 40, op="backward")
        for key in BENCH_KEYS + VS_KEYS + ["forward_ms", "baseline_forward_ms"]:
            self.assertIn(key, r)
        self.assertEqual((r["op"], r["dtype"], r["heads"], r["kv_heads"], r["seq_q"], r["seq_k"]),
                         ("backward", "f32", 2, 1, 48, 40))
        # 2.5x the forward's 4 * H * Sq * Sk * D.
        self.assertAlmostEqual(r["flops"], 2.5 * 4 * 2 * 48 * 40 * 32, places=3)
        self.assertGreater(r["ms"], 0)
        self.assertGreater(r["baseline_ms"], 0)
        self.assertAlmostEqual(r["gflops"], r["flops"] / (r["ms"] * 1e-3) * 1e-9,
                               delta=1e-6 * r["gflops"])
        self.assertAlmostEqual(r["frac_peak"], r["gflops"] / r["peak_gflops"], places=9)
        self.assertGreater(r["peak_rss_mb"], 1)
        self.assertLess(r["peak_rss_mb"], 1024)
        self.assertLess(r["max_abs_diff"], 1e-5)  # over dq, dk and dv
        self.assertAlmostEqual(r["speedup"], r["baseline_ms"] / r["ms"], places=9)

    def test_bench_backward_causal_gqa_f16_reference_path(self):
        r = self.bench_json("--causal", "--dtype", "f16", "--vs", "naive", "--path", "reference",
                            op="backward", heads=4, kv_heads=2)
        self.assertEqual((r["dtype"], r["causal"], r["path"]), ("f16", True, "reference"))
        self.assertAlmostEqual(r["flops"], 2.5 * 2 * 4 * 48 * 48 * 32, places=3)
        self.assertLess(r["max_abs_diff"], 5e-3)  # the gradients are rounded to f16

    def test_bench_backward_baseline_only(self):
        r = self.bench_json("--baseline-only", "--causal", op="backward")
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
        for args, needle in ((["--op", "nonsense"], "unknown op"),
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
        self.assertIn("read bandwidth", out)
        self.assertIn("GB/s", out)
        rc, out, err = run_cli("info", "--json", "--threads", 1)
        self.assertEqual(rc, 0, err)
        r = json.loads(out)
        for key in ("version", "simd_target", "hardware_threads", "threads", "peak_gflops_1t",
                    "peak_gflops_all", "peak_gbps_1t", "peak_gbps_all", "peak_gbps"):
            self.assertIn(key, r)
        self.assertEqual(r["threads"], 1)
        self.assertGreaterEqual(r["hardware_threads"], 1)
        self.assertGreater(r["peak_gflops_1t"], 1)
        self.assertGreater(r["peak_gflops_all"], 0.5 * r["peak_gflops_1t"])
        # Read bandwidth: GB/s of DRAM, single digits on the slowest machines we run on.
        self.assertGreater(r["peak_gbps_1t"], 1)
        self.assertLess(r["peak_gbps_1t"], 2000)
        self.assertGreater(r["peak_gbps_all"], 0.5 * r["peak_gbps_1t"])
        self.assertEqual(r["peak_gbps"], r["peak_gbps_1t"])  # --threads 1

    def test_no_subcommand_and_help(self):
        rc, _, err = run_cli()
        self.assertEqual(rc, 2)
        self.assertTrue(err)
        rc, out, _ = run_cli("run", "--help")
        self.assertEqual(rc, 0)
        self.assertIn("--window", out)


KV_ROW_BYTES = {"f32": lambda d: 4 * d, "bf16": lambda d: 2 * d, "f16": lambda d: 2 * d,
                "int8": lambda d: d, "int4": lambda d: (d + 1) // 2}
DECODE_KEYS = ["op", "kv_dtype", "batch", "heads", "kv_heads", "queries", "seq_k", "dim",
               "paged", "page_size", "threads", "bytes", "flops", "ms", "gbps", "peak_gbps",
               "frac_bw", "gflops", "peak_rss_mb", "simd_target"]


class BenchDecodeTest(unittest.TestCase):
    B, H, HKV, N, D = 2, 4, 2, 300, 64

    def bench_decode(self, *args, kv_dtype="f16", vs=True):
        rc, out, err = run_cli("bench", "--op", "decode", "--batch", self.B, "--heads", self.H,
                               "--kv-heads", self.HKV, "--seq-k", self.N, "--dim", self.D,
                               "--kv-dtype", kv_dtype, "--reps", 5, "--threads", 2, "--json",
                               *(["--vs", "naive"] if vs else []), *args)
        self.assertEqual(rc, 0, err)
        r = json.loads(out)  # exactly one JSON object
        for key in DECODE_KEYS + (["naive_ms", "baseline_ms", "speedup", "max_abs_diff"]
                                  if vs else []):
            self.assertIn(key, r)
        for key in ("ms", "gbps", "peak_gbps", "frac_bw", "gflops"):
            self.assertGreater(r[key], 0, key)
        self.assertEqual((r["op"], r["kv_dtype"], r["batch"], r["heads"], r["kv_heads"], r["dim"]),
                         ("decode", kv_dtype, self.B, self.H, self.HKV, self.D))
        lens = r.get("lens", [self.N] * self.B)
        quantized = kv_dtype in ("int8", "int4")
        want_bytes = sum(lens) * self.HKV * 2 * (KV_ROW_BYTES[kv_dtype](self.D) +
                                                (8 if quantized else 0))
        self.assertEqual(r["bytes"], want_bytes)
        self.assertAlmostEqual(r["flops"], 4 * r["queries"] * self.H * self.D * sum(lens),
                               places=3)
        self.assertAlmostEqual(r["gbps"], r["bytes"] / (r["ms"] * 1e-3) * 1e-9,
                               delta=1e-6 * r["gbps"])
        self.assertAlmostEqual(r["frac_bw"], r["gbps"] / r["peak_gbps"], places=9)
        self.assertLess(r["peak_rss_mb"], 512)  # the bandwidth probe's buffer is not counted
        if vs:
            self.assertGreater(r["naive_ms"], 0)
            self.assertAlmostEqual(r["speedup"], r["naive_ms"] / r["ms"], places=9)
            # Both read the same stored values and compute in f32, except that tessera quantizes
            # q to int8 per row against an int8 / int4 cache (error ~ 1/254 of a logit).
            self.assertLess(r["max_abs_diff"], 5e-3 if quantized else 1e-4)
        return r

    def test_every_kv_dtype(self):
        for kv_dtype in ("f32", "bf16", "f16", "int8", "int4"):
            with self.subTest(kv_dtype=kv_dtype):
                r = self.bench_decode(kv_dtype=kv_dtype)
                self.assertEqual((r["queries"], r["seq_k"], r["paged"]), (1, self.N, False))

    def test_paged(self):
        r = self.bench_decode("--page-size", 16, kv_dtype="int8")
        self.assertEqual((r["paged"], r["page_size"]), (True, 16))

    def test_lens(self):
        r = self.bench_decode("--lens", "100,300", "--page-size", 32)
        self.assertEqual((r["lens"], r["seq_k"]), ([100, 300], 300))

    def test_split_tokens(self):
        # The default: 2048 keys, 512 for pages of 1-3 tokens; or as given.
        for extra, want in (([], 2048), (["--page-size", 16], 2048), (["--page-size", 2], 512),
                            (["--split-tokens", 64], 64)):
            with self.subTest(extra=extra):
                r = self.bench_decode(*extra, vs=False)
                self.assertEqual(r["split_tokens"], want)

    def test_queries_causal(self):
        r = self.bench_decode("--queries", 4, "--causal", kv_dtype="bf16")
        self.assertEqual((r["queries"], r["causal"]), (4, True))

    def test_vs_stream(self):
        # Paired with a plain read of the same bytes: contiguous, paged over shuffled pages with
        # ragged lengths, and quantized (whose scales are read too).
        for kv_dtype, extra in (("f16", []), ("bf16", ["--lens", "100,300", "--page-size", 16]),
                                ("int8", ["--page-size", 32])):
            with self.subTest(kv_dtype=kv_dtype, extra=extra):
                r = self.bench_decode(*extra, "--vs", "stream", kv_dtype=kv_dtype, vs=False)
                self.assertEqual(r["baseline"], "stream")
                for key in ("baseline_ms", "paired_ms", "baseline_gbps", "baseline_frac_bw"):
                    self.assertGreater(r[key], 0, key)
                self.assertEqual(r["baseline_reps"], r["reps"])
                self.assertAlmostEqual(r["frac_stream"], r["baseline_ms"] / r["paired_ms"],
                                       places=9)
                self.assertAlmostEqual(r["baseline_gbps"],
                                       r["bytes"] / (r["baseline_ms"] * 1e-3) * 1e-9,
                                       delta=1e-6 * r["baseline_gbps"])
        rc, out, err = run_cli("bench", "--op", "decode", "--batch", 1, "--heads", 2, "--seq-k",
                               64, "--baseline-only", "--vs", "stream")
        self.assertEqual(rc, 2, err)
        self.assertIn("--vs stream", err)
        self.assertEqual(out, "")

    def test_baseline_only_and_human_output(self):
        rc, out, err = run_cli("bench", "--op", "decode", "--batch", 1, "--heads", 2, "--seq-k",
                               64, "--dim", 32, "--reps", 5, "--threads", 1, "--baseline-only",
                               "--json")
        self.assertEqual(rc, 0, err)
        r = json.loads(out)
        self.assertTrue(r["baseline_only"])
        self.assertNotIn("ms", r)
        self.assertGreater(r["baseline_ms"], 0)
        rc, out, err = run_cli("bench", "--op", "decode", "--batch", 1, "--heads", 2, "--seq-k",
                               64, "--dim", 32, "--reps", 5, "--threads", 1, "--vs", "naive")
        self.assertEqual(rc, 0, err)
        self.assertEqual(len(out.strip().splitlines()), 1, out)
        for needle in ("decode", "GB/s", "naive", "speedup"):
            self.assertIn(needle, out)

    def test_errors(self):
        base = ["bench", "--op", "decode", "--batch", 2, "--heads", 4, "--seq-k", 64]
        for args, needle in ((["--kv-dtype", "int3"], "--kv-dtype"),
                             (["--lens", "10,20,30"], "--lens"),
                             (["--lens", "10,0"], "--lens"),
                             (["--lens", "10,x"], "--lens"),
                             (["--queries", 0], "--queries"),
                             (["--queries", 17], "--queries"),
                             (["--page-size", -1], "--page-size"),
                             (["--split-tokens", -1], "--split-tokens"),
                             (["--seq-k", 0], "--seq-k"),
                             (["--kv-heads", 3], "--kv-heads"),
                             (["--vs", "dense"], "--vs"),
                             (["--dim", 0], "--dim")):
            rc, out, err = run_cli(*base, *args)
            self.assertEqual(rc, 2, "%s: %s" % (args, err))
            self.assertIn(needle, err)
            self.assertEqual(out, "")
        # Decode's options are refused by name elsewhere, not ignored.
        for op in ("forward", "backward"):
            for flag, value in (("--page-size", 16), ("--split-tokens", 64), ("--queries", 2),
                                ("--kv-dtype", "int8"), ("--lens", "10,20")):
                rc, out, err = run_cli("bench", "--op", op, "--seq", 64, flag, value)
                self.assertEqual(rc, 2, "%s %s: %s" % (op, flag, err))
                self.assertIn(flag + ": only with --op decode", err)
                self.assertEqual(out, "")

# ---------------------------------------------------------------------------------------------
# Masks (--mask). Each structured form is checked against the same mask materialized here, in
# Python, from the rules of tessera/mask.h and ALGORITHMS.md section 4, and passed as dense:FILE
# (whose own semantics are checked against the fp64 reference on small shapes); bench reports
# the visible fraction those Python masks give.

def natten_window_start(x, L, K):
    """NATTEN, stride 1, dilation 1, non-causal: the K-wide window centred on x, shifted (never
    shrunk) at the borders."""
    return min(max(x - K // 2, 0), L - K)


def nbhd_axis(x, y, L, K, d=1, s=1, causal=False):
    """ALGORITHMS.md 4.2 on one axis: dilation groups, stride leaders, border shift, causal."""
    if x % d != y % d:
        return False
    g, xp, yp = x % d, x // d, y // d
    lg = L // d + (1 if g < L % d else 0)
    if causal:
        leader = min(xp // s * s + s - 1, lg - 1)
        return yp <= xp and leader - yp < K
    wl, wr = K // 2, K // 2 + K % 2 - 1
    leader = min(xp // s * s + s // 2, lg - 1)
    c = min(max(leader, wl), lg - 1 - wr)
    return c - wl <= yp <= c + wr


def grid_coords(t, grid):
    coords = []
    for L in reversed(grid):
        coords.append(t % L)
        t //= L
    return coords[::-1]


def nbhd_rule(grid, window, dil=None, stride=None, causal=None):
    n = len(grid)
    dil, stride, causal = dil or [1] * n, stride or [1] * n, causal or [False] * n

    def visible(h, i, j):
        ci, cj = grid_coords(i, grid), grid_coords(j, grid)
        return all(nbhd_axis(ci[a], cj[a], grid[a], window[a], dil[a], stride[a], causal[a])
                   for a in range(n))
    return visible


def mask_values(rule, H, Sq, Sk):
    """uint8 [1, H, Sq, Sk] (flattened) of rule(h, i, j)."""
    return [1 if rule(h, i, j) else 0 for h in range(H) for i in range(Sq) for j in range(Sk)]


def reference_masked(q, k, v, Sq, Sk, H, D, rule, additive=None, sigmoid_bias=None):
    """fp64 attention of a batch of one with Hq == Hkv: visible(h, i, j) = rule(h, i, j); an
    additive [Sq, Sk] bias; sigmoid weights (no normalization) when sigmoid_bias is set."""
    scale = 1.0 / math.sqrt(D)
    out = [0.0] * (Sq * H * D)
    for h in range(H):
        for i in range(Sq):
            qo = (i * H + h) * D
            terms = []
            for j in range(Sk):
                if not rule(h, i, j):
                    continue
                ko = (j * H + h) * D
                s = scale * sum(q[qo + d] * k[ko + d] for d in range(D))
                if additive is not None:
                    s += additive[i * Sk + j]
                if s != -math.inf:
                    terms.append((ko, s))
            if not terms:
                continue
            if sigmoid_bias is not None:
                weights = [(ko, 1.0 / (1.0 + math.exp(-(s + sigmoid_bias)))) for ko, s in terms]
                total = 1.0
            else:
                m = max(s for _, s in terms)
                weights = [(ko, math.exp(s - m)) for ko, s in terms]
                total = sum(w for _, w in weights)
            for d in range(D):
                out[qo + d] = sum(w * v[ko + d] for ko, w in weights) / total
    return out


def causal_rule(h, i, j):
    return j <= i


def s2_rule(H, block, local, vstride):
    sigma = max(1, vstride // H)

    def visible(h, i, j):
        qb, kb = i // block, j // block
        return j <= i and (qb - kb < local or (kb + h * sigma) % vstride == 0)
    return visible


class MaskRunTest(CliTestBase):
    N, H, D = 256, 2, 32

    def setUp(self):
        super().setUp()
        self.make_inputs(1, self.N, self.N, self.H, self.H, self.D)

    def run_mask(self, spec, out="o.npy", *extra):
        self.assert_ok(*run_cli("run", *self.io_args(out), "--mask", spec, *extra))
        return read_npy(self.path(out))[3]

    def check_equals_dense(self, spec, rule, *extra, tol=1e-5):
        """The structured spec's output equals that of the same mask materialized here."""
        got = self.run_mask(spec, "structured.npy", *extra)
        write_npy(self.path("dense_mask.npy"), (1, self.H, self.N, self.N),
                  mask_values(rule, self.H, self.N, self.N), "|u1")
        want = self.run_mask("dense:" + self.path("dense_mask.npy"), "dense.npy")
        self.assert_close(got, want, tol, spec)
        return got

    def test_block_all_ones_equals_no_mask(self):
        self.assert_ok(*run_cli("run", *self.io_args("plain.npy")))
        for shape, descr in (((8, 8), "|u1"), ((1, self.H, 8, 8), "|b1")):
            with self.subTest(shape=shape, descr=descr):
                n = 1
                for d in shape:
                    n *= d
                write_npy(self.path("ones.npy"), shape, [1] * n, descr)
                self.run_mask("block:%s:32x32" % self.path("ones.npy"))
                # Every tile full: the unmasked path, bit for bit (DESIGN.md's identity).
                self.assertEqual(read_npy(self.path("o.npy"))[4],
                                 read_npy(self.path("plain.npy"))[4])

    def test_block_file_equals_dense(self):
        rng = random.Random(5)
        blocks = [1 if rng.random() < 0.4 else 0 for _ in range(self.H * 4 * 4)]
        write_npy(self.path("blocks.npy"), (1, self.H, 4, 4), blocks, "|b1")
        rule = lambda h, i, j: blocks[(h * 4 + i // 64) * 4 + j // 64] == 1
        self.check_equals_dense("block:%s:64x64" % self.path("blocks.npy"), rule)
        # --causal ANDs with the block mask.
        self.check_equals_dense("block:%s:64x64" % self.path("blocks.npy"),
                                lambda h, i, j: rule(h, i, j) and j <= i, "--causal")

    def test_nbhd2d_equals_natten_dense(self):
        # 16 x 16 grid, 5 x 5 window (odd) and 4 x 6 (even): the window shifts at the borders.
        for window in ((5, 5), (4, 6)):
            def rule(h, i, j, kh=window[0], kw=window[1]):
                (yi, xi), (yj, xj) = divmod(i, 16), divmod(j, 16)
                r0, c0 = natten_window_start(yi, 16, kh), natten_window_start(xi, 16, kw)
                return r0 <= yj < r0 + kh and c0 <= xj < c0 + kw
            with self.subTest(window=window):
                self.check_equals_dense("nbhd2d:16x16:%dx%d" % window, rule)

    def test_nbhd_dilation_stride_causal(self):
        cases = (("nbhd1d:256:9:dil=2:stride=3", nbhd_rule([256], [9], [2], [3])),
                 ("nbhd1d:256:16:causal=1:stride=4",
                  nbhd_rule([256], [16], stride=[4], causal=[True])),
                 ("nbhd2d:8x32:3x8:dil=2x3:causal=1x0",
                  nbhd_rule([8, 32], [3, 8], [2, 3], causal=[True, False])),
                 ("nbhd3d:4x8x8:3x3x5:stride=1x3x5:causal=1x0x0",
                  nbhd_rule([4, 8, 8], [3, 3, 5], stride=[1, 3, 5], causal=[True, False, False])))
        for spec, rule in cases:
            with self.subTest(spec=spec):
                self.check_equals_dense(spec, rule)

    def test_sink_prefix_doc(self):
        self.check_equals_dense("sink:4:32", lambda h, i, j: j <= i and (j < 4 or i - j < 32))
        self.check_equals_dense("prefix:40", lambda h, i, j: j <= i or j < 40)
        starts = [0, 100, 150, 256]
        doc = lambda x: max(d for d in range(3) if starts[d] <= x)
        self.check_equals_dense("doc:100,50,106", lambda h, i, j: doc(i) == doc(j))
        self.check_equals_dense("doc:100,50,106", lambda h, i, j: doc(i) == doc(j) and j <= i,
                                "--causal")

    def test_shift_and_group_sink(self):
        G, N = 64, self.N

        def shift_rule(h, i, j):
            # LongLoRA: the second half of the heads rolled by -G/2 (the first G/2 tokens join
            # the last group), causal in the rolled order.
            r = (lambda x: (x - G // 2) % N) if h >= self.H // 2 else (lambda x: x)
            return r(i) // G == r(j) // G and r(j) <= r(i)
        self.check_equals_dense("shift:64", shift_rule)
        self.check_equals_dense("group-sink:64:4",
                                lambda h, i, j: j <= i and (i // G == j // G or j < 4))

    def test_s2(self):
        self.check_equals_dense("s2:32:2:4", s2_rule(self.H, 32, 2, 4))

    def test_combinations(self):
        nbhd = nbhd_rule([16, 16], [5, 5])
        doc = lambda x: 0 if x < 128 else 1
        self.check_equals_dense("nbhd2d:16x16:5x5+doc:128,128",
                                lambda h, i, j: nbhd(h, i, j) and doc(i) == doc(j))
        self.check_equals_dense("sink:8:64+doc:128,128",
                                lambda h, i, j: doc(i) == doc(j) and j <= i and
                                (j < 8 or i - j < 64))
        # sigmoid + a structured mask equals sigmoid + the materialized one.
        got = self.run_mask("sigmoid:-2+nbhd2d:16x16:5x5", "s1.npy")
        write_npy(self.path("m.npy"), (self.N, self.N), mask_values(nbhd, 1, self.N, self.N),
                  "|b1")
        want = self.run_mask("dense:%s+sigmoid:-2" % self.path("m.npy"), "s2.npy")
        self.assert_close(got, want, 1e-5, "sigmoid + nbhd2d")

    def test_tree_chain_equals_causal(self):
        self.assert_ok(*run_cli("run", *self.io_args("causal.npy"), "--causal"))
        got = self.run_mask("tree-chain:%d" % self.N)
        self.assert_close(got, read_npy(self.path("causal.npy"))[3], 1e-5, "tree-chain")

    def test_tree_file_equals_dense(self):
        Sq, Sk = 64, 256
        self.make_inputs(1, Sq, Sk, self.H, self.H, self.D)
        rng = random.Random(3)
        parents = [rng.randrange(-1, t) for t in range(Sq)]
        write_npy(self.path("tree.npy"), (Sq,), parents, "<i4")
        got = self.run_mask("tree:" + self.path("tree.npy"), "tree_out.npy")

        def rule(h, i, j):
            if j < Sk - Sq:
                return True
            t, u = i, j - (Sk - Sq)
            while t >= 0 and t != u:
                t = parents[t]
            return t == u
        write_npy(self.path("tm.npy"), (Sq, Sk), mask_values(rule, 1, Sq, Sk), "|u1")
        want = self.run_mask("dense:" + self.path("tm.npy"), "tree_dense.npy")
        self.assert_close(got, want, 1e-5, "tree")

    def test_select_every_block_equals_unmasked(self):
        for causal in ([], ["--causal"]):
            with self.subTest(causal=causal):
                self.assert_ok(*run_cli("run", *self.io_args("plain.npy"), *causal))
                got = self.run_mask("select:topk=8:32x32", "sel.npy", *causal)
                self.assert_close(got, read_npy(self.path("plain.npy"))[3], 1e-5, "select")
        got = self.run_mask("select:thr=0.5")  # a real selection: runs, finite output
        self.assertTrue(all(math.isfinite(x) for x in got))

    def test_radial(self):
        got = self.run_mask("radial:8:32:32")
        self.assertTrue(all(math.isfinite(x) for x in got))
        self.assertEqual(read_npy(self.path("o.npy"))[2], (1, self.N, self.H, self.D))

    def test_verbose_reports_density(self):
        rc, out, err = run_cli("run", *self.io_args(), "--mask", "nbhd1d:256:32", "--verbose")
        self.assert_ok(rc, out, err)
        self.assertIn("density 0.125", err)

    def test_backward_takes_the_mask(self):
        write_npy(self.path("do.npy"), (1, self.N, self.H, self.D),
                  random_values(self.N * self.H * self.D, 9, "<f4"))
        write_npy(self.path("m.npy"), (self.N, self.N),
                  mask_values(nbhd_rule([256], [32]), 1, self.N, self.N), "|u1")
        dense = "dense:" + self.path("m.npy")
        # The gradients under a structured mask equal those under the same mask materialized;
        # sigmoid attention's backward runs without a log-sum-exp.
        for spec, same in (("nbhd1d:256:32", dense),
                           ("sigmoid:-2+nbhd1d:256:32", "sigmoid:-2+" + dense)):
            with self.subTest(spec=spec):
                grads = {}
                for tag, mask in (("s", spec), ("d", same)):
                    self.assert_ok(*run_cli(
                        "run", *self.io_args("o%s.npy" % tag), "--dout", self.path("do.npy"),
                        "--dq", self.path("dq%s.npy" % tag), "--dk", self.path("dk%s.npy" % tag),
                        "--dv", self.path("dv%s.npy" % tag), "--mask", mask))
                    grads[tag] = [read_npy(self.path("%s%s.npy" % (g, tag)))[3]
                                  for g in ("o", "dq", "dk", "dv")]
                for name, got, want in zip(("o", "dq", "dk", "dv"), grads["s"], grads["d"]):
                    self.assert_close(got, want, 1e-5, "%s: %s" % (spec, name))


class MaskReferenceTest(CliTestBase):
    """dense: and sigmoid against the fp64 reference (small shapes: the reference is Python)."""
    N, H, D = 24, 2, 8

    def setUp(self):
        super().setUp()
        self.q, self.k, self.v = self.make_inputs(1, self.N, self.N, self.H, self.H, self.D)

    def check(self, spec, rule, tol=1e-5, **options):
        self.assert_ok(*run_cli("run", *self.io_args(), "--mask", spec))
        want = reference_masked(self.q, self.k, self.v, self.N, self.N, self.H, self.D, rule,
                                **options)
        self.assert_close(read_npy(self.path("o.npy"))[3], want, tol, spec)

    def test_dense_bool_per_head(self):
        rng = random.Random(7)
        values = [rng.random() < 0.3 for _ in range(self.H * self.N * self.N)]
        values[:self.N] = [False] * self.N  # head 0, row 0 sees nothing: output 0
        write_npy(self.path("m.npy"), (1, self.H, self.N, self.N), values, "|b1")
        self.check("dense:" + self.path("m.npy"),
                   lambda h, i, j: values[(h * self.N + i) * self.N + j])
        self.assertEqual(read_npy(self.path("o.npy"))[3][:self.D], [0.0] * self.D)

    def test_dense_additive_f32(self):
        rng = random.Random(8)
        bias = round_to([-math.inf if rng.random() < 0.2 else rng.uniform(-2, 2)
                         for _ in range(self.N * self.N)], "<f4")
        write_npy(self.path("m.npy"), (self.N, self.N), bias)
        self.check("dense:" + self.path("m.npy"), lambda h, i, j: True, additive=bias)

    def test_sigmoid(self):
        self.check("sigmoid:-1.5", lambda h, i, j: True, sigmoid_bias=-1.5)
        self.check("sigmoid", lambda h, i, j: True, sigmoid_bias=0.0)
        self.check("sigmoid:-1+nbhd1d:24:5", nbhd_rule([24], [5]), sigmoid_bias=-1.0)


class MaskErrorTest(CliTestBase):
    def setUp(self):
        super().setUp()
        self.make_inputs(1, 64, 64, 2, 2, 8)

    def assert_mask_error(self, spec, *needles, extra=()):
        rc, _, err = run_cli("run", *self.io_args(), "--mask", spec, *extra)
        self.assert_error(rc, err, *needles)
        self.assertFalse(os.path.exists(self.path("o.npy")), "nothing may be written on error")
        return err

    def test_bad_specs(self):
        for spec, needles in (
                ("", ["--mask", "expected a mask spec"]),
                ("checkerboard:4", ["unknown mask form 'checkerboard'", "nbhd2d"]),
                ("nbhd2d:8x8:3", ["nbhd2d", "window", "'3'"]),
                ("nbhd2d:8x8", ["nbhd2d:HxW:KHxKW"]),
                ("nbhd2d:8x8:3x3:dil=0x1", ["dil="]),
                ("nbhd2d:8x8:3x3:causal=2x0", ["causal="]),
                ("nbhd2d:8x8:3x3:stride=4x1", ["stride <= window"]),
                ("nbhd2d:8x8:3x3:size=1x1", ["options"]),
                ("nbhd1d:64:40:dil=2", ["window x dilation <= grid"]),
                ("sink:4", ["sink:S:W"]),
                ("sink:4:0", ["window W"]),
                ("prefix:x", ["prefix length"]),
                ("prefix:65", ["P <= Sk = 64"]),
                ("doc:30,30", ["summing to Sk = 64", "60"]),
                ("doc:30,,34", ["document lengths"]),
                ("shift:6", ["even", "G = 6"]),
                ("group-sink:48:4", ["dividing", "G = 48"]),
                ("s2:24:1:4", ["multiple of 16"]),
                ("radial:4:8", ["FRAMES x TOKENS_PER_FRAME", "32"]),
                ("select:topk=0", ["topk=K"]),
                ("select:thr=1.5", ["thr=T"]),
                ("select:topk=2:20x20", ["BQxBK", "'20x20'"]),
                ("tree-chain:32", ["T = Sq"]),
                ("sigmoid:abc", ["BIAS"]),
                ("block:" + "m.npy", ["block:FILE.npy:BQxBK"]),
                ("s2:16:1:2+select:topk=1", ["'s2' and 'select' both set the block mask"]),
                ("sink:4:8+group-sink:16:4", ["both set the sink tokens"]),
                ("sigmoid+sigmoid:1", ["both set the score function"])):
            with self.subTest(spec=spec):
                err = self.assert_mask_error(spec, *needles)
                self.assertIn("--mask '%s'" % spec, err)

    def test_wrong_npy_dtype_and_shape(self):
        write_npy(self.path("f.npy"), (4, 4), [1.0] * 16)
        self.assert_mask_error("block:%s:16x16" % self.path("f.npy"), "f.npy", "'<f4'", "uint8",
                               "bool")
        write_npy(self.path("b.npy"), (4, 5), [1] * 20, "|u1")
        self.assert_mask_error("block:%s:16x16" % self.path("b.npy"), "b.npy", "(4, 4)",
                               "got (4, 5)")
        write_npy(self.path("b3.npy"), (3, 2, 4, 4), [1] * 96, "|u1")
        self.assert_mask_error("block:%s:16x16" % self.path("b3.npy"), "got (3, 2, 4, 4)")
        write_npy(self.path("t.npy"), (64,), list(range(-1, 63)), "<i8")
        self.assert_mask_error("tree:" + self.path("t.npy"), "t.npy", "'<i8'", "int32")
        write_npy(self.path("t.npy"), (64,), [-1] + [5] * 63, "<i4")
        self.assert_mask_error("tree:" + self.path("t.npy"), "parents[t] in [-1, t)")
        write_npy(self.path("d.npy"), (64, 64), [0.0] * 4096, "<f2")
        self.assert_mask_error("dense:" + self.path("d.npy"), "'<f2'", "float32")
        write_npy(self.path("d.npy"), (64, 63), [1] * (64 * 63), "|b1")
        self.assert_mask_error("dense:" + self.path("d.npy"), "(64, 64)", "got (64, 63)")
        self.assert_mask_error("dense:" + self.path("missing.npy"), "missing.npy")

    def test_grid_product_mismatch(self):
        self.assert_mask_error("nbhd2d:8x4:3x3", "grid", "8x4 = 32", "Sq = 64")
        self.assert_mask_error("nbhd3d:2x4x4:1x3x3", "2x4x4 = 32")

    def test_block_random_is_bench_only(self):
        self.assert_mask_error("block-random:0.5", "block-random", "bench")

    def test_sigmoid_has_no_lse_and_sink_owns_the_window(self):
        self.assert_mask_error("sigmoid", "--lse", "log-sum-exp",
                               extra=("--lse", self.path("l.npy")))
        self.assert_mask_error("sink:4:8", "--window", extra=("--window", "8,0"))

    def test_help_lists_the_forms(self):
        rc, out, _ = run_cli("run", "--help")
        self.assertEqual(rc, 0)
        for form in ("--mask", "block:FILE.npy:BQxBK", "nbhd2d", "group-sink", "tree-chain",
                     "sigmoid"):
            self.assertIn(form, out)


class MaskBenchTest(unittest.TestCase):
    N, H, D = 256, 2, 32

    def bench(self, spec, *args, op="forward", seq=None, seq_k=None):
        rc, out, err = run_cli("bench", "--op", op, "--heads", self.H, "--seq", seq or self.N,
                               "--seq-k", seq_k or seq or self.N, "--dim", self.D, "--reps", 2,
                               "--warmup", 0, "--threads", 1, "--json", "--mask", spec, *args)
        self.assertEqual(rc, 0, "%s: %s" % (spec, err))
        return json.loads(out)

    def check_density(self, r, rule, Sq=None, Sk=None):
        Sq, Sk = Sq or self.N, Sk or Sq or self.N
        want = sum(mask_values(rule, self.H, Sq, Sk)) / float(self.H * Sq * Sk)
        self.assertTrue(r["density_exact"])
        self.assertAlmostEqual(r["density"], want, places=12, msg=r["mask"])
        # GFLOP/s counts the visible pairs only: 4 * D per pair.
        self.assertAlmostEqual(r["flops"], 4 * self.D * want * self.H * Sq * Sk,
                               delta=1e-9 * r["flops"])
        self.assertAlmostEqual(r["gflops"], r["flops"] / (r["ms"] * 1e-3) * 1e-9,
                               delta=1e-6 * r["gflops"])

    def test_density_of_structured_forms(self):
        G = 64
        shift = lambda h, i, j: (
            ((i - G // 2) % 256) // G == ((j - G // 2) % 256) // G and
            (j - G // 2) % 256 <= (i - G // 2) % 256) if h >= 1 else (i // G == j // G and j <= i)
        cases = (
            ("nbhd2d:16x16:5x5", nbhd_rule([16, 16], [5, 5]), False),
            ("nbhd1d:256:16:causal=1:stride=4", nbhd_rule([256], [16], stride=[4],
                                                          causal=[True]), False),
            ("sink:4:32", lambda h, i, j: j <= i and (j < 4 or i - j < 32), True),
            ("prefix:40", lambda h, i, j: j <= i or j < 40, True),
            ("doc:100,156", lambda h, i, j: (i < 100) == (j < 100), False),
            ("shift:64", shift, True),
            ("group-sink:64:4", lambda h, i, j: j <= i and (i // G == j // G or j < 4), True),
            ("s2:32:2:4", s2_rule(self.H, 32, 2, 4), True),
            ("tree-chain:256", causal_rule, False),
            ("sigmoid:-3+doc:100,156", lambda h, i, j: (i < 100) == (j < 100), False))
        for spec, rule, causal in cases:
            with self.subTest(spec=spec):
                r = self.bench(spec)
                self.assertEqual((r["mask"], r["causal"]), (spec, causal))
                self.check_density(r, rule)

    def test_block_file_and_causal(self):
        with tempfile.TemporaryDirectory(prefix="tessera_cli_") as tmp:
            path = os.path.join(tmp, "blocks.npy")
            blocks = [1, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1]
            write_npy(path, (4, 4), blocks, "|u1")
            rule = lambda h, i, j: blocks[(i // 64) * 4 + j // 64] == 1
            self.check_density(self.bench("block:%s:64x64" % path), rule)
            r = self.bench("block:%s:64x64" % path, "--causal")
            self.assertTrue(r["causal"])
            self.check_density(r, lambda h, i, j: rule(h, i, j) and j <= i)

    def test_vs_dense(self):
        r = self.bench("nbhd2d:16x16:5x5", "--vs", "dense")
        for key in BENCH_KEYS + ["baseline", "baseline_ms", "baseline_gflops", "speedup",
                                 "density", "mask", "flops"]:
            self.assertIn(key, r)
        self.assertEqual(r["baseline"], "dense")
        self.assertEqual(r["baseline_reps"], r["reps"])
        self.assertGreater(r["baseline_ms"], 0)
        self.assertAlmostEqual(r["speedup"], r["baseline_ms"] / r["ms"], places=9)
        self.assertAlmostEqual(r["density"], 25.0 / 256.0, places=12)
        self.assertAlmostEqual(r["baseline_gflops"],
                               4 * self.H * self.N * self.N * self.D /
                               (r["baseline_ms"] * 1e-3) * 1e-9,
                               delta=1e-6 * r["baseline_gflops"])
        # A causal form compares with the causal dense kernel (half the pairs).
        r = self.bench("sink:4:32", "--vs", "dense")
        self.assertTrue(r["baseline_causal"])
        self.assertAlmostEqual(r["baseline_flops"], 2 * self.H * self.N * self.N * self.D)

    def test_block_random(self):
        # 8 x 8 blocks, round(0.3 * 8) = 2 per query-block row, the diagonal always among them.
        r = self.bench("block-random:0.3:32x32", "--seed", 7)
        self.assertAlmostEqual(r["density"], 2.0 / 8.0, places=12)
        # Causal: only blocks at or below the diagonal; row 0 keeps just the diagonal block,
        # whose lower triangle (and diagonal) is visible.
        r = self.bench("block-random:0.3:32x32", "--causal")
        pairs = 32 * 33 / 2 + 7 * (32 * 33 / 2 + 32 * 32)  # per head
        self.assertAlmostEqual(r["density"], pairs / (256.0 * 256.0), places=12)
        # The same seed draws the same mask; the dense run needs no mask file.
        self.assertEqual(self.bench("block-random:0.5", "--seed", 3)["density"],
                         self.bench("block-random:0.5", "--seed", 3)["density"])

    def test_select_reports_selection_time(self):
        r = self.bench("select:topk=2:32x32", "--vs", "dense")
        self.assertGreater(r["select_ms"], 0)
        self.assertLess(r["select_ms"], r["ms"])  # ms includes the selection
        self.assertAlmostEqual(r["density"], 2.0 / 8.0, places=12)
        r = self.bench("select:topk=2:32x32", "--causal")
        self.assertLess(r["density"], 0.5)
        self.assertGreater(r["density"], 0)

    def test_radial_and_tree(self):
        r = self.bench("radial:8:32:32")
        self.assertGreater(r["density"], 0)
        self.assertLessEqual(r["density"], 1)
        with tempfile.TemporaryDirectory(prefix="tessera_cli_") as tmp:
            path = os.path.join(tmp, "tree.npy")
            parents = [-1, 0, 0, 1, 1, 2, 5, -1] * 4
            parents = [p if p < 0 else p + 8 * (t // 8) for t, p in enumerate(parents)]
            write_npy(path, (32,), parents, "<i4")

            def rule(h, i, j):
                if j < 224:
                    return True
                t = i
                while t >= 0 and t != j - 224:
                    t = parents[t]
                return t >= 0
            r = self.bench("tree:" + path, seq=32, seq_k=256)
            self.check_density(r, rule, Sq=32, Sk=256)

    def test_backward_takes_the_mask(self):
        r = self.bench("nbhd2d:16x16:5x5", "--vs", "dense", op="backward")
        # 2.5x the forward's 4 * D per visible pair (25 keys per query), and of the dense pairs.
        self.assertAlmostEqual(r["flops"], 2.5 * 4 * self.D * self.H * self.N * 25,
                               delta=1e-6 * r["flops"])
        self.assertAlmostEqual(r["baseline_flops"], 2.5 * 4 * self.D * self.H * self.N * self.N,
                               delta=1e-6 * r["baseline_flops"])
        self.assertEqual(r["baseline"], "dense")
        self.assertAlmostEqual(r["speedup"], r["baseline_ms"] / r["ms"], places=9)

    def test_human_output(self):
        rc, out, err = run_cli("bench", "--heads", 2, "--seq", 64, "--dim", 16, "--reps", 2,
                               "--threads", 1, "--mask", "nbhd1d:64:8", "--vs", "dense")
        self.assertEqual(rc, 0, err)
        for needle in ("tessera masked", "tessera dense", "density 0.1250", "speedup"):
            self.assertIn(needle, out)

    def test_errors(self):
        base = ["bench", "--heads", 2, "--seq", 64, "--dim", 8, "--reps", 1]
        for args, needle in ((["--mask", "nbhd2d:8x4:3x3"], "8x4 = 32"),
                             (["--mask", "bogus"], "unknown mask form"),
                             (["--mask", "nbhd1d:64:8", "--vs", "naive"], "--vs dense"),
                             (["--mask", "nbhd1d:64:8", "--baseline-only"], "--baseline-only"),
                             (["--vs", "dense", "--baseline-only"], "--baseline-only"),
                             (["--vs", "sparse"], "'naive' or 'dense'"),
                             (["--mask", "nbhd1d:64:8", "--op", "decode"], "--op decode"),
                             (["--mask", "block-random:0"], "RHO in (0, 1]")):
            with self.subTest(args=args):
                rc, out, err = run_cli(*base, *args)
                self.assertEqual(rc, 2, "%s: %s" % (args, err))
                self.assertIn(needle, err)
                self.assertEqual(out, "")


# ---------------------------------------------------------------------------------------------
# Linear attention (run / bench --op linear). The reference below is the recurrent form in fp64,
# token by token with an F x Dv state per (sequence, query head), written from the definitions of
# tessera/linear.h; the kernels under test are the chunked form (and the recurrent one, checked
# against both).

def linear_phi(x, fmap):
    dk = len(x)
    if fmap == "identity":
        return list(x)
    if fmap == "elu1":
        return [xi + 1.0 if xi > 0 else math.exp(xi) for xi in x]
    if fmap == "relu":
        return [xi if xi > 0 else 0.0 for xi in x]
    assert fmap == "taylor2", fmap
    lin = dk ** -0.25
    quad = 1.0 / (math.sqrt(2.0) * math.sqrt(dk))
    return [1.0] + [xi * lin for xi in x] + [xi * xj * quad for xi in x for xj in x]


def linear_feature_dim(fmap, dk):
    return 1 + dk + dk * dk if fmap == "taylor2" else dk


def linear_reference(q, k, v, B, S, Hq, Hkv, Dk, Dv, fmap="identity", scale=None, causal=True,
                     prefix=0, normalize=False, eps=1e-6, decay=None, gates=None, window=0,
                     state0=None, norm0=None):
    """Recurrent form in fp64; returns (out [B,S,Hq,Dv], state [B,Hq,F,Dv], normalizer [B,Hq,F]).

    State S_t = decay_t * S_{t-1} + phi(k_t) v_t^T (decay_t: 1, lambda_h, or exp(g_t) per key
    channel), o_t = scale phi(q_t) S_t, over (scale phi(q_t) z_t + eps) with normalize. Prefix and
    non-causal: the keys every query sees are in the state before the first query. The window part
    adds exact causal softmax attention over keys [t - W + 1, t] with scale 1/sqrt(Dk).
    """
    if scale is None:
        scale = 1.0 if fmap == "taylor2" else 1.0 / math.sqrt(Dk)
    F = linear_feature_dim(fmap, Dk)
    group = Hq // Hkv
    out = [0.0] * (B * S * Hq * Dv)
    state_out = [0.0] * (B * Hq * F * Dv)
    norm_out = [0.0] * (B * Hq * F)
    for b in range(B):
        for h in range(Hq):
            hk = h // group
            qrow = lambda t: q[((b * S + t) * Hq + h) * Dk:((b * S + t) * Hq + h + 1) * Dk]
            krow = lambda t: k[((b * S + t) * Hkv + hk) * Dk:((b * S + t) * Hkv + hk + 1) * Dk]
            vrow = lambda t: v[((b * S + t) * Hkv + hk) * Dv:((b * S + t) * Hkv + hk + 1) * Dv]
            so = (b * Hq + h) * F
            st = [[state0[(so + c) * Dv + d] if state0 else 0.0 for d in range(Dv)]
                  for c in range(F)]
            z = [norm0[so + c] if norm0 else 0.0 for c in range(F)]

            def add_key(s):
                fk, vs = linear_phi(krow(s), fmap), vrow(s)
                for c in range(F):
                    z[c] += fk[c]
                    for d in range(Dv):
                        st[c][d] += fk[c] * vs[d]

            seen = 0  # keys [0, seen) are in the state
            first = S if not causal else prefix
            while seen < first:
                add_key(seen)
                seen += 1
            for t in range(S):
                if seen <= t:
                    # Decay the state by token t (the prefix form has none), then add key t.
                    if decay is not None or gates is not None:
                        for c in range(F):
                            f = decay[h] if decay is not None else \
                                math.exp(gates[((b * S + t) * Hq + h) * Dk + c])
                            z[c] *= f
                            for d in range(Dv):
                                st[c][d] *= f
                    add_key(t)
                    seen = t + 1
                fq = linear_phi(qrow(t), fmap)
                num = [scale * sum(fq[c] * st[c][d] for c in range(F)) for d in range(Dv)]
                if normalize:
                    den = scale * sum(fq[c] * z[c] for c in range(F)) + eps
                    num = [x / den for x in num]
                if window > 0:
                    ws = 1.0 / math.sqrt(Dk)
                    keys = range(max(0, t - window + 1), t + 1)
                    logits = [ws * sum(a * c for a, c in zip(qrow(t), krow(j))) for j in keys]
                    m = max(logits)
                    p = [math.exp(x - m) for x in logits]
                    total = sum(p)
                    for j, pj in zip(keys, p):
                        for d, x in enumerate(vrow(j)):
                            num[d] += pj / total * x
                o = ((b * S + t) * Hq + h) * Dv
                out[o:o + Dv] = num
            for c in range(F):
                norm_out[so + c] = z[c]
                state_out[(so + c) * Dv:(so + c + 1) * Dv] = st[c]
    return out, state_out, norm_out


# The tiny shape of the linear tests: B, S, Hq, Hkv, Dk, Dv (BASED: Dk = 4, so F = 21).
LINEAR_SHAPE = (1, 37, 2, 2, 8, 8)
BASED_SHAPE = (1, 37, 2, 2, 4, 4)


def gate_values(n, seed):
    """Log-space gates in [-0.5, -0.01], rounded to f32."""
    rng = random.Random(seed)
    return round_to([-rng.uniform(0.01, 0.5) for _ in range(n)], "<f4")


class LinearTestBase(CliTestBase):
    def make_linear(self, shape=LINEAR_SHAPE, descr="<f4", seed=21, tag=""):
        B, S, Hq, Hkv, Dk, Dv = shape
        q = random_values(B * S * Hq * Dk, seed, descr)
        k = random_values(B * S * Hkv * Dk, seed + 1, descr)
        v = random_values(B * S * Hkv * Dv, seed + 2, descr)
        write_npy(self.path("q%s.npy" % tag), (B, S, Hq, Dk), q, descr)
        write_npy(self.path("k%s.npy" % tag), (B, S, Hkv, Dk), k, descr)
        write_npy(self.path("v%s.npy" % tag), (B, S, Hkv, Dv), v, descr)
        return q, k, v

    def make_gates(self, shape=LINEAR_SHAPE, seed=31, name="g.npy"):
        B, S, Hq, _, Dk, _ = shape
        g = gate_values(B * S * Hq * Dk, seed)
        write_npy(self.path(name), (B, S, Hq, Dk), g)
        return g

    def linear_args(self, out="o.npy", tag=""):
        return ["--op", "linear", "--q", self.path("q%s.npy" % tag),
                "--k", self.path("k%s.npy" % tag), "--v", self.path("v%s.npy" % tag),
                "--out", self.path(out)]

    def run_linear(self, *args, out="o.npy", tag=""):
        self.assert_ok(*run_cli("run", *self.linear_args(out, tag), *args))
        descr, fortran, shape, values, _ = read_npy(self.path(out))
        self.assertFalse(fortran)
        return descr, shape, values

    def check_linear(self, args, shape=LINEAR_SHAPE, rtol=1e-4, forms=("chunked", "recurrent"),
                     **options):
        """Runs each form (default chunk and --chunk 16 for the chunked one) against the
        reference; returns the reference output."""
        B, S, Hq, Hkv, Dk, Dv = shape
        q, k, v = self.make_linear(shape)
        if "gates" in options and options["gates"] is True:
            options["gates"] = self.make_gates(shape)
            args = list(args) + ["--gates", self.path("g.npy")]
        want, _, _ = linear_reference(q, k, v, B, S, Hq, Hkv, Dk, Dv, **options)
        runs = []
        for form in forms:
            runs.append(("--form", form))
            if form == "chunked":
                runs.append(("--form", form, "--chunk", "16"))
        for extra in runs:
            descr, got_shape, got = self.run_linear(*args, *extra)
            self.assertEqual((descr, got_shape), ("<f4", (B, S, Hq, Dv)), extra)
            self.assert_close_rel(got, want, rtol, " ".join(map(str, list(args) + list(extra))))
        return want


class LinearRunTest(LinearTestBase):
    def test_plain(self):
        self.check_linear(["--variant", "plain", "--threads", 2])

    def test_default_variant_is_plain_and_causal(self):
        self.check_linear(["--causal"], forms=("chunked",))

    def test_gqa(self):
        self.check_linear(["--variant", "plain"], shape=(1, 37, 2, 1, 8, 8))

    def test_value_dim_differs(self):
        self.check_linear(["--variant", "plain"], shape=(2, 37, 2, 1, 8, 5))

    def test_feature_maps_and_normalize(self):
        # elu1 keeps every feature positive, so the normalizer is well away from 0.
        self.check_linear(["--feature-map", "elu1", "--normalize"], fmap="elu1", normalize=True)
        self.check_linear(["--feature-map", "relu"], fmap="relu")
        self.check_linear(["--feature-map", "taylor2", "--scale", "0.5"], shape=BASED_SHAPE,
                          fmap="taylor2", scale=0.5)

    def test_scale(self):
        self.check_linear(["--scale", "0.25"], scale=0.25)

    def test_non_causal(self):
        self.check_linear(["--non-causal"], causal=False)
        self.check_linear(["--non-causal", "--feature-map", "elu1", "--normalize"], causal=False,
                          fmap="elu1", normalize=True)

    def test_prefix(self):
        self.check_linear(["--prefix", 10], prefix=10)
        self.check_linear(["--prefix", 37], prefix=37, forms=("chunked",))

    def test_decay_per_head_and_broadcast(self):
        self.check_linear(["--variant", "decay", "--decay", "0.9,0.6"], decay=[0.9, 0.6])
        self.check_linear(["--variant", "decay", "--decay", "0.95"], decay=[0.95, 0.95])
        # Rates are f32: 0.97 is read as the float nearest it, within the tolerance here.
        self.check_linear(["--variant", "decay", "--decay", "0.97,1", "--feature-map", "elu1",
                           "--normalize"], decay=[0.97, 1.0], fmap="elu1", normalize=True)

    def test_gla(self):
        self.check_linear(["--variant", "gla"], gates=True)
        self.check_linear(["--variant", "gla", "--normalize"], shape=(1, 37, 2, 1, 8, 8),
                          gates=True, normalize=True)

    def test_based(self):
        # Taylor map, normalized, window 64 (> S: every earlier key) by default.
        self.check_linear(["--variant", "based"], shape=BASED_SHAPE, fmap="taylor2",
                          normalize=True, window=64)
        self.check_linear(["--variant", "based", "--window", 8], shape=BASED_SHAPE,
                          fmap="taylor2", normalize=True, window=8)
        self.check_linear(["--variant", "based", "--window", 0, "--no-normalize"],
                          shape=BASED_SHAPE, fmap="taylor2")
        self.check_linear(["--variant", "based", "--window", 5], shape=(1, 37, 2, 1, 4, 6),
                          fmap="taylor2", normalize=True, window=5)

    def test_window_with_other_variants(self):
        self.check_linear(["--variant", "decay", "--decay", "0.8", "--window", 4],
                          decay=[0.8, 0.8], window=4)

    def test_f16_inputs(self):
        B, S, Hq, Hkv, Dk, Dv = LINEAR_SHAPE
        q, k, v = self.make_linear(descr="<f2")
        descr, shape, got = self.run_linear("--feature-map", "elu1", "--normalize")
        self.assertEqual((descr, shape), ("<f2", (B, S, Hq, Dv)))
        want, _, _ = linear_reference(q, k, v, B, S, Hq, Hkv, Dk, Dv, fmap="elu1", normalize=True)
        self.assert_close_rel(got, want, 2e-3, "f16 out")  # rounded to f16 (2^-11 relative)

    def test_recurrent_equals_chunked(self):
        q, k, v = self.make_linear()
        g = self.make_gates()
        for args in (["--variant", "plain"], ["--variant", "decay", "--decay", "0.9,0.8"],
                     ["--variant", "gla", "--gates", self.path("g.npy")],
                     ["--feature-map", "elu1", "--normalize", "--prefix", 20]):
            _, _, chunked = self.run_linear(*args, "--chunk", 16, out="c.npy")
            _, _, recurrent = self.run_linear(*args, "--form", "recurrent", out="r.npy")
            self.assert_close_rel(recurrent, chunked, 1e-5, " ".join(map(str, args)))

    def test_verbose(self):
        self.make_linear()
        rc, out, err = run_cli("run", *self.linear_args(), "--variant", "decay", "--decay", "0.9",
                               "--verbose")
        self.assert_ok(rc, out, err)
        for needle in ("linear decay", "ms", "peak RSS"):
            self.assertIn(needle, err)


class LinearStateTest(LinearTestBase):
    """--state-out of a run over tokens [0, P) then --state-in for [P, S) equals one run."""
    SPLIT = 20

    def split_inputs(self, shape, q, k, v, g=None):
        B, S, Hq, Hkv, Dk, Dv = shape
        assert B == 1  # the layout's first token dim is then contiguous
        P = self.SPLIT
        for tag, lo, hi in (("1", 0, P), ("2", P, S)):
            n = hi - lo
            write_npy(self.path("q%s.npy" % tag), (B, n, Hq, Dk), q[lo * Hq * Dk:hi * Hq * Dk])
            write_npy(self.path("k%s.npy" % tag), (B, n, Hkv, Dk), k[lo * Hkv * Dk:hi * Hkv * Dk])
            write_npy(self.path("v%s.npy" % tag), (B, n, Hkv, Dv), v[lo * Hkv * Dv:hi * Hkv * Dv])
            if g is not None:
                write_npy(self.path("g%s.npy" % tag), (B, n, Hq, Dk), g[lo * Hq * Dk:hi * Hq * Dk])

    def check_continuation(self, args, shape=LINEAR_SHAPE, gla=False, **options):
        B, S, Hq, Hkv, Dk, Dv = shape
        F = linear_feature_dim(options.get("fmap", "identity"), Dk)
        q, k, v = self.make_linear(shape)
        g = self.make_gates(shape) if gla else None
        self.split_inputs(shape, q, k, v, g)
        normalize = options.get("normalize", False)
        for form in ("chunked", "recurrent"):
            with self.subTest(args=args, form=form):
                common = list(args) + ["--form", form, "--chunk", 16]
                state = lambda name, tag: ["--state-%s" % name, self.path("s%s.npy" % tag)] + (
                    ["--normalizer-%s" % name, self.path("z%s.npy" % tag)] if normalize else [])
                gates = lambda tag: ["--gates", self.path("g%s.npy" % tag)] if gla else []
                _, _, full = self.run_linear(*common, *gates(""), *state("out", "_full"),
                                             out="full.npy")
                _, _, first = self.run_linear(*common, *gates("1"), *state("out", "1"),
                                              out="o1.npy", tag="1")
                _, _, second = self.run_linear(*common, *gates("2"), *state("in", "1"),
                                               *state("out", "2"), out="o2.npy", tag="2")
                self.assert_close_rel(first + second, full, 1e-5, "continued vs one run")
                want, want_state, want_norm = linear_reference(
                    q, k, v, B, S, Hq, Hkv, Dk, Dv, gates=g, **options)
                self.assert_close_rel(full, want, 1e-4, "one run vs reference")
                for tag in ("_full", "2"):
                    descr, _, sshape, svals, _ = read_npy(self.path("s%s.npy" % tag))
                    self.assertEqual((descr, sshape), ("<f4", (B, Hq, F, Dv)))
                    self.assert_close_rel(svals, want_state, 1e-4, "final state " + tag)
                    if normalize:
                        descr, _, zshape, zvals, _ = read_npy(self.path("z%s.npy" % tag))
                        self.assertEqual((descr, zshape), ("<f4", (B, Hq, F)))
                        self.assert_close_rel(zvals, want_norm, 1e-4, "final normalizer " + tag)

    def test_plain(self):
        self.check_continuation(["--variant", "plain"])

    def test_decay_gqa(self):
        self.check_continuation(["--variant", "decay", "--decay", "0.9,0.7"],
                                shape=(1, 37, 2, 1, 8, 8), decay=[0.9, 0.7])

    def test_gla(self):
        self.check_continuation(["--variant", "gla"], gla=True)

    def test_based_normalized(self):
        # The window part sees only the keys of its own call, so continuation needs --window 0.
        self.check_continuation(["--variant", "based", "--window", 0], shape=BASED_SHAPE,
                                fmap="taylor2", normalize=True)

    def test_state_in_reference(self):
        # An arbitrary initial state: the reference carries it through the decay.
        B, S, Hq, Hkv, Dk, Dv = LINEAR_SHAPE
        q, k, v = self.make_linear()
        s0 = random_values(B * Hq * Dk * Dv, 41, "<f4")
        write_npy(self.path("s0.npy"), (B, Hq, Dk, Dv), s0)
        _, _, got = self.run_linear("--variant", "decay", "--decay", "0.9,0.8",
                                    "--state-in", self.path("s0.npy"))
        want, _, _ = linear_reference(q, k, v, B, S, Hq, Hkv, Dk, Dv, decay=[0.9, 0.8], state0=s0)
        self.assert_close_rel(got, want, 1e-4, "out with an initial state")


class LinearBackwardTest(LinearTestBase):
    def make_dout(self, shape=LINEAR_SHAPE, seed=51):
        B, S, Hq, _, _, Dv = shape
        dout = random_values(B * S * Hq * Dv, seed, "<f4")
        write_npy(self.path("do.npy"), (B, S, Hq, Dv), dout)
        return dout

    def grad_args(self):
        return ["--dout", self.path("do.npy"), "--dq", self.path("dq.npy"),
                "--dk", self.path("dk.npy"), "--dv", self.path("dv.npy")]

    def check_gradients(self, args, shape=LINEAR_SHAPE, gla=False, samples=5, **options):
        """Shapes, dtypes and finiteness of every gradient, and a central finite difference of
        the fp64 reference's loss sum(out * dout) at a few elements of each."""
        B, S, Hq, Hkv, Dk, Dv = shape
        q, k, v = self.make_linear(shape)
        dout = self.make_dout(shape)
        inputs = {"q": q, "k": k, "v": v}
        extra = []
        if gla:
            inputs["g"] = self.make_gates(shape)
            extra = ["--gates", self.path("g.npy"), "--dgates", self.path("dg.npy")]
        self.assert_ok(*run_cli("run", *self.linear_args(), *args, *extra, *self.grad_args()))
        shapes = {"q": (B, S, Hq, Dk), "k": (B, S, Hkv, Dk), "v": (B, S, Hkv, Dv),
                  "g": (B, S, Hq, Dk)}

        def loss(values):
            out, _, _ = linear_reference(values["q"], values["k"], values["v"], B, S, Hq, Hkv,
                                         Dk, Dv, gates=values.get("g"), **options)
            return sum(o * d for o, d in zip(out, dout))

        rng = random.Random(7)
        for name in inputs:
            descr, fortran, gshape, grad, _ = read_npy(self.path("d%s.npy" % name))
            self.assertEqual((descr, fortran, gshape), ("<f4", False, shapes[name]), name)
            self.assertTrue(all(math.isfinite(x) for x in grad), "d%s not finite" % name)
            scale = max(abs(x) for x in grad)
            self.assertGreater(scale, 0.0, "d%s is all zero" % name)
            for i in rng.sample(range(len(grad)), samples):
                h = 1e-4
                plus = dict(inputs)
                minus = dict(inputs)
                plus[name] = list(inputs[name])
                minus[name] = list(inputs[name])
                plus[name][i] += h
                minus[name][i] -= h
                fd = (loss(plus) - loss(minus)) / (2 * h)
                self.assertLessEqual(abs(grad[i] - fd), 1e-3 * scale + 1e-6,
                                     "d%s[%d]: tessera %r, finite difference %r" %
                                     (name, i, grad[i], fd))

    def test_plain(self):
        self.check_gradients(["--variant", "plain"])

    def test_plain_gqa_non_causal(self):
        self.check_gradients(["--non-causal"], shape=(1, 37, 2, 1, 8, 8), causal=False)

    def test_decay_normalized(self):
        self.check_gradients(["--variant", "decay", "--decay", "0.9,0.7", "--feature-map", "elu1",
                              "--normalize"], decay=[0.9, 0.7], fmap="elu1", normalize=True)

    def test_gla_dgates(self):
        self.check_gradients(["--variant", "gla", "--chunk", 16], gla=True, samples=4)

    def test_based_without_window(self):
        self.check_gradients(["--variant", "based", "--window", 0], shape=BASED_SHAPE,
                             fmap="taylor2", normalize=True, samples=3)


class LinearErrorTest(LinearTestBase):
    def setUp(self):
        super().setUp()
        self.make_linear()
        self.inputs = sorted(os.listdir(self.dir))

    def check_error(self, args, *needles, extra_files=()):
        rc, out, err = run_cli("run", *self.linear_args(), *args)
        self.assert_error(rc, err, *needles)
        self.assertEqual(out, "")
        self.assertEqual(sorted(os.listdir(self.dir)), sorted(self.inputs + list(extra_files)),
                         "nothing may be written on error (%s)" % (args,))

    def test_variant_and_its_inputs(self):
        self.check_error(["--variant", "mamba"], "--variant", "mamba")
        self.check_error(["--variant", "decay"], "--decay")
        self.check_error(["--decay", "0.9"], "--decay", "--variant decay")
        self.check_error(["--variant", "gla"], "--gates")
        self.make_gates()
        self.check_error(["--variant", "plain", "--gates", self.path("g.npy")], "--gates",
                         extra_files=["g.npy"])

    def test_bad_decay(self):
        for value in ("0.9,0.8,0.7", "1.5", "0", "x", "0.9,", "nan"):
            with self.subTest(value=value):
                self.check_error(["--variant", "decay", "--decay", value], "--decay")

    def test_bad_gates(self):
        B, S, Hq, _, Dk, _ = LINEAR_SHAPE
        for shape, descr, values, needle in (
                ((B, S, Hq, Dk + 1), "<f4", None, "(1, 37, 2, 8)"),
                ((B, S - 1, Hq, Dk), "<f4", None, "[B, S, Hq, Dk]"),
                ((S, Hq, Dk), "<f4", None, "rank-4"),
                ((B, S, Hq, Dk), "<f2", None, "dtype"),
                ((B, S, Hq, Dk), "<f4", 0.5, "<= 0")):
            n = shape[0] * shape[1] * shape[2] * (shape[3] if len(shape) > 3 else 1)
            fill = values if values is not None else -0.1
            write_npy(self.path("g.npy"), shape, [fill] * n, descr)
            with self.subTest(shape=shape, descr=descr):
                self.check_error(["--variant", "gla", "--gates", self.path("g.npy")], "--gates",
                                 needle, extra_files=["g.npy"])

    def test_feature_map(self):
        self.check_error(["--feature-map", "softmax"], "--feature-map", "softmax")
        self.check_error(["--variant", "gla", "--feature-map", "relu"], "--feature-map")
        self.check_error(["--variant", "based", "--feature-map", "elu1"], "--feature-map",
                         "taylor2")

    def test_integers_and_form(self):
        for args, needle in ((["--chunk", 20], "--chunk"), (["--chunk", -16], "--chunk"),
                             (["--chunk", "x"], "--chunk"), (["--prefix", 38], "--prefix"),
                             (["--prefix", -1], "--prefix"), (["--window", "2,0"], "--window"),
                             (["--window", -1], "--window"), (["--window="], "--window"),
                             (["--form", "parallel"], "--form"), (["--threads", -1], "--threads"),
                             (["--scale", "inf"], "--scale"), (["--path", "reference"], "--path")):
            with self.subTest(args=args):
                self.check_error(args, needle)

    def test_causality(self):
        self.check_error(["--causal", "--non-causal"], "--causal", "--non-causal")
        self.check_error(["--variant", "based", "--non-causal"], "--non-causal", "--window 0")
        self.check_error(["--variant", "decay", "--decay", "0.9", "--non-causal"],
                         "--non-causal", "causal order")
        self.check_error(["--variant", "gla", "--gates", self.path("q.npy"), "--prefix", 4],
                         "--prefix", "causal order")
        self.check_error(["--non-causal", "--state-out", self.path("s.npy")], "--state-out")

    def test_state_files(self):
        B, S, Hq, Hkv, Dk, Dv = LINEAR_SHAPE
        write_npy(self.path("s.npy"), (B, Hq, Dk, Dv + 1), [0.0] * (B * Hq * Dk * (Dv + 1)))
        write_npy(self.path("z.npy"), (B, Hq, Dk), [0.0] * (B * Hq * Dk))
        files = ["s.npy", "z.npy"]
        self.check_error(["--state-in", self.path("s.npy")], "--state-in", "(1, 2, 8, 8)",
                         extra_files=files)
        self.check_error(["--normalizer-in", self.path("z.npy")], "--normalizer-in",
                         "--normalize", extra_files=files)
        self.check_error(["--normalize", "--feature-map", "elu1", "--state-out",
                          self.path("s2.npy")], "--normalizer-out", extra_files=files)
        self.check_error(["--normalize", "--feature-map", "elu1", "--normalizer-in",
                          self.path("z.npy")], "--state-in", extra_files=files)
        self.check_error(["--state-out", self.path("o.npy")], "--out and --state-out",
                         extra_files=files)
        self.check_error(["--state-out", os.path.join(self.dir, "no_such_dir", "s.npy")],
                         "no_such_dir", extra_files=files)

    def test_backward(self):
        B, S, Hq, Hkv, Dk, Dv = LINEAR_SHAPE
        write_npy(self.path("do.npy"), (B, S, Hq, Dv), [0.5] * (B * S * Hq * Dv))
        grads = ["--dout", self.path("do.npy"), "--dq", self.path("dq.npy"),
                 "--dk", self.path("dk.npy"), "--dv", self.path("dv.npy")]
        files = ["do.npy"]
        self.check_error(grads[:4], "--dout, --dq, --dk and --dv together", extra_files=files)
        self.check_error(["--dgates", self.path("dg.npy")], "--dgates", extra_files=files)
        self.check_error(grads + ["--dgates", self.path("dg.npy")], "--dgates", "gla",
                         extra_files=files)
        self.check_error(grads + ["--variant", "based"], "--window 0", extra_files=files)
        self.check_error(grads + ["--state-out", self.path("s.npy")], "--state-out",
                         extra_files=files)
        write_npy(self.path("do.npy"), (B, S, Hq, Dv + 1), [0.5] * (B * S * Hq * (Dv + 1)))
        self.check_error(grads, "dout", extra_files=files)

    def test_options_of_the_other_op(self):
        for args in (["--lse", self.path("l.npy")], ["--mask", "sink:4:8"],
                     ["--softcap", 5], ["--alibi", self.path("a.npy")]):
            with self.subTest(args=args):
                self.check_error(args, args[0], "--op exact")
        rc, _, err = run_cli("run", "--q", self.path("q.npy"), "--k", self.path("k.npy"),
                             "--v", self.path("v.npy"), "--out", self.path("o.npy"),
                             "--variant", "gla")
        self.assert_error(rc, err, "--variant", "--op linear")
        rc, _, err = run_cli("run", "--op", "sparse", "--q", self.path("q.npy"), "--k",
                             self.path("k.npy"), "--v", self.path("v.npy"), "--out",
                             self.path("o.npy"))
        self.assert_error(rc, err, "--op", "sparse")
        self.assertEqual(sorted(os.listdir(self.dir)), self.inputs)

    def test_help_lists_the_linear_options(self):
        rc, out, _ = run_cli("run", "--help")
        self.assertEqual(rc, 0)
        for needle in ("--op", "--variant", "--decay", "--gates", "--state-in", "--form"):
            self.assertIn(needle, out)


LINEAR_BENCH_KEYS = ["op", "variant", "form", "dtype", "batch", "heads", "kv_heads", "seq",
                     "dim_qk", "dim_v", "feature_map", "feature_dim", "normalize", "causal",
                     "window", "chunk", "threads", "flops", "peak_gflops", "ms", "ms_min", "reps",
                     "tokens_per_s", "gflops", "frac_peak", "peak_rss_mb", "simd_target"]


class LinearBenchTest(unittest.TestCase):
    def bench_linear(self, variant, *args, seq=64, heads=2, dim=16):
        rc, out, err = run_cli("bench", "--op", "linear", "--variant", variant, "--batch", 1,
                               "--heads", heads, "--seq", seq, "--dim", dim, "--reps", 2,
                               "--warmup", 1, "--threads", 1, "--json", *args)
        self.assertEqual(rc, 0, err)
        r = json.loads(out)  # exactly one JSON object
        for key in LINEAR_BENCH_KEYS:
            self.assertIn(key, r)
        self.assertEqual((r["op"], r["variant"], r["seq"], r["heads"]),
                         ("linear", variant, seq, heads))
        self.assertGreater(r["ms"], 0)
        self.assertAlmostEqual(r["tokens_per_s"], r["batch"] * seq / (r["ms"] * 1e-3),
                               delta=1e-6 * r["tokens_per_s"])
        self.assertAlmostEqual(r["gflops"], r["flops"] / (r["ms"] * 1e-3) * 1e-9,
                               delta=1e-6 * r["gflops"])
        self.assertLess(r["peak_rss_mb"], 1024)
        return r

    def test_variants(self):
        r = self.bench_linear("plain")
        self.assertEqual((r["feature_map"], r["feature_dim"], r["normalize"], r["window"],
                          r["form"], r["dim_qk"], r["dim_v"]),
                         ("identity", 16, False, 0, "chunked", 16, 16))
        self.assertAlmostEqual(r["flops"], 2 * 64 * 4 * 16 * 16, places=3)
        r = self.bench_linear("decay", "--kv-heads", 1, heads=4)
        self.assertEqual((r["kv_heads"], len(r["decay"])), (1, 4))
        self.assertTrue(all(0 < x < 1 for x in r["decay"]))
        self.bench_linear("gla", "--normalize", "--chunk", 32)
        # BASED: q/k at --feature-dim (16 by default, F = 273), normalized, window 64.
        r = self.bench_linear("based")
        self.assertEqual((r["feature_map"], r["dim_qk"], r["feature_dim"], r["normalize"],
                          r["window"]), ("taylor2", 16, 273, True, 64))
        r = self.bench_linear("based", "--feature-dim", 4, "--dim-v", 8, "--window", 0,
                              "--no-normalize")
        self.assertEqual((r["dim_qk"], r["dim_v"], r["feature_dim"], r["normalize"],
                          r["window"]), (4, 8, 21, False, 0))

    def test_recurrent_form(self):
        r = self.bench_linear("decay", "--form", "recurrent")
        self.assertEqual(r["form"], "recurrent")

    def test_vs_exact(self):
        r = self.bench_linear("plain", "--vs", "exact", seq=128)
        for key in ("baseline", "baseline_ms", "baseline_tokens_per_s", "speedup"):
            self.assertIn(key, r)
        self.assertEqual((r["baseline"], r["baseline_causal"], r["baseline_dim"]),
                         ("exact", True, 16))
        self.assertGreater(r["baseline_ms"], 0)
        self.assertEqual(r["baseline_reps"], r["reps"])
        self.assertAlmostEqual(r["speedup"], r["baseline_ms"] / r["ms"], places=9)

    def test_human_output(self):
        rc, out, err = run_cli("bench", "--op", "linear", "--variant", "gla", "--seq", 64,
                               "--heads", 1, "--dim", 16, "--reps", 2, "--threads", 1,
                               "--vs", "exact")
        self.assertEqual(rc, 0, err)
        for needle in ("variant=gla", "tokens/s", "tessera linear", "tessera exact", "speedup"):
            self.assertIn(needle, out)

    def test_errors(self):
        base = ["bench", "--op", "linear", "--seq", 32, "--dim", 8, "--reps", 1, "--threads", 1]
        for args, needle in ((["--variant", "rwkv"], "--variant"),
                             (["--vs", "naive"], "--vs"),
                             (["--feature-dim", 4], "--feature-dim"),
                             (["--seq-k", 16], "--seq-k"),
                             (["--mask", "sink:4:8"], "--mask"),
                             (["--baseline-only"], "--baseline-only"),
                             (["--chunk", 24], "--chunk"),
                             (["--form", "scan"], "--form"),
                             (["--feature-map", "cos"], "--feature-map"),
                             (["--variant", "based", "--non-causal"], "--non-causal"),
                             (["--variant", "gla", "--non-causal"], "--non-causal"),
                             (["--heads", 3, "--kv-heads", 2], "--kv-heads")):
            with self.subTest(args=args):
                rc, out, err = run_cli(*base, *args)
                self.assertEqual(rc, 2, "%s: %s" % (args, err))
                self.assertIn(needle, err)
                self.assertEqual(out, "")
        rc, out, err = run_cli("bench", "--op", "forward", "--seq", 32, "--dim", 8, "--variant",
                               "gla")
        self.assertEqual(rc, 2, err)
        self.assertIn("--variant", err)


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
