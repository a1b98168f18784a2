"""Qwen-Image 2.1 on the model seam: its cases reach every path (prefill, cached decode, adjacent images, padding,
causal_condition off), the merged attention matches diffusers there, and every planted 2.1 bug fails and is located."""

from __future__ import annotations

import pytest
import torch

from verify.checks.equivalence import run_case
from verify.implementations import fused_21
from verify.models import qwen_image_21 as m
from verify.planted import PLANTED_21

DTYPES = [torch.float64, torch.float32]
CACHE_CASES = {"attention-cache", "model-cache"}
ADJACENT_CASES = {"attention-adjacent", "model-edit-adjacent"}


@pytest.mark.parametrize("name", list(m.CASES))
def test_the_merged_reference_matches_diffusers_and_its_fused_path_ran(name):
    records = run_case(m.CASES[name], DTYPES, candidate="reference")
    assert records and all(r.passed for r in records), [r.message for r in records if not r.passed]
    layers = m.CASES[name].config["num_layers"] if m.CASES[name].component == "model" else 1
    calls = 3 if name in CACHE_CASES else 1  # the cache cases run a full prefill, an extract and a decode
    assert {r.fused_calls for r in records} == {layers * calls}
    assert all(r.weight_gradients == "compared" for r in records if r.name.endswith("/gradients"))


def test_diffusers_cached_decode_is_its_full_prefill():
    """The cache cases' two outputs agree for diffusers itself: what the cached path is judged beside is sound."""
    for name in sorted(CACHE_CASES):
        case = m.CASES[name]
        with torch.no_grad():
            out = case.outputs(case.build(case.config, 0), case.inputs(case.config, case.spec, 0))
        torch.testing.assert_close(out["cached"], out["prefill"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["attention", "model-edit-adjacent", "model-cache"])
def test_diffusers_flex_processor_matches_its_sdpa_prefill_and_says_why_gradients_are_not_compared(name):
    records = run_case(m.CASES[name], DTYPES, candidate="diffusers-flex")
    outputs = [r for r in records if r.name.endswith("/outputs")]
    assert outputs and all(r.passed for r in outputs)
    for r in (r for r in records if r.name.endswith("/gradients")):  # flex_attention has no backward on the CPU
        assert not r.provided and not r.passed
        assert r.message.startswith("not compared: FlexAttention does not support backward on CPU")


@pytest.mark.parametrize("bug", list(PLANTED_21))
def test_every_planted_21_bug_fails_and_is_located(bug):
    failing = {}
    for name, case in m.CASES.items():
        records = run_case(case, [torch.float64], candidate=f"verify.planted:{bug}")
        failing.update((name, r.first_divergence) for r in records if not r.passed)
    assert failing, f"{bug} passed every case"
    assert all(failing.values()), failing  # each failure names where it starts
    if bug.startswith("cache_"):  # a cache bug shows on the cached decode only, located in its third call
        assert set(failing) == CACHE_CASES
        assert all(where.endswith("(call 3)") for where in failing.values())
    if bug == "adjacent_images_one_block_21":  # only where two condition images touch
        assert set(failing) == ADJACENT_CASES


def test_block_inputs_are_what_the_model_hands_its_first_block():
    """The fixtures' joint metadata (RoPE, segments, padding, modulation rows) equal the model's own prologue's."""
    config, spec = m.model_config("tiny"), m.FIXTURES["edit-adjacent"]
    model, seen = m.build_model(config, 0), {}
    model.transformer_blocks[0].register_forward_pre_hook(lambda _, args, kwargs: seen.update(kwargs),
                                                          with_kwargs=True)
    with torch.no_grad():
        model(**m.model_inputs(config, spec, 0))
    ours = m.block_inputs(config, spec, 0)
    assert seen["segments"] == ours["segments"]
    for key in ("rotary_emb", "target_token_mask", "key_valid"):
        assert torch.equal(seen[key], ours[key]), key
    assert seen["modulation"].shape == ours["modulation"].shape


def test_adjacent_condition_images_are_two_blocks():
    meta = m.joint(m.FIXTURES["edit-adjacent"])
    ids = meta.image_ids[meta.image_ids >= 0].unique().tolist()
    assert ids == [0, 1, 2]  # two condition images and the target
    first, second = (int((meta.image_ids == i).nonzero()[0]) for i in (0, 1))
    assert second == first + 2 * 4  # the second starts right after the first's 8 tokens: no text between


def test_fuse_then_unfuse_gives_back_diffusers_weights_bit_for_bit():
    model = m.build_model(m.model_config("tiny"), 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused_21.fuse_model(model, "interleaved")
    assert all("to_qkv" in k or "to_q." not in k for k in model.state_dict())
    assert any(k.endswith("attn.to_qkv.weight") for k in model.state_dict())
    fused_21.unfuse_model(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(a.processor, m.QwenImage21AttnProcessor) for a in fused_21.attentions(model))


@pytest.mark.parametrize("layout, style", [("blocked", "PackedColwiseParallel"), ("interleaved", "colwise")])
def test_the_merged_models_tensor_parallel_plan_shards_to_qkv_by_head(layout, style):
    """diffusers' 2.1 plan shards to_q, to_k, to_v colwise; merged, one to_qkv must give every rank the q, k and v
    rows of the same heads: three packed blocks for [q | k | v], plain colwise for per-head groups."""
    model = m.build_model(m.model_config("tiny"), 0)
    plan = fused_21.fuse_model(model, layout)._tp_plan
    assert not any(k.endswith(("attn.to_q", "attn.to_k", "attn.to_v")) for k in plan)
    sharded = plan["transformer_blocks.*.attn.to_qkv"]
    assert (type(sharded).__name__ if style != "colwise" else sharded) == style
    kept = {k: v for k, v in m.QwenImage21Transformer2DModel._tp_plan.items() if "attn.to_" not in k or "to_out" in k}
    assert kept.items() <= plan.items()
    assert model.config["qkv_merge"] == {"naming": "seed", "layout": layout}
    fused_21.unfuse_model(model)
    assert model._tp_plan == m.QwenImage21Transformer2DModel._tp_plan and model.config["qkv_merge"] is None
