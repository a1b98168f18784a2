#!/usr/bin/env bash
# On a GPU machine (device tool): the property suite with the cuda device, and the report at full width on cuda.
# Usage: bash reports/gpu/run.sh OUTDIR   (wheels missing there are carried in .wheels/)
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps .wheels/*.whl
fi
export PYTHONPATH=$PWD CI=true
card=$(python3 -c "import torch, re; n = torch.cuda.get_device_name(); print(re.search(r'[HAB]\d+', n).group(0).lower())")
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m pytest properties -q -p no:cacheprovider --device cuda -p properties.results_json \
  --results-json "$out/properties-$card.json" 2>&1 | tail -25
for config in small full; do
  start=$(date +%s)
  python3 -m verify.cli report --device cuda --config "$config" --dtypes bf16 --out "/tmp/report-$config" 2>&1 | tail -8
  echo "report --config $config: $(( $(date +%s) - start )) s"
done
cp /tmp/report-full/summary.json "$out/report-full-$card.json"
cp /tmp/report-full/errors.png "$out/report-full-errors-$card.png"
cp /tmp/report-full/output_stats.png "$out/report-full-output-stats-$card.png"
cp /tmp/report-small/summary.json "$out/report-small-$card.json"
