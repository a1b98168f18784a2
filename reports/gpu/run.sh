#!/usr/bin/env bash
# On a GPU machine (device tool): the property suite with the cuda device, and the report on cuda.
# Usage: bash reports/gpu/run.sh OUTDIR   (wheels missing there are carried in .wheels/)
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps .wheels/*.whl
fi
export PYTHONPATH=$PWD CI=true
card=$(python3 -c "import torch, re; n = torch.cuda.get_device_name(); print(re.search(r'[HAB]\d+', n).group(0).lower())")
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/card.txt"
python3 -m pytest properties -q -p no:cacheprovider --device cuda -p properties.results_json \
  --results-json "$out/properties-$card.json" 2>&1 | tail -25 | tee "$out/properties-$card.log"
python3 -m verify.cli report --device cuda --config small --out "$out/report-small-$card" 2>&1 | tail -12
