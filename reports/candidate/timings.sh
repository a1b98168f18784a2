#!/usr/bin/env bash
# Wall time of `qkv-verify report` (no arguments), of `report --candidate` on the tiny default and of `qkv-verify
# test` under the ci profile,
# with the machine's core count and load average (other work on the machine slows both).
# Usage: bash reports/candidate/timings.sh > reports/candidate/timings-<N>cores.log
set -uo pipefail
cd "$(dirname "$0")/../.."
bin=.venv/bin
out=$(mktemp -d)
echo "commit $(git rev-parse --short HEAD); $(nproc) cores; $(date -u +%FT%TZ)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s.%N)
$bin/qkv-verify report --out "$out/default" >/dev/null 2>&1
echo "report (no arguments: the embedded default with its seeded LoRA): exit $?, $(echo "$(date +%s.%N) - $start" | bc) s"
for spec in reference verify.planted:k_v_swapped diffsynth; do
  echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
  start=$(date +%s.%N)
  $bin/qkv-verify report --candidate "$spec" --out "$out/$RANDOM" >/dev/null 2>&1
  code=$?
  echo "report --candidate $spec: exit $code, $(echo "$(date +%s.%N) - $start" | bc) s"
done
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s.%N)
CI=true $bin/qkv-verify test reference -- -q 2>&1 | tail -1
echo "test reference (ci profile): exit ${PIPESTATUS[0]}, $(echo "$(date +%s.%N) - $start" | bc) s"
rm -rf "$out"
