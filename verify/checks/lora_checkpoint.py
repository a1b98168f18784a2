"""Model shapes without weights (a named config on the meta device, or a checkpoint's headers) and checkpoint saving."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from verify import models
from verify.errors import VerifyError
from verify.files import lora_formats as formats
from verify.files.checkpoint import Checkpoint
from verify.files.folder import write_file
from verify.files.lora_mapping import ModelSpec, other_layout, spec_of

WEIGHTS = "diffusion_pytorch_model.safetensors"


def spec_from_config(name: str, layout: str = "blocked", model: str = models.DEFAULT_MODEL) -> ModelSpec:
    """The standard `model` (verify.models) of config `name` built on the meta device: names and shapes, no memory
    for weights."""
    module = models.load(model)
    if name not in module.CONFIGS:
        raise VerifyError(f"unknown config {name!r}; expected one of {', '.join(module.CONFIGS)}")
    with torch.device("meta"):
        model = module.MODEL_CLASS(**module.CONFIGS[name])
    return spec_of(model, layout)


def spec_from_files(loras: list[formats.LoraFile], layout: str = "blocked",
                    model: str = models.DEFAULT_MODEL) -> ModelSpec:
    """The standard model the LoRA files imply, when no model is given: the full `model`'s module names (they do
    not change with its size) with the files' own shapes. A fused q/k/v splits in three equal parts and the
    q, k and v of one stream share a shape, as in every Qwen-Image; VerifyError where the files disagree."""
    if layout != "blocked":
        raise VerifyError("--layout interleaved needs the model's head size: pass --checkpoint DIR or --config NAME")
    full = spec_from_config("full", model=model)
    groups = other_layout(full)  # fused path (either naming) -> its q, k, v paths
    separate = {p: alt.separate for alt in groups.values() for p in alt.separate}
    flat = {p.replace(".", "_"): p for p in [*full.targets, *groups]}
    shapes: dict[str, tuple[tuple[int, int], str]] = {}  # standard path -> (shape, the key it comes from)
    for lora in loras:
        for pair in lora.pairs:
            path = flat.get(pair.path) if pair.flat else pair.path
            (rows, cols), key = (pair.B.shape[0], pair.A.shape[1]), pair.keys[0]
            if path in groups:
                if rows % 3:
                    raise VerifyError(f"{key}: a fused q/k/v update of {rows} rows, not three equal parts")
                targets, shape = groups[path].separate, (rows // 3, cols)
            elif path in full.targets:
                targets, shape = separate.get(path, (path,)), (rows, cols)
            else:
                continue  # matches nothing: planning lists it as unmatched
            for target in targets:
                known, where = shapes.setdefault(target, (shape, key))
                if known != shape:
                    raise VerifyError(f"{key} implies {target} of shape {shape}, {where} implies {known}: LoRAs "
                                      "for different model sizes")
    return ModelSpec({p: shape for p, (shape, _) in shapes.items()}, full.head_dim, layout)


def spec_from_checkpoint(folder: str | Path, layout: str = "blocked") -> ModelSpec:
    """Module shapes of a diffusers-layout checkpoint (standard or merged) from config.json and tensor headers only."""
    folder = Path(folder)
    if (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    ckpt = Checkpoint(folder)  # validated headers, shards and index; no tensor is read
    if ckpt.config is None:
        raise VerifyError(f"{folder}: no config.json (expected a diffusers checkpoint folder)")
    from verify.files.model_config import merge_recorded

    recorded = merge_recorded(ckpt)
    if recorded and recorded["layout"] != layout:  # a LoRA mapped in the other layout lands on the wrong rows
        raise VerifyError(f"{folder}/config.json records layout {recorded['layout']}; pass --layout "
                          f"{recorded['layout']} (it was {layout})")
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
    write_file(folder / "config.json", json.dumps(dict(model.config), indent=2, default=list).encode())
    return folder
