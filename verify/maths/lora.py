"""LoRA maths, free of files and models: the update m * (B @ A), scale conventions, separate <-> fused conversion."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from verify.maths import qkv

PARTS = ("q", "k", "v")


def multiplier(alpha: float | None, rank: int, rslora: bool = False) -> float:
    """The m of W += m * (B @ A) a convention implies: alpha / r, rsLoRA alpha / sqrt(r); no alpha means 1."""
    if alpha is None:
        return 1.0
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclass(frozen=True)
class Factors:
    """One low-rank update m * (B @ A) of a weight W (out, in)."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float  # m

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """m * (B @ A) computed in `dtype`: (out, in)."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


def fuse(parts: Sequence[Factors | None], rows: Sequence[int], layout: str, head_dim: int) -> Factors:
    """Separate q, k, v updates as one update of the fused projection, exactly; a missing part is zeros.

    Identical A keep one shared A and stack the B by rows; otherwise A is stacked (rank r_q + r_k + r_v) and B is
    block-diagonal. Parts with different scales have their scale baked into B (the fused scale is then 1).
    """
    present = [p for p in parts if p is not None]
    scale = present[0].scale if all(p.scale == present[0].scale for p in present) else 1.0
    Bs = [None if p is None else (p.B if p.scale == scale else p.B * p.scale) for p in parts]
    dtype = present[0].B.dtype
    if all(p.A.shape == present[0].A.shape and torch.equal(p.A, present[0].A) for p in present):
        A, r = present[0].A, present[0].rank
        blocks = [B if B is not None else torch.zeros(n, r, dtype=dtype) for B, n in zip(Bs, rows)]
    else:
        A = torch.cat([p.A for p in present])
        r, start, blocks = A.shape[0], 0, []
        for B, n in zip(Bs, rows):
            block = torch.zeros(n, r, dtype=dtype)
            if B is not None:
                block[:, start : start + B.shape[1]] = B
                start += B.shape[1]
            blocks.append(block)
    return Factors(A, qkv.merge(*blocks, layout=layout, head_dim=head_dim), scale)


def split(fused: Factors, shape: qkv.QKVShape, layout: str) -> tuple[Factors | None, ...]:
    """A fused update as three updates of q, k, v, exactly: A copied, B split by rows.

    Rank columns a part never uses (all-zero columns of its B) are dropped, and a part with no non-zero column is
    None (no update), so split inverts fuse: the original factors come back, a missing part stays missing.
    """
    out = []
    for B in qkv.split(fused.B, shape, layout):
        used = B.ne(0).any(dim=0).nonzero().squeeze(1)  # index_select: boolean masks are slow on the CPU
        out.append(Factors(fused.A.index_select(0, used), B.index_select(1, used), fused.scale) if len(used) else None)
    return tuple(out)


def touched(delta: torch.Tensor, shape: qkv.QKVShape, layout: str) -> tuple[str, ...]:
    """Which of the q, k, v parts of a fused weight's update are non-zero."""
    return tuple(name for name, d in zip(PARTS, qkv.split(delta, shape, layout)) if d.ne(0).any())


def reaching_rank(B: torch.Tensor, shape: qkv.QKVShape, layout: str) -> dict[str, int]:
    """Rank budget reaching q, k and v from a fused update's B: the rank columns each part uses (structural)."""
    return {name: int(b.ne(0).any(dim=0).sum()) for name, b in zip(PARTS, qkv.split(B, shape, layout))}
