"""LoRA adapter configs and what `lora-convert` writes, where the mutation run
(reports/mutation/verdicts-messages-writes.txt) left survivors in verify/files/lora_formats.py and
verify/commands/lora.py: a config that is not a LoraConfig or asks for LoRA bias, --adapter-config's scale reaching
the converted file, and that file's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from properties.files.test_lora_files import STANDARD, random_modules, write_lora
from verify.cli import main

ATTN = "transformer_blocks.0.attn."
MODULES = [ATTN + x for x in ("to_q", "to_k", "to_v", "to_out.0")]


def _lora(tmp_path: Path, rank: int = 4) -> Path:
    """A diffusers-format LoRA without alpha anywhere (no metadata, no adapter_config.json beside it)."""
    return write_lora(tmp_path / "l.safetensors", "diffusers", random_modules(STANDARD, MODULES, rank, 0))


def _config(tmp_path: Path, **config) -> Path:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("config", [{"r": 4}, {"lora_alpha": 8}])
def test_an_adapter_config_without_r_or_lora_alpha_is_refused_in_words(tmp_path, capsys, config):
    """Kills x__check_config__mutmut_2 (`not a dict and no lora_alpha`: a config without lora_alpha accepted, then a
    KeyError) and _10 (VerifyError(None))."""
    mine = _config(tmp_path, **config)
    capsys.readouterr()
    assert main(["lora-audit", str(_lora(tmp_path)), "--config", "tiny", "--adapter-config", str(mine)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qkv-verify: error: {mine}: not a PEFT LoraConfig (needs 'r' and 'lora_alpha')"]


def test_an_adapter_config_with_lora_bias_is_refused(tmp_path, capsys):
    """Kills x__check_config__mutmut_15 (config.get(None): lora_bias never seen, the bias silently dropped)."""
    mine = _config(tmp_path, r=4, lora_alpha=8, lora_bias=True)
    capsys.readouterr()
    assert main(["lora-audit", str(_lora(tmp_path)), "--config", "tiny", "--adapter-config", str(mine)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qkv-verify: error: {mine}: LoRA bias (lora_bias) is not supported (refusing a partial load)"]


def test_convert_carries_the_adapter_configs_scale_and_writes_its_metadata(tmp_path, capsys):
    """Kills x_convert_command__mutmut_18 (--adapter-config ignored: scale 1 assumed) and lora_formats'
    x_write__mutmut_13 (metadata=None: the written file says nothing of its format or where it came from).
    PEFT's scale is lora_alpha / r = 16 / 4 = 4; lora-convert writes it as alpha = 4 x each module's rank."""
    src = _lora(tmp_path)
    dst = tmp_path / "merged.safetensors"
    mine = _config(tmp_path, r=4, lora_alpha=16)
    assert main(["lora-convert", str(src), str(dst), "--to", "merged", "--config", "tiny",
                 "--adapter-config", str(mine)]) == 0
    with safe_open(str(dst), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    alphas = {k.removesuffix(".alpha"): float(t) for k, t in tensors.items() if k.endswith(".alpha")}
    assert sorted(alphas) == ["diffusion_model." + ATTN + x for x in ("to_out.0", "to_qkv")]
    for module, alpha in alphas.items():
        assert alpha / tensors[f"{module}.lora_A.weight"].shape[0] == 4.0, module
    assert metadata["format"] == "pt"
    note = json.loads(metadata["qkv_verify"])
    assert (note["source"], note["source_format"], note["layout"], note["naming"]) == (
        "l.safetensors", "diffusers", "merged", "seed")
    assert note["passed_through_unmatched"] == []
