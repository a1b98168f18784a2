"""Properties of the comparisons: the exact one every round trip relies on passes equal bits and rejects one changed
bit; `compare` fails any NaN or Inf in the candidate, the standard model or the oracle, and counts it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.strategies import float_dtypes, frames, random_tensor, seeds
from verify.compare import assert_failed, assert_passed, compare, compare_exact
from verify.tolerance import ALLCLOSE, EXACT, GRADIENTS, OUTPUTS

RULES = (OUTPUTS, GRADIENTS, ALLCLOSE, EXACT)
NON_FINITE = (float("nan"), float("inf"), float("-inf"))
SAME_SIZE_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
                 torch.float16: torch.int16}


@given(frames(), float_dtypes(), seeds(), st.booleans(), st.data())
def test_compare_exact_sees_one_changed_element(frame, dtype, seed, transpose, data):
    t = random_tensor(frame.shape(3), seed=seed, dtype=dtype, specials=True)
    t = t.transpose(0, -1) if transpose else t  # non-contiguous when ndim > 1
    assert_passed(compare_exact("same", "compare", {"t": t}, {"t": t.clone()}))
    changed = t.clone().reshape(-1)
    i = data.draw(st.integers(0, changed.numel() - 1), label="element")
    bits = changed.view(SAME_SIZE_INT[dtype])
    bits[i] ^= torch.iinfo(bits.dtype).min  # flip the sign bit: also tells 0.0 from -0.0 and one NaN from another
    record = compare_exact("changed", "compare", {"t": t}, {"t": changed.reshape(t.shape)})
    assert_failed(record)
    assert record.message.startswith("first differing tensor: t:")


@given(float_dtypes(), seeds())
def test_compare_exact_takes_zero_dim_tensors(dtype, seed):
    t = random_tensor((), seed=seed, dtype=dtype)
    assert_passed(compare_exact("scalar", "compare", {"t": t}, {"t": t.clone()}))
    assert_failed(compare_exact("scalar", "compare", {"t": t}, {"t": t + 1}))


@given(seeds())
def test_compare_exact_rejects_missing_and_reshaped_tensors(seed):
    t = random_tensor((2, 3), seed=seed, dtype=torch.float32)
    assert_failed(compare_exact("missing", "compare", {"a": t, "b": t}, {"a": t}))
    assert_failed(compare_exact("extra", "compare", {"a": t}, {"a": t, "b": t}))
    assert_failed(compare_exact("reshaped", "compare", {"a": t}, {"a": t.reshape(3, 2)}))
    assert_failed(compare_exact("recast", "compare", {"a": t}, {"a": t.double()}))


def _judged(tensors: dict[str, torch.Tensor], rule, dtype: torch.dtype):
    """compare() of tensors["cand"] against tensors["ref"], with tensors["base"] as the standard model."""
    return compare("nonfinite", "compare", {"t": tensors["ref"]}, {"t": tensors["cand"]}, rule, dtype, "cpu",
                   base={"t": tensors["base"]})


@given(frames(), float_dtypes(), seeds(), st.sampled_from(("cand", "base", "ref")), st.sampled_from(NON_FINITE),
       st.sampled_from(RULES), st.data())
def test_one_nan_or_inf_anywhere_fails_and_is_counted(frame, dtype, seed, side, value, rule, data):
    """Finite equal data passes every rule; one NaN or Inf in the candidate, the standard model or the oracle fails
    it, whatever the rule's bound (a NaN base error makes the relative bound NaN, an Inf one makes it Inf)."""
    cand = random_tensor(frame.shape(3), seed=seed, dtype=dtype)
    tensors = {"ref": cand.double(), "base": cand.clone(), "cand": cand.clone()}
    record = _judged(tensors, rule, dtype)
    assert record.passed and record.nonfinite == 0 and "NaN" not in record.message, record.message
    i = data.draw(st.integers(0, cand.numel() - 1), label="element")
    tensors[side].view(-1)[i] = value
    record = _judged(tensors, rule, dtype)
    assert not record.passed, f"{value} in {side} passed {rule.describe()}: {record.message}"
    assert record.nonfinite == 1 and "1 NaN/Inf elements" in record.message, record.message
    if side != "base":  # the element itself is a mismatch, as torch.testing counts it
        assert record.mismatched >= 1, record.message


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.describe())
def test_nan_is_never_equal_to_nan(rule):
    """The same NaNs in oracle, standard and candidate still fail (torch.testing's default, equal_nan=False), and an
    all-NaN output (a model that produced nothing but NaN) fails with every element counted."""
    ref = torch.tensor([0.5, float("nan"), -1.0], dtype=torch.float64)
    record = _judged({"ref": ref, "base": ref.float(), "cand": ref.float()}, rule, torch.float32)
    assert not record.passed and record.nonfinite == 3 and "3 NaN/Inf elements" in record.message, record.message
    nan = torch.full((2, 4), float("nan"))
    record = _judged({"ref": torch.ones(2, 4, dtype=torch.float64), "base": torch.ones(2, 4), "cand": nan}, rule,
                     torch.float32)
    assert not record.passed and record.nonfinite == 8 and "8 NaN/Inf elements" in record.message, record.message
    assert record.mismatched == 8, "every NaN element is a mismatch"
