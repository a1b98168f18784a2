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


def choose(flag: str | None, sources: dict[str, dict | None]) -> str:
    """The model a command judges: the one the inputs' config.json files name (`sources`: what the user gave, e.g.
    "--checkpoint DIR", -> its config dict or None), else `flag`, else DEFAULT_MODEL. An input whose class is no model
    we know, inputs of two models, or a --model that contradicts them: VerifyError naming both."""
    found = {}
    for given, config in sources.items():
        class_name = (config or {}).get("_class_name")
        if class_name is None:
            continue
        name = from_class_name(class_name)
        if name is None:
            raise VerifyError(f"{given}: config.json names {class_name}, no model qkv-verify knows (it knows "
                              f"{', '.join(f'{c} ({m})' for c, m in CLASS_NAMES.items())})")
        found[given] = name
    for given, name in found.items():
        if flag is not None and name != flag:
            raise VerifyError(f"--model {flag} contradicts {given}, whose config.json names "
                              f"{_class_of(name)} ({name})")
        if name != next(iter(found.values())):
            first = next(iter(found))
            raise VerifyError(f"{given} is {name} but {first} is {found[first]}: inputs of two models")
    return next(iter(found.values()), flag or DEFAULT_MODEL)


def _class_of(name: str) -> str:
    return next(c for c, m in CLASS_NAMES.items() if m == name)


def add_model_argument(parser, what: str = "the model judged", reads_checkpoints: bool = True) -> None:
    """`--model NAME` on a command: choices from MODELS; none given means the inputs' config.json (on a command that
    reads checkpoints), else qwen-image."""
    default = f"the model a given checkpoint's config.json names, else {DEFAULT_MODEL}" if reads_checkpoints \
        else DEFAULT_MODEL
    parser.add_argument("--model", choices=list(MODELS), help=f"{what}: {' or '.join(MODELS)} (default: {default})")


def config_of(path) -> dict | None:
    """The config.json of a checkpoint folder, for choose(); None where there is none or it is not a JSON object
    (the command's own reading of the folder says what is wrong with it)."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None

