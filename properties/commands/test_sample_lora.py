"""`qkv-verify sample --lora`: the LoRA's effect on the final image at each factor of report's sweep, beside the merged
path's own deviation, so that "the LoRA's effect might be subtle" is measured rather than guessed."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from properties.commands.sampling_run import run_sample
from verify.checks.report import SWEEP_FACTORS
from verify.models import qwen_image, qwen_image_21

FAST = ["--steps", "2", "--dtypes", "fp64,fp32"]


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """The write-up's kind of LoRA (rank 32 on the merged targets, Lightning keys) for the tiny model."""
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    save_file(qwen_image.seeded_lora(qwen_image.model_config("tiny"), 0), path)
    return path


def sample(out, *args) -> tuple[int, dict]:
    return run_sample(out, *FAST, *args)


def test_the_effect_is_measured_at_every_factor_and_grows_with_it(lora_file, tmp_path):
    code, summary = sample(tmp_path / "out", "--lora", str(lora_file))
    assert code == 0, summary.get("notes")
    lora = summary["lora"]
    assert [r["factor"] for r in lora["sweep"]] == list(SWEEP_FACTORS)
    assert lora["modules_matched"] == 2 * 4 and lora["scales"] == [1.0]  # 2 blocks x 4 targets, alpha = rank
    rows = {r["factor"]: r for r in lora["sweep"]}
    assert rows[0.0]["effect_mean_abs"] == 0.0  # without the LoRA the image is itself
    effects = [rows[f]["effect_mean_abs"] for f in SWEEP_FACTORS]
    assert all(a < b for a, b in zip(effects, effects[1:])), effects
    # a small weight change moves the image to first order: doubling a small factor doubles the effect (a factor
    # applied twice, or not at all, breaks this)
    assert 1.8 < rows[0.5]["effect_mean_abs"] / rows[0.25]["effect_mean_abs"] < 2.2
    assert "LoRA" in summary["notes"][-1] and f"LoRA {lora_file}" in summary["compared"]
    assert "LoRA effect against the merged path" in (tmp_path / "out" / "index.html").read_text()


def test_a_scale_error_shows_as_a_deviation_beside_the_effect(lora_file, tmp_path):
    code, summary = sample(tmp_path / "out", "--lora", str(lora_file), "--candidate",
                           "verify.planted:scale_error_1e3")
    assert code == 1
    rows = summary["lora"]["sweep"]
    assert all(r["deviation_mean_abs"] > 0 and r["effect_over_deviation"] is not None for r in rows[1:])
    assert rows[0]["effect_over_deviation"] == 0.0  # no effect without the LoRA, yet a deviation


def test_a_lora_with_modules_that_match_nothing_is_refused(lora_file, tmp_path, capsys):
    from safetensors.torch import load_file

    tensors = load_file(lora_file)
    key = "transformer_blocks.0.attn.to_qkv"
    tensors |= {k.replace(key, "transformer_blocks.0.attn.no_such"): v.clone() for k, v in tensors.items()
                if key in k}
    partial = tmp_path / "partial.safetensors"
    save_file(tensors, partial)
    code, _ = sample(tmp_path / "out", "--lora", str(partial))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "match no module of the model" in err[-1] and "lora-audit" in err[-1]
    assert not (tmp_path / "out").exists()


def test_qwen_image_2_1_takes_its_own_lora_targets(tmp_path):
    """2.1's targets (attention and SwiGLU, no add_* projections) in diffusers' keys, small enough to stay linear."""
    config = qwen_image_21.model_config("tiny")
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    hidden = config["mlp_ratio"] * dim
    targets = {"attn.to_q": (dim, dim), "attn.to_v": (dim, dim), "img_mlp.gate_layer": (hidden, dim),
               "img_mlp.out": (dim, hidden)}
    g, tensors = torch.Generator().manual_seed(0), {}
    for i in range(config["num_layers"]):
        for target, (rows, cols) in targets.items():
            key = f"transformer.transformer_blocks.{i}.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, cols, generator=g) / cols**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, 4, generator=g) * 0.05
    path = tmp_path / "lora21.safetensors"
    save_file(tensors, path)
    code, summary = sample(tmp_path / "out", "--model", "qwen-image-2.1", "--lora", str(path))
    assert code == 0, summary.get("notes")
    lora = summary["lora"]
    assert lora["modules_matched"] == config["num_layers"] * len(targets) and lora["scales"] == [1.0]  # no alpha
    rows = {r["factor"]: r for r in lora["sweep"]}
    assert rows[0.0]["effect_mean_abs"] == 0.0 and rows[1.0]["effect_mean_abs"] > 0
