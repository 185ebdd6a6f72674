# SPDX-License-Identifier: Apache-2.0
"""`tessera run --dist` and `tessera bench --dist`: sequence-parallel attention (ring, Ulysses for
the exact op; LASP-2 for --op linear) under mpirun for P = 1, 2, 3 against the single-process
`tessera run` on the same files, the bench report, and errors that end every rank (exit 2)
without a hang.

Skipped as a whole when the binary was built without MPI (its --dist error names TESSERA_MPI);
the mpirun cases are skipped when mpirun is not on PATH.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import unittest

import cli_util
from cli_util import CliTestBase, random_values, read_npy, run_cli, write_npy

MPIRUN = shutil.which("mpirun")
# OpenMPI refuses to run as root (CI containers) unless told; one thread per rank.
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMP_NUM_THREADS": "1"}
# np.allclose(got, want, rtol, atol * max|want|): the gradients have no fixed scale.
RTOL = 1e-5
ATOL = 1e-5

# B, N, Hq, Hkv, D: GQA (2 query heads per KV head), N = 13 divisible by none of P = 2, 3 nor by
# their zigzag cuts into 2P chunks, and Hq, Hkv divisible by every P (Ulysses).
SHAPE = (2, 13, 12, 6, 8)
BENCH_KEYS = ["dist", "ranks", "seq", "layout", "causal", "backward", "threads", "ms",
              "compute_ms", "wait_ms", "transfer_ms", "hidden_fraction", "comm_only_ms",
              "hidden_vs_comm_only", "bytes_sent", "steps", "gflops", "per_rank"]
LASP2_BENCH_KEYS = ["variant", "feature_map", "feature_dim", "normalize", "chunk", "dim_qk",
                    "dim_v", "allgathers", "allgather_bytes"]


def setUpModule():
    with tempfile.TemporaryDirectory(prefix="tessera_cli_") as tmp:
        missing = os.path.join(tmp, "missing.npy")
        rc, _, err = run_cli("run", "--dist", "ring", "--q", missing, "--k", missing, "--v",
                             missing, "--out", os.path.join(tmp, "o.npy"), env=MPI_ENV)
    if rc == 2 and "TESSERA_MPI" in err:
        raise unittest.SkipTest("tessera was built without MPI (TESSERA_MPI off)")


def run_ranks(ranks, *args, timeout=60):
    """`mpirun -np ranks tessera ARGS`; a run past `timeout` (a hang) is killed and fails."""
    if MPIRUN is None:
        raise unittest.SkipTest("mpirun not found")
    cmd = [MPIRUN, "-np", str(ranks), "--oversubscribe", cli_util.BINARY] + [str(a) for a in args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, **MPI_ENV), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # mpirun and its ranks: the group started here
        proc.communicate()
        raise AssertionError("mpirun -np %d %s: no exit within %d s (hang)"
                             % (ranks, args, timeout))
    return proc.returncode, out.decode(), err.decode()


def allclose(got, want):
    """np.allclose with rtol RTOL and atol ATOL * max |want|; the worst offender or None."""
    scale = max([abs(w) for w in want] + [1e-30])
    for i, (g, w) in enumerate(zip(got, want)):
        if not abs(g - w) <= ATOL * scale + RTOL * abs(w):
            return "element %d: got %r, want %r (scale %.3g)" % (i, g, w, scale)
    return None


class OutputsMatch:
    """assert_matches for the run tests: every output file of a prefix against the reference's."""

    def assert_matches(self, prefix, want_prefix, what, names):
        for name in names:
            got = read_npy(self.path(prefix + name + ".npy"))
            want = read_npy(self.path(want_prefix + name + ".npy"))
            self.assertEqual(got[:3], want[:3], "%s %s: dtype, order, shape" % (what, name))
            bad = allclose(got[3], want[3])
            self.assertIsNone(bad, "%s %s: %s" % (what, name, bad))


