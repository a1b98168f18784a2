"""Experiment: the cuda path of `report --parallel` (diffusers' own enable_parallelism, ring with cuDNN attention) on
a machine with one GPU. NCCL refuses two ranks on one GPU, so the 2 ranks talk over gloo here, both on cuda:0; what
`report --parallel KIND=2 --device cuda` adds on two GPUs is only NCCL. Every kind, the merged model's plan (must
pass) and every planted one (must fail), each case's records or its error.

Usage (GPU machine, repository root on PYTHONPATH): python3 reports/gpu/experiments/parallel_one_gpu.py OUT.json
[KIND ...] (the cases of those kinds only). Context parallel crashes gloo with CUDA tensors in torch's functional
all_gather_tensor; with gloo_gather/ on PYTHONPATH too, that one collective is dist.all_gather instead.
"""

from __future__ import annotations

import json
import sys
import traceback

from verify.checks.sharding import check_parallel

CASES = [  # kind, layout, plan, processor, whether it must pass
    ("tp", "blocked", "merged", "reference", True), ("tp", "interleaved", "merged", "fast", True),
    ("tp", "blocked", "naive-colwise", "reference", False), ("tp", "interleaved", "blocked-cut", "reference", False),
    ("ulysses", "blocked", "merged", "reference", True), ("ulysses", "interleaved", "merged", "fast", True),
    ("ulysses", "blocked", "drops-parallel-config", "reference", False),
    ("ring", "blocked", "merged", "reference", True), ("ring", "interleaved", "merged", "fast", True),
    ("ring", "blocked", "drops-parallel-config", "reference", False),
]


def main(path: str, kinds: list[str]) -> None:
    rows = []
    for kind, layout, plan, processor, must_pass in CASES:
        if kinds and kind not in kinds:
            continue
        row = {"kind": kind, "layout": layout, "plan": plan, "processor": processor, "must_pass": must_pass}
        try:
            records = check_parallel(kind, layout, plan, 2, processor, device="cuda", backend="gloo")
            row["records"] = [{k: getattr(r, k) for k in ("name", "dtype", "passed", "message", "mismatched", "numel",
                                                          "max_abs_err", "base_max_abs_err", "ratio",
                                                          "fused_calls")} for r in records]
            row["as_expected"] = all(r.passed == must_pass for r in records)
        except Exception as error:  # an experiment: record what broke and go on to the next case
            row["error"] = f"{type(error).__name__}: {error}"[:2000]
            row["traceback"] = traceback.format_exc()[-4000:]
            row["as_expected"] = False
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        rows.append(row)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
