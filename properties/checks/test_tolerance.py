"""The rules of verify/checks/tolerance.py at their boundaries, judged through `compare`.

The per-dtype floors are torch.testing's own: at |cand - ref| just inside and just outside atol + rtol * |ref|, the
allclose rule accepts and rejects exactly where torch.testing.assert_close does. The relative rules allow
k * err(base, ref) + floor with k = 2 for outputs and 3 for gradients (README, "How a result is judged"), the exact rule
nothing; each expected bound is worked out here from that formula and torch's tolerances, never from Rule.bound."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch.testing._comparison import default_tolerances

from properties.strategies import float_dtypes
from verify.checks.compare import compare
from verify.checks.tolerance import (
    ALLCLOSE,
    DTYPES,
    EXACT,
    FLOORS,
    FP64_FLOOR,
    GRADIENTS,
    OUTPUTS,
    Rule,
    parse_dtypes,
)

INSIDE, OUTSIDE = 1 - 1e-3, 1 + 1e-3  # the candidate's error as a multiple of the allowed error
# (rule, k): the rules' factors; allclose is the floor alone, whatever the standard model's error
RULES = [(OUTPUTS, 2.0), (GRADIENTS, 3.0), (ALLCLOSE, 0.0)]
BASE_AT, CAND_AT = (0, 3), (2, 5)  # where the standard model's error and the candidate's lie


def _floor_probe(dtype: torch.dtype, value: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cand in `dtype`, fp64 ref) with |cand - ref| = scale * (atol + rtol * |ref|) at the dtype's floor (torch's
    default tolerances; fp64's measured floor).

    ref lies beyond cand, away from zero, so |ref| = |cand| + e and e = scale * (atol + rtol * (|cand| + e)).
    """
    atol, rtol = FLOORS[dtype]
    cand = torch.tensor([value], dtype=dtype)
    c = float(cand)
    e = scale * (atol + rtol * abs(c)) / (1 - scale * rtol)
    ref = torch.tensor([c + e if c >= 0 else c - e], dtype=torch.float64)
    return cand, ref


