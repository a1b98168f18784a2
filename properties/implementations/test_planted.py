"""Planted bugs: the comparison that passes the correct merge must reject every broken one, in fp64 and fp32.

A check that cannot fail is a defect. Each entry of verify.planted.PLANTED is a realistic wrong merged implementation;
each must be caught on every drawn config where it is observable (more than one head, a padded text mask), by the same
`run_case` call that passes the reference processor on the same draw. bf16 verdicts are recorded, never asserted: bugs
hide in bf16 noise.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from properties.strategies import expensive, input_specs, model_configs, seeds
from verify.checks.cases import case_for
from verify.checks.compare import Record, assert_failed, assert_passed
from verify.checks.equivalence import run_case
from verify.implementations.fused import joint_attentions
from verify.models.qwen_image import CASES, CONFIGS
from verify.planted import PLANTED

HIGH = (torch.float64, torch.float32)
# The classic bugs of a merged path (K and V swapped, q/k/v order, layout mix-up, a dropped bias, the two streams'
# q-norms swapped, an off-by-one split, an ignored mask); removing one from PLANTED must not go unnoticed.
LISTED = {"k_v_swapped", "kqv_order", "layout_mixup", "dropped_bias", "norm_q_swapped", "split_off_by_one",
          "mask_ignored"}
COMPONENTS = ("attention", "block", "model")


def _caught(record: Record) -> bool:
    """Rejected on the numbers, with the fused path having run (a 'never ran' rejection catches nothing)."""
    return not record.passed and bool(record.fused_calls) and (record.mismatched > 0 or record.nonfinite > 0)


def _outputs(records: list[Record], dtype: str) -> Record:
    return next(r for r in records if r.name.endswith("/outputs") and r.dtype == dtype)


def test_every_listed_bug_is_planted():
    assert LISTED <= set(PLANTED), f"planted bugs missing: {sorted(LISTED - set(PLANTED))}"


@pytest.mark.parametrize("bug", sorted(PLANTED))
@settings(max_examples=expensive(5))
@given(component=st.sampled_from(COMPONENTS), config=model_configs(min_heads=2, layered=None),
       spec=input_specs(padded=True), seed=seeds())
def test_planted_bug_is_caught(device, bug, component, config, spec, seed):
    case = case_for(component, config, spec)
    run = dict(dtypes=HIGH, device=device, seed=seed, config=config, spec=spec)
    for record in run_case(case, **run, candidate="reference"):
        assert_passed(record)  # the same comparison passes the correct merge on this draw
    broken = run_case(case, **run, candidate=PLANTED[bug][1])
    for dtype in ("fp64", "fp32"):
        record = _outputs(broken, dtype)
        assert_failed(record)
        assert _caught(record), f"{bug} rejected for the wrong reason: {record.message}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["block", "model-text-to-image"])
@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_is_caught_at_small_width(device, bug, name):
    """Caught at the `small` config too (6 heads of 32, 4 layers): width does not dilute the bug below the bound."""
    case = CASES[name]
    config = {**case.config, **CONFIGS["small"]}
    broken = run_case(case, dtypes=HIGH, device=device, config=config, candidate=PLANTED[bug][1])
    for dtype in ("fp64", "fp32"):
        assert _caught(_outputs(broken, dtype)), _outputs(broken, dtype).message


def test_kill_rate_is_total(device, record_property):
    """Every planted bug is caught on every registry case, in fp64 and in fp32."""
    survivors = []
    for bug, (description, merge) in PLANTED.items():
        for name in CASES:  # every registry case, edit, zero_cond_t and layered included
            records = run_case(CASES[name], dtypes=HIGH, device=device, candidate=merge)
            missed = [dtype for dtype in ("fp64", "fp32") if not _caught(_outputs(records, dtype))]
            if missed:
                survivors.append(f"{bug} ({description}) on {name} in {', '.join(missed)}")
    killed = len(PLANTED) - len({s.split(" ", 1)[0] for s in survivors})
    record_property("kill_rate", f"{killed}/{len(PLANTED)}")
    assert not survivors, f"kill rate {killed}/{len(PLANTED)}; survived: " + "; ".join(survivors)


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_bf16_verdict_is_recorded_not_trusted(bug, record_property):
    """fp64 catches the bug; whether bf16 does is noted only (a fused processor ignoring the mask passes bf16)."""
    records = run_case(CASES["model-text-to-image"], dtypes=(torch.float64, torch.bfloat16), candidate=PLANTED[bug][1])
    assert _caught(_outputs(records, "fp64")), _outputs(records, "fp64").message
    bf16 = _outputs(records, "bf16")
    record_property("bf16_caught", not bf16.passed)
    record_property("bf16_error_over_base", bf16.ratio)


def _diffusers_fuse_projections(module: torch.nn.Module, component: str) -> torch.nn.Module:
    """diffusers' own fusion: builds to_qkv / to_added_qkv, keeps to_q... and the processor that reads those."""
    for attn in joint_attentions(module):
        attn.fuse_projections()
    return module


@pytest.mark.parametrize("merge", [lambda module, component: module, _diffusers_fuse_projections],
                         ids=["identity", "diffusers"])
@pytest.mark.parametrize("case", ["attention", "block", "model-text-to-image"])
def test_a_fused_path_that_never_runs_is_rejected(device, merge, case):
    """The numbers agree (the standard path ran), yet the record fails: the fused projections were never called."""
    records = run_case(CASES[case], dtypes=HIGH, device=device, candidate=merge)
    assert records
    for record in records:
        assert record.fused_calls == 0
        assert_failed(record)
        assert "never ran" in record.message
