"""Where a failing implementation first leaves the bound: the first submodule, in execution order, whose output is
beyond what the output rule allows, among the submodules that reference and candidate share by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from verify.checks.probes import strip_wrapper, submodule_outputs
from verify.checks.tolerance import OUTPUTS


def leaves_bound(ref: torch.Tensor, base: torch.Tensor, cand: torch.Tensor, dtype: torch.dtype) -> bool:
    """cand beyond OUTPUTS' bound at `dtype`'s floor anywhere (relative to base's own error against ref), or
    non-finite where ref is finite; computed where the tensors live."""
    if ref.shape != cand.shape or ref.shape != base.shape:
        return True
    r, b, c = (t.detach().double() for t in (ref, base.to(ref.device), cand.to(ref.device)))
    finite = torch.isfinite(r)
    if bool((finite & ~torch.isfinite(c)).any()):
        return True
    base_err = float((b - r).abs().nan_to_num(0.0).max()) if r.numel() else 0.0
    allowed = OUTPUTS.bound(dtype, base_err, r.nan_to_num(0.0, 0.0, 0.0))
    return bool((((c - r).abs() - allowed)[finite] > 0).any())


def first_divergence(ref: nn.Module, base: nn.Module, cand: nn.Module, run: Callable[[nn.Module, torch.dtype], None],
                     dtype: torch.dtype, shared: set[str], floor: torch.dtype | None = None) -> str | None:
    """The first submodule named in `shared` (the standard component's module names; wrapper prefixes ignored)
    whose output, in the reference's execution order, leaves the bound at `floor`'s floor (default: `dtype`'s, the
    run's; a candidate declaring fp32 precision is located at fp32's); `run(module, dtype)` runs one forward."""
    ref_out = _named_outputs(ref, run, torch.float64, shared)
    base_out, cand_out = (_named_outputs(m, run, dtype, shared) for m in (base, cand))
    return _first_leaving(ref_out, base_out, cand_out, dtype, floor)


def first_divergence_saved(ref: nn.Module, base: nn.Module, cand: dict[str, tuple[torch.Tensor, ...]],
                           run: Callable[[nn.Module, torch.dtype], None], dtype: torch.dtype, shared: set[str],
                           floor: torch.dtype | None = None) -> str | None:
    """first_divergence of a candidate whose submodule outputs are given (`cand`: an engine's, saved under the
    standard's names, "name (call N)" for a later call): reference and base are run here; names the candidate does
    not give are passed over."""
    ref_out = _named_outputs(ref, run, torch.float64, shared)
    return _first_leaving(ref_out, _named_outputs(base, run, dtype, shared), cand, dtype, floor)


def _first_leaving(ref_out: dict[str, tuple], base_out: dict[str, tuple], cand_out: dict[str, tuple],
                   dtype: torch.dtype, floor: torch.dtype | None) -> str | None:
    """The first name of `ref_out` (execution order) whose candidate output leaves the bound."""
    for name, r in ref_out.items():
        b, c = base_out.get(name), cand_out.get(name)
        if b is None or c is None or not [t.shape for t in r] == [t.shape for t in b] == [t.shape for t in c]:
            continue  # absent, or laid out differently (DiffSynth's norm_q sees (B, H, S, D)): not comparable here
        if any(leaves_bound(*t, floor or dtype) for t in zip(r, b, c) if t[0].is_floating_point()):
            return name
    return None


def _named_outputs(module: nn.Module, run, dtype: torch.dtype, shared: set[str]) -> dict[str, tuple]:
    """Standard name -> a submodule's output, in the order the calls finished; a module's later calls are named
    "name (call N)"."""
    with torch.no_grad(), submodule_outputs(module) as seen:
        run(module, dtype)
    named = strip_wrapper({name for name, _ in seen}, shared)
    out: dict[str, tuple] = {}
    for (key, call), tensors in seen.items():
        if key in named:
            out.setdefault(named[key] if call == 1 else f"{named[key]} (call {call})", tensors)
    return out
