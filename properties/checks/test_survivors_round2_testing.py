"""verify.testing's trajectory API, for the survivors of the second mutation run
(reports/mutation/verdicts-messages-writes.txt) in verify/testing.py: a declared precision reaching the judge, and
assert_trajectory's message, one failing step per line."""

from __future__ import annotations

import pytest
import torch

from verify.testing import assert_trajectory, check_trajectory

FP32_ATTENTION = "properties.precision_variants:fp32_attention"  # attention in fp32 whatever the input dtype


def test_a_declared_fp32_candidates_fp64_steps_are_judged_at_fp32s_floor():
    """Kills x_check_trajectory__mutmut_35 (precision not passed on): with precision="fp32" an attention computed in
    fp32 passes its fp64 steps, judged at fp32's floor and saying so; undeclared, the same candidate fails them."""
    declared = check_trajectory(FP32_ATTENTION, steps=2, dtypes=(torch.float64,), precision="fp32")
    assert [r["name"] for r in declared] == ["step-01/latents", "step-02/latents"]
    assert all(r["passed"] and r["rule"].endswith("at fp32's floor (declared)") for r in declared), declared
    undeclared = check_trajectory(FP32_ATTENTION, steps=2, dtypes=(torch.float64,))
    assert not any(r["passed"] for r in undeclared)


def test_assert_trajectory_lists_each_dtypes_first_failing_step_on_its_own_line():
    """Kills x_assert_trajectory__mutmut_17 (the lines joined by "XX\\nXX"): a 1e-3 scale error fails both steps in
    fp64 and fp32; the message is a heading, then one line per dtype naming its first failing step and where it
    diverged."""
    with pytest.raises(AssertionError) as e:
        assert_trajectory("verify.planted:scale_error_1e3", steps=2)
    heading, *lines = str(e.value).splitlines()
    assert heading == "4 of 4 steps failed:"
    assert len(lines) == 2
    for line, dtype in zip(lines, ("fp64", "fp32")):
        assert line.startswith(f"step-01/latents [{dtype}]: "), line
        assert "; first divergence: step 1: transformer_blocks.0." in line, line
