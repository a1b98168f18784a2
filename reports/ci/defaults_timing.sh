#!/usr/bin/env bash
# Wall time and peak memory of the commands whose defaults have a time budget (sample under 60 s, report
# --model qwen-image-2.1 under 60 s on the 2-core CPU), each on its embedded default.
# Usage: bash reports/ci/defaults_timing.sh > reports/ci/defaults-timing-2cores.log   (from the repository root)
set -uo pipefail
out=$(mktemp -d)
echo "# qkv-verify's time-budgeted defaults on this project's 2-core CPU machine, commit $(git rev-parse --short HEAD) ($(date +%F))"
for args in "sample" "sample --model qwen-image-2.1" "sample --fixture edit-2511" "report --model qwen-image-2.1"; do
  dir="$out/$(echo "$args" | tr ' ' '_')"
  echo "\$ qkv-verify $args"
  # shellcheck disable=SC2086
  /usr/bin/time -f "wall %e s, max RSS %M KB" .venv/bin/qkv-verify $args --out "$dir" 2>&1 | grep -v "^  FAILED"
done
rm -rf "$out"