class DistRunTest(OutputsMatch, CliTestBase):
    OUTPUTS = ["out", "lse", "dq", "dk", "dv"]

    def write_inputs(self, B, N, Hq, Hkv, D, seed=3):
        self.references = {}  # new inputs: new references
        for name, heads, offset in (("q", Hq, 0), ("k", Hkv, 1), ("v", Hkv, 2), ("do", Hq, 3)):
            write_npy(self.path(name + ".npy"), (B, N, heads, D),
                      random_values(B * N * heads * D, seed + offset, "<f4"))

    def args(self, prefix, backward=True, lse=True):
        a = ["--q", self.path("q.npy"), "--k", self.path("k.npy"), "--v", self.path("v.npy"),
             "--out", self.path(prefix + "out.npy"), "--threads", 1]
        if lse:
            a += ["--lse", self.path(prefix + "lse.npy")]
        if backward:
            a += ["--dout", self.path("do.npy")]
            a += sum((["--" + g, self.path(prefix + g + ".npy")] for g in ("dq", "dk", "dv")), [])
        return a

    def single_process(self, options, backward=True, lse=True):
        """The reference: plain `tessera run` with the same options (once per option set)."""
        key = (tuple(options), backward, lse)
        if key not in self.references:
            prefix = "ref%d_" % len(self.references)
            for name in self.OUTPUTS:
                if os.path.exists(self.path(prefix + name + ".npy")):
                    os.remove(self.path(prefix + name + ".npy"))
            self.assert_ok(*run_cli("run", *self.args(prefix, backward, lse), *options))
            self.references[key] = prefix
        return self.references[key]

    def check(self, ranks, dist, options, backward=True, lse=True, singleton=False):
        what = "P=%d --dist %s %s" % (ranks, dist, " ".join(map(str, options)))
        want = self.single_process([o for o in options if o not in ("--layout", "contiguous",
                                                                     "zigzag")], backward, lse)
        prefix = "dist_"
        for name in self.OUTPUTS:
            if os.path.exists(self.path(prefix + name + ".npy")):
                os.remove(self.path(prefix + name + ".npy"))
        args = ["run", "--dist", dist, *self.args(prefix, backward, lse), *options]
        rc, out, err = run_cli(*args, env=MPI_ENV) if singleton else run_ranks(ranks, *args)
        self.assertEqual(rc, 0, "%s: exit %d, stderr: %s" % (what, rc, err))
        self.assertEqual(out, "", what + ": stdout must stay clean")
        names = ["out"] + (["lse"] if lse else []) + (["dq", "dk", "dv"] if backward else [])
        self.assert_matches(prefix, want, what, names)
        if not lse:
            self.assertFalse(os.path.exists(self.path(prefix + "lse.npy")))

    def test_ring_and_ulysses_match_single_process(self):
        # Forward and backward, every layout, causal and not, P = 1, 2, 3.
        self.write_inputs(*SHAPE)
        for ranks in (1, 2, 3):
            for dist in ("ring", "ulysses"):
                for layout in ("contiguous", "zigzag"):
                    for causal in (False, True):
                        options = ["--layout", layout] + (["--causal"] if causal else [])
                        with self.subTest(ranks=ranks, dist=dist, layout=layout, causal=causal):
                            self.check(ranks, dist, options)

    def test_forward_only_scale_softcap(self):
        # No backward and no --lse (Ulysses still moves the LSE back into scratch).
        self.write_inputs(*SHAPE)
        for dist in ("ring", "ulysses"):
            with self.subTest(dist=dist):
                self.check(2, dist, ["--layout", "zigzag", "--causal", "--scale", 0.3,
                                     "--softcap", 5], backward=False, lse=False)

    def test_sliding_windows(self):
        # Windows by global position: blocks outside the window are skipped by the ring.
        self.write_inputs(*SHAPE)
        for dist in ("ring", "ulysses"):
            for options in (["--causal", "--window", "3,0"], ["--window", "2,4"]):
                with self.subTest(dist=dist, options=options):
                    self.check(2, dist, ["--layout", "zigzag"] + options)
        self.check(3, "ring", ["--window", "-1,1"])

    def test_empty_shards(self):
        # Fewer tokens than ranks (contiguous) and than the 2P zigzag chunks: shards of 0 tokens.
        self.write_inputs(1, 2, 2, 1, 16)
        self.check(3, "ring", ["--causal"])
        self.write_inputs(1, 5, 2, 1, 16, seed=9)
        self.check(3, "ring", ["--layout", "zigzag", "--causal"])

    def test_singleton_without_mpirun(self):
        # Started without mpirun, MPI runs a job of one rank.
        self.write_inputs(*SHAPE)
        self.check(1, "ring", ["--layout", "zigzag", "--causal"], singleton=True)


