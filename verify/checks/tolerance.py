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


# fp64's floor (atol = rtol), from measurement (reports/precision/fp64-floor*.json, `summary`): correct reorderings of
# fp64 arithmetic (SDPA or an explicit softmax, one fused GEMM or three, blocked or interleaved, DiffSynth's attention)
# land within 1.7e-15 of the oracle, 4 x 16 heads to the full 24 x 128, on the CPU and an H100; fp32 arithmetic at
# 2.4e-8 and beyond. torch's default, 1e-7, sat where fp32 arithmetic lands, so the verdict on an fp32-computing
# candidate depended on the seed; 1e-10 sits inside the gap, by 4 orders of magnitude on the fp64 side and 2 on the
# fp32 side. Rotating q and k in fp64 lands on fp32's side: diffusers' RoPE rounds them to fp32 even in fp64 runs.
FP64_FLOOR = 1e-10

# (atol, rtol) per dtype: torch.testing.assert_close's defaults, read from torch, never re-typed; fp64's measured.
FLOORS: dict[torch.dtype, tuple[float, float]] = {dtype: _floor(dtype) for dtype in DTYPES.values()}
FLOORS[torch.float64] = (FP64_FLOOR, FP64_FLOOR)

# Arithmetic precisions, finest first: the order in which `effective_precision` names the one that explains an error.
PRECISIONS = ("fp64", "fp32", "fp16", "bf16")
COARSER = "coarser than bf16"  # an error no dtype's arithmetic explains: a bug, not a precision


@dataclass(frozen=True)
class Rule:
    """How a candidate is judged.

    relative_to_base: err(cand, ref) <= factor * err(base, ref) + floor (flash-attention's rule; the merged path
    must be no worse than the standard one is anyway). allclose: err(cand, ref) <= floor. exact: bit-identical.
    """

    name: str
    factor: float = 0.0

    def bound(self, dtype: torch.dtype, base_err: float, ref: torch.Tensor) -> torch.Tensor:
        """Largest allowed |cand - ref| per element: k * max|base - ref| + atol + rtol * |ref|, with `dtype`'s floor."""
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


def floor_dtype(dtype: torch.dtype, *precisions: str | None) -> torch.dtype:
    """Whose floor judges a run in `dtype` given the precisions declared (the candidate's, the oracle's; None: none):
    the coarsest of them and `dtype` (an fp32-declared candidate's fp64 runs at fp32's floor; its fp32, bf16 and fp16
    runs as anyone's). A bound finer than what the oracle computes at would fail correct reorderings."""
    declared = [DTYPES[p] for p in precisions if p is not None]
    return max([dtype, *declared], key=lambda d: PRECISIONS.index(dtype_name(d)))


def parse_dtypes(text: str) -> list[torch.dtype]:
    """'fp64,fp32' -> [torch.float64, torch.float32]; ValueError names an unknown entry."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in DTYPES]
    if unknown or not names:
        wanted = ", ".join(DTYPES)
        raise ValueError(f"unknown dtype {', '.join(unknown) or '(none)'}; expected a comma list of {wanted}")
    return [DTYPES[n] for n in names]
