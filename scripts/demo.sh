#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# tessera vs naive (materialized, OpenBLAS) attention: B=1, H=8, D=128, fp32, N = 1K..16K, plus
# a causal row at 4K. Run by `make demo` in the build folder; takes about 2-5 minutes.
#
# usage: scripts/demo.sh [path/to/tessera] [output folder]
#   defaults: build/tools/tessera and demo_out/ at the repository root
#   TESSERA_DEMO_THREADS (default 2), TESSERA_DEMO_SIZES (default "1024 2048 4096 8192 16384"),
#   TESSERA_DEMO_PYTHON (default build/venv/bin/python, the venv `make python` makes): when it
#   imports torch, each row also times PyTorch's CPU scaled_dot_product_attention on the same
#   shape and threads (its own [B, H, S, D] layout); otherwise that column is skipped.
#
# Each size runs two processes, because peak RSS is per process:
#   1. bench --vs naive: both timings (same inputs, same process), the speedup, max |diff|, and
#      tessera's peak RSS (read before the baseline allocates anything);
#   2. bench --baseline-only: the naive baseline alone, for its own honest peak RSS.
# The naive baseline runs OpenBLAS; the CLI forces a stronger core when OpenBLAS fell back to a
# generic one, and the report names the core that ran.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
bin="${1:-$root/build/tools/tessera}"
out="${2:-$root/demo_out}"
threads="${TESSERA_DEMO_THREADS:-2}"
sizes="${TESSERA_DEMO_SIZES:-1024 2048 4096 8192 16384}"

if [[ ! -x "$bin" ]]; then
  echo "demo: no tessera binary at $bin (build it: cmake --build build --target tessera_cli)" >&2
  exit 2
fi
mkdir -p "$out"
results="$out/results.jsonl"
: > "$results"

"$bin" info --json --threads "$threads" > "$out/info.json"

py="${TESSERA_DEMO_PYTHON:-$(dirname "$(dirname "$bin")")/venv/bin/python}"
torch_ok=0
if [[ -x "$py" ]] && "$py" -c "import torch" 2> /dev/null; then
  torch_ok=1
else
  echo "demo: no PyTorch (looked for $py with torch; make python builds it): skipping the" \
       "PyTorch SDPA column" >&2
fi

# PyTorch's CPU SDPA on random [1, 8, N, 128] fp32 tensors: the median of `reps` calls after one
# warm-up, as one JSON object.
torch_case() {
  "$py" - "$1" "$2" "$threads" "$3" << 'PYEOF'
import json, statistics, sys, time
import torch
n, causal, threads, reps = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 8, n, 128, generator=g) for _ in range(3))
sdpa = torch.nn.functional.scaled_dot_product_attention
times = []
with torch.no_grad():
    sdpa(q, k, v, is_causal=causal)
    for _ in range(reps):
        start = time.perf_counter()
        sdpa(q, k, v, is_causal=causal)
        times.append((time.perf_counter() - start) * 1e3)
flops = 4.0 * 8 * n * n * 128 * (0.5 if causal else 1.0)
ms = statistics.median(times)
print(json.dumps({"torch_version": torch.__version__, "ms": ms, "ms_min": min(times),
                  "reps": reps, "gflops": flops / (ms * 1e-3) * 1e-9}))
PYEOF
}

common=(--op forward --batch 1 --heads 8 --kv-heads 8 --dim 128 --threads "$threads" --json)

# Fewer repeats where one run takes seconds; the median of 3 cold runs discards the first-touch
# page faults that a warm-up would otherwise absorb.
reps_for() {
  if (( $1 >= 16384 )); then echo "--warmup 0 --reps 3"
  elif (( $1 >= 8192 )); then echo "--warmup 1 --reps 3"
  else echo "--warmup 1"
  fi
}

run_case() {
  local n="$1" causal="$2"
  local mask=() label="N=$n"
  if [[ "$causal" == 1 ]]; then mask=(--causal); label="$label causal"; fi
  local reps
  read -r -a reps <<< "$(reps_for "$n")"
  echo "demo: $label: tessera and naive ..." >&2
  local both naive
  both="$("$bin" bench "${common[@]}" --seq "$n" "${mask[@]}" --vs naive "${reps[@]}")"
  echo "demo: $label: naive alone (memory) ..." >&2
  naive="$("$bin" bench "${common[@]}" --seq "$n" "${mask[@]}" --baseline-only --warmup 0 \
           --reps 1)"
  local torch="null"
  if [[ "$torch_ok" == 1 ]]; then
    echo "demo: $label: PyTorch SDPA ..." >&2
    torch="$(torch_case "$n" "$causal" "$( (( n >= 8192 )) && echo 3 || echo 5)")" || torch="null"
  fi
  printf '{"vs": %s, "baseline_only": %s, "torch": %s}\n' "$both" "$naive" "$torch" >> "$results"
}

start=$SECONDS
for n in $sizes; do
  run_case "$n" 0
  if [[ "$n" == 4096 ]]; then run_case "$n" 1; fi
done
echo "demo: measured in $((SECONDS - start)) s" >&2

python3 "$here/demo_report.py" "$results" "$out/info.json" "$out"
