#!/usr/bin/env bash
# Build and test on a GPU machine that has the CUDA toolkit but no package registry: the Debian
# packages and PyPI wheels come in a folder made beforehand (tools/offline_deps.sh fetch DIR/debs;
# pip download of the two header wheels into DIR/wheels). Logs go to $LOGS (default: build-gpu).
#   tools/gpu_check.sh DIR [ctest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
deps=${1:?usage: gpu_check.sh DEPS_DIR [ctest args]}; shift
logs=${LOGS:-build-gpu}
mkdir -p "$logs"
bash tools/offline_deps.sh install "$deps/debs" >"$logs/deps.log" 2>&1 || { echo "deps failed"; tail "$logs/deps.log"; exit 1; }
WHEELS="$deps/wheels" bash tools/fetch_headers.sh >>"$logs/deps.log" 2>&1 || { echo "headers failed"; tail "$logs/deps.log"; exit 1; }
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release >"$logs/cmake.log" 2>&1 || { tail -30 "$logs/cmake.log"; exit 1; }
start=$(date +%s)
if ! cmake --build build-gpu -j"$(nproc)" -- -k 0 >"$logs/build.log" 2>&1; then
  echo "build failed:"; grep -E -A5 "error" "$logs/build.log" | head -80
fi
echo "build: $(( $(date +%s) - start )) s"
ctest --test-dir build-gpu --output-on-failure "$@" >"$logs/ctest.log" 2>&1
grep -E "tests passed|tests failed|Failed|\*\*\*|SKIPPED|Not Run" "$logs/ctest.log" | head -40
exit 0
