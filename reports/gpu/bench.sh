#!/usr/bin/env bash
# On a GPU machine (device tool): `qkv-verify bench` -> OUTDIR/NAME-<card>.json (rewritten after every row, so a run
# cut short keeps what it measured) and OUTDIR/NAME-<card>.log (the table). Wheels missing there come from .wheels/.
# Usage: bash reports/gpu/bench.sh OUTDIR NAME [qkv-verify bench arguments...]
set -uo pipefail
out=${1:?output folder}
name=${2:?name of the result, e.g. bench}
shift 2
mkdir -p "$out"
source "$(dirname "$0")/preamble.sh"
python3 -m verify.commands.bench --device cuda --json "$out/$name-$card.json" "$@" 2>&1 | tee "$out/$name-$card.log"
exit "${PIPESTATUS[0]}"
