"""The models qkv-verify knows, one module each: everything that knows an architecture lives in its module (diffusers'
classes, configs, fixtures and their inputs, the equivalence cases). This registry is torch-free: the command line's
choices come from here, and a model's module is imported only when a check needs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from verify.errors import VerifyError

# --model name -> the module that holds the model, and the diffusers class a checkpoint's config.json names
MODELS: dict[str, str] = {
    "qwen-image": "verify.models.qwen_image",
    "qwen-image-2.1": "verify.models.qwen_image_21",
}
CLASS_NAMES: dict[str, str] = {
    "QwenImageTransformer2DModel": "qwen-image",
    "QwenImage21Transformer2DModel": "qwen-image-2.1",
}
DEFAULT_MODEL = "qwen-image"


def load(name: str) -> ModuleType:
    """The module of the model `name`, or VerifyError naming the models there are."""
    if name not in MODELS:
        raise VerifyError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return importlib.import_module(MODELS[name])


def from_class_name(class_name: str | None) -> str | None:
    """The model whose diffusers class a config.json's `_class_name` names (None when it names none we know)."""
    return CLASS_NAMES.get(class_name or "")
