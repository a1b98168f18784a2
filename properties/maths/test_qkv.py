"""Properties of the q/k/v maths: merge and split are exact inverses, layouts are permutations, bad shapes refused."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.strategies import (
    blocked_shapes,
    float_dtypes,
    frames,
    layouts,
    qkv_shapes,
    qkv_tensors,
    random_tensor,
    seeds,
    shapes_and_layouts,
)
from verify.checks.compare import assert_passed, compare_exact
from verify.errors import VerifyError
from verify.maths import qkv


def _dim(frame, negative: bool) -> int:
    ndim = frame.dim + 1 + len(frame.after)
    return frame.dim - ndim if negative else frame.dim


@given(shapes_and_layouts(), frames(), seeds(), float_dtypes(), st.booleans())
def test_split_inverts_merge(shape_layout, frame, seed, dtype, negative):
    shape, layout = shape_layout
    q, k, v = qkv_tensors(shape, frame, seed=seed, dtype=dtype, specials=True)
    dim = _dim(frame, negative)
    fused = qkv.merge(q, k, v, layout, shape.head_dim, dim=dim)
    assert fused.shape == frame.shape(shape.rows)
    back = qkv.split(fused, shape, layout, dim=dim)
    assert_passed(compare_exact("split(merge(q, k, v))", "qkv", {"q": q, "k": k, "v": v}, dict(zip("qkv", back))))


@given(shapes_and_layouts(), frames(), seeds(), float_dtypes(), st.booleans())
def test_merge_inverts_split(shape_layout, frame, seed, dtype, negative):
    shape, layout = shape_layout
    fused = random_tensor(frame.shape(shape.rows), seed=seed, dtype=dtype, specials=True)
    dim = _dim(frame, negative)
    parts = qkv.split(fused, shape, layout, dim=dim)
    assert [p.shape[dim] for p in parts] == [shape.q_rows, shape.k_rows, shape.v_rows]
    again = qkv.merge(*parts, layout=layout, head_dim=shape.head_dim, dim=dim)
    assert_passed(compare_exact("merge(split(fused))", "qkv", {"fused": fused}, {"fused": again}))


@given(qkv_shapes(), frames(), seeds(), float_dtypes())
def test_layouts_match_their_definitions(shape, frame, seed, dtype):
    """Blocked is cat([q, k, v]); interleaved is Megatron's per-group reshape, written here independently."""
    q, k, v = qkv_tensors(shape, frame, seed=seed, dtype=dtype)
    d, G = frame.dim, shape.groups
    grouped = [t.movedim(d, 0).reshape(G, -1, *frame.before, *frame.after) for t in (q, k, v)]  # (G, rows/G, ...)
    interleaved = torch.cat(grouped, dim=1).flatten(0, 1).movedim(0, d)
    expected = {"blocked": torch.cat([q, k, v], dim=d), "interleaved": interleaved}
    actual = {layout: qkv.merge(q, k, v, layout, shape.head_dim, dim=d) for layout in qkv.LAYOUTS}
    assert_passed(compare_exact("layout definitions", "qkv", expected, actual))


@given(qkv_shapes(), frames(), seeds(), float_dtypes())
def test_interleaved_rows_are_each_groups_q_heads_then_its_k_and_v(shape, frame, seed, dtype):
    """Row by row, for every KV group g: its q heads (r of them, r = q heads per group), then k head g, then v head
    g; q is asserted like k and v, and split gives each group's q, k and v rows back."""
    q, k, v = qkv_tensors(shape, frame, seed=seed, dtype=dtype)
    d, hd, G = frame.dim, shape.head_dim, shape.groups
    r = shape.q_rows // hd // G
    fused = qkv.merge(q, k, v, "interleaved", hd, dim=d)
    expected, actual = {}, {}
    for g in range(G):
        start = g * (r + 2) * hd  # the group's first row in the fused tensor
        rows = [(f"q head {g * r + j}", q, g * r + j) for j in range(r)] + [("k", k, g), ("v", v, g)]
        for i, (what, source, head) in enumerate(rows):  # (name, source tensor, its head taken here)
            expected[f"group {g}: {what}"] = source.narrow(d, head * hd, hd)
            actual[f"group {g}: {what}"] = fused.narrow(d, start + i * hd, hd)
    assert fused.shape[d] == G * (r + 2) * hd == shape.rows
    assert_passed(compare_exact("interleaved rows", "qkv", expected, actual))
    parts = dict(zip("qkv", qkv.split(fused, shape, "interleaved", dim=d)))
    assert_passed(compare_exact("interleaved split", "qkv", {"q": q, "k": k, "v": v}, parts))


