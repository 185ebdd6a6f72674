#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs the Debian packages tessera needs to build, test and run its demo; a no-op when they
# are all present. Runs as root (CI and the dev machines) or through sudo.
set -euo pipefail

packages=(build-essential cmake libhwy-dev libopenblas-dev libcli11-dev nlohmann-json3-dev
          libgtest-dev libbenchmark-dev libfftw3-dev libopenmpi-dev openmpi-bin python3 python3-venv python3-dev clang-format
          clang-14 libclang-rt-14-dev  # clang and its runtimes: the libFuzzer harnesses (fuzz/)
          liburing-dev)  # optional: the io_uring reader of KV cache files
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing: ${missing[*]}"
sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo_cmd apt-get update -qq
$sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}"
