"""Tolerances in one place: per-dtype floors from torch.testing's defaults and the named rules that judge a result."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.testing._comparison import default_tolerances

DTYPES: dict[str, torch.dtype] = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def _floor(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) of torch.testing.assert_close for `dtype`, read from torch (which returns them as (rtol, atol))."""
    rtol, atol = default_tolerances(dtype)
    return atol, rtol


# (atol, rtol) per dtype, as torch.testing.assert_close uses them by default: read from torch, never re-typed.
FLOORS: dict[torch.dtype, tuple[float, float]] = {dtype: _floor(dtype) for dtype in DTYPES.values()}


@dataclass(frozen=True)
class Rule:
    """How a candidate is judged.

    relative_to_base: err(cand, ref) <= factor * err(base, ref) + floor (flash-attention's rule; the merged path
    must be no worse than the standard one is anyway). allclose: err(cand, ref) <= floor. exact: bit-identical.
    """

    name: str
    factor: float = 0.0

    def bound(self, dtype: torch.dtype, base_err: float, ref: torch.Tensor) -> torch.Tensor:
        """Largest allowed |cand - ref| per element: k * max|base - ref| + atol + rtol * |ref|."""
        if self.name == "exact":
            return torch.zeros_like(ref)
        atol, rtol = FLOORS[dtype]
        floor = atol + rtol * ref.abs()
        return self.factor * base_err + floor if self.name == "relative_to_base" else floor

    def describe(self) -> str:
        return f"{self.name}(k={self.factor:g})" if self.name == "relative_to_base" else self.name


OUTPUTS = Rule("relative_to_base", 2.0)
GRADIENTS = Rule("relative_to_base", 3.0)
ALLCLOSE = Rule("allclose")
EXACT = Rule("exact")


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def parse_dtypes(text: str) -> list[torch.dtype]:
    """'fp64,fp32' -> [torch.float64, torch.float32]; ValueError names an unknown entry."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in DTYPES]
    if unknown or not names:
        wanted = ", ".join(DTYPES)
        raise ValueError(f"unknown dtype {', '.join(unknown) or '(none)'}; expected a comma list of {wanted}")
    return [DTYPES[n] for n in names]
