"""What a checkpoint folder's config.json says: the model's constructor arguments, and the merge it records.

`model_config` reads the arguments QwenImageTransformer2DModel takes (diffusers' bookkeeping keys dropped),
`differing_fields` names the ones two configs set differently, `merge_recorded` reads `qkv_merge` (MERGE_KEY),
which a merged model's config.json holds; `is_merged` tells a merged checkpoint by its tensor names.
"""

from __future__ import annotations

import inspect

from verify.errors import VerifyError
from verify.files.checkpoint import Checkpoint
from verify.maths.naming import NAMINGS
from verify.maths.qkv import LAYOUTS
from verify.models.qwen_image import QwenImageTransformer2DModel

MERGE_KEY = "qkv_merge"  # config.json of a merged model: {"naming": ..., "layout": ...}

_PARAMETERS = inspect.signature(QwenImageTransformer2DModel.__init__).parameters
_ARGS = set(_PARAMETERS) - {"self"}


class ModelConfig(dict):
    """A model's constructor arguments, and the config.json they were read from (`path`; None when built here)."""

    path = None


def model_config(ckpt: Checkpoint) -> dict:
    """The model's constructor arguments from config.json (diffusers bookkeeping keys dropped), as a ModelConfig
    that knows its file."""
    if ckpt.config is None:
        raise VerifyError(f"{ckpt.path}: a model needs a folder with config.json, not a single file")
    config = ModelConfig({k: v for k, v in ckpt.config.items() if k in _ARGS})
    config.path = ckpt.path / "config.json"
    heads, head_dim = config.get("num_attention_heads", 24), config.get("attention_head_dim", 128)
    axes = config.get("axes_dims_rope", (16, 56, 56))
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
    def value(config: dict, key: str):
        v = config.get(key, _PARAMETERS[key].default)
        return list(v) if isinstance(v, tuple) else v

    return [f"{k} {value(a, k)} vs {value(b, k)}" for k in sorted((set(a) | set(b)) & _ARGS)
            if value(a, k) != value(b, k)]
