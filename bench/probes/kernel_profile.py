# Where one training step's GPU time goes, kernel by kernel: reads the CSV that Nsight Compute
# writes for a `mop bench` run (bench/probes/kernel_profile.sh) and sums the last full step's kernels
# by kind. Kernels run one at a time under the profiler, so the sum is pure kernel time: set against
# the step's wall time from the same shape unprofiled, the rest is time the GPU spent between kernels
# (host synchronisations, launch gaps, copies and memsets) or running slower in the real step.
#   python3 bench/probes/kernel_profile.py ncu.csv [--wall-ms W] [--list]
import argparse
import csv
import re
import sys
from collections import defaultdict

# First match wins; the name is the demangled kernel name.
KINDS = [
    ("grouped GEMM (CUTLASS)", r"GroupProblemShape|setup_groups_kernel"),
    ("attention fwd (cuDNN)", r"flash_fprop"),
    ("attention bwd (cuDNN)", r"flash_bprop|compute_dot_do_o|convert_dq|fmha_reduce_head|lse_to_bhl"),
    ("dense GEMM (cuBLASLt)", r"nvjet|cublasLt|gemm|sm90_xmma"),
    ("cross-entropy", r"cross_entropy"),
    ("AdamW update", r"adamw"),
    ("gradient norm", r"sum_squares|sum_partials"),
    ("MoE permute / combine", r"permute|gather_sum|combine"),
    ("router and route layout", r"router|expert_counts|column_mean|lb_loss|layout_|RadixSort"),
]


def short(name):
    name = re.sub(r"\(.*", "", name)
    return name if len(name) < 80 else name[:77] + "..."


def load(path):
    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]  # the profiler's own notes come first
    rows = []
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ns = float(r["Metric Value"].replace(",", ""))
        rows.append((int(r["ID"]), r["Kernel Name"], r["Grid Size"], ns / 1000.0))
    rows.sort()
    return rows


def last_step(rows):
    # A step ends with its run of AdamW kernels; the last step runs from the end of the run before
    # the last one.
    runs = []  # [first, last] index of each run of consecutive AdamW kernels
    for i, r in enumerate(rows):
        if "adamw" in r[1]:
            if runs and runs[-1][1] == i - 1:
                runs[-1][1] = i
            else:
                runs.append([i, i])
    if len(runs) < 2:
        sys.exit("fewer than two steps in the profile; profile at least two (--steps 2 --warmup 1)")
    return rows[runs[-2][1] + 1 : runs[-1][1] + 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--wall-ms", type=float, help="the same step's median wall time, unprofiled")
    ap.add_argument("--list", action="store_true", help="every kernel of the step, in order")
    a = ap.parse_args()
    step = last_step(load(a.csv))
    by_kind, names = defaultdict(float), defaultdict(lambda: [0, 0.0])
    for _, name, grid, us in step:
        kind = next((k for k, rx in KINDS if re.search(rx, name)), "other elementwise (mop)")
        by_kind[kind] += us
        n = names[(kind, short(name))]
        n[0] += 1
        n[1] += us
        if a.list:
            print(f"{us:10.1f} us  {grid:>16}  {short(name)}")
    total = sum(by_kind.values())
    print(f"{len(step)} kernels, {total / 1000:.2f} ms of kernel time in the last step")
    for k, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {k:28} {us / 1000:8.2f} ms  {100 * us / total:5.1f}%")
    print("largest kernels by total time:")
    for (k, n), (c, us) in sorted(names.items(), key=lambda kv: -kv[1][1])[:15]:
        print(f"  {us / 1000:8.2f} ms  x{c:<4} {n}")
    if a.wall_ms:
        print(f"wall {a.wall_ms:.2f} ms: {a.wall_ms - total / 1000:.2f} ms ({100 * (1 - total / 1000 / a.wall_ms):.1f}%) "
              "outside the kernels' own time")


if __name__ == "__main__":
    main()
