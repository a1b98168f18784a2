"""`qkv-verify sample --model qwen-image-2.1`: diffusers' QwenImage21Pipeline with its prefix KV cache (the first
step prefills it, later steps decode over it) judged step by step against the fp64 oracle. The built-in merged
processor passes with its fused path running at every step; cache bugs are located at the step where they first act,
including one that a single prefill and a single cached decode never show."""

from __future__ import annotations

import pytest
import torch

from properties.commands.sampling_run import assert_refused, run_sample
from verify.implementations.builtins import reference
from verify.models import qwen_image_21
from verify.testing import assert_trajectory, check_candidate, check_trajectory

STEPS = 3
FAST = ["--model", "qwen-image-2.1", "--steps", str(STEPS), "--dtypes", "fp64,fp32"]


def sample(tmp_path, *args) -> tuple[int, dict]:
    return run_sample(tmp_path / "out", *FAST, *args)


def test_the_merged_reference_passes_every_step_with_its_fused_path_running(tmp_path, capsys):
    code, summary = sample(tmp_path)
    assert code == 0 and summary["verdict"] == "pass"
    assert [(r["name"], r["dtype"]) for r in summary["trajectory"]] == [
        (f"step-{i:02d}/latents", d) for d in ("fp64", "fp32") for i in (1, 2, 3)]
    assert all(r["passed"] for r in summary["trajectory"])
    # one fused to_qkv per attention, one attention per block, one transformer call per step (no true CFG at 1.0)
    per_run = qwen_image_21.model_config("tiny")["num_layers"] * STEPS
    assert {r["fused_calls"] for r in summary["trajectory"]} == {per_run}
    s = summary["sampling"]
    assert s["pipeline"] == "QwenImage21Pipeline" and s["true_cfg_scale"] == 1.0 and s["size"] == [64, 64]
    assert s["vae"].startswith("seeded tiny AutoencoderKLQwenImage21") and s["kv_cache"].startswith("on")
    assert summary["compared"].startswith(
        "qwen-image-2.1, QwenImage21Pipeline (text-to-image) 3 steps at 64x64, true CFG 1:")
    assert "encode_prompt" not in summary["compared"]  # text to image runs the pipeline as it stands
    fp64 = [r for r in summary["trajectory"] if r["dtype"] == "fp64"]
    fp32 = [r for r in summary["trajectory"] if r["dtype"] == "fp32"]
    # the oracle is an fp64 run (scheduler included): fp64's merged path sits at rounding, fp32's base well above it
    assert all(r["max_abs_err"] < 1e-12 for r in fp64) and all(r["base_max_abs_err"] > 1e-9 for r in fp32)
    assert {(i["dtype"], i["implementation"]) for i in summary["images"]} == {
        ("fp64", "oracle"), ("fp64", "standard"), ("fp64", "merged"), ("fp32", "standard"), ("fp32", "merged")}
    assert "verdict: pass (6/6 steps passed)" in capsys.readouterr().out


def test_the_pipeline_prefills_the_cache_once_then_decodes_over_it():
    """The candidate sees what diffusers' pipeline passes: `extract` at step 1, `cached` after, one cache per run
    (the single forward pass shown beside the steps is a model of its own, called once)."""
    seen: list[tuple[int, torch.dtype, str, int]] = []

    def recording(standard, component):
        model = reference(standard, component)
        model.register_forward_pre_hook(lambda m, _a, kw: seen.append(
            (id(m), kw["hidden_states"].dtype, kw["kv_cache_mode"], id(kw["kv_cache"]))), with_kwargs=True)
        return model

    records = check_trajectory(recording, steps=STEPS, model="qwen-image-2.1")
    assert all(r["passed"] for r in records)
    for dtype in (torch.float64, torch.float32):
        models = {m for m, d, _, _ in seen if d == dtype}
        runs = sorted(([(mode, cache) for m, d, mode, cache in seen if m == model] for model in models), key=len)
        assert [[mode for mode, _ in run] for run in runs] == [["extract"], ["extract", "cached", "cached"]]
        assert len({cache for _, cache in runs[-1]}) == 1


def test_a_cache_appended_each_step_fails_at_step_3_and_is_located_there(tmp_path, capsys):
    """Step 2 decodes over the prefix alone (the cache is still as extracted); from step 3 the target also attends
    to step 2's target tokens. Locating step 3 needs the candidate's cache as its own run left it."""
    code, summary = sample(tmp_path, "--candidate", "verify.planted:cache_appended_21")
    assert code == 1 and summary["verdict"] == "fail"
    for dtype in ("fp64", "fp32"):
        steps = [r for r in summary["trajectory"] if r["dtype"] == dtype]
        assert [r["passed"] for r in steps] == [True, True, False]
        assert steps[2]["first_divergence"].startswith("step 3: transformer_blocks.0.")
        assert steps[2]["ratio"] is None or steps[2]["ratio"] > 10
    out = capsys.readouterr().out
    assert "FAILED from step-03/latents [fp32]" in out and "first divergence: step 3: transformer_blocks.0." in out
    assert "first divergence [fp64]: step 3: transformer_blocks.0." in summary["compared"]


def test_under_true_cfg_each_prompt_keeps_its_own_cache_and_the_bug_is_still_located_at_step_3():
    """With a negative prompt the pipeline keeps two caches (cond, uncond): each is replayed into its own fresh one."""
    records = check_trajectory("verify.planted:cache_appended_21", steps=STEPS, true_cfg_scale=2.0,
                               model="qwen-image-2.1")
    for dtype in ("fp64", "fp32"):
        steps = [r for r in records if r["dtype"] == dtype]
        assert [r["passed"] for r in steps] == [True, True, False]
        assert steps[2]["first_divergence"].startswith("step 3: transformer_blocks.0.")
        assert steps[2]["fused_calls"] == qwen_image_21.model_config("tiny")["num_layers"] * STEPS * 2


def test_the_appended_cache_passes_one_prefill_and_one_cached_decode():
    """What the single-pass report runs (the model-cache case: an extract, then one cached decode) cannot see it."""
    records = check_candidate("verify.planted:cache_appended_21", components=("model",),
                              dtypes=(torch.float64,), model="qwen-image-2.1")
    assert any(r.name.startswith("model-cache") for r in records) and all(r.passed for r in records)


def test_a_cache_stored_before_rope_fails_at_the_first_cached_step():
    """The prefill is right (step 1 passes); the first decode over the cache (step 2) is not, and is located in its
    own call, the cache replayed from the extract."""
    records = check_trajectory("verify.planted:cache_before_rope_21", steps=STEPS, model="qwen-image-2.1")
    for dtype in ("fp64", "fp32"):
        assert [r["passed"] for r in records if r["dtype"] == dtype] == [True, False, False]
    with pytest.raises(AssertionError, match=r"step-02/latents \[fp64\].*first divergence: step 2: "
                                             r"transformer_blocks\.0\."):
        assert_trajectory("verify.planted:cache_before_rope_21", steps=2, model="qwen-image-2.1")


@pytest.mark.parametrize("args, words", [
    (["--size", "48x48"], "--size 48x48: each side must be a multiple of 32 for qwen-image-2.1"),
    (["--size", "64x40"], "--size 64x40: each side must be a multiple of 32 for qwen-image-2.1"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, words):
    code, _ = sample(tmp_path, *args)
    assert_refused(code, tmp_path / "out", capsys.readouterr().err, words)
