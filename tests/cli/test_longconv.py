# SPDX-License-Identifier: Apache-2.0
"""`tessera run --op longconv` (forward and backward) and `tessera run --op h3` (H3Layer and its
backward) against direct fp64 sums, bad inputs, and `tessera bench --op longconv` / `--op h3`
(with --backward and --vs direct) on tiny shapes.
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


def conv_transpose(dy, h, d, B, N, C, L):
    """du[b, t, c] = sum_{s < L, t + s < N} h[s, c] dy[b, t + s, c] (+ d[c] dy[b, t, c])."""
    du = []
    for b in range(B):
        for t in range(N):
            for c in range(C):
                acc = sum(h[s * C + c] * dy[(b * N + t + s) * C + c] for s in range(min(L, N - t)))
                if d is not None:
                    acc += d[c] * dy[(b * N + t) * C + c]
                du.append(acc)
    return du


def conv_filter_grad(dy, u, B, N, C, L):
    """dh[s, c] = sum_b sum_{t >= s} dy[b, t, c] u[b, t - s, c]."""
    return [sum(dy[(b * N + t) * C + c] * u[(b * N + t - s) * C + c]
                for b in range(B) for t in range(s, N))
            for s in range(L) for c in range(C)]


def bias_grad(dy, u, B, N, C):
    """dd[c] = sum_b sum_t dy[b, t, c] u[b, t, c]."""
    return [sum(dy[i * C + c] * u[i * C + c] for i in range(B * N)) for c in range(C)]


def h3_reference(q, k, v, sf, sb, hf, hb, dout, B, N, H, D, Ls, L):
    """H3Layer and H3LayerBackward (tessera/longconv.h) in fp64, on flat C-order lists: the shift
    convolution over the H*D channels of k, the SSM convolution over the H*D*D outer-product
    channels (h, i, j) = K_i v_j of each head (its filter and bias repeated over i, j), read out
    by q; then the chain rule back through the same steps. Returns a dict of every output."""
    C, P_C = H * D, H * D * D
    K = longconv_reference(k, sf, sb, B, N, C, Ls)
    # P[b, t, (h, i, j)] = K[b, t, h, i] v[b, t, h, j]; the SSM filter per channel (h, i, j).
    P = [K[r * C + h * D + i] * v[r * C + h * D + j]
         for r in range(B * N) for h in range(H) for i in range(D) for j in range(D)]
    hf_rep = [hf[s * H + h] for s in range(L) for h in range(H) for _ in range(D * D)]
    hb_rep = None if hb is None else [hb[h] for h in range(H) for _ in range(D * D)]
    S = longconv_reference(P, hf_rep, hb_rep, B, N, P_C, L)
    ch = lambda h, i, j: (h * D + i) * D + j  # noqa: E731
    out = [sum(q[r * C + h * D + i] * S[r * P_C + ch(h, i, j)] for i in range(D))
           for r in range(B * N) for h in range(H) for j in range(D)]
    dq = [sum(dout[r * C + h * D + j] * S[r * P_C + ch(h, i, j)] for j in range(D))
          for r in range(B * N) for h in range(H) for i in range(D)]
    dS = [q[r * C + h * D + i] * dout[r * C + h * D + j]
          for r in range(B * N) for h in range(H) for i in range(D) for j in range(D)]
    dP = conv_transpose(dS, hf_rep, hb_rep, B, N, P_C, L)
    dhf_rep = conv_filter_grad(dS, P, B, N, P_C, L)
    dhf = [sum(dhf_rep[s * P_C + h * D * D + m] for m in range(D * D))
           for s in range(L) for h in range(H)]
    dhb_rep = bias_grad(dS, P, B, N, P_C)
    dhb = [sum(dhb_rep[h * D * D + m] for m in range(D * D)) for h in range(H)]
    dK = [sum(dP[r * P_C + ch(h, i, j)] * v[r * C + h * D + j] for j in range(D))
          for r in range(B * N) for h in range(H) for i in range(D)]
    dv = [sum(dP[r * P_C + ch(h, i, j)] * K[r * C + h * D + i] for i in range(D))
          for r in range(B * N) for h in range(H) for j in range(D)]
    return {"out": out, "dq": dq, "dk": conv_transpose(dK, sf, sb, B, N, C, Ls), "dv": dv,
            "dshift_filter": conv_filter_grad(dK, k, B, N, C, Ls),
            "dshift_bias": bias_grad(dK, k, B, N, C), "dssm_filter": dhf, "dssm_bias": dhb}


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

    def test_backward_matches_reference(self):
        B, N, C, L = 2, 37, 3, 20
        u, h, d = self.make(B, N, C, L)
        dy = random_values(B * N * C, 4, "<f4")
        write_npy(self.path("dy.npy"), (B, N, C), dy)
        want = {"du": conv_transpose(dy, h, d, B, N, C, L),
                "dh": conv_filter_grad(dy, u, B, N, C, L),
                "dd": bias_grad(dy, u, B, N, C)}
        shapes = {"du": (B, N, C), "dh": (L, C), "dd": (C,)}
        for path in ("direct", "fft"):
            rc, out, err = run_cli("run", "--op", "longconv", "--u", self.path("u.npy"),
                                   "--filter", self.path("h.npy"), "--bias", self.path("d.npy"),
                                   "--conv-path", path, "--out", self.path("y.npy"),
                                   "--dout", self.path("dy.npy"), "--du", self.path("du.npy"),
                                   "--dfilter", self.path("dh.npy"), "--dbias",
                                   self.path("dd.npy"))
            self.assert_ok(rc, out, err)
            for name, values in want.items():
                _, _, shape, got, _ = read_npy(self.path(name + ".npy"))
                self.assertEqual(shape, shapes[name], name)
                self.assert_close_rel(got, values, 1e-5, "%s (%s)" % (name, path))
        # One gradient alone, without a bias: only that file is written.
        os.remove(self.path("du.npy"))
        rc, out, err = run_cli("run", "--op", "longconv", "--u", self.path("u.npy"), "--filter",
                               self.path("h.npy"), "--out", self.path("y.npy"), "--dout",
                               self.path("dy.npy"), "--dfilter", self.path("dh2.npy"))
        self.assert_ok(rc, out, err)
        _, _, _, got, _ = read_npy(self.path("dh2.npy"))
        self.assert_close_rel(got, want["dh"], 1e-5, "dfilter alone")
        self.assertFalse(os.path.exists(self.path("du.npy")))

    def test_backward_bad_flags(self):
        B, N, C, L = 1, 9, 2, 4
        self.make(B, N, C, L)
        write_npy(self.path("dy.npy"), (B, N, C), random_values(B * N * C, 4, "<f4"))
        write_npy(self.path("dy_bad.npy"), (B, N + 1, C), random_values(B * (N + 1) * C, 4, "<f4"))
        base = ["run", "--op", "longconv", "--u", self.path("u.npy"), "--filter",
                self.path("h.npy"), "--out", self.path("y.npy")]
        cases = [
            (["--dout", self.path("dy.npy"), "--dbias", self.path("g.npy")], ["--dbias", "--bias"]),
            (["--dout", self.path("dy.npy")], ["--dout", "--du"]),
            (["--du", self.path("g.npy")], ["--du", "--dout"]),
            (["--dout", self.path("dy_bad.npy"), "--du", self.path("g.npy")], ["--dout"]),
            (["--dout", self.path("dy.npy"), "--dq", self.path("g.npy")], ["--dq"]),
            (["--causal"], ["--causal"]),
            (["--shift-filter", self.path("h.npy")], ["--shift-filter", "--op h3"]),
        ]
        for args, needles in cases:
            with self.subTest(args=args):
                rc, _, err = run_cli(*(base + args))
                self.assert_error(rc, err, *needles)
                self.assertFalse(os.path.exists(self.path("y.npy")))
                self.assertFalse(os.path.exists(self.path("g.npy")))


class H3RunTest(CliTestBase):
    B, N, H, D, LS = 2, 13, 2, 2, 3

    def make(self, L):
        B, N, H, D, Ls = self.B, self.N, self.H, self.D, self.LS
        n = B * N * H * D
        x = {"q": random_values(n, 11, "<f4"), "k": random_values(n, 12, "<f4"),
             "v": random_values(n, 13, "<f4"), "dout": random_values(n, 14, "<f4"),
             "sf": random_values(Ls * H * D, 15, "<f4"), "sb": random_values(H * D, 16, "<f4"),
             "hf": random_values(L * H, 17, "<f4"), "hb": random_values(H, 18, "<f4")}
        shapes = {"q": (B, N, H, D), "k": (B, N, H, D), "v": (B, N, H, D), "dout": (B, N, H, D),
                  "sf": (Ls, H * D), "sb": (H * D,), "hf": (L, H), "hb": (H,)}
        for name, values in x.items():
            write_npy(self.path(name + ".npy"), shapes[name], values)
        return x

    def forward_args(self, biases=True, out="o.npy"):
        args = ["run", "--op", "h3", "--q", self.path("q.npy"), "--k", self.path("k.npy"),
                "--v", self.path("v.npy"), "--shift-filter", self.path("sf.npy"), "--ssm-filter",
                self.path("hf.npy"), "--out", self.path(out)]
        if biases:
            args += ["--shift-bias", self.path("sb.npy"), "--ssm-bias", self.path("hb.npy")]
        return args

    def test_matches_reference(self):
        B, N, H, D, Ls = self.B, self.N, self.H, self.D, self.LS
        for L in (13, 5):
            x = self.make(L)
            for biases in (True, False):
                want = h3_reference(x["q"], x["k"], x["v"], x["sf"], x["sb"] if biases else None,
                                    x["hf"], x["hb"] if biases else None, x["dout"],
                                    B, N, H, D, Ls, L)
                files = {"out": "--out", "dq": "--dq", "dk": "--dk", "dv": "--dv",
                         "dshift_filter": "--dshift-filter", "dssm_filter": "--dssm-filter"}
                if biases:
                    files.update({"dshift_bias": "--dshift-bias", "dssm_bias": "--dssm-bias"})
                for path in ("direct", "fft"):
                    args = self.forward_args(biases) + ["--conv-path", path, "--dout",
                                                        self.path("dout.npy")]
                    for name, flag in files.items():
                        if name != "out":
                            args += [flag, self.path(name + ".npy")]
                    rc, out, err = run_cli(*args)
                    self.assert_ok(rc, out, err)
                    what = "L=%d biases=%s %s" % (L, biases, path)
                    _, _, shape, _, _ = read_npy(self.path("o.npy"))
                    self.assertEqual(shape, (B, N, H, D), what)
                    for name in files:
                        got = read_npy(self.path("o.npy" if name == "out" else name + ".npy"))[3]
                        self.assert_close_rel(got, want[name], 1e-5, "%s (%s)" % (name, what))

    def test_forward_alone(self):
        B, N, H, D, Ls, L = self.B, self.N, self.H, self.D, self.LS, 5
        x = self.make(L)
        want = h3_reference(x["q"], x["k"], x["v"], x["sf"], x["sb"], x["hf"], x["hb"], x["dout"],
                            B, N, H, D, Ls, L)
        rc, out, err = run_cli(*self.forward_args())
        self.assert_ok(rc, out, err)
        self.assert_close_rel(read_npy(self.path("o.npy"))[3], want["out"], 1e-5, "out (auto)")
        self.assertEqual(sorted(f for f in os.listdir(self.dir) if f.startswith("d")),
                         ["dout.npy"])

    def test_bad_inputs(self):
        B, N, H, D, Ls = self.B, self.N, self.H, self.D, self.LS
        self.make(5)
        write_npy(self.path("hf_wide.npy"), (5, H + 1), random_values(5 * (H + 1), 1, "<f4"))
        write_npy(self.path("hf_long.npy"), (N + 1, H), random_values((N + 1) * H, 1, "<f4"))
        write_npy(self.path("sf_wide.npy"), (Ls, H * D + 1),
                  random_values(Ls * (H * D + 1), 1, "<f4"))
        write_npy(self.path("k_bad.npy"), (B, N, H, D + 1),
                  random_values(B * N * H * (D + 1), 1, "<f4"))
        write_npy(self.path("q3.npy"), (B, N, H * D), random_values(B * N * H * D, 1, "<f4"))

        def without(args, flag):
            i = args.index(flag)
            return args[:i] + args[i + 2:]

        def replaced(args, flag, name):
            i = args.index(flag)
            return args[:i + 1] + [self.path(name)] + args[i + 2:]

        fwd = self.forward_args(biases=False)
        bwd = ["--dout", self.path("dout.npy"), "--dq", self.path("g1.npy"), "--dk",
               self.path("g2.npy"), "--dv", self.path("g3.npy")]
        cases = [
            (without(fwd, "--ssm-filter"), ["--ssm-filter"]),
            (replaced(fwd, "--ssm-filter", "hf_wide.npy"), ["--ssm-filter", "[5, 3]"]),
            (replaced(fwd, "--ssm-filter", "hf_long.npy"), ["--ssm-filter"]),
            (replaced(fwd, "--shift-filter", "sf_wide.npy"), ["--shift-filter"]),
            (replaced(fwd, "--k", "k_bad.npy"), ["--k"]),
            (replaced(fwd, "--q", "q3.npy"), ["--q", "rank-4"]),
            (fwd + ["--conv-path", "stream"], ["--conv-path"]),
            (fwd + ["--dout", self.path("dout.npy"), "--dq", self.path("g1.npy")], ["--dk"]),
            (fwd + ["--dssm-filter", self.path("g4.npy")], ["--dssm-filter", "--dout"]),
            (fwd + bwd + ["--dshift-bias", self.path("g4.npy")], ["--dshift-bias", "--shift-bias"]),
            (fwd + ["--u", self.path("q.npy")], ["--u", "--op longconv"]),
            (fwd + ["--window", "4,0"], ["--window"]),
            (fwd + ["--lse", self.path("g4.npy")], ["--lse"]),
        ]
        for args, needles in cases:
            with self.subTest(args=args[args.index("--out") - 1:]):
                rc, _, err = run_cli(*args)
                self.assert_error(rc, err, *needles)
                for f in ("o.npy", "g1.npy", "g2.npy", "g3.npy", "g4.npy"):
                    self.assertFalse(os.path.exists(self.path(f)), f)
        # An h3 flag under the exact op is refused by name.
        rc, _, err = run_cli("run", "--q", self.path("q.npy"), "--k", self.path("k.npy"), "--v",
                             self.path("v.npy"), "--out", self.path("o.npy"), "--ssm-filter",
                             self.path("hf.npy"))
        self.assert_error(rc, err, "--ssm-filter", "--op h3")
        self.assertFalse(os.path.exists(self.path("o.npy")))


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

    def test_bench_longconv_backward_vs_direct(self):
        rc, out, err = run_cli("bench", "--op", "longconv", "--backward", "--seq", "150",
                               "--channels", "5", "--filter-len", "90", "--conv-path", "fft",
                               "--vs", "direct", "--reps", "2", "--warmup", "0", "--json")
        self.assertEqual(rc, 0, err)
        r = json.loads(out)
        for key in ("ms", "forward_ms", "tokens_per_s", "speedup", "max_abs_diff"):
            self.assertIn(key, r)
        self.assertTrue(r["backward"])
        self.assertGreater(r["speedup"], 0.0)
        self.assertLessEqual(r["max_abs_diff"], 1e-4)

    def test_bench_h3(self):
        for extra in ([], ["--backward"]):
            rc, out, err = run_cli("bench", "--op", "h3", "--seq", "60", "--heads", "2", "--dim",
                                   "2", "--batch", "2", "--filter-len", "40", "--shift-len", "3",
                                   "--conv-path", "fft", "--vs", "direct", "--reps", "2",
                                   "--warmup", "0", "--json", *extra)
            self.assertEqual(rc, 0, err)
            r = json.loads(out)
            self.assertEqual(r["op"], "h3")
            for key in ("ms", "tokens_per_s", "speedup", "max_abs_diff"):
                self.assertIn(key, r)
            self.assertEqual(r["backward"], bool(extra))
            if extra:
                self.assertIn("forward_ms", r)
            self.assertGreater(r["tokens_per_s"], 0.0)
            self.assertLessEqual(r["max_abs_diff"], 1e-4)

    def test_bench_conv_options_refused(self):
        cases = [
            (["--op", "longconv", "--shift-len", "3"], "--shift-len"),
            (["--op", "h3", "--channels", "4"], "--channels"),
            (["--op", "h3", "--conv-path", "stream"], "--conv-path"),
            (["--op", "longconv", "--conv-path", "stream", "--backward"], "--backward"),
            (["--op", "forward", "--filter-len", "4"], "--filter-len"),
            (["--op", "h3", "--seq-k", "4"], "--seq-k"),
        ]
        for args, needle in cases:
            with self.subTest(args=args):
                rc, out, err = run_cli("bench", "--seq", "16", "--reps", "1", *args)
                self.assert_error(rc, err, needle)
                self.assertEqual(out, "")

    def test_bench_ssm(self):
        # The streamed scan (calls of 7 tokens chained through the state) against the one-shot
        # FFT convolution with the model's kernel.
        rc, out, err = run_cli("bench", "--op", "ssm", "--seq", "100", "--channels", "19",
                               "--modes", "3", "--batch", "2", "--conv-block", "7", "--vs", "fft",
                               "--reps", "2", "--warmup", "0", "--json")
        self.assertEqual(rc, 0, err)
        r = json.loads(out)
        self.assertEqual((r["op"], r["seq"], r["channels"], r["modes"], r["block"]),
                         ("ssm", 100, 19, 3, 7))
        for key in ("ms", "tokens_per_s", "baseline_ms", "ratio", "kernel_ms", "state_kb"):
            self.assertIn(key, r)
        self.assertLessEqual(r["max_abs_diff"], 1e-4)
        self.assertAlmostEqual(r["state_kb"], 2 * 19 * 3 * 2 * 4 / 1024)
        cases = [
            (["--op", "ssm", "--filter-len", "4"], "--filter-len"),
            (["--op", "ssm", "--vs", "direct"], "--vs"),
            (["--op", "ssm", "--modes", "0"], "--modes"),
            (["--op", "longconv", "--modes", "4"], "--modes"),
            (["--op", "ssm", "--conv-block", "0"], "--conv-block"),
        ]
        for args, needle in cases:
            with self.subTest(args=args):
                rc, out, err = run_cli("bench", "--seq", "16", "--reps", "1", *args)
                self.assert_error(rc, err, needle)
                self.assertEqual(out, "")
