# Where a GPU step's timeline has the device idle, and why: reads a `train.trace` file (Chrome
# trace of one step, train/cuda/step_trace.h) and lists the gaps between device operations (all
# streams together) with what the host was doing. A gap whose next operation was launched after
# the device went idle is the host's (a synchronisation, host work, launch overhead); one whose
# next operation was already launched waited on the device itself (an event, another stream).
#   python3 bench/probes/trace_gaps.py trace.json[.gz] [--min-us 2] [--top 25]
import argparse
import bisect
import gzip
import json
from collections import defaultdict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--min-us", type=float, default=2.0, help="smallest gap listed or counted")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    with (gzip.open if a.trace.endswith(".gz") else open)(a.trace, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    dev = sorted((e for e in events if e["cat"] != "runtime"), key=lambda e: e["ts"])
    host = [e for e in events if e["cat"] == "runtime"]
    launch = {e["args"]["correlation"]: e for e in host}
    by_thread = defaultdict(list)
    for e in host:
        by_thread[e["tid"]].append(e)
    for v in by_thread.values():
        v.sort(key=lambda e: e["ts"])
    starts = {t: [e["ts"] for e in v] for t, v in by_thread.items()}

    # Busy intervals of the device (union over streams), and the gaps between them.
    gaps, busy, end, prev = [], 0.0, None, None
    for e in dev:
        s, f = e["ts"], e["ts"] + e["dur"]
        if end is None or s > end:
            if end is not None and s - end >= a.min_us:
                gaps.append((end, s, prev, e))
            busy += f - s
            end, prev = f, e
        else:
            if f > end:
                busy += f - end
                end, prev = f, e
    span = end - dev[0]["ts"] if dev else 0.0
    idle = sum(g[1] - g[0] for g in gaps)
    print(f"device span {span / 1e3:.2f} ms: busy {busy / 1e3:.2f} ms, idle in gaps >= {a.min_us:g} us "
          f"{idle / 1e3:.2f} ms ({100 * idle / max(span, 1e-9):.1f}%) in {len(gaps)} gaps")

    def host_calls(tid, t0, t1):
        v, i = by_thread.get(tid, []), bisect.bisect_left(starts.get(tid, []), t0) - 1
        out = []
        for e in v[max(i, 0):]:
            if e["ts"] >= t1:
                break
            lo, hi = max(e["ts"], t0), min(e["ts"] + e["dur"], t1)
            if hi > lo:
                out.append((hi - lo, e["name"]))
        return out

    causes, rows = defaultdict(float), []
    for g0, g1, before, after in gaps:
        call = launch.get(after["args"].get("correlation"))
        if call is None:
            cause = "next op has no host call in the trace"
        elif call["ts"] > g0:
            inside = host_calls(call["tid"], g0, call["ts"])
            covered = sum(d for d, _ in inside)
            top = max(inside, default=(0.0, ""))
            host_code = (call["ts"] - g0) - covered
            cause = f"host late: {top[1]}" if top[0] >= host_code else "host late: host code between CUDA calls"
        else:
            cause = "launched in time: the device waited (event, other stream)"
        causes[cause] += g1 - g0
        rows.append((g1 - g0, g0, before["name"], after["name"], cause))
    print("idle by cause:")
    for c, t in sorted(causes.items(), key=lambda kv: -kv[1]):
        print(f"  {t / 1e3:8.3f} ms  {c}")
    print(f"largest {a.top} gaps:")
    for d, t, b, n, c in sorted(rows, reverse=True)[: a.top]:
        print(f"  {d:8.1f} us at {t / 1e3:8.3f} ms  after {b[:50]:50}  before {n[:50]:50}  {c}")


if __name__ == "__main__":
    main()
