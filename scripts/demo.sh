#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# tessera vs naive (materialized, OpenBLAS) attention: B=1, H=8, D=128, fp32, N = 1K..16K, plus
# a causal row at 4K. Run by `make demo` in the build folder; takes about 2-5 minutes.
#
# usage: scripts/demo.sh [path/to/tessera] [output folder]
#   defaults: build/tools/tessera and demo_out/ at the repository root
#   TESSERA_DEMO_THREADS (default 2), TESSERA_DEMO_SIZES (default "1024 2048 4096 8192 16384")
#
# Each size runs two processes, because peak RSS is per process:
#   1. bench --vs naive: both timings (same inputs, same process), the speedup, max |diff|, and
#      tessera's peak RSS (read before the baseline allocates anything);
#   2. bench --baseline-only: the naive baseline alone, for its own honest peak RSS.
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
  printf '{"vs": %s, "baseline_only": %s}\n' "$both" "$naive" >> "$results"
}

start=$SECONDS
for n in $sizes; do
  run_case "$n" 0
  if [[ "$n" == 4096 ]]; then run_case "$n" 1; fi
done
echo "demo: measured in $((SECONDS - start)) s" >&2

python3 "$here/demo_report.py" "$results" "$out/info.json" "$out"
