"""verify.checks.sharding's two choices the report states (summary.json's parallel.backend and parallel.dtype), in
this process: test_sharding and test_parallel, which spawn ranks, are out of mutation runs' reach."""

from __future__ import annotations

import pytest
import torch

from verify.checks.sharding import KINDS, parallel_dtype, rank_backend


@pytest.mark.parametrize("ranks_device, backend", [("cpu", "gloo"), ("cuda", "nccl")])
def test_ranks_talk_over_gloo_on_the_cpu_and_nccl_on_gpus(ranks_device, backend):
    assert rank_backend(ranks_device) == backend


def test_tensor_and_ulysses_parallel_run_in_fp64_and_ring_in_bf16():
    """Ring attention merges by the log-sum-exp only cuDNN's attention returns, in half precision only."""
    assert {kind: parallel_dtype(kind) for kind in KINDS} == \
        {"tp": torch.float64, "ulysses": torch.float64, "ring": torch.bfloat16}
