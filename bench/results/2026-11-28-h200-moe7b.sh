#!/usr/bin/env bash
# moe-7b on one H200: mop's checkpointing modes next to the PyTorch FSDP2 baseline, in one call.
#   bench/results/2026-11-28-h200-moe7b.sh BUILD_DIR RUN...
# RUN is impl:seq:batch:setting:steps:warmup with impl mop (setting = train.checkpointing) or torch
# (setting = torch_fsdp2.py flags joined by '+', e.g. ac+cudnn). One JSON line per run goes to
# $OUT/moe7b.jsonl (an error line when a run fails), each run's stderr to $OUT/<run>.err.
set -uo pipefail
build=${1:?usage: 2026-11-28-h200-moe7b.sh BUILD_DIR RUN...}
shift
out=${OUT:-.}
jsonl=$out/moe7b.jsonl
for spec in "$@"; do
  IFS=: read -r impl seq batch setting steps warmup <<<"$spec"
  name="${impl}_${seq}x${batch}_${setting}"
  start=$(date +%s)
  if [ "$impl" = mop ]; then
    # train.threads=16: the host initialises 5.6B parameters before the first step.
    line=$(timeout 240 "$build/mop" bench --set model.preset=moe-7b --set train.seq_len="$seq" \
      --set train.batch="$batch" --set device=cuda --set train.checkpointing="$setting" --set train.threads=16 \
      --steps "$steps" --warmup "$warmup" 2>"$out/$name.err" | tail -1)
  else
    line=$(timeout 240 python3 bench/baselines/torch_fsdp2.py --preset moe-7b --seq "$seq" --batch "$batch" \
      --steps "$steps" --warmup "$warmup" $(printf -- '--%s ' ${setting//+/ }) 2>"$out/$name.err" | tail -1)
  fi
  rc=$?
  python3 - "$impl" "$seq" "$batch" "$setting" "$rc" "$line" "$out/$name.err" "$(($(date +%s) - start))" \
    >>"$jsonl" <<'PY'
import json, sys
impl, seq, batch, setting, rc, line, err, secs = sys.argv[1:]
try:
    r = json.loads(line)
except ValueError:
    tail = open(err, errors="replace").read().strip().splitlines()[-3:]
    r = {"impl": impl, "preset": "moe-7b", "seq": int(seq), "batch": int(batch), "error": f"rc {rc}: {' | '.join(tail)}"}
if impl == "mop":
    r["settings"] = f"checkpointing={setting}"
r["wall_s"] = int(secs)
print(json.dumps(r))
PY
  tail -1 "$jsonl"
done