def _torch_accepts(cand: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether torch.testing.assert_close, at FLOORS of cand's dtype, takes cand for ref."""
    atol, rtol = FLOORS[cand.dtype]
    try:
        torch.testing.assert_close(cand, ref, check_dtype=False, atol=atol, rtol=rtol)
    except AssertionError:
        return False
    return True


@given(float_dtypes(), st.floats(-1e3, 1e3), st.sampled_from([INSIDE, OUTSIDE]))
@example(torch.bfloat16, 0.0, OUTSIDE)  # the absolute floor alone: 1e-5 is torch's, 0.016 (its rtol) is not
@example(torch.float16, 0.0, OUTSIDE)
@example(torch.float32, 0.0, OUTSIDE)
@example(torch.bfloat16, 256.0, OUTSIDE)  # the relative floor dominates
@example(torch.float16, 256.0, INSIDE)
def test_allclose_accepts_and_rejects_where_torch_testing_does(dtype, value, scale):
    cand, ref = _floor_probe(dtype, value, scale)
    accepted = _torch_accepts(cand, ref)
    assert accepted == (scale < 1), "the probe sits at torch's own bound"
    record = compare("probe", "tolerance", {"t": ref}, {"t": cand}, ALLCLOSE, dtype, "cpu")
    assert record.passed == accepted, (dtype, float(cand), float(ref), FLOORS[dtype], record.message)


def test_bf16_floors_are_atol_1e_5_and_rtol_0_016():
    """torch.testing's bf16 pair spelled out, in the (atol, rtol) order FLOORS stores."""
    assert FLOORS[torch.bfloat16] == (1e-5, 0.016)


def _rule_case(dtype: torch.dtype, k: float, scale: float) -> tuple[dict, float]:
    """(ref, base, cand) where base is off by b at BASE_AT and cand by scale x its allowed error at CAND_AT, and that
    allowed error k * b + atol + rtol * |ref| (b: ten times the floor at |ref| = 1, so that k's share dominates)."""
    atol, rtol = FLOORS[dtype]
    ref = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    base, cand = ref.clone(), ref.clone()
    base[BASE_AT] += 10 * (atol + rtol)
    base_err = float((base - ref).abs().max())
    allowed = k * base_err + atol + rtol * abs(float(ref[CAND_AT]))
    cand[CAND_AT] += scale * allowed
    return {"ref": ref, "base": base, "cand": cand}, allowed


def _judge(tensors: dict, rule, dtype: torch.dtype):
    return compare("boundary", "tolerance", {"t": tensors["ref"]}, {"t": tensors["cand"]}, rule, dtype, "cpu",
                   base={"t": tensors["base"]})


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
@pytest.mark.parametrize("rule, k", RULES, ids=[r.describe() for r, _ in RULES])
@pytest.mark.parametrize("scale", [INSIDE, OUTSIDE], ids=["inside", "outside"])
def test_each_rule_passes_just_inside_its_bound_and_fails_just_outside(dtype, rule, k, scale):
    tensors, allowed = _rule_case(dtype, k, scale)
    record = _judge(tensors, rule, dtype)
    assert record.passed == (scale < 1), record.message
    assert record.mismatched == (scale > 1)
    assert record.worst_index == f"t[{CAND_AT[0]}, {CAND_AT[1]}]"
    assert record.tolerance == pytest.approx(allowed, rel=1e-9), "the bound at the worst element"
    assert record.max_abs_err == pytest.approx(scale * allowed, rel=1e-9)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_exact_passes_equal_bits_and_fails_one_ulp(dtype):
    """The exact rule allows nothing, however far the standard model is off."""
    tensors, _ = _rule_case(dtype, 0.0, 0.0)
    assert _judge(tensors, EXACT, dtype).passed
    tensors["cand"][CAND_AT] = torch.nextafter(tensors["ref"][CAND_AT], torch.tensor(math.inf, dtype=torch.float64))
    record = _judge(tensors, EXACT, dtype)
    assert not record.passed and record.mismatched == 1 and record.tolerance == 0.0, record.message


# --- the rules' own API, pinned (mutation testing: reports/mutation/) ----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES)
def test_floor_reads_torch_testing_and_swaps_it_into_atol_rtol(dtype):
    """FLOORS is built at import; the function that builds it is called here, so a change to it is seen."""
    from verify.checks.tolerance import _floor

    rtol, atol = default_tolerances(dtype)
    assert _floor(dtype) == (atol, rtol)
    assert FLOORS[dtype] == ((atol, rtol) if dtype != torch.float64 else (FP64_FLOOR, FP64_FLOOR))


def test_rules_describe_themselves_with_their_factor():
    """The rule's name in every record (and in every report) says the factor of a relative rule."""
    assert [r.describe() for r in (OUTPUTS, GRADIENTS, ALLCLOSE, EXACT)] == [
        "relative_to_base(k=2)", "relative_to_base(k=3)", "allclose", "exact"]
    assert Rule("relative_to_base", 2.5).describe() == "relative_to_base(k=2.5)"
    assert Rule("allclose", 7.0).describe() == "allclose"


def test_allclose_is_the_floor_alone_whatever_its_factor():
    """Only the relative rule adds k * err(base, ref): an allclose rule never does, even one given a factor."""
    ref = torch.tensor([0.0, -2.0, 3.0], dtype=torch.float64)
    atol, rtol = FLOORS[torch.float32]
    floor = atol + rtol * ref.abs()
    assert torch.equal(Rule("allclose", 5.0).bound(torch.float32, 1.0, ref), floor)
    assert torch.equal(Rule("relative_to_base", 5.0).bound(torch.float32, 1.0, ref), 5.0 + floor)
    assert torch.equal(Rule("exact", 5.0).bound(torch.float32, 1.0, ref), torch.zeros(3, dtype=torch.float64))


def test_parse_dtypes_reads_a_comma_list_and_names_what_it_refuses():
    assert parse_dtypes("fp64") == [torch.float64]
    assert parse_dtypes(" bf16 , fp16,,fp32 ") == [torch.bfloat16, torch.float16, torch.float32]
    expected = "expected a comma list of fp64, fp32, bf16, fp16"
    for text, named in (("fp64,fp8,int8", "fp8, int8"), ("", "(none)"), (" , ", "(none)"), ("FP32", "FP32")):
        with pytest.raises(ValueError) as caught:
            parse_dtypes(text)
        assert str(caught.value) == f"unknown dtype {named}; {expected}", text
