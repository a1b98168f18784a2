"""Hypothesis strategies: draw small metadata (sizes, heads, flags, seeds), then build tensors from a seeded Generator.

Every strategy takes keyword-only options, checks them first, and keeps its defaults tiny so that an example runs
in milliseconds. Tensors are never drawn element by element: a strategy draws a seed and a builder makes the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from verify.checks.strategies import _positive, expensive, input_specs, model_configs, rope_axes, seeds  # noqa: F401 (shared)
from verify.maths.naming import NAMINGS
from verify.maths.qkv import LAYOUTS, QKVShape

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def layouts() -> st.SearchStrategy[str]:
    return st.sampled_from(LAYOUTS)


def namings() -> st.SearchStrategy[str]:
    return st.sampled_from(tuple(NAMINGS))


def float_dtypes(*, low_precision: bool = True) -> st.SearchStrategy[torch.dtype]:
    return st.sampled_from(FLOAT_DTYPES if low_precision else FLOAT_DTYPES[:2])


# --- q/k/v shapes and tensors -------------------------------------------------------------------------------------


@st.composite
def qkv_shapes(draw, *, max_groups: int = 4, max_q_per_group: int = 3, max_head_dim: int = 7) -> QKVShape:
    """Shapes valid in both layouts: G KV groups of head_dim rows for k and v, r q heads per group (r > 1: GQA)."""
    _positive(max_groups=max_groups, max_q_per_group=max_q_per_group, max_head_dim=max_head_dim)
    groups = draw(st.integers(1, max_groups))
    q_per_group = draw(st.integers(1, max_q_per_group))
    head_dim = draw(st.integers(1, max_head_dim))
    return QKVShape(groups * q_per_group * head_dim, groups * head_dim, groups * head_dim, head_dim)


@st.composite
def blocked_shapes(draw, *, max_rows: int = 24) -> QKVShape:
    """Any positive q, k, v row counts, all different in general: valid in the blocked layout only."""
    _positive(max_rows=max_rows)
    q, k, v = (draw(st.integers(1, max_rows)) for _ in range(3))
    return QKVShape(q, k, v, draw(st.integers(1, max_rows)))


@st.composite
def shapes_and_layouts(draw) -> tuple[QKVShape, str]:
    """A (shape, layout) pair valid together: interleaved needs the grouped shapes, blocked takes any."""
    layout = draw(layouts())
    shape = draw(qkv_shapes() if layout == "interleaved" else st.one_of(qkv_shapes(), blocked_shapes()))
    return shape, layout


@dataclass(frozen=True)
class Frame:
    """Where the fused dimension sits: the sizes of the dimensions before and after it."""

    before: tuple[int, ...]
    after: tuple[int, ...]

    @property
    def dim(self) -> int:
        return len(self.before)

    def shape(self, rows: int) -> tuple[int, ...]:
        return (*self.before, rows, *self.after)


@st.composite
def frames(draw, *, max_ndim: int = 3, max_side: int = 4) -> Frame:
    """Weights (rows, in), biases (rows,), activations (B, S, rows) and anything between: the fused dim anywhere."""
    _positive(max_ndim=max_ndim, max_side=max_side)
    ndim = draw(st.integers(1, max_ndim))
    sides = tuple(draw(st.lists(st.integers(1, max_side), min_size=ndim - 1, max_size=ndim - 1)))
    dim = draw(st.integers(0, ndim - 1))
    return Frame(sides[:dim], sides[dim:])


def random_tensor(shape: tuple[int, ...], *, seed: int, dtype: torch.dtype, specials: bool = False) -> torch.Tensor:
    """Seeded normal values; with `specials`, some entries replaced by NaN, +-Inf and -0.0 (bit patterns to keep)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    if specials and t.numel():
        values = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0], dtype=torch.float64)
        where = torch.rand(shape, generator=g) < 0.1
        pick = torch.randint(len(values), shape, generator=g)
        t = torch.where(where, values[pick], t)
    return t.to(dtype)


def qkv_tensors(shape: QKVShape, frame: Frame, *, seed: int, dtype: torch.dtype, specials: bool = False):
    """(q, k, v) with their row counts along frame.dim and the frame's other sizes."""
    return tuple(
        random_tensor(frame.shape(rows), seed=seed + i, dtype=dtype, specials=specials)
        for i, rows in enumerate((shape.q_rows, shape.k_rows, shape.v_rows))
    )
