"""Model shapes for the LoRA commands and saved checkpoints, for the survivors of the second mutation run
(reports/mutation/verdicts-messages-writes.txt) in verify/checks/lora_checkpoint.py: the head size of a checkpoint
whose config.json does not give one, the names in its error messages, and the config.json it writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from verify.checks import lora_checkpoint as checkpoint
from verify.cli import main
from verify.errors import VerifyError
from verify.models import qwen_image

ATTN = "transformer_blocks.0.attn."


def test_a_checkpoint_without_attention_head_dim_splits_interleaved_updates_in_heads_of_128(tmp_path):
    """Kills x_spec_from_checkpoint__mutmut_56 (default head size 129): a config.json without attention_head_dim
    means diffusers' default, 128. A fused update of 768 rows (q, k, v of 256 rows: two heads of 128) converted to
    standard in the interleaved layout (q0 k0 v0 q1 k1 v1, 128 rows each) gives to_q rows 0-127 and 384-511."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "QwenImageTransformer2DModel", "num_layers": 1}))
    save_file({f"{ATTN}{n}.weight": torch.zeros(256, 8) for n in ("to_q", "to_k", "to_v")},
              str(folder / "diffusion_pytorch_model.safetensors"))
    B = torch.arange(768.0).reshape(768, 1)  # each row holds its own index
    src, dst = tmp_path / "fused.safetensors", tmp_path / "standard.safetensors"
    save_file({f"transformer.{ATTN}to_qkv.lora_A.weight": torch.ones(1, 8),
               f"transformer.{ATTN}to_qkv.lora_B.weight": B}, str(src))
    assert main(["lora-convert", str(src), str(dst), "--to", "standard", "--checkpoint", str(folder),
                 "--layout", "interleaved"]) == 0
    with safe_open(str(dst), framework="pt") as f:
        rows = {n: f.get_tensor(f"diffusion_model.{ATTN}{n}.lora_B.weight").flatten().tolist()
                for n in ("to_q", "to_k", "to_v")}
    for i, n in enumerate(("to_q", "to_k", "to_v")):
        head = list(range(128 * i, 128 * (i + 1)))
        assert rows[n] == [float(r) for r in head + [r + 384 for r in head]], n


def test_an_unknown_config_name_is_refused_listing_the_known_ones():
    """Kills x_spec_from_config__mutmut_8 (the names joined by 'XX, XX')."""
    with pytest.raises(VerifyError) as e:
        checkpoint.spec_from_config("huge")
    assert str(e.value) == "unknown config 'huge'; expected one of tiny, small, full"


def test_a_fused_update_that_does_not_split_in_three_is_named_by_its_first_tensor(tmp_path, capsys):
    """Kills x_spec_from_files__mutmut_35 (the message names the module's second tensor, lora_up): the error names
    the file's lora_down key, the first of the module's tensors."""
    path = tmp_path / "fused.safetensors"
    save_file({f"{ATTN}to_qkv.lora_down.weight": torch.ones(1, 64),
               f"{ATTN}to_qkv.lora_up.weight": torch.ones(64, 1)}, str(path))
    capsys.readouterr()
    assert main(["lora-convert", str(path), str(tmp_path / "out.safetensors"), "--to", "standard"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qkv-verify: error: {ATTN}to_qkv.lora_down.weight: a fused q/k/v update of 64 rows, not three equal parts"]


def test_a_saved_checkpoints_config_json_has_one_key_per_line(tmp_path):
    """Kills x_save_checkpoint__mutmut_31 (indent dropped): config.json is written as diffusers writes it, indented,
    one key per line, and holds the model's config."""
    model = qwen_image.build_model(qwen_image.model_config("tiny"), 0, dtype=torch.float32)
    folder = checkpoint.save_checkpoint(model, tmp_path / "saved")
    text = (folder / "config.json").read_text()
    config = json.loads(text)
    assert config["attention_head_dim"] == 16 and config["num_layers"] == 2
    lines = text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    assert sum(line.startswith('  "') for line in lines) == len(config)
