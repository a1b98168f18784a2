"""Properties of the LoRA maths: separate <-> fused conversion keeps delta W exactly; planted bugs are caught."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verify.maths import lora as algebra
from verify.maths import qkv
from verify.maths.lora import Factors

FAST = settings(deadline=None)


@st.composite
def separate_loras(draw, *, max_heads: int = 3, max_rank: int = 4):
    """(parts, shape, layout): q, k, v updates with their own ranks and scales; some parts may be missing or share A."""
    heads, head_dim = draw(st.integers(1, max_heads)), draw(st.sampled_from((2, 3, 4)))
    shape = qkv.QKVShape.equal(3 * heads * head_dim, head_dim)
    cols, layout, seed = draw(st.integers(1, 7)), draw(st.sampled_from(qkv.LAYOUTS)), draw(st.integers(0, 2**31))
    present = draw(st.lists(st.booleans(), min_size=3, max_size=3).filter(any))
    shared = draw(st.booleans())
    ranks = [draw(st.integers(1, max_rank))] * 3 if shared else draw(st.lists(st.integers(1, max_rank), min_size=3,
                                                                              max_size=3))
    scales = [draw(st.sampled_from((1.0, 0.125, 0.75, 2.0)))] * 3 if draw(st.booleans()) else \
        draw(st.lists(st.sampled_from((1.0, 0.125, 0.75, 2.0)), min_size=3, max_size=3))
    g = torch.Generator().manual_seed(seed)
    shared_A = torch.randn(ranks[0], cols, generator=g, dtype=torch.float64)
    parts = []
    for is_there, r, s in zip(present, ranks, scales):
        A = shared_A.clone() if shared else torch.randn(r, cols, generator=g, dtype=torch.float64)
        B = torch.randn(shape.q_rows, r, generator=g, dtype=torch.float64)
        parts.append(Factors(A, B, s) if is_there else None)
    return parts, shape, layout


def expected_delta(parts, shape: qkv.QKVShape, layout: str) -> torch.Tensor:
    """The fused update the separate ones imply: each part's m * B @ A in its rows, zeros where a part is missing."""
    cols = next(p for p in parts if p is not None).A.shape[1]
    deltas = [p.delta() if p is not None else torch.zeros(shape.q_rows, cols, dtype=torch.float64) for p in parts]
    return qkv.merge(*deltas, layout=layout, head_dim=shape.head_dim)


def fuse_error(fuse, parts, shape: qkv.QKVShape, layout: str) -> float:
    """max |delta W of fuse(parts) - the merged separate delta W|: the check every fuse variant must pass."""
    fused = fuse(parts, (shape.q_rows, shape.k_rows, shape.v_rows), layout, shape.head_dim)
    return float((fused.delta() - expected_delta(parts, shape, layout)).abs().max())


def split_error(split, fused: Factors, shape: qkv.QKVShape, layout: str) -> float:
    """max |merge(delta W of split parts) - delta W of the fused update|."""
    parts = split(fused, shape, layout)
    return float((expected_delta(parts, shape, layout) - fused.delta()).abs().max())


TOL = 1e-12  # fp64 rounding of O(1) sums of a few products


@FAST
@given(separate_loras())
def test_fuse_keeps_delta(case):
    parts, shape, layout = case
    assert fuse_error(algebra.fuse, parts, shape, layout) <= TOL


@FAST
@given(separate_loras())
def test_split_of_fuse_returns_the_factors(case):
    parts, shape, layout = case
    fused = algebra.fuse(parts, (shape.q_rows,) * 3, layout, shape.head_dim)
    back = algebra.split(fused, shape, layout)
    assert split_error(algebra.split, fused, shape, layout) <= TOL
    for part, got in zip(parts, back):
        assert (got is None) == (part is None), "a missing part came back, or a present one vanished"
        if part is not None and fused.scale == part.scale:
            assert torch.equal(got.A, part.A) and torch.equal(got.B, part.B), "split(fuse(x)) is not x bit for bit"


@FAST
@given(separate_loras())
def test_identical_A_stay_shared(case):
    parts, shape, layout = case
    present = [p for p in parts if p is not None]
    fused = algebra.fuse(parts, (shape.q_rows,) * 3, layout, shape.head_dim)
    same = all(torch.equal(p.A, present[0].A) for p in present)
    assert fused.rank == (present[0].rank if same else sum(p.rank for p in present))


@FAST
@given(separate_loras(), st.integers(0, 2**31))
def test_fused_lora_split_keeps_delta(case, seed):
    _, shape, layout = case
    g = torch.Generator().manual_seed(seed)
    fused = Factors(torch.randn(3, 5, generator=g, dtype=torch.float64),
                    torch.randn(shape.rows, 3, generator=g, dtype=torch.float64), 0.5)
    assert split_error(algebra.split, fused, shape, layout) <= TOL
    assert algebra.reaching_rank(fused.B, shape, layout) == {"q": 3, "k": 3, "v": 3}


@FAST
@given(separate_loras())
def test_touched_names_the_parts_present(case):
    parts, shape, layout = case
    fused = algebra.fuse(parts, (shape.q_rows,) * 3, layout, shape.head_dim)
    assert algebra.touched(fused.delta(), shape, layout) == tuple(
        name for name, p in zip(algebra.PARTS, parts) if p is not None)


