#!/usr/bin/env python3
"""One table from run_gpus.sh's JSON lines: each mop run next to the PyTorch baseline of the same
shape (layers, sequence length, batch per GPU).

  python3 bench/summarize_gpus.py OUT/x2.jsonl [...]

ratio: mop's tokens/s per GPU over the baseline's. exposed: the share of mop's step that the
communication adds, 1 - (skipped step / step), from the run's own steps with the communication
skipped (`mop bench --skip-steps`, SKIP=N in run_gpus.sh: the last step's routing replayed, so the
skipped steps do the same expert work; "routing differs" flags a run where they did not). Without
them, a twin run with parallel.gpu_comm = skip of the same shape; with expert parallelism that twin
is not the same computation (the rows a rank gets back are the ones it sent, so later layers route
differently) and its share is marked "(twin)". The phases are the compute stream's medians
(train.timing): where the step went, the expert exchange and the ZeRO waits included. ep load: over
the MoE layers, the most loaded rank's expert pairs over the mean rank's (1 is even), with
parallel.ep_balance's moves, and in brackets without them."""
import json
import sys


def rows(paths):
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    yield json.loads(line)


def shape(r):
    if r.get("impl") == "mop":
        return (r["layers"], r["seq"], r["batch"] // max(1, r["world"]))
    return (r["layers"], r["seq"], r["batch"])


def layout(r):
    return (f"zero {r.get('zero', 0)}, ep {r.get('ep', 1)}" + (", ep_overlap" if r.get("ep_overlap") else "")
            + (", ep_balance" if r.get("ep_balance") else "")
            + (f", {r['checkpointing']} recompute" if r.get("checkpointing") else ""))


def main(paths):
    runs = list(rows(paths))
    # Runs from several calls in one file carry a "call" field: each run pairs with its own call's.
    torch = {(shape(r), r.get("call")): r for r in runs
             if r.get("impl", "").startswith("torch") and "tokens_per_s_per_gpu" in r}
    mop = [r for r in runs if r.get("impl") == "mop" and "tokens_per_s" in r]
    skipped = {(shape(r), layout(r), r.get("call")): r for r in mop if r.get("gpu_comm") == "skip"}
    print("| run | GPUs | layers | seq x batch/GPU | tok/s/GPU | MFU | peak GiB | vs baseline | exposed comm | ep load | top phases (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in mop + [t for t in torch.values()]:
        is_mop = r.get("impl") == "mop"
        sh = shape(r)
        tps = r["tokens_per_s"] if is_mop else r["tokens_per_s_per_gpu"]
        ratio = exposed = phases = load = ""
        if is_mop:
            name = f"mop {layout(r)}" + (", comm skipped" if r.get("gpu_comm") == "skip" else "")
            base = torch.get((sh, r.get("call")))
            if base and r.get("gpu_comm") != "skip":  # a skipped run's numbers are not a result
                ratio = f"{tps / base['tokens_per_s_per_gpu']:.2f}x"
            twin = skipped.get((sh, layout(r), r.get("call")))
            if "exposed_comm_share" in r:
                exposed = f"{100 * r['exposed_comm_share']:.1f}%"
                if not r.get("skip_routing_matches", True):
                    exposed += " (routing differs)"
            elif twin is not None and twin is not r and r.get("gpu_comm") != "skip":
                exposed = f"{100 * (1 - twin['step_s_median'] / r['step_s_median']):.1f}%"
                if r.get("ep", 1) > 1:
                    exposed += " (twin)"
            if "ep_load_max_over_mean" in r:
                load = f"{r['ep_load_max_over_mean']:.2f}"
                if r.get("ep_balance"):
                    load += f" ({r['ep_load_max_over_mean_unbalanced']:.2f})"
            ph = sorted(r.get("phase_ms_median", {}).items(), key=lambda kv: -kv[1])[:5]
            phases = ", ".join(f"{k} {v:.1f}" for k, v in ph)
            gpus = r["world"]
        else:
            name = f"PyTorch FSDP2 ({r.get('settings', '')})"
            gpus = r.get("gpus", "")
        print(f"| {name} | {gpus} | {sh[0]} | {sh[1]} x {sh[2]} | {tps:,.0f} | {100 * r['mfu']:.1f}% | "
              f"{r['peak_gib']:.1f} | {ratio} | {exposed} | {load} | {phases} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
