"""Tensor parallelism of the merged model on 2 CPU ranks (gloo): diffusers' own TP styles applied by its plan shard
the whole tiny model; the merged model's plan computes the unsharded function (its error against the fp64 oracle
is the sharded standard model's), and the planted wrong plans, each cutting q, k and v of different heads into
one rank's shard, are caught."""

from __future__ import annotations

import pytest

from verify.checks.fixtures import FIXTURES, model_config
from verify.checks.sharding import check_tensor_parallel


@pytest.mark.parametrize("layout,processor", [("blocked", "reference"), ("interleaved", "fast")])
def test_the_merged_plan_shards_the_merged_model_exactly(layout, processor):
    records = check_tensor_parallel(layout, "merged", processor=processor)
    assert [r.name for r in records] == [f"tp2/merged/{layout}/{name}" for name in FIXTURES]
    for record in records:
        assert record.passed, record.message
        # every rank ran its shard of each block's two fused projections
        assert record.fused_calls == 2 * model_config("tiny")["num_layers"] * 2


@pytest.mark.parametrize("layout,plan", [("blocked", "naive-colwise"), ("interleaved", "blocked-cut")])
def test_a_plan_that_cuts_q_k_v_of_different_heads_is_caught(layout, plan):
    for record in check_tensor_parallel(layout, plan):
        assert not record.passed
        assert record.mismatched == record.numel  # every output element is wrong, and no error was raised
