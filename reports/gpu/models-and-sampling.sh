#!/usr/bin/env bash
# On a GPU machine (device tool): Qwen-Image 2.1 on cuda (the report on the small config for the merged reference
# and for diffusers' flex processor, whose gradients the CPU cannot compute: flex_attention has no CPU backward; the
# packaged suite's 2.1 properties), and a sampling run on cuda judged against the fp64 oracle (fast-compiled, the
# cuda default, as candidate).
# Usage: bash reports/gpu/models-and-sampling.sh OUTDIR   (wheels missing there are carried in .wheels/)
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
source "$(dirname "$0")/preamble.sh"
run() {  # NAME LIMIT COMMAND...: the command's last lines, its exit status and time; its summary.json kept
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" python3 -m verify.cli "$@" --out "/tmp/$name" 2>&1 | tail -4
  echo "$name: exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s"
  cp "/tmp/$name/summary.json" "$out/$name-$card.json" 2>/dev/null
}
run qwen-image-21-diffusers-flex 150 report --model qwen-image-2.1 --device cuda --config small \
  --candidate diffusers-flex --fused-modules none
run sample-small-256 200 sample --device cuda --config small --size 256x256 --steps 20 --dtypes fp32,bf16
run sample-21-small 150 sample --model qwen-image-2.1 --device cuda --config small --steps 20 --dtypes fp32,bf16
run qwen-image-21-reference 120 report --model qwen-image-2.1 --device cuda --config small
start=$(date +%s)
timeout 240 python3 -m verify.cli test reference --model qwen-image-2.1 --device cuda -- -q 2>&1 | tail -3
echo "qkv-verify test reference --model qwen-image-2.1 --device cuda (ci profile): exit ${PIPESTATUS[0]}, $(( $(date +%s) - start )) s"
