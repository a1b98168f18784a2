#!/usr/bin/env bash
# On a GPU machine (device tool): `sample --config full`, the real width with seeded weights, streamed block by block
# (every run, the fp64 oracle included, on the card), 20 steps, fp32 and bf16 (fp64 always runs), the cuda default
# candidate (fast-compiled for Qwen-Image, reference for 2.1, which samples with its prefix KV cache).
# Usage: bash reports/gpu/sample-full.sh OUTDIR HxW MODEL [SECONDS [SAMPLE-ARGS...]]   (e.g. --true-cfg-scale 1; wheels
# missing there are carried in .wheels/)
set -uo pipefail
out=${1:?output folder}
size=${2:?HxW}
model=${3:?model}
limit=${4:-540}
shift 4 2>/dev/null || shift $#
mkdir -p "$out"
source "$(dirname "$0")/preamble.sh"
extra=$(echo "$*" | sed 's/--//g; s/ /-/g')
name="sample-full-$model-$size${extra:+-$extra}-$card"
(while sleep 30; do echo "$(date +%T) $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)"; done) \
  > "$out/$name.memory.log" &
start=$(date +%s)
timeout "$limit" python3 -m verify.cli sample --model "$model" --config full --device cuda --size "$size" \
  --steps 20 --dtypes fp32,bf16 --out "/tmp/$name" "$@" 2>&1 | tee "$out/$name.log" | tail -8
echo "sample --model $model --config full --size $size: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s" \
  | tee -a "$out/$name.log"
kill %1 2>/dev/null
cp "/tmp/$name/summary.json" "$out/$name.json" 2>/dev/null
cp "/tmp/$name/report.md" "$out/$name.md" 2>/dev/null
