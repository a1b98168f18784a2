"""Properties of the comparisons: the exact one every round trip relies on passes equal bits and rejects one changed
bit; `compare` fails any NaN or Inf in the candidate, the standard model or the oracle, and counts it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.strategies import float_dtypes, frames, random_tensor, seeds
from verify.checks.compare import assert_failed, assert_passed, compare, compare_exact
from verify.checks.tolerance import ALLCLOSE, EXACT, GRADIENTS, OUTPUTS

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


# --- every field of the records, pinned (mutation testing: reports/mutation/) --------------------------------------


def test_compare_exact_records_say_what_differs():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ok = compare_exact("w", "weights", {"a": a, "b": a[:2]}, {"a": a.clone(), "b": a[:2].clone()})
    assert (ok.passed, ok.dtype, ok.rule, ok.message) == (True, "fp32", "exact", "2 tensors bit-identical")
    assert (ok.max_abs_err, ok.rel_l2_err, ok.cosine, ok.numel, ok.bit_identical) == (0.0, 0.0, 1.0, 6, True)
    changed = a.clone()
    changed[1] = 2.5
    bad = compare_exact("w", "weights", {"a": a}, {"a": changed})
    assert (bad.passed, bad.dtype, bad.rule, bad.bit_identical) == (False, "fp32", "exact", False)
    assert bad.message == "first differing tensor: a: 1 of 16 bytes differ, max abs difference 0.5"
    ints = torch.tensor([1, 2], dtype=torch.int32)
    assert compare_exact("i", "w", {"i": ints}, {"i": ints + 1}).message == \
        "first differing tensor: i: 2 of 8 bytes differ", "no difference in value for integers"
    assert compare_exact("w", "w", {"a": a}, {}).message == "first differing tensor: a missing from actual"
    assert compare_exact("w", "w", {}, {"a": a}).message == "first differing tensor: a missing from expected"
    assert compare_exact("w", "w", {"a": a.double()}, {"a": a.double()}).dtype == "fp64"


def test_compare_with_tensors_on_one_side_only_fails_naming_them():
    t = torch.zeros(3, dtype=torch.float64)
    record = compare("m", "model", {"x": t, "y": t}, {"x": t}, OUTPUTS, torch.float32, "cpu", base={"x": t, "y": t},
                     fused_calls=2)
    assert record.passed is False and record.rule == "relative_to_base(k=2)" and record.fused_calls == 2
    assert record.message == "tensors present on one side only: ['y']"
    assert (record.name, record.component, record.dtype, record.device) == ("m", "model", "fp32", "cpu")


def test_record_to_dict_adds_the_mismatched_fraction_and_nulls_non_finite_numbers():
    ref = torch.zeros(4, dtype=torch.float64)
    cand = torch.tensor([0.0, 1.0, 0.0, 0.0])
    d = compare("m", "model", {"x": ref}, {"x": cand}, ALLCLOSE, torch.float32, "cpu").to_dict()
    assert d["mismatched"] == 1 and d["numel"] == 4 and d["mismatched_fraction"] == 0.25
    assert d["base_max_abs_err"] is None and d["ratio"] is None
    cand[0] = float("nan")
    d = compare("m", "model", {"x": ref}, {"x": cand}, ALLCLOSE, torch.float32, "cpu").to_dict()
    assert d["max_abs_err"] is None and d["nonfinite"] == 1 and d["mismatched_fraction"] == 0.5


def test_a_relative_comparison_records_its_worst_element_and_the_standard_models_error():
    """Every field of one record worked out by hand: cand is off by 3e-3 at a[1, 0] where the standard model's error
    is 1e-3 (at a[0, 0]), so the bound there is 2 * 1e-3 + atol + rtol * 3 (fp32: 1e-5, 1.3e-6). fp16's floor
    (1e-5, 1e-3) would allow 2 * 1e-3 + 1e-5 + 3e-3 there, and b's 2e-6 is within fp32's: fp16 explains the error."""
    f64 = torch.float64
    ref = {"a": torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=f64), "b": torch.tensor([4.0, 0.0], dtype=f64)}
    base = {"a": ref["a"] + torch.tensor([[1e-3, 0.0], [0.0, 0.0]], dtype=f64), "b": ref["b"].clone()}
    cand = {"a": ref["a"] + torch.tensor([[0.0, 0.0], [3e-3, 0.0]], dtype=f64),
            "b": ref["b"] + torch.tensor([0.0, 2e-6], dtype=f64)}
    record = compare("m/x", "model", ref, {k: v.float() for k, v in cand.items()}, OUTPUTS, torch.float32, "cpu",
                     base={k: v.float() for k, v in base.items()}, fused_calls=4)
    d = record.to_dict()
    floats = {k: d.pop(k) for k in ("max_abs_err", "base_max_abs_err", "rel_l2_err", "cosine", "ratio", "tolerance",
                                    "mismatched_fraction")}
    err, base_err = float(torch.tensor(3.003).float()) - 3.0, float(torch.tensor(1.001).float()) - 1.0
    assert floats == {
        "max_abs_err": pytest.approx(err, rel=1e-9), "base_max_abs_err": pytest.approx(base_err, rel=1e-9),
        "rel_l2_err": pytest.approx(err / float(ref["a"].norm()), rel=1e-6), "cosine": pytest.approx(1, abs=1e-6),
        "ratio": pytest.approx(err / base_err, rel=1e-9),
        "tolerance": pytest.approx(2 * base_err + 1e-5 + 1.3e-6 * 3.0, rel=1e-9),
        "mismatched_fraction": pytest.approx(1 / 6)}
    assert floats["cosine"] < 1
    assert d == {
        "name": "m/x", "component": "model", "dtype": "fp32", "device": "cpu", "rule": "relative_to_base(k=2)",
        "passed": False,
        "message": "computes at fp16 precision: Mismatched elements: 1 / 6 (17%); greatest absolute difference "
                   "0.003; worst element a[1, 0] off "
                   "by 0.003 where 0.00201 is allowed by relative_to_base(k=2) (base error 0.001)",
        "mismatched": 1, "numel": 6, "worst_index": "a[1, 0]", "bit_identical": False, "nonfinite": 0,
        "fused_calls": 4, "first_divergence": None, "weight_gradients": None, "provided": True,
        "effective_precision": "fp16"}


def test_an_infinite_oracle_value_is_bounded_by_the_absolute_floor_alone():
    """+-Inf in the oracle counts as 0 in the bound (the record fails on the non-finite count, not on a huge bound)."""
    for inf in (float("inf"), float("-inf")):
        ref = {"x": torch.tensor([inf, 1.0], dtype=torch.float64)}
        record = compare("m", "model", ref, {"x": torch.tensor([1.0, 1.0])}, ALLCLOSE, torch.float32, "cpu")
        assert (record.passed, record.nonfinite, record.worst_index) == (False, 1, "x[0]")
        assert record.tolerance == 1e-5, "atol + rtol * 0"


@pytest.mark.parametrize("shape", [(0,), (2, 0)])
def test_empty_tensors_compare_as_equal_with_nothing_allowed(shape):
    """A zero-size tensor (an empty batch) has no element to be off: it passes, with a zero bound and no index
    (ZeroDivisionError in _unravel before)."""
    z = torch.zeros(shape)
    record = compare("e", "model", {"t": z.double()}, {"t": z}, OUTPUTS, torch.float32, "cpu", base={"t": z.clone()})
    assert (record.passed, record.tolerance, record.max_abs_err, record.worst_index) == (True, 0.0, 0.0, "t[]")


def test_a_candidate_equal_to_the_standard_model_is_bit_identical():
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    base = torch.tensor([1.0, 2.5])
    record = compare("m", "model", {"t": ref}, {"t": base.clone()}, OUTPUTS, torch.float32, "cpu", base={"t": base})
    assert record.bit_identical is True and record.passed
    other = compare("m", "model", {"t": ref}, {"t": base + 1e-7}, OUTPUTS, torch.float32, "cpu", base={"t": base})
    assert other.bit_identical is False
