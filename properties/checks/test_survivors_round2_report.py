"""`qkv-verify report --claims`, for the survivors of the second mutation run
(reports/mutation/verdicts-messages-writes.txt) in verify/checks/report.py (run_values): a claim filtering checks on
a component is held to the components a report writes, before the report runs. (The selector tests compute these
values at import, which a mutation run's workers do before a mutant is switched on; these compute them in the test.)"""

from __future__ import annotations

import pytest
import yaml

import verify.checks.report
from verify.cli import main


class Ran(Exception):
    """The report started: its claims were accepted."""


@pytest.fixture
def report(tmp_path, monkeypatch, capsys):
    """`qkv-verify report --claims` of one claim on `metric`, the run itself replaced by raising Ran: (exit status
    or "ran", stderr)."""
    def never(*args, **kwargs):
        raise Ran

    monkeypatch.setattr(verify.checks.report, "run_report", never)

    def run(metric: str) -> tuple[int | str, str]:
        claims = tmp_path / "claims.yaml"
        claims.write_text(yaml.safe_dump([{"id": "c", "metric": metric, "op": "<", "expected": 1}]))
        capsys.readouterr()
        try:
            code = main(["report", "--claims", str(claims), "--dtypes", "fp64,fp32", "--out", str(tmp_path / "o")])
        except Ran:
            code = "ran"
        return code, capsys.readouterr().err

    return run


@pytest.mark.parametrize("component", ["block", "model"])
def test_a_claim_on_a_component_the_report_writes_is_accepted(report, component):
    """Kills x_run_values__mutmut_27 (the component "model" misspelt: a claim on the model's checks refused)."""
    code, err = report(f"checks[component={component},dtype=fp32].max_abs_err")
    assert code == "ran", err


def test_a_claim_on_a_component_no_report_writes_is_refused_before_the_run(report, tmp_path):
    """Kills x_run_values__mutmut_18 (the field named "COMPONENT": any component accepted, the run started and the
    claim left unmeasured)."""
    code, err = report("checks[component=blocks,dtype=fp32].max_abs_err")
    assert code == 2
    assert "claim 'c'" in err and "component=blocks selects nothing in this run" in err
    assert not (tmp_path / "o").exists()
