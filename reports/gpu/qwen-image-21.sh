#!/usr/bin/env bash
# On a GPU machine (device tool): Qwen-Image 2.1 on cuda. The report on the small config for the merged reference
# and for diffusers' flex processor (whose gradients the CPU cannot compute: flex_attention has no CPU backward), then
# the packaged suite's 2.1 properties for both.
# Usage: bash reports/gpu/qwen-image-21.sh OUTDIR   (wheels missing there are carried in .wheels/)
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
if ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps .wheels/*.whl
fi
export PYTHONPATH=$PWD CI=true PYTHONUNBUFFERED=1
card=$(python3 -c "import torch, re; n = torch.cuda.get_device_name(); print(re.search(r'[HAB]\d+', n).group(0).lower())")
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
report() {  # NAME, then report's flags
  local name=$1; shift
  local start=$(date +%s)
  timeout 150 python3 -m verify.cli report --model qwen-image-2.1 --device cuda --config small "$@" \
    --out "/tmp/$name" 2>&1 | tail -4
  echo "report $name: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s"
  cp "/tmp/$name/summary.json" "$out/$name-$card.json" 2>/dev/null
}
report qwen-image-21-reference
report qwen-image-21-diffusers-flex --candidate diffusers-flex --fused-modules none
for spec in "reference" "diffusers-flex --fused-modules none"; do
  start=$(date +%s)
  # shellcheck disable=SC2086
  timeout 120 python3 -m verify.cli test $spec --model qwen-image-2.1 --device cuda -- -q 2>&1 | tail -3
  echo "qkv-verify test $spec --model qwen-image-2.1 --device cuda (ci profile): exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s"
done
