#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Turns the demo's measurements into a table (stdout), demo.md and attention_scaling.svg.

usage: demo_report.py results.jsonl info.json OUT_DIR

results.jsonl holds one line per case: {"vs": <bench --vs naive JSON>,
"baseline_only": <bench --baseline-only JSON>, "torch": <PyTorch SDPA timing, or null>}. Standard library only; the SVG is written by
hand (log-log time and memory against N).
"""
import json
import math
import os
import sys


def load(results_path, info_path):
    with open(results_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    with open(info_path) as f:
        info = json.load(f)
    cases = []
    for r in rows:
        vs, alone, torch = r["vs"], r["baseline_only"], r.get("torch")
        cases.append({
            "torch_ms": torch["ms"] if torch else None,
            "torch_gflops": torch["gflops"] if torch else None,
            "torch_version": torch["torch_version"] if torch else None,
            "blas_core": vs.get("blas_core"),
            "blas_core_forced_from": vs.get("blas_core_forced_from"),
            "naive_gemm_gflops": vs.get("baseline_gemm_gflops"),
            "sgemm_gflops": vs.get("sgemm_gflops"),
            "sgemm_over_naive_gemm": vs.get("sgemm_over_baseline_gemm"),
            "shapes_over_naive_gemm": vs.get("sgemm_shapes_over_baseline_gemm"),
            "n": vs["seq_q"],
            "causal": vs["causal"],
            "ms": vs["ms"],
            "ms_min": vs["ms_min"],
            "gflops": vs["gflops"],
            "frac_peak": vs["frac_peak"],
            "peak_gflops": vs["peak_gflops"],
            "rss": vs["peak_rss_mb"],
            "naive_ms": vs["baseline_ms"],
            "naive_ms_min": vs["baseline_ms_min"],
            "naive_gflops": vs["baseline_gflops"],
            "naive_rss": alone["baseline_peak_rss_mb"],
            "naive_scores_mb": vs["baseline_score_mb"],
            "naive_chunk": vs["baseline_heads_per_chunk"],
            "speedup": vs["speedup"],
            "max_abs_diff": vs["max_abs_diff"],
            "reps": vs["reps"],
            "flops": vs["flops"],
            "threads": vs["threads"],
        })
    return cases, info


def noise_notes(cases):
    """Flags rows measured while other work shared the cores: a low in-process FMA peak, or a
    median far above the fastest run. Returns ({row index: marker}, [note lines])."""
    best_peak = max(c["peak_gflops"] for c in cases)
    marks, notes = {}, []
    for i, c in enumerate(cases):
        why = []
        if c["peak_gflops"] < 0.9 * best_peak:
            why.append("the FMA peak probed in its process was %.0f GFLOP/s (best %.0f)"
                       % (c["peak_gflops"], best_peak))
        for name, med, low in (("tessera", c["ms"], c["ms_min"]),
                               ("naive", c["naive_ms"], c["naive_ms_min"])):
            if med > 1.2 * low:
                why.append("%s's median %.1f ms is %.0f%% above its fastest run %.1f ms"
                           % (name, med, 100 * (med / low - 1), low))
        if why:
            marks[i] = "*"
            notes.append("* N=%d%s: %s; other work likely shared the cores, so this row is "
                         "noisy." % (c["n"], " causal" if c["causal"] else "", "; ".join(why)))
    return marks, notes


def table_rows(cases):
    header = ["N", "mask", "tessera ms", "GFLOP/s", "% peak", "tessera RSS MiB", "naive ms",
              "naive GFLOP/s", "naive RSS MiB", "speedup", "max abs diff"]
    with_torch = any(c["torch_ms"] is not None for c in cases)
    if with_torch:
        header += ["torch ms", "torch GFLOP/s", "vs torch"]
    marks, _ = noise_notes(cases)
    rows = []
    for i, c in enumerate(cases):
        row = [
            str(c["n"]) + marks.get(i, ""), "causal" if c["causal"] else "none", "%.1f" % c["ms"],
            "%.1f" % c["gflops"], "%.1f" % (100 * c["frac_peak"]), "%.0f" % c["rss"],
            "%.1f" % c["naive_ms"], "%.1f" % c["naive_gflops"], "%.0f" % c["naive_rss"],
            "%.2fx" % c["speedup"], "%.1e" % c["max_abs_diff"],
        ]
        if with_torch:
            row += (["-", "-", "-"] if c["torch_ms"] is None else
                    ["%.1f" % c["torch_ms"], "%.1f" % c["torch_gflops"],
                     "%.2fx" % (c["torch_ms"] / c["ms"])])
        rows.append(row)
    return header, rows


def blas_note(cases, info):
    """One line: the OpenBLAS core the naive column ran, and its GEMMs against a plain sgemm."""
    core = next((c["blas_core"] for c in cases if c["blas_core"]), info.get("blas_core"))
    if not core:
        return ""
    forced = next((c["blas_core_forced_from"] for c in cases if c["blas_core_forced_from"]),
                  None)
    line = "naive column: OpenBLAS core %s" % core
    if forced:
        line += " (forced from %s by tessera: OpenBLAS did not recognise this CPU)" % forced
    shapes = [c["shapes_over_naive_gemm"] for c in cases if c["shapes_over_naive_gemm"]]
    if shapes:
        line += ("; plain sgemms of the naive GEMMs' own shapes ran %.2f-%.2fx their rate"
                 % (min(shapes), max(shapes)))
    ratios = [c["sgemm_over_naive_gemm"] for c in cases if c["sgemm_over_naive_gemm"]]
    if ratios:
        line += ", a 2048^3 sgemm %.2f-%.2fx (head dim 128 is a thin GEMM)" % (
            min(ratios), max(ratios))
    return line


def torch_note(cases):
    version = next((c["torch_version"] for c in cases if c["torch_version"]), None)
    if version is None:
        return ("PyTorch column skipped: no interpreter with torch (make python builds "
                "build/venv; or set TESSERA_DEMO_PYTHON).")
    return ("torch: PyTorch %s CPU scaled_dot_product_attention on [1, 8, N, 128] fp32 tensors, "
            "same threads, median of 3-5 calls; vs torch = torch ms / tessera ms." % version)


def print_table(header, rows):
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join("%%%ds" % w for w in widths)
    print(fmt % tuple(header))
    for r in rows:
        print(fmt % tuple(r))


def markdown(cases, info, header, rows):
    threads = cases[0]["threads"] if cases else info.get("threads", 0)
    lines = [
        "# tessera vs naive attention",
        "",
        "Exact attention forward, batch 1, 8 heads, head dim 128, fp32, %d threads. "
        "tessera %s, SIMD target %s, %d hardware threads." % (
            threads, info["version"], info["simd_target"], info["hardware_threads"]),
        "Measured fp32 FMA peak: %.1f GFLOP/s on 1 thread, %.1f GFLOP/s on all threads; "
        "`%% peak` is against the peak measured in the same process at %d threads." % (
            info["peak_gflops_1t"], info["peak_gflops_all"], threads),
        "",
        "- tessera: `tessera bench --op forward`, O(tile) memory, scores never materialized.",
        "- naive: S = scale QK^T with OpenBLAS sgemm, vectorized parallel row softmax, "
        "O = PV with sgemm; all heads at once while the scores fit in 1 GiB, else in chunks "
        "of heads.",
        "- Times are medians of repeated runs; GFLOP/s count 4·B·H·N²·D, halved for causal.",
        "- Peak RSS: tessera's is read in the benchmark process before the baseline allocates; "
        "naive's comes from a separate `--baseline-only` process.",
        "- `max abs diff` is max |tessera - naive| over the outputs (a sanity check).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" for _ in header) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    lines += ["", blas_note(cases, info), "", torch_note(cases)]
    notes = noise_notes(cases)[1]
    if notes:
        lines += [""] + notes
    lines += ["", "![time and memory against N](attention_scaling.svg)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# SVG

TESSERA_COLOR = "#1f77b4"
NAIVE_COLOR = "#d62728"
BOUND_COLOR = "#7f7f7f"


def log_ticks(lo, hi):
    """1-2-5 ticks covering [lo, hi] (positive values)."""
    ticks = []
    e = math.floor(math.log10(lo))
    while 10 ** e <= hi * 1.0001:
        for m in (1, 2, 5):
            t = m * 10 ** e
            if lo / 1.0001 <= t <= hi * 1.0001:
                ticks.append(t)
        e += 1
    return ticks


def fmt_num(v):
    if v >= 1000:
        return "%gk" % (v / 1000) if v < 1e6 else "%gM" % (v / 1e6)
    return "%g" % v


class Panel:
    def __init__(self, x0, y0, w, h, xs, ys, title, ylabel):
        self.x0, self.y0, self.w, self.h = x0, y0, w, h
        self.xlo, self.xhi = min(xs), max(xs)
        ylo, yhi = min(ys), max(ys)
        self.ylo = 10 ** math.floor(math.log10(ylo))
        self.yhi = 10 ** math.ceil(math.log10(yhi))
        if self.yhi / self.ylo < 100:  # at least two decades, for a readable slope
            self.yhi = self.ylo * 100
        self.title, self.ylabel = title, ylabel

    def px(self, x):
        if self.xhi == self.xlo:
            return self.x0 + self.w / 2
        return self.x0 + self.w * (math.log2(x) - math.log2(self.xlo)) / (
            math.log2(self.xhi) - math.log2(self.xlo))

    def py(self, y):
        t = (math.log10(y) - math.log10(self.ylo)) / (math.log10(self.yhi) - math.log10(self.ylo))
        return self.y0 + self.h * (1 - t)

    def axes(self, xs):
        out = ['<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="none" stroke="#333"/>'
               % (self.x0, self.y0, self.w, self.h)]
        for x in sorted(set(xs)):
            X = self.px(x)
            out.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>'
                       % (X, self.y0, X, self.y0 + self.h))
            out.append('<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>'
                       % (X, self.y0 + self.h + 16, x))
        for y in log_ticks(self.ylo, self.yhi):
            Y = self.py(y)
            major = abs(math.log10(y) - round(math.log10(y))) < 1e-9
            out.append('<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s"/>'
                       % (self.x0, Y, self.x0 + self.w, Y, "#ccc" if major else "#eee"))
            out.append('<text x="%.1f" y="%.1f" text-anchor="end">%s</text>'
                       % (self.x0 - 6, Y + 4, fmt_num(y)))
        out.append('<text x="%.1f" y="%.1f" text-anchor="middle" font-weight="bold">%s</text>'
                   % (self.x0 + self.w / 2, self.y0 - 10, self.title))
        out.append('<text x="%.1f" y="%.1f" text-anchor="middle">sequence length N (log)</text>'
                   % (self.x0 + self.w / 2, self.y0 + self.h + 36))
        cx, cy = self.x0 - 48, self.y0 + self.h / 2
        out.append('<text x="%.1f" y="%.1f" text-anchor="middle" transform="rotate(-90 %.1f %.1f)">'
                   '%s</text>' % (cx, cy, cx, cy, self.ylabel))
        return out

    def series(self, pts, color, dashed=False, markers=True):
        pts = sorted(pts)
        path = " ".join("%s%.1f,%.1f" % ("M" if i == 0 else "L", self.px(x), self.py(y))
                        for i, (x, y) in enumerate(pts))
        out = ['<path d="%s" fill="none" stroke="%s" stroke-width="2"%s/>'
               % (path, color, ' stroke-dasharray="6,4"' if dashed else "")]
        if markers:
            for x, y in pts:
                out.append('<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s"/>'
                           % (self.px(x), self.py(y), color))
        return out


def svg(cases):
    dense = sorted((c for c in cases if not c["causal"]), key=lambda c: c["n"])
    if not dense:
        return None
    ns = [c["n"] for c in dense]
    bound_ms = [(c["n"], c["flops"] / (c["peak_gflops"] * 1e9) * 1e3) for c in dense]
    t_pts = [(c["n"], c["ms"]) for c in dense]
    nt_pts = [(c["n"], c["naive_ms"]) for c in dense]
    m_pts = [(c["n"], c["rss"]) for c in dense]
    nm_pts = [(c["n"], c["naive_rss"]) for c in dense]

    width, height = 980, 470
    left = Panel(80, 50, 370, 320, ns, [y for _, y in t_pts + nt_pts + bound_ms],
                 "Time per forward", "milliseconds (log)")
    right = Panel(580, 50, 370, 320, ns, [y for _, y in m_pts + nm_pts],
                  "Peak resident memory", "MiB (log)")
    body = []
    body += left.axes(ns)
    body += left.series(bound_ms, BOUND_COLOR, dashed=True, markers=False)
    body += left.series(nt_pts, NAIVE_COLOR)
    body += left.series(t_pts, TESSERA_COLOR)
    body += right.axes(ns)
    body += right.series(nm_pts, NAIVE_COLOR)
    body += right.series(m_pts, TESSERA_COLOR)

    legend_y = height - 40
    items = [(TESSERA_COLOR, False, "tessera"),
             (NAIVE_COLOR, False, "naive (OpenBLAS sgemm + softmax, materialized scores)"),
             (BOUND_COLOR, True, "fp32 FMA peak bound")]
    x = 80
    for color, dashed, label in items:
        body.append('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2"%s/>'
                    % (x, legend_y, x + 28, legend_y, color,
                       ' stroke-dasharray="6,4"' if dashed else ""))
        body.append('<text x="%d" y="%d">%s</text>' % (x + 34, legend_y + 4, label))
        x += 44 + 7 * len(label)
    threads = dense[0]["threads"]
    body.append('<text x="%d" y="%d" fill="#555">B=1, H=8, D=128, fp32, %d threads, '
                'non-causal; memory is the peak RSS of each implementation\'s own process phase'
                '</text>' % (80, height - 12, threads))
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
            'viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">\n'
            '<rect width="100%%" height="100%%" fill="white"/>\n%s\n</svg>\n'
            % (width, height, width, height, "\n".join(body)))


def main(argv):
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    cases, info = load(argv[1], argv[2])
    out_dir = argv[3]
    if not cases:
        print("demo_report: no results in %s" % argv[1], file=sys.stderr)
        return 1
    header, rows = table_rows(cases)
    print()
    print_table(header, rows)
    print()
    print(blas_note(cases, info))
    print(torch_note(cases))
    for note in noise_notes(cases)[1]:
        print(note)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "demo.md"), "w") as f:
        f.write(markdown(cases, info, header, rows))
    picture = svg(cases)
    if picture:
        with open(os.path.join(out_dir, "attention_scaling.svg"), "w") as f:
            f.write(picture)
    print("\nwrote %s and %s" % (os.path.join(out_dir, "demo.md"),
                                 os.path.join(out_dir, "attention_scaling.svg")))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
