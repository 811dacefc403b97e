#!/usr/bin/env bash
# N GPUs of one host: mop (under `mop launch`) next to the PyTorch FSDP2 baseline (under torchrun),
# one spec after the other in the same call, so the ratios compare like with like.
#   bench/run_gpus.sh NGPUS BUILD_DIR SPEC...
# SPEC is impl:layers:seq:batch_per_gpu:settings:steps:warmup, impl mop or torch; settings are
# '+'-joined: for mop config assignments (e.g. parallel.ep=2+train.checkpointing=selective), for
# torch torch_fsdp2.py flags (e.g. ac+cudnn); '-' for none. The preset is $PRESET (default moe-7b).
# One JSON line per run (rank 0's) goes to $OUT/x<NGPUS>.jsonl, each run's output to
# $OUT/<name>.log. NCCL_NVLS_ENABLE=0 is set here.
# Exposed communication: SKIP=N (e.g. 3) makes each mop run end with N more steps with every device
# collective skipped and the last step's routing replayed (`mop bench --skip-steps`); 1 - (skipped
# step / step) is the exposed share. (A twin spec with +parallel.gpu_comm=skip also works, but with
# expert parallelism it routes differently and is not the same computation.)
# At the end, bench/summarize_gpus.py prints the runs as one table (ratios, exposed share, phases).
# TRACE=1: each mop run also records its last step's timeline on every rank (train.trace, not
# timed) to $OUT/<name>.rank<r>.json.gz; bench/probes/trace_gaps.py reads them.
set -uo pipefail
gpus=${1:?usage: run_gpus.sh NGPUS BUILD_DIR SPEC...}
build=${2:?usage: run_gpus.sh NGPUS BUILD_DIR SPEC...}
shift 2
out=${OUT:-.}
preset=${PRESET:-moe-7b}
limit=${RUN_TIMEOUT:-300}
export NCCL_NVLS_ENABLE=0
for spec in "$@"; do
  IFS=: read -r impl layers seq batch settings steps warmup <<<"$spec"
  [ "$settings" = - ] && settings=""
  name="${impl}_${preset}_g${gpus}_L${layers}_${seq}x${batch}_${settings//[=+.]/_}"
  if [ "$impl" = mop ]; then
    sets=(--set model.preset="$preset" --set model.layers="$layers" --set train.seq_len="$seq"
          --set train.batch=$((batch * gpus)) --set device=cuda --set train.threads=8)
    for s in ${settings//+/ }; do sets+=(--set "$s"); done
    [ "${TRACE:-0}" = 1 ] && sets+=(--set "train.trace=$out/$name.rank{rank}.json")
    timeout "$limit" "$build/mop" launch --nproc "$gpus" -- bench "${sets[@]}" --steps "$steps" --warmup "$warmup" \
      --skip-steps "${SKIP:-0}" >"$out/$name.log" 2>&1
    rc=$?
    if [ "${TRACE:-0}" = 1 ]; then gzip -f "$out/$name".rank*.json 2>/dev/null; fi
  else
    flags=()
    for s in ${settings//+/ }; do flags+=(--"$s"); done
    timeout "$limit" torchrun --standalone --nproc_per_node "$gpus" bench/baselines/torch_fsdp2.py --preset "$preset" \
      --layers "$layers" --seq "$seq" --batch "$batch" --steps "$steps" --warmup "$warmup" "${flags[@]}" \
      >"$out/$name.log" 2>&1
    rc=$?
  fi
  echo "$name rc=$rc"
  grep -E '^\{' "$out/$name.log" | grep -v '"rank": *[1-9]' | head -1 | tee -a "$out/x$gpus.jsonl"
done
python3 "$(dirname "$0")/summarize_gpus.py" "$out/x$gpus.jsonl"