class DistErrorTest(CliTestBase):
    def setUp(self):
        super().setUp()
        self.make_inputs(1, 8, 8, 2, 1, 8)

    def assert_refused(self, rc, out, err, *needles):
        self.assert_error(rc, err, *needles)
        self.assertEqual(out, "")
        self.assertFalse(os.path.exists(self.path("o.npy")), "nothing may be written")

    def test_options_the_drivers_do_not_take(self):
        write_npy(self.path("slopes.npy"), (2,), [0.5, 0.25])
        cases = [
            (["--mask", "sink:1:4"], "--mask"),
            (["--alibi", self.path("slopes.npy")], "--alibi"),
            (["--stats-window", 2, "--key-mass", self.path("km.npy")], "--stats-window"),
            (["--op", "linear"], "--op linear"),
            (["--op", "approx", "--method", "hyper"], "--op approx"),
        ]
        for extra, needle in cases:
            with self.subTest(extra=extra):
                self.assert_refused(*run_cli("run", "--dist", "ring", *self.io_args(), *extra,
                                             env=MPI_ENV), needle, "--dist")

    def test_bad_values(self):
        cases = [
            (["--dist", "bogus"], ["--dist", "'bogus'", "ring", "ulysses"]),
            (["--dist", "lasp2"], ["--dist lasp2", "--op linear"]),
            (["--dist", "ring", "--layout", "bogus"], ["--layout", "'bogus'"]),
            (["--layout", "zigzag"], ["--layout", "only with --dist"]),
        ]
        for extra, needles in cases:
            with self.subTest(extra=extra):
                self.assert_refused(*run_cli("run", *self.io_args(), *extra, env=MPI_ENV),
                                    *needles)

    def test_sequence_lengths_must_match(self):
        write_npy(self.path("k.npy"), (1, 9, 1, 8), random_values(72, 5, "<f4"))
        self.assert_refused(*run_cli("run", "--dist", "ring", *self.io_args(), env=MPI_ENV),
                            "--k", "Sq == Sk")

    def test_ulysses_heads_not_divisible(self):
        # Hkv = 1 cannot be split across 2 ranks: every rank fails, rank 0 names the heads.
        self.assert_refused(*run_ranks(2, "run", "--dist", "ulysses", *self.io_args(),
                                       timeout=30), "heads", "Ulysses")

    def test_missing_input_on_every_rank(self):
        args = self.io_args()
        args[1] = self.path("missing.npy")
        self.assert_refused(*run_ranks(2, "run", "--dist", "ring", *args, timeout=30),
                            "missing.npy")

    def test_failure_on_rank_0_only(self):
        # Only rank 0 checks the destinations: the others must learn of it and end too.
        os.mkdir(self.path("dir"))
        args = self.io_args()
        args[-1] = self.path("dir")
        rc, out, err = run_ranks(2, "run", "--dist", "ring", *args, timeout=30)
        self.assert_error(rc, err, "--out", "directory")
        self.assertEqual(out, "")


# LASP-2: B, N, Hq, Hkv, Dk, Dv. GQA, B > 1, Dv != Dk, and N = 37 divisible by neither P = 2 nor 3
# and longer than --chunk 16 on every shard but the last of P = 3.
LINEAR_SHAPE = (2, 37, 4, 2, 8, 6)
LASP2_VARIANTS = {
    "plain": [],
    "decay": ["--variant", "decay", "--decay", "0.9,0.8,0.95,0.7"],
    "gla": ["--variant", "gla", "--gates", "g.npy"],
    "elu1-normalized": ["--feature-map", "elu1", "--normalize"],
}


