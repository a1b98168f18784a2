"""`qkv-verify report --checkpoint DIR` on a Qwen-Image 2.1 checkpoint: the model comes from its config.json, every
fixture of 2.1's whole-model cases is streamed block by block over the checkpoint's own weights (the oracle's values
are diffusers' from_pretrained model's), the fused path runs in every block; a planted bug fails the streamed checks
of the fixture it breaks and is located in a block; a merged checkpoint passes in its layout, and one with a tampered
weight fails its weight check naming the tensor; a LoRA on every 2.1 target is streamed onto both models (the
oracle's values are diffusers' model with W + BA by hand), a key that lands nowhere fails; --config full streams
seeded weights; bad combinations exit 2."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from diffusers import QwenImage21Transformer2DModel
from safetensors.torch import load_file, save_file

from verify.cli import main
from verify.implementations import fused_21
from verify.models import qwen_image_21

V21 = "qwen-image-2.1"
FAST = ["--dtypes", "fp64,fp32"]
STREAMED = {"model/text-to-image/outputs", "model/edit/outputs", "model/edit-adjacent/outputs"}  # 2.1's fixtures


def _checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny seeded 2.1 model saved by diffusers itself (fp32, as a user's checkpoint is stored)."""
    qwen_image_21.build_model(qwen_image_21.model_config("tiny"), seed, torch.float32).save_pretrained(path)
    return path


