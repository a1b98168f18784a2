#!/usr/bin/env bash
# On a GPU machine (device tool): `sample` at 1024x1024, 20 steps, on cuda, judged against the fp64 oracle (which runs
# on the CPU): Qwen-Image with true CFG 4 and fast-compiled (the cuda default) as candidate, then Qwen-Image 2.1 with
# its prefix KV cache. Seeded small config (width 192): the real width's fp64 oracle does not fit one card.
# Usage: bash reports/gpu/sample-1024.sh OUTDIR [MODEL ...]   (default both; wheels missing there are carried in .wheels/)
set -uo pipefail
out=${1:?output folder}
shift
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(qwen-image qwen-image-2.1)
mkdir -p "$out"
source "$(dirname "$0")/preamble.sh"
for model in "${models[@]}"; do
  start=$(date +%s)
  timeout 270 python3 -m verify.cli sample --model "$model" --device cuda --config small --size 1024x1024 \
    --steps 20 --dtypes fp32,bf16 --out "/tmp/$model" 2>&1 | tail -4
  echo "sample --model $model 1024x1024: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s"
  cp "/tmp/$model/summary.json" "$out/sample-1024-$model-$card.json" 2>/dev/null
done
