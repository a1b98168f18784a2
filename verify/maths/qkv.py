"""Merge and split of q/k/v projections in the blocked and interleaved-per-head layouts (pure tensor maths).

A fused tensor stacks the q, k and v rows along one dimension (dim 0 for weights and biases, the last dimension
for activations). *Blocked*: all q rows, then all k rows, then all v rows (diffusers' fuse_projections,
nunchaku). *Interleaved*: for each KV group (each head, without GQA), that group's q rows, then its k rows, then
its v rows (Megatron / GPT-NeoX). Both are permutations of the same rows, so every function here is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from verify.errors import VerifyError
from verify.maths.naming import LAYOUTS  # defined torch-free there; verify.maths.qkv.LAYOUTS as before


@dataclass(frozen=True)
class QKVShape:
    """Row counts of q, k and v and the head size; k and v with fewer heads than q is GQA."""

    q_rows: int
    k_rows: int
    v_rows: int
    head_dim: int

    @classmethod
    def equal(cls, rows: int, head_dim: int) -> QKVShape:
        """Shape of a fused tensor of `rows` rows that splits into three equal parts."""
        if rows % 3:
            raise VerifyError(f"fused tensor has {rows} rows, not divisible into equal q, k, v")
        return cls(rows // 3, rows // 3, rows // 3, head_dim)

    @property
    def rows(self) -> int:
        return self.q_rows + self.k_rows + self.v_rows

    @property
    def groups(self) -> int:
        """Number of KV groups: the unit the interleaved layout repeats."""
        return self.k_rows // self.head_dim

    def check(self, layout: str) -> None:
        """Raise VerifyError if these sizes cannot be laid out in `layout`."""
        if layout not in LAYOUTS:
            raise VerifyError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
        if min(self.q_rows, self.k_rows, self.v_rows, self.head_dim) <= 0:
            raise VerifyError(f"q/k/v rows and head_dim must be positive, got {self}")
        if layout == "blocked":
            return
        if self.k_rows != self.v_rows:
            raise VerifyError(f"interleaved layout needs as many k rows as v rows, got k={self.k_rows} v={self.v_rows}")
        for name, rows in (("q", self.q_rows), ("k", self.k_rows)):
            if rows % self.head_dim:
                raise VerifyError(f"{name} has {rows} rows, not a multiple of head_dim {self.head_dim}")
        if (self.q_rows // self.head_dim) % self.groups:
            raise VerifyError(
                f"{self.q_rows // self.head_dim} q heads do not divide into {self.groups} KV groups"
            )

    def parts(self, layout: str) -> list[int]:
        """Row counts of the consecutive pieces of a fused tensor in `layout`."""
        if layout == "blocked":
            return [self.q_rows, self.k_rows, self.v_rows]
        return [self.q_rows // self.groups, self.head_dim, self.head_dim] * self.groups


def merge(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str, head_dim: int, dim: int = 0) -> torch.Tensor:
    """Fuse q, k and v along `dim` in `layout`."""
    shape = QKVShape(q.shape[dim], k.shape[dim], v.shape[dim], head_dim)
    shape.check(layout)
    _check_other_dims(q, k, v, dim)
    if layout == "blocked":
        return torch.cat([q, k, v], dim=dim)
    g = shape.groups
    pieces = zip(q.chunk(g, dim), k.chunk(g, dim), v.chunk(g, dim))
    return torch.cat([t for group in pieces for t in group], dim=dim)


def split(fused: torch.Tensor, shape: QKVShape, layout: str, dim: int = 0) -> tuple[torch.Tensor, ...]:
    """Inverse of merge: the (q, k, v) views of a fused tensor."""
    shape.check(layout)
    if fused.shape[dim] != shape.rows:
        raise VerifyError(
            f"fused tensor has {fused.shape[dim]} rows along dim {dim}, but q+k+v = "
            f"{shape.q_rows}+{shape.k_rows}+{shape.v_rows} = {shape.rows}"
        )
    pieces = fused.split(shape.parts(layout), dim=dim)
    if layout == "blocked":
        return tuple(pieces)
    return tuple(torch.cat(pieces[i::3], dim=dim) for i in range(3))


def convert_layout(fused: torch.Tensor, shape: QKVShape, src: str, dst: str, dim: int = 0) -> torch.Tensor:
    """Re-lay a fused tensor from layout `src` to layout `dst` (a row permutation)."""
    return merge(*split(fused, shape, src, dim), layout=dst, head_dim=shape.head_dim, dim=dim)


def layout_permutation(shape: QKVShape, src: str, dst: str) -> torch.Tensor:
    """Row indices p such that fused_dst = fused_src[p]."""
    rows = torch.arange(shape.rows)
    return convert_layout(rows, shape, src, dst)


def _check_other_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dim: int) -> None:
    def rest(t: torch.Tensor) -> tuple[int, ...]:
        return tuple(s for i, s in enumerate(t.shape) if i != dim % t.dim())

    if not (q.dim() == k.dim() == v.dim()) or not (rest(q) == rest(k) == rest(v)):
        raise VerifyError(
            f"q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} differ outside dim {dim}"
        )
