"""`qkv-verify sample` on the user's folders: --checkpoint (the standard weights, the model named by its config.json),
--merged-checkpoint in either --layout (what the candidate is built from) and --vae. Each folder is the seeded tiny
model or VAE saved by diffusers' own save_pretrained, so a run that reads it must sample exactly what the seeded run
samples; a merged checkpoint whose to_qkv was tampered with must fail the trajectory."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from properties.checkpoint_files import merged_checkpoint
from properties.commands.sampling_run import assert_refused, run_sample
from verify.models import qwen_image, qwen_image_21

FAST = ["--steps", "2", "--dtypes", "fp64,fp32", "--true-cfg-scale", "1"]
RUN = ("trajectory", "final", "single_pass", "images")  # what a run measured: every number, bit for bit
TAMPERED = "transformer_blocks.0.attn.to_qkv.weight"


def sample(out, *args) -> tuple[int, dict]:
    return run_sample(out, *FAST, *args)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The seeded tiny transformer (fp64, sharded with an index) and VAE (fp32, as it is built) of seeds 0 and 1,
    saved by diffusers; seed 0's transformer merged in both layouts, and once with block 0's to_qkv scaled by 1.01."""
    root = tmp_path_factory.mktemp("folders")
    config = qwen_image.model_config("tiny")
    for seed in (0, 1):
        qwen_image.build_model(config, seed).save_pretrained(root / f"transformer-{seed}", max_shard_size="400KB")
        vae = qwen_image.build_vae(config, seed)
        torch.nn.Module.to(vae, torch.float32).save_pretrained(root / f"vae-{seed}")
    qwen_image_21.build_model(qwen_image_21.model_config("tiny"), 0).save_pretrained(root / "transformer-21")
    wide = qwen_image.model_config("tiny", in_channels=64, out_channels=16)  # the real model's latent width
    qwen_image.build_model(wide, 0).save_pretrained(root / "transformer-wide")
    for layout in ("blocked", "interleaved"):
        merged_checkpoint(root / "transformer-0", root / f"merged-{layout}", layout=layout)
    merged_checkpoint(root / "transformer-0", root / "tampered",
                      mutate=lambda sd: {**sd, TAMPERED: sd[TAMPERED] * 1.01})
    return root


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    code, summary = sample(tmp_path_factory.mktemp("seeded") / "out")
    assert code == 0
    return summary


def test_the_seeded_models_checkpoint_samples_the_seeded_run_bit_for_bit(folders, seeded_run, tmp_path):
    code, summary = sample(tmp_path / "out", "--checkpoint", str(folders / "transformer-0"))
    assert code == 0 and summary["verdict"] == "pass"
    assert len(list((folders / "transformer-0").glob("*.safetensors"))) > 1  # read through the index
    assert {k: summary[k] for k in RUN} == {k: seeded_run[k] for k in RUN}
    assert all(r["fused_calls"] > 0 for r in summary["trajectory"])
    assert summary["sampling"]["checkpoint"] == str(folders / "transformer-0") and summary["sampling"]["config"] is None
    assert f"checkpoint {folders / 'transformer-0'} (seed 0)" in summary["compared"]
    assert [w["name"] for w in summary["weights"]] == ["inputs/finite-checkpoint"]


def test_another_checkpoint_samples_another_image(folders, seeded_run, tmp_path):
    """The checkpoint's weights are those sampled (the seeded ones would give the seeded run's image)."""
    code, summary = sample(tmp_path / "out", "--checkpoint", str(folders / "transformer-1"))
    oracle = [next(i["pixel_mean"] for i in s["images"] if i["implementation"] == "oracle")
              for s in (summary, seeded_run)]
    assert code == 0 and oracle[0] != oracle[1]


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_a_merged_checkpoint_in_either_layout_passes_and_samples_the_seeded_run(folders, seeded_run, tmp_path,
                                                                                layout):
    """Split back in its layout it is the standard weights bit for bit, so the candidate built from it samples
    exactly what the seeded run's candidate does, its fused path running."""
    code, summary = sample(tmp_path / "out", "--checkpoint", str(folders / "transformer-0"), "--merged-checkpoint",
                           str(folders / f"merged-{layout}"), "--layout", layout)
    assert code == 0 and summary["verdict"] == "pass"
    assert {k: summary[k] for k in RUN} == {k: seeded_run[k] for k in RUN}
    assert all(r["fused_calls"] > 0 for r in summary["trajectory"])
    split = next(w for w in summary["weights"] if w["name"].startswith("weights/split-"))
    assert split["name"] == f"weights/split-seed-{layout}-equals-standard" and split["passed"]
    assert f"merged weights {folders / f'merged-{layout}'} ({layout})" in summary["compared"]


def test_a_tampered_merged_checkpoint_fails_the_trajectory_in_the_tampered_block(folders, tmp_path):
    code, summary = sample(tmp_path / "out", "--checkpoint", str(folders / "transformer-0"), "--merged-checkpoint",
                           str(folders / "tampered"))
    assert code == 1 and summary["verdict"] == "fail"
    first = {r["dtype"]: r for r in summary["trajectory"] if r["first_divergence"]}
    assert set(first) == {"fp64", "fp32"}
    assert all(r["name"] == "step-01/latents" and r["first_divergence"].startswith("step 1: transformer_blocks.0.")
               for r in first.values())
    split = next(w for w in summary["weights"] if w["name"].startswith("weights/split-"))
    assert not split["passed"] and "transformer_blocks.0.attn.to_" in split["message"]


