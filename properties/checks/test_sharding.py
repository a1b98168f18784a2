"""Tensor and Ulysses context parallelism of the merged model on 2 CPU ranks (gloo), made as diffusers makes them
(its TP styles by the model's _tp_plan; its context-parallel config and hooks by the _cp_plan): the merged model's
plan computes the unsharded function (its error against the fp64 oracle is the parallel standard model's), and the
planted wrong ones are caught: TP plans that cut q, k and v of different heads into one rank's shard, and a processor
that drops the parallel config (each rank attends to its own sequence shard only). Qwen-Image 2.1 too (tensor parallel
only: it has no _cp_plan), on its prefill and its KV-cached decode."""

from __future__ import annotations

import pytest

from verify.checks.sharding import check_parallel, parallel_dtype, parse_parallel
from verify.models import qwen_image_21
from verify.models.qwen_image import FIXTURES, model_config


@pytest.mark.parametrize("kind,layout,processor", [("tp", "blocked", "reference"), ("tp", "interleaved", "fast"),
                                                   ("ulysses", "blocked", "fast")])
def test_the_merged_plan_makes_the_merged_model_parallel_exactly(kind, layout, processor):
    records = check_parallel(kind, layout, "merged", processor=processor)
    assert [r.name for r in records] == [f"{kind}2/merged/{layout}/{name}" for name in FIXTURES]
    for record in records:
        assert record.passed, record.message
        # every rank ran (its shard of) each block's two fused projections
        assert record.fused_calls == 2 * model_config("tiny")["num_layers"] * 2


@pytest.mark.parametrize("kind,layout,plan", [("tp", "blocked", "naive-colwise"), ("tp", "interleaved", "blocked-cut"),
                                              ("ulysses", "blocked", "drops-parallel-config")])
def test_a_wrong_plan_is_caught(kind, layout, plan):
    for record in check_parallel(kind, layout, plan):
        assert not record.passed
        assert record.mismatched > record.numel // 2  # most output elements wrong, and no error was raised


def test_a_wrong_plan_of_21_is_caught_on_its_prefill_and_its_cached_decode():
    """A naive colwise cut of 2.1's blocked to_qkv: each rank's heads get q, k and v rows of other heads."""
    records = check_parallel("tp", "blocked", "naive-colwise", model="qwen-image-2.1")
    assert [r.name for r in records] == [f"tp2/naive-colwise/blocked/{name}" for name in
                                         (*qwen_image_21.FIXTURES, "model-cache/prefill", "model-cache/cached")]
    for record in records:
        assert not record.passed and record.fused_calls > 0
        assert record.mismatched > record.numel // 2


@pytest.mark.parametrize("kind", ["tp", "ulysses", "ring"])
def test_every_kind_is_accepted_on_cuda_with_a_gpu_a_rank(kind, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_parallel(f"{kind}=2", "cuda", "fast") == (kind, 2)
    # ring needs cuDNN's attention, which runs half precision only; the others are judged in fp64
    assert parallel_dtype(kind) == (torch.bfloat16 if kind == "ring" else torch.float64)
