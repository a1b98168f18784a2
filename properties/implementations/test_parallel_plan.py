"""The merged model under diffusers' attention backends and parallelism, as far as one CPU can test it: the backend
and the parallel config reach the fused processor and its dispatch_attention_fn call, and the tensor-parallel plan's
shard specs (diffusers' own resolve_tp_shard_specs) give every rank the q, k and v rows of the same heads in both
layouts, where a naive "colwise" plan on a blocked to_qkv (or a blocked plan on an interleaved one) is caught."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks.tensor_parallel import PackedColwiseParallel, resolve_tp_shard_specs
from diffusers.models.attention_dispatch import AttentionBackendName

from verify.implementations import fused
from verify.implementations.fused import fuse_model, joint_attentions, tensor_parallel_plan, unfuse_model
from verify.maths import qkv
from verify.maths.naming import streams
from verify.models import qwen_image

CONFIG = qwen_image.model_config("tiny")
HEAD_DIM = CONFIG["attention_head_dim"]


@pytest.mark.parametrize("processor", ["reference", "fast"])
def test_set_attention_backend_and_the_parallel_config_reach_dispatch(monkeypatch, processor):
    model = fuse_model(qwen_image.build_model(CONFIG, 0), processor=processor)
    model.set_attention_backend("native")
    assert {a.processor._attention_backend for a in joint_attentions(model)} == {AttentionBackendName.NATIVE}
    marker = object()
    for attn in joint_attentions(model):
        attn.processor._parallel_config = marker
    seen = []
    dispatch = fused.dispatch_attention_fn

    def spy(*args, **kwargs):
        seen.append((kwargs["backend"], kwargs["parallel_config"]))
        kwargs["parallel_config"] = None  # no process group on this machine: the call itself runs unsharded
        return dispatch(*args, **kwargs)

    monkeypatch.setattr(fused, "dispatch_attention_fn", spy)  # the one call, FusedQwenAttnProcessor.attend
    with torch.no_grad():
        model(**qwen_image.model_inputs(CONFIG, qwen_image.FIXTURES["text-to-image"], 0))
    assert len(seen) == CONFIG["num_layers"]
    assert all(b == AttentionBackendName.NATIVE and c is marker for b, c in seen)


def _rank_rows(spec, rank: int, degree: int) -> torch.Tensor:
    """The row indices of one rank's shard, from a TPShardSpec along dim 0 (each block split evenly)."""
    rows, offset = [], 0
    for size in spec.block_sizes:
        chunk = size // degree
        rows.append(torch.arange(offset + rank * chunk, offset + (rank + 1) * chunk))
        offset += size
    return torch.cat(rows)


def _expected_rows(layout: str, rank: int, degree: int, heads: int) -> torch.Tensor:
    """Rank r's rows of to_qkv: the fused form of its q, k and v rows under the standard colwise plan."""
    dim = heads * HEAD_DIM
    q, k, v = (torch.arange(dim) + i * dim for i in range(3))  # ids of the standard rows, q then k then v
    ids = qkv.merge(q, k, v, layout, HEAD_DIM)  # fused position -> standard row id
    local = slice(rank * dim // degree, (rank + 1) * dim // degree)
    want = qkv.merge(q[local], k[local], v[local], layout, HEAD_DIM)
    return torch.stack([torch.nonzero(ids == i).flatten()[0] for i in want])


@pytest.mark.parametrize("degree", [2, 4])
@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
@pytest.mark.parametrize("naming", ["seed", "diffusers"])
def test_every_rank_holds_matching_q_k_v_rows(naming, layout, degree):
    model = fuse_model(qwen_image.build_model(CONFIG, 0), naming=naming, layout=layout)
    specs = resolve_tp_shard_specs(model, model._tp_plan, degree)
    fused_names = [s.fused for s in streams(naming)]
    covered = [n for n in specs if n.rsplit(".", 2)[-2] in fused_names]
    assert len(covered) == CONFIG["num_layers"] * 2 * 2, "weight and bias of both fused projections in every block"
    for name in covered:
        for rank in range(degree):
            expected = _expected_rows(layout, rank, degree, CONFIG["num_attention_heads"])
            assert torch.equal(_rank_rows(specs[name], rank, degree), expected), (name, rank)
    assert not any("to_q" in n.split(".") for n in model._tp_plan), "no entry for projections that are gone"


@pytest.mark.parametrize("layout, wrong", [("blocked", "colwise"), ("interleaved", PackedColwiseParallel([1, 1, 1]))],
                         ids=["naive-colwise-on-blocked", "blocked-cut-on-interleaved"])
def test_a_wrong_plan_gives_a_rank_mismatched_rows(layout, wrong):
    model = fuse_model(qwen_image.build_model(CONFIG, 0), layout=layout)
    plan = {k: (wrong if k.endswith(("to_qkv", "add_qkv_proj")) else v) for k, v in model._tp_plan.items()}
    specs = resolve_tp_shard_specs(model, plan, 2)
    name = "transformer_blocks.0.attn.to_qkv.weight"
    assert not torch.equal(_rank_rows(specs[name], 0, 2), _expected_rows(layout, 0, 2, CONFIG["num_attention_heads"]))


def test_unfuse_restores_the_standard_plan_and_the_plan_maps_only_what_exists():
    model = qwen_image.build_model(CONFIG, 0)
    standard = dict(type(model)._tp_plan)
    fuse_model(model)

    def shown(plan):
        return {k: getattr(v, "blocks", v) for k, v in plan.items()}

    assert shown(model._tp_plan) == shown(tensor_parallel_plan(standard, "seed", "blocked")) != shown(standard)
    assert shown(model._tp_plan)["transformer_blocks.*.attn.to_qkv"] == [1, 1, 1]
    unfuse_model(model)
    assert model._tp_plan == standard