def test_a_vae_folder_of_the_seeded_vae_decodes_the_seeded_runs_images(folders, seeded_run, tmp_path):
    code, summary = sample(tmp_path / "out", "--vae", str(folders / "vae-0"))
    assert code == 0
    assert {k: summary[k] for k in RUN} == {k: seeded_run[k] for k in RUN}
    assert summary["sampling"]["vae"].startswith(f"{folders / 'vae-0'} AutoencoderKLQwenImage in fp64")
    assert summary["compared"].endswith(f"; VAE {folders / 'vae-0'}; dtypes fp64,fp32")


def test_another_vae_decodes_other_images_from_the_same_latents(folders, seeded_run, tmp_path):
    code, summary = sample(tmp_path / "out", "--vae", str(folders / "vae-1"))
    assert code == 0
    assert summary["trajectory"] == seeded_run["trajectory"]  # the latents do not depend on the VAE
    assert summary["images"] != seeded_run["images"]


@pytest.mark.parametrize("model, folder, names", [
    ("qwen-image-2.1", "transformer-0", "QwenImageTransformer2DModel (qwen-image)"),
    ("qwen-image", "transformer-21", "QwenImage21Transformer2DModel (qwen-image-2.1)"),
])
def test_a_model_the_checkpoint_contradicts_is_refused_naming_both(folders, tmp_path, capsys, model, folder, names):
    code, _ = sample(tmp_path / "out", "--model", model, "--checkpoint", str(folders / folder))
    assert_refused(code, tmp_path / "out", capsys.readouterr().err,
                   f"--model {model} contradicts --checkpoint {folders / folder}, whose config.json names {names}")


def _without_config(folder):
    (folder / "config.json").unlink()


def _without_a_tensor(folder):
    path = folder / "diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if k != "decoder.conv_in.bias"}, path)


def _with_a_tensor_flattened(folder):
    path = folder / "diffusion_pytorch_model.safetensors"
    save_file({k: v.flatten() if k == "decoder.conv_in.weight" else v for k, v in load_file(path).items()}, path)


@pytest.mark.parametrize("edit, words", [
    (_without_config, "no config.json holding a JSON object"),
    (_without_a_tensor,
     "its tensors do not fit AutoencoderKLQwenImage (missing decoder.conv_in.bias; 1 missing, 0 unexpected)"),
    (_with_a_tensor_flattened, "decoder.conv_in.weight has shape ("),
])
def test_a_broken_vae_folder_is_refused(folders, tmp_path, capsys, edit, words):
    """diffusers' from_pretrained would fill a missing tensor with random weights and only warn."""
    shutil.copytree(folders / "vae-0", tmp_path / "vae")
    edit(tmp_path / "vae")
    code, _ = sample(tmp_path / "out", "--vae", str(tmp_path / "vae"))
    assert_refused(code, tmp_path / "out", capsys.readouterr().err, f"--vae {tmp_path / 'vae'}: {words}")


@pytest.mark.parametrize("args, words", [
    (["--checkpoint", "{f}/vae-0"], "config.json names AutoencoderKLQwenImage, no model qkv-verify knows"),
    (["--checkpoint", "{f}"], "no config.json (expected a diffusers-layout transformer folder)"),
    (["--checkpoint", "{f}/merged-blocked"], "holds fused to_qkv weights; pass it as --merged-checkpoint"),
    (["--merged-checkpoint", "{f}/merged-blocked"], "--merged-checkpoint needs --checkpoint"),
    (["--checkpoint", "{f}/transformer-0", "--merged-checkpoint", "{f}/transformer-1"],
     "holds no fused to_qkv weights"),
    (["--checkpoint", "{f}/transformer-0", "--fixture", "edit-2511"],
     "--fixture edit-2511 samples a model with zero_cond_t=True; "),
    (["--vae", "{f}/transformer-0"], "config.json names QwenImageTransformer2DModel, not AutoencoderKLQwenImage"),
    (["--model", "qwen-image-2.1", "--vae", "{f}/vae-0"],
     "config.json names AutoencoderKLQwenImage, not AutoencoderKLQwenImage21"),
    (["--vae", "{f}/no-such-folder"], "no such folder"),
    (["--checkpoint", "{f}/transformer-wide", "--vae", "{f}/vae-0"], "--vae {f}/vae-0 has z_dim 4, but"),
])
def test_a_folder_of_the_wrong_kind_is_refused(folders, tmp_path, capsys, args, words):
    code, _ = sample(tmp_path / "out", *(a.format(f=folders) for a in args))
    assert_refused(code, tmp_path / "out", capsys.readouterr().err, words.format(f=folders))


def test_a_checkpoint_of_the_real_latent_width_is_decoded_by_a_seeded_vae_of_its_width(folders, tmp_path):
    """The seeded VAE takes the transformer's latent channels (in_channels 64 unpacked 2 x 2: z_dim 16, the real
    VAE's), so a checkpoint of the real latent width samples without --vae."""
    code, summary = sample(tmp_path / "out", "--checkpoint", str(folders / "transformer-wide"))
    assert code == 0 and summary["verdict"] == "pass"
    assert summary["sampling"]["vae"].startswith("seeded tiny AutoencoderKLQwenImage in fp64")
    assert qwen_image.build_vae(qwen_image.model_config("full"), 0).config.z_dim == 64 // 4
