#!/usr/bin/env bash
# Build dependencies for a machine without a package registry (e.g. a GPU node with only the
# CUDA toolkit): `fetch DIR` downloads the Debian 12 packages on a machine that has apt;
# `install DIR` unpacks them into / on the target (headers, CMake configs, OpenBLAS and its
# runtime) and recreates the alternatives links that dpkg -x does not make.
set -euo pipefail
mode=${1:?usage: offline_deps.sh fetch|install DIR}
dir=${2:?usage: offline_deps.sh fetch|install DIR}
pkgs=(libfmt-dev libfmt9 nlohmann-json3-dev libcli11-dev libtomlplusplus-dev libtomlplusplus3 libopenblas-dev
      libopenblas0 libopenblas0-pthread libopenblas-pthread-dev libgfortran5 libgtest-dev
      libgloo-dev libgloo0 libhiredis0.14 libibverbs1 libnl-3-200 libnl-route-3-200)
case $mode in
  fetch)
    mkdir -p "$dir" && cd "$dir" && apt-get download "${pkgs[@]}" ;;
  install)
    # Unpack into a staging tree first: some packages (libibverbs1, libnl-3-200) ship files under
    # /lib, which on a merged-/usr system is a symlink that a plain `dpkg -x DEB /` would replace.
    stage=$(mktemp -d)
    for f in "$dir"/*.deb; do dpkg -x "$f" "$stage"; done
    if [ -d "$stage/lib" ] && [ -L /lib ]; then
      mkdir -p "$stage/usr/lib" && cp -a "$stage/lib/." "$stage/usr/lib/" && rm -rf "$stage/lib"
    fi
    cp -a "$stage/." /
    rm -rf "$stage"
    lib=/usr/lib/x86_64-linux-gnu
    ln -sf openblas-pthread/libopenblas.so.0 $lib/libopenblas.so.0
    ln -sf openblas-pthread/libopenblas.so $lib/libopenblas.so
    ln -sf openblas-pthread/cblas.h /usr/include/x86_64-linux-gnu/cblas.h
    ldconfig ;;
  *) echo "unknown mode $mode" >&2; exit 2 ;;
esac
