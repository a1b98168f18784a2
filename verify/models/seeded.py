"""Seeded components, made the same way for every model: named configs with overrides, a module built under a forked
RNG from the seed, its RMSNorm weights drawn from U(0.5, 1.5) (at their initial ones, norm_q and norm_k, or a
stream's and the other's, are interchangeable and a swap would not show), cast with nn.Module.to."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.models.normalization import RMSNorm
from torch import nn


def named_config(configs: dict[str, dict], name_or_config: str | dict, **overrides) -> dict:
    """A diffusers config dict from a config name of `configs` or a dict, with overrides applied."""
    config = dict(configs[name_or_config]) if isinstance(name_or_config, str) else dict(name_or_config)
    config.update(overrides)
    return config


def seeded(make: Callable[[], nn.Module], seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    """make() under the seed, its norms randomised, in `dtype` on the CPU, in eval mode (ModelMixin.to would warn
    about fp32 modules a model lacks: nn.Module.to does not)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
    randomise_norms(module, seed)
    return nn.Module.to(module, dtype).eval()


def seeded_on(model_class: type[nn.Module], config: dict, seed: int, device: str, dtype: torch.dtype) -> nn.Module:
    """model_class(**config) with seeded weights, built in `dtype` directly on `device` (a real-size model never passes
    through fp32 or fp64, nor the CPU), its norms randomised, in eval mode."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(**config)
    finally:
        torch.set_default_dtype(default)
    randomise_norms(model, seed)
    return model.eval()


def randomise_norms(module: nn.Module, seed: int) -> None:
    """Draw every RMSNorm weight of `module` from U(0.5, 1.5), seeded."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for norm in (m for m in module.modules() if isinstance(m, RMSNorm) and m.weight is not None):
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=g, dtype=torch.float64) + 0.5)
