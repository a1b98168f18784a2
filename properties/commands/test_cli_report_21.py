"""`qkv-verify report --checkpoint DIR` on a Qwen-Image 2.1 checkpoint: the model comes from its config.json, every
fixture of 2.1's whole-model cases is streamed block by block over the checkpoint's own weights (the oracle's values
are diffusers' from_pretrained model's), the fused path runs in every block; a planted bug fails the streamed checks
of the fixture it breaks and is located in a block; a merged checkpoint passes in its layout, and one with a tampered
weight fails its weight check naming the tensor; --config full streams seeded weights; bad combinations exit 2."""

from __future__ import annotations

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
