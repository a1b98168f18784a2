"""Model shapes without weights (a named config on the meta device, or a checkpoint's headers) and checkpoint saving."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel

from verify.checkpoint import Checkpoint
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
    ckpt = Checkpoint(folder)  # validated headers, shards and index; no tensor is read
    if ckpt.config is None:
        raise VerifyError(f"{folder}: no config.json (expected a diffusers checkpoint folder)")
    targets = {key.removesuffix(".weight"): shape for key, shape in ckpt.shapes.items()
               if key.endswith(".weight") and len(shape) == 2}
    if not targets:
        raise VerifyError(f"{folder}: no 2-D weights in its safetensors files")
    return ModelSpec(targets, int(ckpt.config.get("attention_head_dim", 128)), layout)


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
