"""A model's component built from a diffusers folder the user gave (its config.json and its tensors, read by
verify.files.checkpoint), the same way for every model: diffusers' own from_pretrained would fill a missing tensor
with random weights and only warn, so every tensor is required here, each of its shape."""

from __future__ import annotations

import torch
from torch import nn

from verify.errors import VerifyError


def component(cls: type, config: dict, weights: dict[str, torch.Tensor]) -> nn.Module:
    """`cls` (a diffusers class) made from `config` with exactly `weights`, in fp64 and eval mode; VerifyError where
    the config names another class or does not construct it, or a tensor is missing, unexpected or mis-shaped."""
    named = config.get("_class_name")
    if named != cls.__name__:
        raise VerifyError(f"config.json names {named or 'no _class_name'}, not {cls.__name__}")
    try:
        module = cls.from_config(config)
    except (TypeError, ValueError) as e:
        raise VerifyError(f"config.json does not make a {cls.__name__} ({e})") from None
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        what = ", ".join([f"missing {k}" for k in missing[:1]] + [f"unexpected {k}" for k in unexpected[:1]])
        raise VerifyError(f"its tensors do not fit {cls.__name__} ({what}; {len(missing)} missing, "
                          f"{len(unexpected)} unexpected)")
    wrong = next((k for k, shape in expected.items() if tuple(weights[k].shape) != shape), None)
    if wrong:
        raise VerifyError(f"{wrong} has shape {tuple(weights[wrong].shape)}, {cls.__name__} wants {expected[wrong]}")
    module.load_state_dict(weights, strict=True, assign=True)  # the stored dtype kept, then widened: exact
    return nn.Module.to(module, torch.float64).eval()