class DistLasp2RunTest(OutputsMatch, CliTestBase):
    OUTPUTS = ["out", "dq", "dk", "dv", "dgates"]

    def write_linear(self, B, N, Hq, Hkv, Dk, Dv, seed=5):
        self.references = {}
        for name, shape, offset in (("q", (B, N, Hq, Dk), 0), ("k", (B, N, Hkv, Dk), 1),
                                    ("v", (B, N, Hkv, Dv), 2), ("do", (B, N, Hq, Dv), 3)):
            n = shape[0] * shape[1] * shape[2] * shape[3]
            write_npy(self.path(name + ".npy"), shape, random_values(n, seed + offset, "<f4"))
        # Log-space gates in [-0.5, -0.01], one per channel (g.npy) or per token and head (gs.npy).
        rng = random.Random(seed + 4)
        write_npy(self.path("g.npy"), (B, N, Hq, Dk),
                  [-rng.uniform(0.01, 0.5) for _ in range(B * N * Hq * Dk)])
        write_npy(self.path("gs.npy"), (B, N, Hq),
                  [-rng.uniform(0.01, 0.5) for _ in range(B * N * Hq)])

    def args(self, prefix, backward=True, lse=False, dgates=False):
        a = ["--op", "linear", "--q", self.path("q.npy"), "--k", self.path("k.npy"),
             "--v", self.path("v.npy"), "--out", self.path(prefix + "out.npy"), "--threads", 1,
             "--chunk", 16]
        if backward:
            a += ["--dout", self.path("do.npy")]
            a += sum((["--" + g, self.path(prefix + g + ".npy")] for g in ("dq", "dk", "dv")), [])
        if dgates:
            a += ["--dgates", self.path(prefix + "dgates.npy")]
        return a

    def single_process(self, options, backward=True, dgates=False):
        """The reference: `tessera run --op linear` with the same options (once per set)."""
        key = (tuple(options), backward, dgates)
        if key not in self.references:
            prefix = "ref%d_" % len(self.references)
            self.assert_ok(*run_cli("run", *self.args(prefix, backward, dgates=dgates),
                                    *options))
            self.references[key] = prefix
        return self.references[key]

    def check_lasp2(self, ranks, options, backward=True, dgates=False):
        options = [self.path(o) if o in ("g.npy", "gs.npy") else o for o in options]
        what = "P=%d --dist lasp2 %s" % (ranks, " ".join(map(str, options)))
        want = self.single_process(options, backward, dgates)
        prefix = "dist_"
        for name in self.OUTPUTS:
            if os.path.exists(self.path(prefix + name + ".npy")):
                os.remove(self.path(prefix + name + ".npy"))
        rc, out, err = run_ranks(ranks, "run", "--dist", "lasp2",
                                 *self.args(prefix, backward, dgates=dgates), *options)
        self.assertEqual(rc, 0, "%s: exit %d, stderr: %s" % (what, rc, err))
        self.assertEqual(out, "", what + ": stdout must stay clean")
        names = ["out"] + (["dq", "dk", "dv"] if backward else []) + (["dgates"] if dgates else [])
        self.assert_matches(prefix, want, what, names)
        for name in set(self.OUTPUTS) - set(names):
            self.assertFalse(os.path.exists(self.path(prefix + name + ".npy")), what + " " + name)

    def test_variants_match_single_process(self):
        # Forward and backward (dgates for gla) of every variant, P = 1, 2, 3.
        self.write_linear(*LINEAR_SHAPE)
        for ranks in (1, 2, 3):
            for variant, options in LASP2_VARIANTS.items():
                with self.subTest(ranks=ranks, variant=variant):
                    self.check_lasp2(ranks, options, dgates=variant == "gla")

    def test_forward_only_scalar_gates_and_empty_shards(self):
        # No backward files (one decay rate for every head, a scale); scalar gates [B, N, Hq] and
        # their dgates; then fewer tokens than ranks: a rank with no tokens still takes part in
        # the all-gathers (gates too).
        self.write_linear(*LINEAR_SHAPE)
        self.check_lasp2(2, ["--variant", "decay", "--decay", "0.85", "--scale", 0.5],
                         backward=False)
        self.check_lasp2(2, ["--variant", "gla", "--gates", "gs.npy"], dgates=True)
        self.write_linear(1, 2, 2, 1, 8, 8, seed=9)
        self.check_lasp2(3, LASP2_VARIANTS["gla"], dgates=True)


