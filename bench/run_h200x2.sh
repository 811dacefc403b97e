#!/usr/bin/env bash
# Two GPUs: bench/run_gpus.sh 2 (same SPEC format; results in $OUT/x2.jsonl).
#   bench/run_h200x2.sh BUILD_DIR SPEC...
exec "$(dirname "$0")/run_gpus.sh" 2 "$@"
