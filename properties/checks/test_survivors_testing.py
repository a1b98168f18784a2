"""verify.testing's messages where a check has nothing to say: no check ran at all, and a failure with no first
divergence (a fused candidate whose fused modules never ran: its outputs are right, so nothing diverges)."""

from __future__ import annotations

import pytest
import torch

from verify.testing import assert_candidate, check_candidate

FP64 = [torch.float64]


def _unfused(standard, component):
    """The standard attention itself: right outputs, but not the fused candidate it is taken for."""
    return standard


def test_asserting_no_component_says_no_check_ran():
    with pytest.raises(AssertionError) as e:
        assert_candidate("reference", components=())
    assert str(e.value) == "no check ran"


def test_a_failure_without_a_first_divergence_ends_with_its_message():
    records = check_candidate(_unfused, components=("attention",), dtypes=FP64)
    failed = [r for r in records if not r.passed]
    assert failed and all(not r.first_divergence and "never ran" in r.message for r in failed)
    with pytest.raises(AssertionError) as e:
        assert_candidate(_unfused, components=("attention",), dtypes=FP64)
    heading, *lines = str(e.value).splitlines()
    assert heading == f"{len(failed)} of {len(records)} checks failed:"
    assert len(lines) == len(failed)
    for line, record in zip(lines, failed):
        assert line.startswith(f"{record.name} [fp64, cpu, ") and line.endswith(f"]: {record.message}"), line
        assert "first divergence" not in line
