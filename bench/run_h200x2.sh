#!/usr/bin/env bash
# Two GPUs of one host: mop (under `mop launch`) next to the PyTorch FSDP2 baseline (under
# torchrun), one spec after the other in the same call, so the ratios compare like with like.
#   bench/run_h200x2.sh BUILD_DIR SPEC...
# SPEC is impl:layers:seq:batch_per_gpu:settings:steps:warmup, impl mop or torch; settings are
# '+'-joined: for mop config assignments (e.g. parallel.ep=2+train.checkpointing=selective), for
# torch torch_fsdp2.py flags (e.g. ac+cudnn). One JSON line per run (rank 0's) goes to
# $OUT/x2.jsonl, each run's output to $OUT/<name>.log. Keep NCCL_NVLS_ENABLE=0 set.
# Exposed communication: the same mop spec again with +parallel.gpu_comm=skip (every device
# collective skipped); 1 - (step time skipped / step time) is the exposed share of the step.
set -uo pipefail
build=${1:?usage: run_h200x2.sh BUILD_DIR SPEC...}
shift
out=${OUT:-.}
export NCCL_NVLS_ENABLE=0
for spec in "$@"; do
  IFS=: read -r impl layers seq batch settings steps warmup <<<"$spec"
  name="${impl}_L${layers}_${seq}x${batch}_${settings//[=+.]/_}"
  if [ "$impl" = mop ]; then
    sets=(--set model.preset=moe-7b --set model.layers="$layers" --set train.seq_len="$seq"
          --set train.batch=$((batch * 2)) --set device=cuda --set train.threads=8)
    for s in ${settings//+/ }; do sets+=(--set "$s"); done
    timeout 300 "$build/mop" launch --nproc 2 -- bench "${sets[@]}" --steps "$steps" --warmup "$warmup" \
      >"$out/$name.log" 2>&1
  else
    timeout 300 torchrun --standalone --nproc_per_node 2 bench/baselines/torch_fsdp2.py --preset moe-7b \
      --layers "$layers" --seq "$seq" --batch "$batch" --steps "$steps" --warmup "$warmup" \
      $(printf -- '--%s ' ${settings//+/ }) >"$out/$name.log" 2>&1
  fi
  echo "$name rc=$?"
  grep -E '^\{' "$out/$name.log" | grep -v '"rank": *1' | grep -v '"rank":1' | head -1 | tee -a "$out/x2.jsonl"
done
