#!/usr/bin/env bash
# The packaged property suite on one candidate, each of its 8 properties in a process of its own, all at once on one
# GPU: inductor's compilation is CPU-bound and these machines have 16 cores, so 8 processes take about one property's
# time. Logs land in $OUT/test-<candidate>-<property>-<card>.log. Usage: suite_by_property.sh CANDIDATE CARD LIMIT_S
set -u
candidate=$1 card=$2 limit=$3
tree=${TREE:-unknown}
for property in attention-fp64 attention-fp32 attention-bf16 attention-fp16 block-fp64 block-fp32 block-bf16 block-fp16; do
    log=$OUT/test-$candidate-$property-$card.log
    {
        echo "# $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); torch $(python3 -c 'import torch; print(torch.__version__)'); tree $tree"
        echo "# CI=true HYPOTHESIS_PROFILE=find timeout $limit python3 -m verify.cli test $candidate --device cuda -- -rA --tb=short -p no:warnings --durations=0 -k $property"
        start=$(date +%s.%N)
        CI=true HYPOTHESIS_PROFILE=find TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-$property timeout "$limit" \
            python3 -m verify.cli test "$candidate" --device cuda -- -rA --tb=short -p no:warnings --durations=0 -k "$property"
        echo "# exit $? after $(python3 -c "import time; print(round(time.time() - $start, 1))") s"
    } > "$log" 2>&1 &
done
wait
grep -h "^# exit\|passed\|failed" "$OUT"/test-"$candidate"-*-"$card".log
