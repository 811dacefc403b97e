#!/usr/bin/env bash
# Every kernel of a `mop bench` run timed one at a time by Nsight Compute (clocks and caches left as
# they are), then summed by kind for the last step (bench/probes/kernel_profile.py). The unprofiled
# run of the same shape comes first, for its wall time and phases.
#   bench/probes/kernel_profile.sh BUILD_DIR [--set key=value ...]
# Output under $OUT (default .): bench.log, ncu.csv.gz, summary.txt.
set -euo pipefail
build=${1:?usage: kernel_profile.sh BUILD_DIR [--set key=value ...]}
shift
out=${OUT:-.}
ncu=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)}
[ -n "$ncu" ] || { echo "no ncu (Nsight Compute) found; set NCU" >&2; exit 1; }
"$build/mop" bench --set device=cuda "$@" --steps 6 --warmup 3 >"$out/bench.log" 2>&1
wall=$(python3 -c 'import json,sys; print(1000*[json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")][-1]["step_s_median"])' "$out/bench.log")
"$ncu" --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
  "$build/mop" bench --set device=cuda "$@" --steps 2 --warmup 1 >"$out/ncu.csv" 2>"$out/ncu.err"
python3 "$(dirname "$0")/kernel_profile.py" "$out/ncu.csv" --wall-ms "$wall" | tee "$out/summary.txt"
gzip -f "$out/ncu.csv"
