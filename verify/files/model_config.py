"""What a checkpoint folder's config.json says: the model's constructor arguments, and the merge it records.

`model_config` reads the arguments the model's diffusers class takes (the class config.json's `_class_name` names,
from verify.models; diffusers' bookkeeping keys dropped), `differing_fields` names the ones two configs set
differently, `merge_recorded` reads `qkv_merge` (MERGE_KEY), which a merged model's config.json holds; `is_merged`
tells a merged checkpoint by its tensor names.
"""

from __future__ import annotations

import inspect

from verify import models
from verify.errors import VerifyError
from verify.files.checkpoint import Checkpoint
from verify.maths.naming import NAMINGS
from verify.maths.qkv import LAYOUTS
from verify.models.qwen_image import QwenImageTransformer2DModel

MERGE_KEY = "qkv_merge"  # config.json of a merged model: {"naming": ..., "layout": ...}



class ModelConfig(dict):
    """A model's constructor arguments, the config.json they were read from (`path`; None when built here) and the
    diffusers class they are for."""

    path = None
    model_class = QwenImageTransformer2DModel


def parameters(cls: type) -> dict[str, inspect.Parameter]:
    """A diffusers model class's constructor arguments by name."""
    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def model_class(ckpt: Checkpoint) -> type:
    """The diffusers class of a checkpoint's model: the one its config.json's `_class_name` names (verify.models),
    Qwen-Image's where it names none; an unknown class is a VerifyError."""
    return models.load(models.choose(None, {f"{ckpt.path}/config.json": ckpt.config})).MODEL_CLASS


def model_config(ckpt: Checkpoint) -> dict:
    """The model's constructor arguments from config.json (diffusers bookkeeping keys dropped, an argument it leaves
    out at the class's default, as diffusers loads it), as a ModelConfig that knows its file."""
    if ckpt.config is None:
        raise VerifyError(f"{ckpt.path}: a model needs a folder with config.json, not a single file")
    cls = model_class(ckpt)
    args = parameters(cls)
    config = ModelConfig({k: ckpt.config.get(k, p.default) for k, p in args.items()  # as diffusers' from_config:
                          if k in ckpt.config or p.default is not inspect.Parameter.empty})  # a key left out: default
    config.path, config.model_class = ckpt.path / "config.json", cls
    heads, head_dim, axes = (config.get(k, args[k].default) for k in ("num_attention_heads", "attention_head_dim",
                                                                       "axes_dims_rope"))
    if sum(axes) != head_dim:
        raise VerifyError(f"{ckpt.path}/config.json: axes_dims_rope {axes} must sum to attention_head_dim {head_dim}")
    if not (isinstance(heads, int) and heads > 0):
        raise VerifyError(f"{ckpt.path}/config.json: num_attention_heads must be a positive integer")
    return config


def is_merged(ckpt: Checkpoint) -> bool:
    return "to_qkv" in ckpt.leaf_names()


def merge_recorded(ckpt: Checkpoint) -> dict | None:
    """The merge a folder's config.json records ({'naming', 'layout'}), or None."""
    merge = (ckpt.config or {}).get(MERGE_KEY)
    if merge is None:
        return None
    if not (isinstance(merge, dict) and merge.get("layout") in LAYOUTS and merge.get("naming") in NAMINGS):
        raise VerifyError(f"{ckpt.path}/config.json: {MERGE_KEY} must be {{naming: seed|diffusers, layout: "
                          f"blocked|interleaved}}, got {merge!r}")
    return merge


def differing_fields(a: dict, b: dict) -> list[str]:
    """'name: A vs B' for each constructor argument two model configs set differently (diffusers' defaults filled
    in, lists and tuples alike)."""
    classes = [getattr(c, "model_class", QwenImageTransformer2DModel) for c in (a, b)]
    if classes[0] is not classes[1]:
        return [f"_class_name {classes[0].__name__} vs {classes[1].__name__}"]
    args = parameters(classes[0])

    def value(config: dict, key: str):
        v = config.get(key, args[key].default)
        return list(v) if isinstance(v, tuple) else v

    return [f"{k} {value(a, k)} vs {value(b, k)}" for k in sorted((set(a) | set(b)) & set(args))
            if value(a, k) != value(b, k)]
