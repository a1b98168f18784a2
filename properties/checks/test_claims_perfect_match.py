"""The write-up's "attention and block: perfect match" row: bit-identical attention and block checks confirm it only
while no backing property test (test_fused_attention/block_equals_standard) failed; a failed one refutes it even
when every check of the run is bit-identical. Judged on made checks, and on a real report whose candidate is
diffusers' own model (every attention and block check bit-identical), given a property-results JSON with --properties
as `pytest -p properties.results_json` writes it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from properties.checkpoint_files import standard_checkpoint
from verify.checks.claims import CONFIRMED, REFUTED, attention_block, ledger
from verify.cli import main

ROW = "attention-block-match"
BACKING = ("properties/checks/test_equivalence.py::test_fused_attention_equals_standard[cpu]",
           "properties/checks/test_equivalence.py::test_fused_block_equals_standard[cpu]")


def _properties(**outcomes: str) -> dict:
    """A results JSON: each backing test ('attention', 'block') with its outcome, beside an unrelated failure."""
    tests = [{"test": test, "outcome": outcomes.get(kind, "passed"), "examples": 100}
             for kind, test in zip(("attention", "block"), BACKING)]
    other = {"test": "properties/maths/test_qkv.py::test_layout_conversion_is_a_permutation", "outcome": "failed"}
    return {"tests": [*tests, other]}


def _summary(n: int = 6) -> dict:
    """Attention and block checks, every one passed and bit-identical."""
    checks = [{"name": f"{case}/{kind}", "component": case, "dtype": dtype, "passed": True, "bit_identical": True,
               "ratio": None, "message": "ok", "max_abs_err": 0.0}
              for case in ("attention", "block") for kind in ("outputs", "gradients") for dtype in ("fp64", "fp32")]
    return {"checks": checks[:n]}


def test_every_check_bit_identical_and_no_failed_backing_test_confirms():
    for properties in (None, _properties()):
        row = attention_block(_summary(), properties)
        assert row["verdict"] == CONFIRMED, row
        assert (row["measured"], row["expected"]) == (6, 6)


@pytest.mark.parametrize("failed", ["attention", "block"])
def test_a_failed_backing_test_refutes_although_every_check_is_bit_identical(failed):
    row = attention_block(_summary(), _properties(**{failed: "failed"}))
    assert row["verdict"] == REFUTED, row
    assert "1 failed" in row["detail"]


def test_a_failed_test_that_backs_another_claim_does_not_refute():
    """The unrelated failure in _properties() is there in every case; alone it leaves a perfect match confirmed."""
    row = attention_block(_summary(), {"tests": _properties()["tests"][2:]})
    assert row["verdict"] == CONFIRMED, row


def test_one_check_not_bit_identical_refutes():
    summary = _summary()
    summary["checks"][3]["bit_identical"] = False
    row = attention_block(summary, _properties())
    assert row["verdict"] == REFUTED and (row["measured"], row["expected"]) == (5, 6)


@pytest.fixture(scope="module")
def identical_run(tmp_path_factory) -> tuple[Path, dict]:
    """A report whose candidate is diffusers itself, given property results with the block test failed."""
    root = tmp_path_factory.mktemp("perfect")
    std = standard_checkpoint(root / "std")
    results = root / "properties.json"
    results.write_text(json.dumps(_properties(block="failed")))
    out = root / "out"
    code = main(["report", "--checkpoint", str(std), "--candidate", "diffusers", "--dtypes", "fp64,fp32",
                 "--properties", str(results), "--out", str(out)])
    assert code == 0, "write-up claims never change the exit status; diffusers against itself passes every check"
    return out, json.loads((out / "summary.json").read_text())


def test_report_refutes_perfect_match_on_a_failed_property_test_with_every_check_bit_identical(identical_run):
    out, summary = identical_run
    checks = [c for c in summary["checks"] if c["component"] in ("attention", "block")]
    assert checks and all(c["passed"] and c["bit_identical"] for c in checks), "the premise: all bit-identical"
    row = next(r for r in summary["claims"] if r["id"] == ROW)
    assert row["verdict"] == REFUTED and row["measured"] == row["expected"] == len(checks), row
    assert "1 failed" in row["detail"]


def test_the_same_run_without_the_failure_confirms(identical_run):
    _, summary = identical_run
    rows = {r["id"]: r for r in ledger(summary, None, None, properties=_properties())}
    assert rows[ROW]["verdict"] == CONFIRMED, rows[ROW]
    rows = {r["id"]: r for r in ledger(summary, None, None)}
    assert rows[ROW]["verdict"] == CONFIRMED, rows[ROW]
