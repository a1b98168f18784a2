#!/usr/bin/env bash
# On a GPU machine (device tool): the full-width Qwen-Image 2.1 report (32 blocks, 4096 wide, seeded weights made on
# the GPU) of the merged reference on cuda, streamed block by block against the fp64 oracle; fp64 and fp32 are
# always added to the dtypes asked for.
# Usage: bash reports/gpu/report-21-full.sh OUTDIR   (wheels missing there are carried in .wheels/)
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
source "$(dirname "$0")/preamble.sh"
start=$(date +%s)
timeout 540 python3 -m verify.cli report --model qwen-image-2.1 --device cuda --config full --dtypes bf16 \
  --out /tmp/report-21-full 2>&1 | tail -6
echo "report --model qwen-image-2.1 --config full: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s"
cp /tmp/report-21-full/summary.json "$out/report-21-full-$card.json" 2>/dev/null
cp /tmp/report-21-full/report.md "$out/report-21-full-$card.md" 2>/dev/null
