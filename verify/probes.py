"""What a check observes inside an implementation it did not write: fused-module calls, submodule outputs, and its
parameter names mapped onto the standard model's (whatever wrapper prefix it adds, fused names split by layout)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from verify.naming import NAMINGS
from verify.state_dict import split_state_dict


@contextlib.contextmanager
def count_calls(module: nn.Module, names: tuple[str, ...]) -> Iterator[Counter]:
    """Forward calls of every submodule whose last name is in `names`, while the block runs."""
    calls: Counter = Counter()
    targets = [(n, m) for n, m in module.named_modules() if n.rsplit(".", 1)[-1] in names]
    hooks = [m.register_forward_hook(lambda *_, n=n: calls.update([n])) for n, m in targets]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def submodule_outputs(module: nn.Module) -> Iterator[dict[str, tuple[torch.Tensor, ...]]]:
    """Each named submodule's first output (its tensors), keyed by name in the order the submodules finished."""
    seen: dict[str, tuple[torch.Tensor, ...]] = {}

    def keep(name):
        def hook(_module, _args, output):
            if name not in seen:
                seen[name] = tuple(t.detach() for t in _tensors(output))
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in module.named_modules() if n]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _tensors(o)]
    if isinstance(output, Mapping):
        return [t for o in output.values() for t in _tensors(o)]  # diffusers' BaseOutput is a Mapping too
    return []


def strip_wrapper(names, known: set[str]) -> dict[str, str]:
    """name -> the longest dotted suffix of it that is in `known` (a wrapper's leading path ignored)."""
    out = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            suffix = ".".join(parts[i:])
            if suffix in known:
                out[name] = suffix
                break
    return out


def standard_parameters(named: Mapping[str, torch.Tensor], standard: set[str], layout: str,
                        head_dim: int) -> tuple[dict[str, torch.Tensor] | None, str]:
    """`named` (an implementation's parameters or their gradients) renamed onto the standard parameter names:
    a common wrapper prefix dropped, fused projections split in `layout`. (None, why) when they do not map."""
    for prefix in _prefixes(named):
        renamed = {k[len(prefix):]: v for k, v in named.items() if k.startswith(prefix)}
        if len(renamed) != len(named):
            continue
        try:
            for naming in NAMINGS:
                renamed = split_state_dict(renamed, naming, layout, head_dim)
        except Exception:  # a fused tensor that does not split in `layout`: try the next prefix, else say why
            continue
        if set(renamed) <= standard and renamed:
            return renamed, ""
    unknown = sorted(set(named) - standard)[:3]
    return None, (f"its parameters ({', '.join(unknown) or 'none'}, ...) do not map onto the standard's names "
                  f"(same names, or fused to_qkv/add_qkv_proj/to_added_qkv split as {layout}, under one prefix)")


def _prefixes(named: Mapping[str, torch.Tensor]) -> list[str]:
    """Candidate wrapper prefixes, shortest first: '' and every leading dotted path of the first name."""
    first = next(iter(named), "")
    parts = first.split(".")
    return [""] + [".".join(parts[:i]) + "." for i in range(1, len(parts))]
