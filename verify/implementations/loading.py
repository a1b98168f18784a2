"""Build standard and merged models from checkpoints: structure on the meta device, then tensors one at a time."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from verify import models
from verify.errors import VerifyError
from verify.files.checkpoint import Checkpoint
from verify.files.model_config import differing_fields, is_merged, merge_recorded, model_config
from verify.implementations import fused_21
from verify.implementations.fused import fuse_model, unfuse_model
from verify.maths.naming import NAMINGS
from verify.models.qwen_image import QwenImageTransformer2DModel


def empty_model(config: dict) -> nn.Module:
    """The model's structure without weights (meta device), of the class its config is for (Qwen-Image's when it
    says none); RoPE tables, which are plain attributes, built for real."""
    cls = getattr(config, "model_class", QwenImageTransformer2DModel)
    return models.load(models.from_class_name(cls.__name__)).empty_model(config)


def fuse_any(model: nn.Module, naming: str, layout: str, processor: str | None = None) -> nn.Module:
    """fuse_model for Qwen-Image (in `naming`, run by `processor`); Qwen-Image 2.1's one stream has one naming and
    one fused processor, its reference."""
    if fused_21.attentions(model):
        return fused_21.fuse_model(model, layout)
    return fuse_model(model, naming, layout, processor)


def unfuse_any(model: nn.Module) -> nn.Module:
    """fuse_any undone, dispatched as it dispatches: Qwen-Image 2.1's attentions by fused_21, else Qwen-Image's."""
    if fused_21.attentions(model):
        return fused_21.unfuse_model(model)
    return unfuse_model(model)


def load_standard(ckpt: Checkpoint, dtype: torch.dtype = torch.float64) -> QwenImageTransformer2DModel:
    """The standard model with the checkpoint's weights, cast to `dtype`."""
    if is_merged(ckpt):
        raise VerifyError(f"{ckpt.path}: holds fused to_qkv weights; pass it as --merged-checkpoint")
    return _fill(empty_model(model_config(ckpt)), ckpt, dtype)


def build_merged(ckpt: Checkpoint, config: dict, layout: str, dtype: torch.dtype | None = torch.float64) -> nn.Module:
    """A merged model (naming detected from the keys, `layout` as told) with the checkpoint's weights."""
    model = fuse_any(empty_model(config), merged_naming(ckpt, config), layout)
    return _fill(model, ckpt, dtype)


def load_merged(path: str | Path, layout: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """The merged model saved in folder `path` (save_pretrained of a fused model, or `qkv-verify convert`): its
    config.json records the merge (`qkv_merge`: naming, layout); `layout` is needed only where it does not, and
    must agree where it does. Tensors keep their stored dtype unless `dtype` is given."""
    ckpt = Checkpoint(path)
    if not is_merged(ckpt):
        raise VerifyError(f"{path}: holds no fused to_qkv weights; load it with QwenImageTransformer2DModel")
    recorded = merge_recorded(ckpt)
    if recorded and layout and layout != recorded["layout"]:
        raise VerifyError(f"{path}/config.json records layout {recorded['layout']}, not {layout}")
    layout = layout or (recorded or {}).get("layout")
    if layout is None:
        raise VerifyError(f"{path}/config.json does not record the fused layout (qkv_merge); pass layout= "
                          "('blocked' or 'interleaved'): it is never guessed from the weights")
    return build_merged(ckpt, model_config(ckpt), layout, dtype)


def check_same_model(ckpt: Checkpoint, config: dict) -> None:
    """VerifyError when `ckpt` has a config.json describing another model than `config` (read from another
    checkpoint's config.json): both files are named, with the fields that differ."""
    if ckpt.config is None or getattr(config, "path", None) is None:
        return
    own = model_config(ckpt)
    if own.path.resolve() == config.path.resolve():
        return
    fields = differing_fields(config, own)
    if fields:
        raise VerifyError(f"{config.path} and {own.path} describe different models ({'; '.join(fields)}): the "
                          "two checkpoints are not one model in two layouts")


def check_fits(ckpt: Checkpoint, model: nn.Module, config: dict | None = None) -> None:
    """VerifyError naming the first missing, unexpected or mis-shaped tensor, from the headers alone; `config` (the
    model's) names the config.json the model was built from when that is not the checkpoint's own."""
    source = getattr(config, "path", None)
    whose = "its config" if source is None or source.parent == ckpt.path else str(source)
    expected = {k: tuple(p.shape) for k, p in model.named_parameters()}
    missing = sorted(set(expected) - set(ckpt.shapes))
    unexpected = sorted(set(ckpt.shapes) - set(expected))
    if missing or unexpected:
        what = ", ".join([f"missing {k}" for k in missing[:1]] + [f"unexpected {k}" for k in unexpected[:1]])
        raise VerifyError(f"{ckpt.path}: does not fit the model of {whose} ({what}; "
                          f"{len(missing)} missing, {len(unexpected)} unexpected)")
    for key, shape in expected.items():
        if ckpt.shapes[key] != shape:
            raise VerifyError(f"{ckpt.path}: {key} has shape {ckpt.shapes[key]}, {whose} wants {shape}")


def merged_naming(ckpt: Checkpoint, config: dict) -> str:
    """The fused naming whose merged model the checkpoint fits (every name and shape); else VerifyError naming
    what does not fit."""
    problems = {}
    check_same_model(ckpt, config)
    for naming in NAMINGS:
        try:
            check_fits(ckpt, fuse_any(empty_model(config), naming, "blocked"), config)
            return naming
        except VerifyError as e:
            problems[naming] = str(e)
    closest = min(problems.values(), key=len)
    raise VerifyError(f"fits neither fused naming ({', '.join(NAMINGS)}): {closest}")


def _fill(model: nn.Module, ckpt: Checkpoint, dtype: torch.dtype | None) -> nn.Module:
    check_fits(ckpt, model)
    state = {key: ckpt.get(key).to(dtype or ckpt.get(key).dtype) for key, _ in model.named_parameters()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
