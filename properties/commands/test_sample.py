"""`qkv-verify sample`: diffusers' pipeline judged step by step against an fp64 oracle. The built-in merged processor
passes with its fused path running at every step; planted bugs that one forward pass does not show (a joint mask
memoised by shape under true CFG) or shows too small to matter (a 1e-3 scale error) fail, located by step."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from properties.commands.sampling_run import assert_refused, run_sample
from verify.checks.sampling import Fp64FlowMatchEulerScheduler
from verify.cli import main
from verify.models import qwen_image
from verify.planted import PLANTED_SAMPLING, PLANTED_SAMPLING_21
from verify.testing import assert_trajectory, check_candidate, check_trajectory

STEPS = 4
FAST = ["--steps", str(STEPS), "--dtypes", "fp64,fp32"]


def sample(tmp_path, *args) -> tuple[int, dict]:
    return run_sample(tmp_path / "out", *FAST, *args)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    return sample(tmp_path_factory.mktemp("sample"))


def test_the_merged_reference_passes_every_step_with_its_fused_path_running(reference_run):
    code, summary = reference_run
    assert code == 0 and summary["verdict"] == "pass"
    assert len(summary["trajectory"]) == STEPS * 2 and all(r["passed"] for r in summary["trajectory"])
    attentions = qwen_image.model_config("tiny")["num_layers"] * 2  # two fused projections per attention
    per_run = STEPS * 2 * attentions  # true CFG: two transformer calls per step
    assert {r["fused_calls"] for r in summary["trajectory"]} == {per_run}
    assert [r["name"] for r in summary["final"]] == ["final/latents"] * 2
    assert summary["sampling"]["pipeline"] == "QwenImagePipeline" and summary["sampling"]["true_cfg_scale"] == 4.0
    assert summary["compared"].startswith("qwen-image, QwenImagePipeline (text-to-image) 4 steps at 32x32, true CFG 4")
    claim = summary["claims"][0]
    assert claim["id"] == "mean-same-as-standard" and claim["verdict"] == "confirmed"


def test_the_report_files_are_written(reference_run, tmp_path):
    code = main(["sample", "--steps", "2", "--dtypes", "fp64,fp32", "--out", str(tmp_path / "o")])
    assert code == 0
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"summary.json", "report.md", "index.html",
                                                           "trajectory.png", "images.png"}
    html = (tmp_path / "o" / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "Error against the oracle, step by step" in html


def test_a_mask_memoised_by_shape_fails_at_the_first_step_in_the_negative_pass(tmp_path):
    code, summary = sample(tmp_path, "--candidate", "verify.planted:mask_memoised_by_shape")
    assert code == 1
    first = {r["dtype"]: r for r in summary["trajectory"] if r["first_divergence"]}
    assert set(first) == {"fp64", "fp32"}
    for r in first.values():  # step 1's second model call is the negative prompt's: it got the positive's padding
        assert r["name"] == "step-01/latents" and r["first_divergence"].startswith("step 1: transformer_blocks.0.")
        assert r["first_divergence"].endswith("(call 2)")


def test_the_same_memoised_mask_passes_without_true_cfg(tmp_path):
    """One pass per step never shows it: the bug lives in true CFG's second pass only."""
    code, summary = sample(tmp_path, "--candidate", "verify.planted:mask_memoised_by_shape", "--true-cfg-scale", "1")
    assert code == 0 and summary["sampling"]["true_cfg_scale"] == 1.0


@pytest.mark.parametrize("cfg", ["4", "1"])
def test_text_keys_and_values_cached_once_fail_at_the_second_step(tmp_path, cfg):
    """Each prompt computes its own text K and V at step 1, so step 1 is right; from step 2 they are stale (the
    timestep's modulation moved them), with or without true CFG. One forward pass never shows it."""
    code, summary = sample(tmp_path, "--candidate", "verify.planted:text_kv_cached_once", "--true-cfg-scale", cfg)
    assert code == 1
    steps = {(r["dtype"], r["name"]): r for r in summary["trajectory"]}
    for dtype in ("fp64", "fp32"):
        assert steps[(dtype, "step-01/latents")]["passed"] and not steps[(dtype, "step-02/latents")]["passed"]
        assert steps[(dtype, "step-02/latents")]["first_divergence"].startswith("step 2: transformer_blocks.0.")
    single = check_candidate("verify.planted:text_kv_cached_once", components=("model",), dtypes=[torch.float64])
    assert single and all(r.passed for r in single)


