"""`qkv-verify sample --fixture edit|edit-2511`: diffusers' QwenImageEditPipeline and QwenImageEditPlusPipeline (the
model's zero_cond_t on, as Qwen-Image-Edit-2511) without a text encoder, a seeded condition image encoded by the fp64
VAE, judged step by step against the fp64 oracle. A zero_cond_t bug right at the first step and stale after it fails
at step 2 on edit-2511, and passes on edit, where that path never runs."""

from __future__ import annotations

import pytest
import torch

from properties.commands.sampling_run import assert_refused, run_sample
from verify.implementations.builtins import reference
from verify.models import qwen_image
from verify.testing import assert_trajectory, check_trajectory

STEPS = 3


def sample(tmp_path, *args) -> tuple[int, dict]:
    return run_sample(tmp_path / "out", "--steps", str(STEPS), "--dtypes", "fp64,fp32", *args)


@pytest.mark.parametrize("fixture, pipeline, zero_cond_t", [
    ("edit", "QwenImageEditPipeline", False),
    ("edit-2511", "QwenImageEditPlusPipeline", True),
])
def test_the_merged_reference_passes_every_step_of_an_edit(tmp_path, fixture, pipeline, zero_cond_t):
    code, summary = sample(tmp_path, "--fixture", fixture)
    assert code == 0 and summary["verdict"] == "pass"
    assert len(summary["trajectory"]) == STEPS * 2 and all(r["passed"] for r in summary["trajectory"])
    # two fused projections per attention, two blocks, true CFG's two transformer calls per step
    per_run = 2 * qwen_image.model_config("tiny")["num_layers"] * 2 * STEPS
    assert {r["fused_calls"] for r in summary["trajectory"]} == {per_run}
    s = summary["sampling"]
    assert s["fixture"] == fixture and s["pipeline"] == pipeline and s["true_cfg_scale"] == 4.0
    assert s.get("transformer_config", {}).get("zero_cond_t", False) is zero_cond_t
    assert "1024 x 1024" in s["condition_image"] and "fp64 VAE" in s["condition_image"]
    assert summary["compared"].startswith(f"qwen-image, {pipeline} ({fixture}) 3 steps at 32x32, true CFG 4:")


def test_the_condition_image_is_encoded_once_in_fp64_and_handed_over_in_the_run_dtype():
    """The transformer sees [target tokens, condition tokens] (4 x 4 each at 32 x 32 px), the condition's the same
    at every call, and the fp32 run's are the fp64 run's rounded: one fp64 encoding, cast."""
    seen: list[tuple[int, torch.Tensor, list]] = []

    def recording(standard, component):
        model = reference(standard, component)
        model.register_forward_pre_hook(lambda m, _a, kw: seen.append((id(m), kw["hidden_states"].clone(),
                                                                       kw["img_shapes"])), with_kwargs=True)
        return model

    check_trajectory(recording, steps=2, fixture="edit")
    calls = {}  # per model: the pipeline run's calls (the single forward pass beside it is a model called once)
    for model, h, _ in seen:
        calls.setdefault(model, []).append(h)
    by = {dtype: max((c for c in calls.values() if c[0].dtype == dtype), key=len) for dtype in (torch.float64,
                                                                                                torch.float32)}
    assert len(by[torch.float64]) == len(by[torch.float32]) == 2 * 2  # 2 steps, true CFG
    assert all(shapes == [[(1, 4, 4), (1, 4, 4)]] for _, _, shapes in seen)
    condition = {dtype: [h[:, 16:] for h in calls] for dtype, calls in by.items()}
    assert all(h.shape == (1, 16, 16) for calls in condition.values() for h in calls)
    for calls in condition.values():
        assert all(torch.equal(h, calls[0]) for h in calls)
    assert torch.equal(condition[torch.float32][0], condition[torch.float64][0].float())
    assert condition[torch.float64][0].abs().max() > 0


def test_a_zero_cond_t_modulation_kept_from_step_1_fails_at_step_2_of_edit_2511(tmp_path, capsys):
    code, summary = sample(tmp_path, "--fixture", "edit-2511", "--candidate",
                           "verify.planted:zero_cond_modulation_memoised")
    assert code == 1
    for dtype in ("fp64", "fp32"):
        steps = [r for r in summary["trajectory"] if r["dtype"] == dtype]
        assert [r["passed"] for r in steps] == [True, False, False]
        assert steps[1]["first_divergence"].startswith("step 2: transformer_blocks.0.")
    assert "FAILED from step-02/latents [fp64]" in capsys.readouterr().out


def test_the_same_kept_modulation_passes_where_zero_cond_t_is_off():
    records = assert_trajectory("verify.planted:zero_cond_modulation_memoised", steps=STEPS, fixture="edit")
    assert len(records) == STEPS * 2


def test_a_mask_memoised_by_shape_fails_an_edit_at_the_first_step_in_the_negative_pass():
    records = check_trajectory("verify.planted:mask_memoised_by_shape", steps=2, fixture="edit")
    first = [r for r in records if r["first_divergence"]]
    assert {r["dtype"] for r in first} == {"fp64", "fp32"}
    assert all(r["name"] == "step-01/latents" and r["first_divergence"].startswith("step 1: transformer_blocks.0.")
               and r["first_divergence"].endswith("(call 2)") for r in first)


@pytest.mark.parametrize("args, words", [
    (["--fixture", "edit-adjacent"],
     "sample --model qwen-image --fixture edit-adjacent: not supported (it samples text-to-image, edit, edit-2511)"),
    (["--fixture", "inpaint"], "argument --fixture: invalid choice: 'inpaint'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, words):
    code, _ = sample(tmp_path, *args)
    assert_refused(code, tmp_path / "out", capsys.readouterr().err, words)