# --- planted bugs: the same checks must fail ----------------------------------------------------------------------

REAL_FUSE, REAL_SPLIT = algebra.fuse, algebra.split  # the bugs wrap these, also while a test patches them in

def fuse_into_k_third(parts, rows, layout, head_dim):
    """Bug: the q update lands in the k third (and k's in q's)."""
    return REAL_FUSE([parts[1], parts[0], parts[2]], rows, layout, head_dim)


def fuse_sharing_first_A(parts, rows, layout, head_dim):
    """Bug: keeps one shared A even where the three differ."""
    present = next(p for p in parts if p is not None)
    return REAL_FUSE([p and Factors(present.A, p.B, p.scale) for p in parts], rows, layout, head_dim)


def split_in_kqv_order(fused, shape, layout):
    """Bug: B split into (k, q, v)."""
    q, k, v = REAL_SPLIT(fused, shape, layout)
    return k, q, v


def _distinct_parts(seed: int, shared: bool = False):
    g = torch.Generator().manual_seed(seed)
    shape = qkv.QKVShape.equal(3 * 2 * 4, 4)
    A = torch.randn(2, 6, generator=g, dtype=torch.float64)
    return [Factors(A.clone() if shared else torch.randn(2, 6, generator=g, dtype=torch.float64),
                    torch.randn(shape.q_rows, 2, generator=g, dtype=torch.float64), 0.5) for _ in range(3)], shape


def test_planted_q_in_k_third_is_caught():
    parts, shape = _distinct_parts(0)
    assert fuse_error(algebra.fuse, parts, shape, "blocked") <= TOL
    assert fuse_error(fuse_into_k_third, parts, shape, "blocked") > 1e-3


def test_planted_shared_A_is_caught():
    parts, shape = _distinct_parts(1)
    assert fuse_error(fuse_sharing_first_A, parts, shape, "interleaved") > 1e-3
    shared, _ = _distinct_parts(1, shared=True)  # where the A really are shared, the shortcut is right
    assert fuse_error(fuse_sharing_first_A, shared, shape, "interleaved") <= TOL


def test_planted_split_order_is_caught():
    parts, shape = _distinct_parts(2)
    fused = algebra.fuse(parts, (shape.q_rows,) * 3, "blocked", shape.head_dim)
    assert split_error(algebra.split, fused, shape, "blocked") <= TOL
    assert split_error(split_in_kqv_order, fused, shape, "blocked") > 1e-3


def test_conventions():
    assert algebra.multiplier(None, 16) == 1.0
    assert algebra.multiplier(8.0, 64) == 8.0 / 64
    assert algebra.multiplier(8.0, 64, rslora=True) == 8.0 / 8


# --- pinned by mutation testing (reports/mutation/) -------------------------------------------------------------


def test_fuse_keeps_a_common_scale_and_bakes_differing_ones_into_B():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 5, generator=g, dtype=torch.float64)
    q, k = (Factors(A, torch.randn(4, 2, generator=g, dtype=torch.float64), 0.5) for _ in range(2))
    fused = algebra.fuse([q, k, None], (4, 4, 4), "blocked", 2)
    assert fused.scale == 0.5 and torch.equal(fused.B[:4], q.B) and torch.equal(fused.B[4:8], k.B)
    assert torch.equal(fused.B[8:], torch.zeros(4, 2, dtype=torch.float64))
    mixed = algebra.fuse([q, Factors(A, k.B, 2.0), None], (4, 4, 4), "blocked", 2)
    assert mixed.scale == 1.0 and torch.equal(mixed.B[:4], q.B * 0.5) and torch.equal(mixed.B[4:8], k.B * 2.0)


def test_fuse_keeps_the_factors_dtype_where_a_part_is_missing():
    A = torch.ones(2, 3, dtype=torch.bfloat16)
    part = Factors(A, torch.ones(4, 2, dtype=torch.bfloat16), 1.0)
    for shared in (True, False):
        other = part if shared else Factors(A * 2, part.B, 1.0)
        fused = algebra.fuse([part, None, other], (4, 4, 4), "blocked", 2)
        assert fused.B.dtype == torch.bfloat16 and fused.A.dtype == torch.bfloat16, shared


def test_a_lora_pair_of_the_wrong_shape_is_refused_naming_the_models_module():
    import pytest

    from verify.errors import VerifyError
    from verify.files.lora_formats import LoraFile, Pair
    from verify.files.lora_mapping import ModelSpec, plan

    spec = ModelSpec({"blocks.0.attn.to_q": (8, 8), "blocks.0.attn.to_k": (8, 8), "blocks.0.attn.to_v": (8, 8)}, 4)
    pair = Pair("blocks.0.attn.to_q", torch.zeros(2, 6), torch.zeros(8, 2), 2.0, False, "peft", ("q.lora_A",))
    with pytest.raises(VerifyError) as caught:
        plan(LoraFile([pair], "alpha keys"), spec)
    assert str(caught.value) == ("LoRA module 'blocks.0.attn.to_q' updates a (8, 6) weight, but the model's "
                                 "blocks.0.attn.to_q is (8, 8): a LoRA for another model size?")