@given(qkv_shapes(), layouts(), layouts(), frames(), seeds())
def test_layout_conversion_is_a_permutation(shape, src, dst, frame, seed):
    p = qkv.layout_permutation(shape, src, dst)
    rows = torch.arange(shape.rows)
    assert torch.equal(p.sort().values, rows), f"{src}->{dst} of {shape} is not a permutation: {p.tolist()}"
    back = qkv.layout_permutation(shape, dst, src)
    assert torch.equal(p[back], rows), f"{dst}->{src} is not the inverse of {src}->{dst} for {shape}"
    # identity exactly when nothing changes: same layout, or a single KV group (interleaved == blocked)
    assert torch.equal(p, rows) == (src == dst or shape.groups == 1)
    fused = random_tensor(frame.shape(shape.rows), seed=seed, dtype=torch.float64, specials=True)
    converted = qkv.convert_layout(fused, shape, src, dst, dim=frame.dim)
    expected = fused.index_select(frame.dim, p)
    assert_passed(compare_exact(f"convert_layout {src}->{dst}", "qkv", {"fused": expected}, {"fused": converted}))


@given(shapes_and_layouts(), frames(max_ndim=3), st.data())
def test_merge_refuses_mismatched_other_dims(shape_layout, frame, data):
    shape, layout = shape_layout
    if not frame.before and not frame.after:
        frame = type(frame)((), (2,))
    q, k, v = qkv_tensors(shape, frame, seed=0, dtype=torch.float32)
    other = [i for i in range(q.dim()) if i != frame.dim]
    i = data.draw(st.sampled_from(other), label="mismatched dim")
    which = data.draw(st.sampled_from("kv"), label="tensor")
    grown = list(frame.shape({"k": shape.k_rows, "v": shape.v_rows}[which]))
    grown[i] += 1
    k, v = (torch.zeros(grown) if which == "k" else k), (torch.zeros(grown) if which == "v" else v)
    with pytest.raises(VerifyError) as info:
        qkv.merge(q, k, v, layout, shape.head_dim, dim=frame.dim)
    for t in (q, k, v):
        assert str(tuple(t.shape)) in str(info.value)


@given(shapes_and_layouts(), st.integers(-5, 5).filter(bool))
def test_split_refuses_wrong_row_count(shape_layout, delta):
    shape, layout = shape_layout
    rows = max(1, shape.rows + delta)
    if rows == shape.rows:
        rows += 1
    with pytest.raises(VerifyError) as info:
        qkv.split(torch.zeros(rows, 2), shape, layout)
    assert f"{rows} rows" in str(info.value) and f"= {shape.rows}" in str(info.value)


@given(blocked_shapes(max_rows=12))
def test_interleaved_check_follows_its_definition(shape):
    """Interleaved needs k == v rows, q and k in whole heads, and the q heads split evenly over the KV groups."""
    q, k, v, hd = shape.q_rows, shape.k_rows, shape.v_rows, shape.head_dim
    shape.check("blocked")
    if k != v:
        expected = [f"k={k}", f"v={v}"]
    elif q % hd:
        expected = [f"{q} rows", f"head_dim {hd}"]
    elif k % hd:
        expected = [f"{k} rows", f"head_dim {hd}"]
    elif (q // hd) % (k // hd):
        expected = [f"{q // hd} q heads", f"{k // hd} KV groups"]
    else:
        shape.check("interleaved")
        return
    for attempt in (lambda: shape.check("interleaved"),
                    lambda: qkv.merge(torch.zeros(q, 1), torch.zeros(k, 1), torch.zeros(v, 1), "interleaved", hd)):
        with pytest.raises(VerifyError) as info:
            attempt()
        assert all(part in str(info.value) for part in expected), f"{info.value} does not name {expected}"


@given(st.integers(1, 300))
def test_equal_shape_needs_three_equal_parts(rows):
    if rows % 3:
        with pytest.raises(VerifyError, match=f"{rows} rows"):
            qkv.QKVShape.equal(rows, 1)
    else:
        assert qkv.QKVShape.equal(rows, 1).parts("blocked") == [rows // 3] * 3


@given(st.text(min_size=1, max_size=12).filter(lambda s: s not in qkv.LAYOUTS), qkv_shapes())
def test_unknown_layout_is_refused(layout, shape):
    with pytest.raises(VerifyError, match="unknown layout"):
        shape.check(layout)


@given(st.integers(-3, 0), st.sampled_from(["q_rows", "k_rows", "v_rows", "head_dim"]), layouts())
def test_non_positive_sizes_are_refused(size, field, layout):
    sizes = {**dict(q_rows=4, k_rows=4, v_rows=4, head_dim=2), field: size}
    with pytest.raises(VerifyError, match="positive"):
        qkv.QKVShape(**sizes).check(layout)


def test_blocked_split_returns_views_of_the_fused_tensor():
    """split's contract: (q, k, v) views. Blocked rows are contiguous runs, no copy is made (interleaved cats)."""
    fused = torch.arange(24.0).reshape(12, 2)
    q, k, v = qkv.split(fused, qkv.QKVShape.equal(12, 2), "blocked")
    assert [t.data_ptr() for t in (q, k, v)] == [fused[0].data_ptr(), fused[4].data_ptr(), fused[8].data_ptr()]
