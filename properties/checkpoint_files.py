"""Test helpers that write small checkpoints as users have them: diffusers folders, sharded, standard or merged."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from verify.maths.state_dict import merge_state_dict
from verify.models import qwen_image


def standard_checkpoint(path: Path, seed: int = 0, shard_size: str = "40KB", **overrides) -> Path:
    """A tiny seeded model saved by diffusers itself (sharded with an index when shard_size is small)."""
    config = qwen_image.model_config("tiny", **overrides)
    model = qwen_image.build_model(config, seed, dtype=torch.float32)
    model.save_pretrained(path, max_shard_size=shard_size)
    return path


def merged_checkpoint(src: Path, dst: Path, naming: str = "seed", layout: str = "blocked",
                      mutate: Callable[[dict], dict] | None = None) -> Path:
    """The standard checkpoint at `src` fused into `dst` (config.json + one safetensors file); `mutate` edits it."""
    config = json.loads((src / "config.json").read_text())
    sd = {}
    for shard in sorted(src.glob("*.safetensors")):
        sd.update(load_file(shard))
    merged = merge_state_dict(sd, naming, layout, config["attention_head_dim"])
    if mutate:
        merged = mutate(merged)
    dst.mkdir(parents=True)
    (dst / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in merged.items()}, str(dst / "diffusion_pytorch_model.safetensors"))
    return dst
