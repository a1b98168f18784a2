#!/usr/bin/env bash
# On a GPU machine (device tool): `qkv-verify bench --model qwen-image-2.1` at the real width (its defaults: 32 heads x
# 128 = 4096, mlp_ratio 3, no biases) on cuda: forward, training step and LoRA training step (rank 32), eager and
# compiled, every arm judged against the fp64 oracle before it is timed. About 6 minutes: no new (mode, size) group
# starts after 240 s, and the run is cut at 390 s (the JSON, rewritten after every row, keeps what was measured).
# -> OUTDIR/bench-21-<card>.json and .log. properties/bench/test_bench_21.py runs ARGS on the CPU at a tiny width.
# Usage: bash reports/gpu/bench-21.sh OUTDIR
set -uo pipefail
out=${1:?output folder}
mkdir -p "$out"
source "$(dirname "$0")/preamble.sh"
ARGS=(--model qwen-image-2.1 --image-tokens 1024,4096 --text-tokens 256 --lora-rank 32 --repeats 10 --warmup 3 --time-limit 240)
timeout 390 python3 -m verify.commands.bench --device cuda --json "$out/bench-21-$card.json" "${ARGS[@]}" 2>&1 \
  | tee "$out/bench-21-$card.log"
rc=${PIPESTATUS[0]}
echo "bench-21: exit $rc (124: cut at 390 s)"
exit "$rc"
