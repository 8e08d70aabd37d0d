#!/usr/bin/env bash
# Installs what earn's build, tests, benchmarks and examples need on Debian 12, from Debian's packages only.
# Skips apt entirely when everything is already there (a second run costs nothing).
set -euo pipefail
# clang and its compiler-rt (ASan, UBSan, TSan, libFuzzer) build the hardening runs of tools/hardening.sh.
pkgs=(g++ cmake ninja-build libeigen3-dev doctest-dev libbenchmark-dev nlohmann-json3-dev libcli11-dev
      clang libclang-rt-14-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "${missing[@]}"
fi
