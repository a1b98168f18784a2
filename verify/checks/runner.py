"""The one runner every check runs implementations through: it builds an implementation's component from the standard
and counts its fused calls, so that the checks differ only in the inputs they feed and in how they judge outputs."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from verify.checks.probes import count_calls
from verify.errors import VerifyError
from verify.implementations.candidate import Implementation


def cast_copy(standard: nn.Module, dtype: torch.dtype, device: str) -> nn.Module:
    """A copy of `standard` in `dtype` on `device`, cast with nn.Module.to (diffusers' ModelMixin.to warns about fp32
    modules this model does not have)."""
    return nn.Module.to(copy.deepcopy(standard), device=device, dtype=dtype)


def build_component(impl: Implementation, standard: nn.Module, component: str) -> nn.Module | None:
    """impl's module for `component`; a model that impl does not provide is the standard model with every block
    built by impl (None when it provides neither)."""
    built = impl.make(copy.deepcopy(standard) if component == "model" else standard, component)
    if built is not None or component != "model":
        return built
    blocks = standard.transformer_blocks
    for i in range(len(blocks)):
        block = impl.make(blocks[i], "block")
        if block is None:
            return None
        blocks[i] = block
    return standard


def required(impl: Implementation, standard: nn.Module, component: str, role: str, why: str) -> nn.Module:
    """build_component for a check that cannot go on without it: VerifyError naming the role and why, on None."""
    built = build_component(impl, standard, component)
    if built is None:
        raise VerifyError(f"{role} {impl.spec} provides no {component!r}: {why}")
    return built


def provides(impl: Implementation, standard: nn.Module, component: str) -> bool:
    """Whether impl's build returns `component` of its own (a model it does not assemble from its blocks)."""
    return impl.make(standard, component) is not None


@contextlib.contextmanager
def counting(module: nn.Module, fused_modules: tuple[str, ...]) -> Iterator[Callable[[], int | None]]:
    """Counts the forward calls of `module`'s submodules named in `fused_modules` (the proof its fused path ran) while
    the body runs; yields a function giving the count, None for no names (an implementation declared unfused)."""
    with count_calls(module, fused_modules) as calls:
        yield lambda: sum(calls.values()) if fused_modules else None