def _merged(std: Path, dst: Path, layout: str = "blocked", tamper: tuple[str, int, int] | None = None) -> Path:
    """The checkpoint fused by hand: each block's to_q, to_k, to_v rows stacked (blocked) or head by head
    (interleaved) into one to_qkv; `tamper` = (key, row, column) adds 1e-3 to one element."""
    config = json.loads((std / "config.json").read_text())
    head_dim = config["attention_head_dim"]
    sd = load_file(std / "diffusion_pytorch_model.safetensors")
    out = {}
    for key, tensor in sd.items():
        if ".attn.to_q." in key:
            q, k, v = (sd[key.replace("to_q", name)] for name in ("to_q", "to_k", "to_v"))
            if layout == "blocked":
                fused = torch.cat([q, k, v])
            else:
                fused = torch.cat([torch.cat([t[h * head_dim:(h + 1) * head_dim] for t in (q, k, v)])
                                   for h in range(q.shape[0] // head_dim)])
            out[key.replace("to_q", "to_qkv")] = fused
        elif not any(f".attn.{name}." in key for name in ("to_k", "to_v")):
            out[key] = tensor
    if tamper:
        key, row, col = tamper
        out[key] = out[key].clone()
        out[key][row, col] += 1e-3
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config))
    save_file(out, str(dst / "diffusion_pytorch_model.safetensors"))
    return dst


def _report(tmp_path: Path, *args: str) -> tuple[int, dict | None]:
    out = tmp_path / "out"
    code = main(["report", *FAST, "--out", str(out), *args])
    summary = out / "summary.json"
    return code, json.loads(summary.read_text()) if summary.exists() else None


def _streamed(summary: dict) -> dict[tuple[str, str], dict]:
    return {(c["name"], c["dtype"]): c for c in summary["checks"] if c["name"].startswith("model/")}


def test_a_21_checkpoint_is_streamed_over_its_own_weights_with_the_fused_path_run(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    code, summary = _report(tmp_path, "--checkpoint", str(ckpt))  # no --model: its config.json names 2.1
    assert code == 0 and summary["verdict"] == "pass", [c["message"] for c in summary["checks"] if not c["passed"]]
    assert summary["inputs"]["model"] == V21 and summary["inputs"]["checkpoint"] == str(ckpt)
    streamed = _streamed(summary)
    assert set(streamed) == {(name, d) for name in STREAMED for d in ("fp64", "fp32")}
    layers = json.loads((ckpt / "config.json").read_text())["num_layers"]
    assert all(c["passed"] and c["fused_calls"] == layers for c in streamed.values()), streamed  # one to_qkv a block
    names = {c["name"] for c in summary["checks"]}
    assert {"inputs/finite-checkpoint", "attention/outputs", "block/outputs", "attention-cache/outputs"} <= names
    # the oracle's sampled outputs are those of diffusers' own model loaded from the folder, in fp64
    model = QwenImage21Transformer2DModel.from_pretrained(ckpt).to(torch.float64).eval()
    config = dict(model.config)
    for fixture in ("text-to-image", "edit-adjacent"):
        inputs = qwen_image_21.model_inputs(config, qwen_image_21.FIXTURES[fixture], 0)
        with torch.no_grad():
            expected = model(**inputs).sample.flatten()
        row = next(r for r in summary["output_samples"]
                   if r["fixture"] == fixture and r["implementation"] == "oracle")
        assert torch.allclose(expected[row["indices"]], torch.tensor(row["values"], dtype=torch.float64),
                              rtol=0, atol=1e-12)


def test_a_planted_21_bug_fails_the_streamed_fixture_it_breaks_and_is_located_in_a_block(tmp_path):
    """Two adjacent condition images attended as one block: only the edit-adjacent fixture has them."""
    ckpt = _checkpoint(tmp_path / "ckpt")
    code, summary = _report(tmp_path, "--checkpoint", str(ckpt), "--candidate",
                            "verify.planted:adjacent_images_one_block_21")
    assert code == 1 and summary["verdict"] == "fail"
    streamed = _streamed(summary)
    failed = {name for (name, _), c in streamed.items() if not c["passed"]}
    assert failed == {"model/edit-adjacent/outputs"}
    for d in ("fp64", "fp32"):
        where = streamed[("model/edit-adjacent/outputs", d)]["first_divergence"]
        assert where and where.startswith("transformer_blocks.0.attn"), where


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_a_merged_21_checkpoint_passes_in_its_layout(tmp_path, layout):
    std = _checkpoint(tmp_path / "std")
    merged = _merged(std, tmp_path / "merged", layout)
    code, summary = _report(tmp_path, "--checkpoint", str(std), "--merged-checkpoint", str(merged),
                            "--layout", layout)
    assert code == 0, [c["message"] for c in summary["checks"] if not c["passed"]]
    weights = [c for c in summary["checks"] if c["name"].startswith("weights/split-")]
    assert len(weights) == 1 and weights[0]["passed"] and weights[0]["bit_identical"]
    assert weights[0]["name"].endswith(f"-{layout}-equals-standard")
    assert {c["name"] for c in summary["checks"] if c["name"].startswith("model/")} == STREAMED
    assert all(c["fused_calls"] == 2 for c in _streamed(summary).values())


def test_a_21_model_saved_fused_records_its_layout_and_passes(tmp_path):
    """save_pretrained of fused_21.fuse_model: config.json records qkv_merge, which --layout agrees with."""
    std = _checkpoint(tmp_path / "std", seed=1)
    model = qwen_image_21.build_model(qwen_image_21.model_config("tiny"), 1, torch.float32)
    fused_21.fuse_model(model, "interleaved").save_pretrained(tmp_path / "merged")
    code, summary = _report(tmp_path, "--checkpoint", str(std), "--merged-checkpoint", str(tmp_path / "merged"),
                            "--layout", "interleaved")
    assert code == 0 and summary["inputs"]["layout"] == "interleaved"


def test_a_tampered_weight_in_a_merged_21_checkpoint_fails_its_weight_check(tmp_path):
    std = _checkpoint(tmp_path / "std")
    # row 5 of the blocked to_qkv is a row of to_q (the first inner-width rows)
    merged = _merged(std, tmp_path / "merged", tamper=("transformer_blocks.1.attn.to_qkv.weight", 5, 3))
    code, summary = _report(tmp_path, "--checkpoint", str(std), "--merged-checkpoint", str(merged))
    assert code == 1 and summary["verdict"] == "fail"
    weights = next(c for c in summary["checks"] if c["name"].startswith("weights/split-"))
    assert not weights["passed"] and "transformer_blocks.1.attn.to_q.weight" in weights["message"]
    assert not all(c["passed"] for c in _streamed(summary).values())  # the streamed model runs on those weights


def test_config_full_on_21_streams_seeded_weights(tmp_path, monkeypatch):
    """--config full streams per-tensor seeded weights of 2.1's model (the real width swapped for a tiny one)."""
    monkeypatch.setitem(qwen_image_21.CONFIGS, "full", qwen_image_21.model_config("tiny"))
    code, summary = _report(tmp_path, "--model", V21, "--config", "full")
    assert code == 0, [c["message"] for c in summary["checks"] if not c["passed"]]
    assert summary["inputs"]["model"] == V21 and summary["inputs"]["config"] == "full"
    assert {c["name"] for c in summary["checks"] if c["name"].startswith("model/")} == STREAMED
    assert all(c["fused_calls"] == 2 for c in _streamed(summary).values())


def test_a_21_merged_checkpoint_without_the_standard_one_exits_2(tmp_path, capsys):
    merged = _merged(_checkpoint(tmp_path / "std"), tmp_path / "merged")
    code, summary = _report(tmp_path, "--merged-checkpoint", str(merged))
    assert code == 2 and summary is None
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--merged-checkpoint needs --checkpoint" in err, err


@pytest.mark.parametrize("key", ["num_layers", "in_channels", "context_in_dim"])
def test_a_config_json_without_an_argument_reads_its_default_and_a_mismatch_is_one_line(tmp_path, capsys, key):
    """diffusers loads a config.json that leaves an argument out at the class's default; where the default does not
    fit the weights (the tiny model is 2 blocks and 16 / 32 channels wide, the defaults are the real model's), one
    line naming a tensor, never a KeyError."""
    ckpt = _checkpoint(tmp_path / "std")
    config = json.loads((ckpt / "config.json").read_text())
    default = inspect.signature(qwen_image_21.MODEL_CLASS.__init__).parameters[key].default
    assert config.pop(key) != default
    (ckpt / "config.json").write_text(json.dumps(config))
    code, summary = _report(tmp_path, "--checkpoint", str(ckpt))
    err = capsys.readouterr().err.strip()
    assert code == 2 and summary is None and "\n" not in err and "Traceback" not in err, err
    assert str(ckpt) in err


def _lora(path: Path, config: dict, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """A seeded rank-4 LoRA on every 2.1 target (attention q, k, v, out and the SwiGLU's three), in diffusers' keys
    (lora_A/lora_B, no alpha: scale 1); `extra` adds tensors as they are."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    hidden = dim * config["mlp_ratio"]
    targets = {"attn.to_q": (dim, dim), "attn.to_k": (dim, dim), "attn.to_v": (dim, dim), "attn.to_out.0": (dim, dim),
               "img_mlp.proj": (hidden, dim), "img_mlp.gate_layer": (hidden, dim), "img_mlp.out": (dim, hidden)}
    g, tensors = torch.Generator().manual_seed(4), {}
    for i in range(config["num_layers"]):
        for target, (rows, cols) in targets.items():
            key = f"transformer.transformer_blocks.{i}.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, cols, generator=g) * 0.2 / cols**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, 4, generator=g) * 0.2
    save_file(tensors | (extra or {}), str(path))
    return tensors


def test_a_lora_on_a_21_checkpoint_is_streamed_onto_both_models(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    tensors = _lora(tmp_path / "lora.safetensors", config)
    code, summary = _report(tmp_path, "--checkpoint", str(ckpt), "--lora", str(tmp_path / "lora.safetensors"))
    assert code == 0, [c["message"] for c in summary["checks"] if not c["passed"]]
    assert summary["lora"]["modules_matched"] == 7 * config["num_layers"]
    assert summary["lora"]["applied_to_candidate"] == "merged layout, onto the fused projections"
    lora = {(c["name"], c["dtype"]): c for c in summary["checks"] if c["name"].startswith("lora/")
            and c["name"] != "lora/unmatched-keys"}
    assert set(lora) == {(n.replace("model/", "lora/"), d) for n in STREAMED for d in ("fp64", "fp32")}
    assert all(c["passed"] and c["fused_calls"] == config["num_layers"] for c in lora.values())
    sweep = summary["lora"]["sweep"]
    assert [r["factor"] for r in sweep][:2] == [0.0, 0.25] and sweep[-1]["oracle_rel_dev"] > 0
    # the sweep's oracle at factor 1 is diffusers' model from the folder with W + B A added by hand, in fp64
    model = QwenImage21Transformer2DModel.from_pretrained(ckpt).to(torch.float64).eval()
    inputs = qwen_image_21.model_inputs(dict(model.config), qwen_image_21.FIXTURES["text-to-image"], 0)
    with torch.no_grad():
        plain = model(**inputs).sample
        for key, A in tensors.items():
            if key.endswith("lora_A.weight"):
                B = tensors[key.replace("lora_A", "lora_B")]
                name = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                model.get_submodule(name).weight += B.double() @ A.double()
        expected = model(**inputs).sample
    row = next(r for r in sweep if r["factor"] == 1.0 and r["fixture"] == "text-to-image")
    rel_dev = float((expected - plain).norm() / plain.norm())
    assert rel_dev > 1e-3  # the LoRA moves the output: the comparison can tell
    assert abs(row["oracle_rel_dev"] - rel_dev) < 1e-10 * rel_dev, (row["oracle_rel_dev"], rel_dev)
    assert abs(row["oracle_mean"] - float(expected.mean())) < 1e-12, (row["oracle_mean"], float(expected.mean()))


def test_a_lora_key_that_lands_on_no_21_module_fails(tmp_path):
    """2.1 has no text-stream projections: a LoRA on add_q_proj lands nowhere, a failed check unless allowed."""
    ckpt = _checkpoint(tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    stray = {"transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": torch.zeros(4, dim),
             "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight": torch.zeros(dim, 4)}
    _lora(tmp_path / "lora.safetensors", config, stray)
    code, summary = _report(tmp_path, "--checkpoint", str(ckpt), "--lora", str(tmp_path / "lora.safetensors"))
    assert code == 1
    unmatched = next(c for c in summary["checks"] if c["name"] == "lora/unmatched-keys")
    assert not unmatched["passed"] and "add_q_proj" in unmatched["message"]
