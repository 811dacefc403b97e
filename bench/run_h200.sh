#!/usr/bin/env bash
# mop next to our PyTorch FSDP2 baseline on one GPU, in one call, same machine, same shapes.
# Writes one JSON line per run to $OUT/bench.jsonl (or ./bench.jsonl) and a markdown table to stdout.
#   bench/run_h200.sh BUILD_DIR [preset seq batch torch-flags]...
set -uo pipefail
build=${1:?usage: run_h200.sh BUILD_DIR [preset seq batch "torch flags"]...}; shift
out=${OUT:-.}/bench.jsonl
: >"$out"
runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=(moe-1b 4096 4 "")
for ((i = 0; i < ${#runs[@]}; i += 4)); do
  preset=${runs[i]} seq=${runs[i+1]} batch=${runs[i+2]} tflags=${runs[i+3]}
  timeout 200 "$build/mop" bench --set model.preset="$preset" --set train.seq_len="$seq" --set train.batch="$batch" \
    --set device=cuda --steps 12 --warmup 4 >>"$out" 2>"$out.mop.err" || echo "{\"impl\": \"mop\", \"preset\": \"$preset\", \"error\": \"$(tail -1 "$out.mop.err" | tr '"' "'")\"}" >>"$out"
  timeout 200 python3 bench/baselines/torch_fsdp2.py --preset "$preset" --seq "$seq" --batch "$batch" --steps 12 \
    --warmup 4 $tflags >>"$out" 2>"$out.torch.err" || echo "{\"impl\": \"torch-fsdp2\", \"preset\": \"$preset\", \"error\": \"failed\"}" >>"$out"
done
python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| impl | preset | seq x batch | settings | tokens/s/GPU | MFU | peak GiB |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    if "error" in r:
        print(f"| {r['impl']} | {r.get('preset')} | | | {r['error']} | | |")
        continue
    tps = r.get("tokens_per_s", r.get("tokens_per_s_per_gpu", 0))
    print(f"| {r['impl']} | {r['preset']} | {r['seq']} x {r['batch']} | {r.get('settings', 'bf16, no recompute')} | "
          f"{tps:,.0f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} |")
PY
