"""The per-dtype floors are torch.testing's own: at |cand - ref| just inside and just outside atol + rtol * |ref|,
`compare` under the allclose rule accepts and rejects exactly where torch.testing.assert_close does."""

from __future__ import annotations

import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch.testing._comparison import default_tolerances

from properties.strategies import float_dtypes
from verify.compare import compare
from verify.tolerance import ALLCLOSE, FLOORS

INSIDE, OUTSIDE = 1 - 1e-3, 1 + 1e-3  # the candidate's error as a multiple of the allowed error


def _floor_probe(dtype: torch.dtype, value: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cand in `dtype`, fp64 ref) with |cand - ref| = scale * (atol + rtol * |ref|) at torch's default tolerances.

    ref lies beyond cand, away from zero, so |ref| = |cand| + e and e = scale * (atol + rtol * (|cand| + e)).
    """
    rtol, atol = default_tolerances(dtype)  # torch returns (rtol, atol)
    cand = torch.tensor([value], dtype=dtype)
    c = float(cand)
    e = scale * (atol + rtol * abs(c)) / (1 - scale * rtol)
    ref = torch.tensor([c + e if c >= 0 else c - e], dtype=torch.float64)
    return cand, ref


def _torch_accepts(cand: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether torch.testing.assert_close, at its defaults for cand's dtype, takes cand for ref."""
    try:
        torch.testing.assert_close(cand, ref, check_dtype=False)  # tolerances: the looser dtype's, i.e. cand's
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
    """The design brief's spelled-out bf16 pair (section 5), in the (atol, rtol) order FLOORS stores."""
    assert FLOORS[torch.bfloat16] == (1e-5, 0.016)