class DistLasp2ErrorTest(CliTestBase):
    def setUp(self):
        super().setUp()
        self.make_inputs(1, 8, 8, 2, 1, 8)

    def assert_refused(self, rc, out, err, *needles):
        self.assert_error(rc, err, *needles)
        self.assertEqual(out, "")
        self.assertFalse(os.path.exists(self.path("o.npy")), "nothing may be written")

    def lasp2(self, *extra):
        return run_cli("run", "--op", "linear", "--dist", "lasp2", *self.io_args(), *extra,
                       env=MPI_ENV)

    def test_options_lasp2_does_not_take(self):
        cases = [
            (["--non-causal"], ["--non-causal", "--dist lasp2"]),
            (["--prefix", 2], ["--prefix", "--dist lasp2"]),
            (["--window", 4], ["--window", "--dist lasp2"]),
            (["--variant", "based"], ["--variant based", "--window 0"]),
            (["--form", "recurrent"], ["--form recurrent", "--dist lasp2"]),
            (["--state-in", self.path("s.npy")], ["--state-in", "--dist lasp2"]),
            (["--state-out", self.path("s.npy")], ["--state-out", "--dist lasp2"]),
            (["--normalize", "--normalizer-in", self.path("n.npy")], ["--normalizer-in"]),
            (["--normalize", "--normalizer-out", self.path("n.npy")], ["--normalizer-out"]),
            (["--lse", self.path("l.npy")], ["--lse", "--dist lasp2"]),
            (["--layout", "zigzag"], ["--layout zigzag", "contiguous"]),
        ]
        for extra, needles in cases:
            with self.subTest(extra=extra):
                self.assert_refused(*self.lasp2(*extra), *needles)

    def test_op_and_dist_must_match(self):
        cases = [
            (["--dist", "lasp2"], ["--dist lasp2", "--op linear"]),
            (["--dist", "lasp2", "--op", "approx"], ["--dist lasp2", "--op approx"]),
            (["--dist", "ring", "--op", "linear"], ["--op linear", "--dist ring"]),
            (["--dist", "ulysses", "--op", "linear"], ["--op linear", "--dist ulysses"]),
        ]
        for extra, needles in cases:
            with self.subTest(extra=extra):
                self.assert_refused(*run_cli("run", *self.io_args(), *extra, env=MPI_ENV),
                                    *needles)

    def test_bad_gates_on_every_rank(self):
        # Gates of the wrong length: every rank fails after loading, rank 0 names the file.
        write_npy(self.path("g.npy"), (1, 5, 2, 8), [-0.1] * 80)
        self.assert_refused(*run_ranks(2, "run", "--op", "linear", "--dist", "lasp2",
                                       *self.io_args(), "--variant", "gla", "--gates",
                                       self.path("g.npy"), timeout=30), "--gates", "tokens")


