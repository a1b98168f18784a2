"""Model shapes without weights (a named config on the meta device, or a checkpoint's headers) and checkpoint saving."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel
from safetensors import safe_open

from verify.errors import VerifyError
from verify.fixtures import CONFIGS
from verify.lora import formats
from verify.lora.mapping import ModelSpec, spec_of

WEIGHTS = "diffusion_pytorch_model.safetensors"


def spec_from_config(name: str, layout: str = "blocked") -> ModelSpec:
    """The standard model of config `name` built on the meta device: names and shapes, no memory for weights."""
    if name not in CONFIGS:
        raise VerifyError(f"unknown config {name!r}; expected one of {', '.join(CONFIGS)}")
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**CONFIGS[name])
    return spec_of(model, layout)


def spec_from_checkpoint(folder: str | Path, layout: str = "blocked") -> ModelSpec:
    """Module shapes of a diffusers-layout checkpoint (standard or merged) from config.json and tensor headers only."""
    folder = Path(folder)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise VerifyError(f"{folder}: no config.json (expected a diffusers checkpoint folder)")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VerifyError(f"{folder / 'config.json'}: not JSON ({e})") from None
    targets = {}
    for shard in _shards(folder):
        formats.check_header(shard)
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                if key.endswith(".weight") and len(shape) == 2:
                    targets[key.removesuffix(".weight")] = tuple(shape)
    if not targets:
        raise VerifyError(f"{folder}: no 2-D weights in its safetensors files")
    return ModelSpec(targets, int(config.get("attention_head_dim", 128)), layout)


def _shards(folder: Path) -> list[Path]:
    for index in folder.glob("*.safetensors.index.json"):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise VerifyError(f"{index}: not a safetensors index ({e})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise VerifyError(f"{folder}: no safetensors files")
    return shards


def save_checkpoint(model: torch.nn.Module, folder: str | Path) -> Path:
    """Write `model` (standard or merged, LoRA applied or not) as config.json plus one safetensors file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    formats.write(folder / WEIGHTS, {k: v.detach() for k, v in model.state_dict().items()}, {"format": "pt"})
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(dict(model.config), f, indent=2, default=list)
    os.replace(tmp, folder / "config.json")
    return folder
