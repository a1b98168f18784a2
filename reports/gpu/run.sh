#!/usr/bin/env bash
# On a GPU machine (device tool): the device-parametrised property tests on cuda, the packaged candidate suite on
# cuda, and the report at full width on cuda (judging fuse_model's cuda default, fast-compiled).
# Usage: bash reports/gpu/run.sh OUTDIR   (wheels missing there are carried in .wheels/)
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
source "$(dirname "$0")/preamble.sh"
start=$(date +%s)
python3 -m verify.cli report --device cuda --config full --dtypes bf16,fp16 --bench "reports/gpu/bench-$card.json" \
  --out /tmp/report-full 2>&1 | tail -8
echo "report --config full: $(( $(date +%s) - start )) s"
cp /tmp/report-full/summary.json "$out/report-full-$card.json"
cp /tmp/report-full/report.md "$out/report-full-$card.md"
for chart in errors output_stats speed; do
  cp "/tmp/report-full/$chart.png" "$out/report-full-${chart//_/-}-$card.png" 2>/dev/null
done
start=$(date +%s)
# Only the device-parametrised tests (their ids name the device); the rest run on the CPU in CI anyway.
python3 -m pytest properties -q -p no:cacheprovider --device cuda -k cuda -p properties.results_json \
  --results-json "$out/properties-$card.json" 2>&1 | tail -6
echo "property tests on cuda: $(( $(date +%s) - start )) s"
start=$(date +%s)
python3 -m verify.cli test fast --device cuda -- -q 2>&1 | tail -3
echo "qkv-verify test fast --device cuda (ci profile): $(( $(date +%s) - start )) s"