class DistBenchTest(unittest.TestCase):
    def bench(self, ranks, *args):
        rc, out, err = run_ranks(ranks, "bench", "--seq", 96, "--heads", 4, "--kv-heads", 2,
                                 "--dim", 16, "--threads", 1, "--reps", 3, "--warmup", 1,
                                 "--json", *args)
        self.assertEqual(rc, 0, err)
        r = json.loads(out)  # one object: only rank 0 prints
        for key in BENCH_KEYS + (LASP2_BENCH_KEYS if r["dist"] == "lasp2" else []):
            self.assertIn(key, r)
        self.assertEqual((r["ranks"], r["seq"], r["threads"]), (ranks, 96, 1))
        self.assertGreater(r["ms"], 0)
        self.assertGreater(r["gflops"], 0)
        for key in ("compute_ms", "wait_ms", "transfer_ms", "comm_only_ms"):
            self.assertGreaterEqual(r[key], 0, key)
        self.assertGreater(r["compute_ms"], 0)
        self.assertLessEqual(r["compute_ms"], r["ms"] * 1.01)
        self.assertLessEqual(r["wait_ms"], r["ms"] * 1.01)
        for key in ("hidden_fraction", "hidden_vs_comm_only"):
            self.assertTrue(0 <= r[key] <= 1, "%s = %r" % (key, r[key]))
        self.assertEqual(len(r["per_rank"]), ranks)
        self.assertEqual(sum(e["tokens"] for e in r["per_rank"]), 96)
        for e in r["per_rank"]:
            self.assertGreater(e["compute_ms"], 0)
            self.assertGreaterEqual(e["wait_ms"], 0)
        return r

    def test_ring_json(self):
        r = self.bench(2, "--dist", "ring", "--layout", "zigzag", "--causal")
        self.assertEqual((r["dist"], r["layout"], r["causal"], r["backward"]),
                         ("ring", "zigzag", True, False))
        self.assertEqual(r["steps"], 2)
        # One K/V block of 48 tokens, 2 KV heads, D = 16, f32.
        self.assertEqual(r["bytes_sent"], 2 * 48 * 2 * 16 * 4)
        self.assertGreater(r["transfer_ms"], 0)
        self.assertGreater(r["comm_only_ms"], 0)

    def test_ring_backward_and_ulysses(self):
        r = self.bench(3, "--dist", "ring", "--backward")
        self.assertEqual((r["backward"], r["steps"]), (True, 3))
        self.assertGreater(r["bytes_sent"], 0)
        r = self.bench(2, "--dist", "ulysses", "--causal")
        self.assertEqual((r["dist"], r["steps"]), ("ulysses", 1))

    def test_single_rank(self):
        r = self.bench(1, "--dist", "ring")
        self.assertEqual((r["bytes_sent"], r["wait_ms"], r["hidden_fraction"]), (0, 0, 1))

    def test_lasp2_json(self):
        # Forward: one all-gather of the chunk state and decay, B*Hq*F*(Dv+1) floats per rank.
        r = self.bench(2, "--op", "linear", "--dist", "lasp2", "--dim-v", 8)
        self.assertEqual((r["dist"], r["layout"], r["causal"], r["backward"], r["variant"]),
                         ("lasp2", "contiguous", True, False, "plain"))
        self.assertEqual((r["steps"], r["allgathers"], r["feature_dim"], r["dim_v"]),
                         (1, 1, 16, 8))
        self.assertEqual(r["allgather_bytes"], 1 * 4 * 16 * (8 + 1) * 4)
        self.assertEqual(r["bytes_sent"], r["allgather_bytes"])
        # GFLOP/s as bench --op linear counts it: 4*B*Hq*N*F*Dv.
        self.assertAlmostEqual(r["gflops"] * r["ms"] * 1e6 / (4 * 4 * 96 * 16 * 8), 1, places=6)
        self.assertGreater(r["comm_only_ms"], 0)

    def test_lasp2_backward_json(self):
        # With --normalize the backward all-gathers twice, B*Hq*F*(Dv+2) floats each (elu1:
        # F = Dk); gla's backward once, B*Hq*F*(2*Dv+1).
        r = self.bench(3, "--op", "linear", "--dist", "lasp2", "--feature-map", "elu1",
                       "--normalize", "--backward")
        self.assertEqual((r["backward"], r["normalize"], r["allgathers"]), (True, True, 2))
        self.assertEqual(r["allgather_bytes"], 2 * 4 * 16 * (16 + 2) * 4)
        self.assertEqual(r["bytes_sent"], r["allgather_bytes"])
        self.assertAlmostEqual(r["gflops"] * r["ms"] * 1e6 / (2 * 4 * 96 * (4 * 16 * 16 + 4 * 16)),
                               1, places=6)
        r = self.bench(2, "--op", "linear", "--dist", "lasp2", "--variant", "gla", "--backward")
        self.assertEqual((r["variant"], r["allgathers"]), ("gla", 1))
        self.assertEqual(r["allgather_bytes"], 4 * 16 * (2 * 16 + 1) * 4)

    def test_refused(self):
        cases = [
            (["--dist", "lasp2"], "--op linear"),
            (["--dist", "ring", "--op", "linear"], "--dist lasp2"),
            (["--op", "linear", "--dist", "lasp2", "--layout", "zigzag"], "contiguous"),
            (["--op", "linear", "--dist", "lasp2", "--non-causal"], "--non-causal"),
            (["--op", "linear", "--dist", "lasp2", "--form", "recurrent"], "--form recurrent"),
            (["--op", "linear", "--dist", "lasp2", "--vs", "exact"], "--vs"),
            (["--dist", "ring", "--vs", "naive"], "--vs"),
            (["--dist", "ring", "--op", "backward"], "--op"),
            (["--dist", "ring", "--mask", "sink:1:4"], "--mask"),
            (["--dist", "bogus"], "--dist"),
            (["--dist", "ring", "--layout", "bogus"], "--layout"),
            (["--backward"], "--backward"),
            (["--layout", "zigzag"], "--layout"),
        ]
        for args, needle in cases:
            with self.subTest(args=args):
                rc, out, err = run_cli("bench", "--seq", 64, *args, env=MPI_ENV)
                self.assertEqual(rc, 2, err)
                self.assertIn(needle, err)
                self.assertEqual(out, "")


if __name__ == "__main__":
    unittest.main()