def test_an_equal_pixel_mean_is_no_evidence(tmp_path):
    """The write-up's "Mean 203.98, same as standard": the broken mask's image has the oracle's mean within a
    fraction of a grey level while its PSNR falls far below the standard model's."""
    _, summary = sample(tmp_path, "--candidate", "verify.planted:mask_memoised_by_shape")
    by = {(i["dtype"], i["implementation"]): i for i in summary["images"]}
    base, cand = by[("fp32", "standard")], by[("fp32", "merged")]
    assert abs(cand["pixel_mean"] - by[("fp64", "oracle")]["pixel_mean"]) < 0.5
    assert cand["psnr_db"] < base["psnr_db"] - 40
    claim = summary["claims"][0]  # the write-up's "Mean 203.98, same as standard": refuted by the trajectory
    assert claim["verdict"] == "refuted" and "although the pixel means agree within half a grey level" in claim["why"]
    assert claim["why"].startswith("the trajectory leaves the bound at step-01/latents")


def test_one_forward_pass_is_shown_beside_the_steps_and_a_scale_error_grows_over_them(tmp_path, reference_run):
    _, passing = reference_run
    assert [r["dtype"] for r in passing["single_pass"]] == ["fp64", "fp32"]
    assert all(r["passed"] and r["fused_calls"] > 0 for r in passing["single_pass"])
    code, summary = sample(tmp_path, "--candidate", "verify.planted:scale_error_1e3")
    one_pass, last = (next(r for r in summary[k] if r["dtype"] == "fp32") for k in ("single_pass", "final"))
    assert code == 1 and not one_pass["passed"]
    assert last["ratio"] > 1.5 * one_pass["ratio"]  # small in one pass, compounding over the steps
    assert any(n.startswith(f"fp32: merged/standard error ratio {one_pass['ratio']:.3g} in one forward pass")
               for n in summary["notes"])


def test_a_1e_3_scale_error_fails_every_dtype_and_api_says_where(tmp_path):
    records = check_trajectory("verify.planted:scale_error_1e3", steps=STEPS)
    assert {r["dtype"] for r in records if not r["passed"]} == {"fp64", "fp32"}
    assert all(r["first_divergence"].startswith("step 1:") for r in records if r["first_divergence"])
    with pytest.raises(AssertionError, match=r"step-01/latents \[fp64\].*first divergence: step 1"):
        assert_trajectory("verify.planted:scale_error_1e3", steps=2)


def test_the_fp64_scheduler_step_is_the_euler_update_in_fp64():
    """diffusers' step rounds an fp64 sample to fp32 first; the oracle's is x + (sigma_next - sigma) * v exactly."""
    ours, theirs = Fp64FlowMatchEulerScheduler(), FlowMatchEulerDiscreteScheduler()
    for s in (ours, theirs):
        s.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x, v = (torch.randn(1, 8, 4, generator=g, dtype=torch.float64) + 1 / 3 for _ in range(2))
    t = ours.timesteps[0]
    expected = x + (ours.sigmas[1].double() - ours.sigmas[0].double()) * v
    got = ours.step(v, t, x, return_dict=False)[0]
    assert got.dtype == torch.float64 and torch.equal(got, expected)
    rounded = theirs.step(v, t, x, return_dict=False)[0]
    assert not torch.equal(rounded, expected) and torch.allclose(rounded, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("args, words", [
    (["--size", "30x30"], "--size 30x30: each side must be a multiple of 8"),
    (["--steps", "0"], "expected a positive number of steps"),
    (["--vae", "vae"], "--vae vae: no such folder"),
    (["--lora", "no-such.safetensors"], "no-such.safetensors"),
    (["--candidate", "no_such_module:build"], "no module 'no_such_module'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, words):
    code, _ = sample(tmp_path, *args)
    assert_refused(code, tmp_path / "out", capsys.readouterr().err, words)


# where each planted sampling bug lives: the fixture and model whose run reaches it (a bug added without one fails)
REACHED_BY = {"mask_memoised_by_shape": [], "text_kv_cached_once": [], "scale_error_1e3": [],
              "zero_cond_modulation_memoised": ["--fixture", "edit-2511"],
              "cache_appended_21": ["--model", "qwen-image-2.1"]}


@pytest.mark.parametrize("name", [*PLANTED_SAMPLING, *PLANTED_SAMPLING_21])
def test_every_planted_sampling_bug_fails_fp64_and_fp32_located_by_step(tmp_path, name):
    code, summary = sample(tmp_path, "--candidate", f"verify.planted:{name}", *REACHED_BY[name])
    assert code == 1
    first = {r["dtype"]: r for r in summary["trajectory"] if r["first_divergence"]}
    assert {"fp64", "fp32"} <= set(first)
    for r in first.values():
        step = int(r["name"].removeprefix("step-").removesuffix("/latents"))
        assert r["first_divergence"].startswith(f"step {step}: transformer_blocks.")
