"""LoRA on Qwen-Image 2.1 through lora-audit, lora-convert and lora-compare: its targets (to_q, to_k, to_v, to_out.0,
the SwiGLU's proj, gate_layer, out) in the format diffusers writes, separate -> fused with delta W unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from verify.cli import main
from verify.models import qwen_image_21 as m

RANK = 4
CONFIG = m.model_config("tiny")
DIM = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
HIDDEN = CONFIG["mlp_ratio"] * DIM
TARGETS = {"attn.to_q": (DIM, DIM), "attn.to_k": (DIM, DIM), "attn.to_v": (DIM, DIM), "attn.to_out.0": (DIM, DIM),
           "img_mlp.proj": (HIDDEN, DIM), "img_mlp.gate_layer": (HIDDEN, DIM), "img_mlp.out": (DIM, HIDDEN)}


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A seeded rank-4 LoRA on every 2.1 target of the tiny config, in diffusers' keys (lora_A/lora_B)."""
    g, tensors = torch.Generator().manual_seed(0), {}
    for i in range(CONFIG["num_layers"]):
        for target, (rows, cols) in TARGETS.items():
            key = f"transformer.transformer_blocks.{i}.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, cols, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, RANK, generator=g)
    path = tmp_path_factory.mktemp("lora21") / "lora.safetensors"
    save_file(tensors, path)
    return path, tensors


def test_audit_finds_every_2_1_target(lora, tmp_path, capsys):
    path, _ = lora
    assert main(["lora-audit", str(path), "--model", "qwen-image-2.1", "--config", "tiny",
                 "--json", str(tmp_path / "a.json")]) == 0
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["modules_matched"] == CONFIG["num_layers"] * len(TARGETS) and not record["unmatched_keys"]


def test_separate_to_fused_keeps_delta_w_and_compare_proves_it(lora, tmp_path, capsys):
    path, tensors = lora
    merged = tmp_path / "merged.safetensors"
    assert main(["lora-convert", str(path), str(merged), "--to", "merged", "--model", "qwen-image-2.1",
                 "--config", "tiny"]) == 0
    fused = load_file(merged)
    for i in range(CONFIG["num_layers"]):  # delta W of to_qkv, split blocked, is each separate delta W (scale 1)
        prefix = next(k for k in fused if f"blocks.{i}.attn.to_qkv" in k).rsplit("attn.to_qkv", 1)[0] + "attn.to_qkv"
        A, B = (fused[f"{prefix}.{n}.weight"] for n in ("lora_A", "lora_B"))
        scale = float(fused[f"{prefix}.alpha"]) / A.shape[0] if f"{prefix}.alpha" in fused else 1.0
        for part, name in zip((B @ A * scale).split(DIM), ("to_q", "to_k", "to_v")):
            key = f"transformer.transformer_blocks.{i}.attn.{name}"
            expected = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
            torch.testing.assert_close(part, expected, rtol=1e-5, atol=1e-5)
    assert main(["lora-compare", str(path), str(merged), "--model", "qwen-image-2.1", "--config", "tiny"]) == 0
    assert "same delta W" in capsys.readouterr().out


def test_compare_fails_a_fused_2_1_lora_with_one_value_changed(lora, tmp_path, capsys):
    path, _ = lora
    merged = tmp_path / "merged.safetensors"
    assert main(["lora-convert", str(path), str(merged), "--to", "merged", "--model", "qwen-image-2.1",
                 "--config", "tiny"]) == 0
    fused = load_file(merged)
    key = next(k for k in sorted(fused) if "to_qkv" in k and k.endswith("lora_B.weight"))
    fused[key][-1, 0] += 1.0  # the last row: v's part of the fused update
    save_file(fused, merged)
    assert main(["lora-compare", str(path), str(merged), "--model", "qwen-image-2.1", "--config", "tiny"]) == 1
