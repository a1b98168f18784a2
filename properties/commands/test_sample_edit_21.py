"""`qkv-verify sample --model qwen-image-2.1 --fixture edit|edit-adjacent`: QwenImage21Pipeline with seeded condition
images (their latents substituted at the image slots of the prompt embeddings) and its prefix KV cache, judged step
by step against the fp64 oracle. The built-in merged processor passes with its fused path running; the condition
image reaches the image; two adjacent condition images attended as one block fail at step 1, where edit, with one
image, cannot show it."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from properties.commands.sampling_run import assert_refused, run_sample
from verify.checks.sampling import SampleOptions, run_sampling
from verify.commands.sample import FIXTURES
from verify.implementations.builtins import reference
from verify.implementations.candidate import resolve
from verify.models import qwen_image, qwen_image_21
from verify.testing import assert_trajectory, check_trajectory

STEPS = 3
FAST = ["--model", "qwen-image-2.1", "--steps", str(STEPS), "--dtypes", "fp64,fp32"]
TOKENS = (64 // 16) ** 2  # latent tokens of one 64 x 64 image at the pipeline's 16x VAE scale (4 x 4)


def sample(tmp_path, *args) -> tuple[int, dict]:
    return run_sample(tmp_path / "out", *FAST, *args)


def test_an_edit_passes_every_step_with_its_fused_path_running(tmp_path, capsys):
    code, summary = sample(tmp_path, "--fixture", "edit")
    assert code == 0 and summary["verdict"] == "pass"
    assert len(summary["trajectory"]) == STEPS * 2 and all(r["passed"] for r in summary["trajectory"])
    # one fused to_qkv per attention, one attention per block, one transformer call per step (no true CFG at 1.0)
    per_run = qwen_image_21.model_config("tiny")["num_layers"] * STEPS
    assert {r["fused_calls"] for r in summary["trajectory"]} == {per_run}
    s = summary["sampling"]
    assert s["fixture"] == "edit" and s["pipeline"] == "QwenImage21Pipeline" and s["kv_cache"].startswith("on")
    assert "image_pad_mask" in s["text_encoder"] and "1024 x 1024" in s["condition_image"]
    # the pipeline is not run as it stands, and the line a report leads with says so
    assert summary["compared"].startswith("qwen-image-2.1, QwenImage21Pipeline (edit) ")
    assert "encode_prompt handed the embeddings with the condition images' slots" in summary["compared"]
    assert "verdict: pass (6/6 steps passed)" in capsys.readouterr().out


def test_the_condition_latents_fill_the_image_slots_and_the_cache_holds_them():
    """The transformer sees [condition tokens, target tokens], 4 x 4 each, the condition's the VAE's encoding of the
    seeded pixels (RGBA in [-1, 1], scaled in fp32 as diffusers' image processor does) at every call; the
    vision-language mask one slot per 2 x 2 condition tokens beside the 8 text positions, then the target's slots;
    extract at step 1, cached after."""
    seen: list[dict] = []

    def recording(standard, component):
        model = reference(standard, component)
        model.register_forward_pre_hook(lambda m, _a, kw: seen.append(kw | {"model": id(m)}), with_kwargs=True)
        return model

    assert all(r["passed"] for r in check_trajectory(recording, steps=STEPS, dtypes=(torch.float64,),
                                                     model="qwen-image-2.1", fixture="edit"))
    run = max(({k["model"] for k in seen}), key=lambda m: sum(k["model"] == m for k in seen))
    calls = [k for k in seen if k["model"] == run]
    assert [k["kv_cache_mode"] for k in calls] == ["extract", "cached", "cached"]
    assert all(k["img_shapes"] == [[(1, 4, 4), (1, 4, 4)]] for k in calls)
    assert all(k["img_mask"][0].sum() == 2 * TOKENS // 4 and k["img_mask"].shape[1] == 8 + 2 * TOKENS // 4
               for k in calls)
    config = qwen_image_21.model_config("tiny")
    pixels = np.random.default_rng(0 + 8).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgba = torch.from_numpy(np.asarray(Image.fromarray(pixels).convert("RGBA"), dtype=np.float32) / 255) * 2 - 1
    vae = qwen_image_21.build_vae(config, 0)
    with torch.no_grad():
        latents = vae.encode(rgba.double().permute(2, 0, 1)[None, :, None]).latent_dist.mode()
    expected = latents.flatten(2).transpose(1, 2)  # [1, 16 tokens, 8 channels], row-major as the pipeline packs
    for k in calls:
        assert torch.allclose(k["hidden_states"][:, :TOKENS], expected, rtol=0, atol=1e-12)


def edit_images(monkeypatch, condition_seed_shift: int, dtypes: tuple[torch.dtype, ...]) -> dict:
    """The final images of a 2-step edit, per dtype and role, its condition image drawn `condition_seed_shift` seeds
    on (the weights, noise and embeddings unchanged)."""
    drawn = qwen_image_21.condition_inputs
    monkeypatch.setattr(qwen_image_21, "condition_inputs",
                        lambda fixture, size, seed: drawn(fixture, size, seed + condition_seed_shift))
    opts = SampleOptions(model="qwen-image-2.1", fixture="edit", steps=2, dtypes=dtypes)
    result, pictures = run_sampling(resolve("reference"), resolve("diffusers"), opts)
    assert all(r["passed"] for r in result["trajectory"])
    return pictures


def test_another_condition_image_changes_the_oracles_image_far_above_fp32s_rounding(monkeypatch):
    first = edit_images(monkeypatch, 0, (torch.float64, torch.float32))
    other = edit_images(monkeypatch, 100, (torch.float64,))["fp64"]["oracle"]
    oracle = first["fp64"]["oracle"]
    rounding = np.abs(first["fp32"]["standard"] - oracle).max()  # the fp32 standard's own deviation from the oracle
    assert 0 < rounding and np.abs(other - oracle).max() > 100 * rounding


def test_adjacent_images_attended_as_one_block_fail_at_step_1_of_edit_adjacent(tmp_path, capsys):
    code, summary = sample(tmp_path, "--fixture", "edit-adjacent", "--candidate",
                           "verify.planted:adjacent_images_one_block_21")
    assert code == 1 and summary["verdict"] == "fail"
    for dtype in ("fp64", "fp32"):
        steps = [r for r in summary["trajectory"] if r["dtype"] == dtype]
        assert not steps[0]["passed"] and steps[0]["first_divergence"].startswith("step 1: transformer_blocks.0.")
    assert "FAILED from step-01/latents [fp64]" in capsys.readouterr().out


def test_the_same_bug_passes_edit_where_one_condition_image_has_no_neighbour():
    records = assert_trajectory("verify.planted:adjacent_images_one_block_21", steps=2, dtypes=(torch.float64,),
                                model="qwen-image-2.1", fixture="edit")
    assert len(records) == 2


def test_the_merged_reference_passes_edit_adjacent_with_its_fused_path_running():
    records = assert_trajectory("reference", steps=2, dtypes=(torch.float64,), model="qwen-image-2.1",
                                fixture="edit-adjacent")
    assert {r["fused_calls"] for r in records} == {qwen_image_21.model_config("tiny")["num_layers"] * 2}


def test_a_vae_that_reads_rgb_is_refused_for_an_edit(tmp_path, capsys):
    """The pipeline hands the VAE its condition image as RGBA: a VAE of 3 input channels could only crash on it."""
    seeded = qwen_image_21.build_vae(qwen_image_21.model_config("tiny"), 0)
    type(seeded).from_config({**seeded.config, "in_channels": 3}).save_pretrained(tmp_path / "vae")
    code, _ = sample(tmp_path, "--fixture", "edit", "--vae", str(tmp_path / "vae"))
    assert_refused(code, tmp_path / "out", capsys.readouterr().err,
                   "--fixture edit: QwenImage21Pipeline hands the VAE its condition images as RGBA, but the VAE "
                   "reads 3 channels (its in_channels)")


def test_edit_2511_is_refused_for_qwen_image_2_1(tmp_path, capsys):
    code, _ = sample(tmp_path, "--fixture", "edit-2511")
    assert_refused(code, tmp_path / "out", capsys.readouterr().err,
                   "sample --model qwen-image-2.1 --fixture edit-2511: not supported (it samples text-to-image, "
                   "edit, edit-adjacent)")


def test_the_cli_offers_every_models_sampling_fixtures_and_no_other():
    assert set(FIXTURES) == set(qwen_image.SAMPLING_FIXTURES) | set(qwen_image_21.SAMPLING_FIXTURES)
