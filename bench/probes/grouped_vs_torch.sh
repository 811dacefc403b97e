#!/usr/bin/env bash
# mop's CUTLASS expert GEMMs next to torch._grouped_mm on the moe-7b expert shape (65,536 rows,
# 2048 -> 1536, 64 experts), in one call: each side twice, alternating, so both see the same clocks
# and temperature; then Nsight Compute on both (the grouped kernels only, clocks and caches as they
# are) for each kernel's own time, grid, registers and shared memory, which tells a configuration
# difference from a timing one.
#   bench/probes/grouped_vs_torch.sh BUILD_DIR      (logs and summary.txt under $OUT, default .)
set -uo pipefail
build=${1:?usage: grouped_vs_torch.sh BUILD_DIR}
out=${OUT:-.}
here=$(dirname "$0")
for i in 1 2; do
  "$build/mop" bench ops --preset moe-7b --only grouped --json "$out/mop_$i.jsonl" >"$out/mop_$i.log" 2>&1
  python3 "$here/../torch_ops_ref.py" --only grouped --out "$out/torch_$i.jsonl" >"$out/torch_$i.log" 2>&1
done
ncu=${NCU:-$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)}
metrics=gpu__time_duration.sum,launch__grid_size,launch__block_size,launch__registers_per_thread,launch__shared_mem_per_block_dynamic,sm__cycles_elapsed.avg.per_second
if [ -n "$ncu" ]; then
  "$ncu" --clock-control none --cache-control none --metrics "$metrics" --csv -k regex:device_kernel \
    --launch-count 120 "$build/mop" bench ops --preset moe-7b --only grouped >"$out/ncu_mop.csv" 2>"$out/ncu_mop.err"
  "$ncu" --clock-control none --cache-control none --metrics "$metrics" --csv -k regex:device_kernel \
    --launch-count 60 python3 "$here/../torch_ops_ref.py" --only grouped --out /dev/null >"$out/ncu_torch.csv" 2>"$out/ncu_torch.err"
fi
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import csv, glob, io, json, os, statistics, sys
out = sys.argv[1]
print("event-timed, median of 20 samples (L2 flushed), TFLOP/s:")
for f in sorted(glob.glob(os.path.join(out, "mop_*.jsonl")) + glob.glob(os.path.join(out, "torch_*.jsonl"))):
    for l in open(f):
        r = json.loads(l)
        k = r.get("kernel", "")
        if "grouped" in k.lower() or "dense" in k.lower() or "_grouped_mm" in k:
            print(f"  {os.path.basename(f):14} {k:44} {r.get('shape', ''):34} {r.get('us', 0):9.1f} us {r.get('tflops', 0) or 0:6.0f}")
for side in ("mop", "torch"):
    path = os.path.join(out, f"ncu_{side}.csv")
    if not os.path.exists(path):
        continue
    text = open(path).read()
    start = text.find('"ID"')
    if start < 0:
        print(f"{side}: no ncu rows"); continue
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    kern = {}
    for r in rows:
        key = (r["Kernel Name"][:150], )
        v = r["Metric Value"].replace(",", "")
        if r["Metric Name"] == "gpu__time_duration.sum":  # to microseconds, whatever unit ncu chose
            v = float(v) * {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(r.get("Metric Unit", ""), 1e-3)
        kern.setdefault(key, {}).setdefault(r["Metric Name"], []).append(v)
    print(f"\nncu, {side}: kernel (first 150 chars) | n | median us | grid | block | regs | dyn smem | SM clock")
    for (name,), m in kern.items():
        t = m.get("gpu__time_duration.sum", [])
        g = lambda k: m.get(k, ["?"])[0]
        print(f"  {name}\n    n={len(t)} median={statistics.median(t) if t else 0:.1f} us grid={g('launch__grid_size')} "
              f"block={g('launch__block_size')} regs={g('launch__registers_per_thread')} "
              f"smem={g('launch__shared_mem_per_block_dynamic')} clock={g('sm__cycles_elapsed.avg.per_second')}")
PY
