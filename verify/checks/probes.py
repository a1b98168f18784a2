"""What a check observes inside an implementation it did not write: fused-module calls, submodule outputs, and its
parameter names mapped onto the standard model's (whatever wrapper prefix it adds, fused names split by layout)."""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from verify.maths.naming import NAMINGS
from verify.maths.state_dict import split_state_dict


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


def graph_calls(graph: torch.fx.GraphModule, names: tuple[str, ...]) -> int:
    """Calls of every submodule whose last name is in `names` in a graph dynamo captured: torch.compile runs the
    graph, not the modules' forwards (hooks attached after compilation never fire; attached before, they are traced
    and guard on the count they read), so under compile the calls are counted where the graph records them, in its
    nodes' module stacks (a module called twice has two entries)."""
    calls = set()
    for node in graph.graph.nodes:
        if node.op == "placeholder":
            continue
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            if re.split(r"[.\[\]']+", path.strip(".[]'"))[-1] in names:
                calls.add(key)
    return len(calls)


@contextlib.contextmanager
def submodule_outputs(module: nn.Module) -> Iterator[dict[tuple[str, int], tuple[torch.Tensor, ...]]]:
    """Every output (its tensors) of each named submodule, keyed by (name, call number from 1) in the order the
    calls finished: a module called on several steps (a KV cache's prefill, then its decode) is seen on each."""
    seen: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}
    calls: dict[str, int] = {}

    def keep(name):
        def hook(_module, _args, output):
            calls[name] = calls.get(name, 0) + 1
            seen[(name, calls[name])] = tuple(t.detach() for t in _tensors(output))
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
    """name -> the name in `known` it becomes once one wrapper's path (one run of dotted parts: a leading prefix
    or an adapter's attribute inside) is dropped, the shortest drop first; names that match nothing are left out."""
    out = {}
    for name in names:
        parts = name.split(".")
        drops = sorted(((i, j) for i in range(len(parts)) for j in range(i, len(parts))), key=lambda d: d[1] - d[0])
        for i, j in drops:
            candidate = ".".join(parts[:i] + parts[j:])
            if candidate in known:
                out[name] = candidate
                break
    return out


def standard_parameters(named: Mapping[str, torch.Tensor], standard: set[str], layout: str,
                        head_dim: int) -> tuple[dict[str, torch.Tensor] | None, str]:
    """`named` (an implementation's parameters or their gradients) renamed onto the standard parameter names:
    fused projections split in `layout`, a wrapper's path dropped. (None, why) when they do not map one to one."""
    try:
        split = dict(named)
        for naming in NAMINGS:
            split = split_state_dict(split, naming, layout, head_dim)
    except Exception as e:  # a fused tensor that does not split: say why rather than guess
        return None, f"its fused parameters do not split as {layout}: {e}"
    renamed = strip_wrapper(split, standard)
    unmapped = sorted(set(split) - set(renamed))
    if unmapped or len(set(renamed.values())) != len(renamed) or not renamed:
        shown = ", ".join(unmapped[:3]) or "several onto one name"
        return None, (f"its parameters ({shown}) do not map onto the standard's names (same names, or fused "
                      f"to_qkv/add_qkv_proj/to_added_qkv split as {layout}, under a wrapper's path)")
    return {renamed[k]: v for k, v in split.items()}, ""
