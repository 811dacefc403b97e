#!/usr/bin/env bash
# Installs what mop needs from Debian 12 (when missing) and builds it into build/.
# Safe to rerun: it skips installed packages and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(g++ cmake make libcli11-dev libtomlplusplus-dev nlohmann-json3-dev libfmt-dev
          libopenblas-dev libgloo-dev libgtest-dev libgmock-dev libbenchmark-dev libomp-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# nvcc is not always on PATH even when the toolkit is installed.
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi

# The CUDA backend's header-only libraries come from PyPI (only needed when nvcc exists).
if command -v nvcc >/dev/null; then bash tools/fetch_headers.sh || echo "bootstrap: no cuDNN frontend/CUTLASS headers; CUDA backend off"; fi

jobs=$(nproc)
if [ ! -f build/CMakeCache.txt ]; then
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
echo "bootstrap: building (log: build/build.log)"
if ! cmake --build build -j"$jobs" >build/build.log 2>&1; then
  grep -E -A3 "error|Error" build/build.log | head -60 >&2
  echo "bootstrap: build failed; full log in build/build.log" >&2
  exit 1
fi
