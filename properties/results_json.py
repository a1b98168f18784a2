"""pytest plugin: `-p properties.results_json --results-json FILE` writes each test's outcome, Hypothesis example
count, device and recorded properties (kill rates, bf16 verdicts) as JSON, with counts per device, the card and
torch version (how reports/gpu/properties-<card>.json is made)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

_PASSING = re.compile(r"(\d+) passing")


def pytest_addoption(parser):
    parser.addoption("--results-json", help="write per-test outcomes and examples run to this JSON file")


def pytest_configure(config):
    config._results = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    entry = item.config._results.setdefault(item.nodeid, {"test": item.nodeid, "outcome": "passed", "examples": None})
    if hasattr(report, "wasxfail"):
        entry["outcome"] = "xpassed" if report.passed else "xfailed"
    elif report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
    if report.when == "teardown" and hasattr(item, "hypothesis_statistics"):
        entry["examples"] = sum(int(n) for n in _PASSING.findall(item.hypothesis_statistics))
    if report.when == "teardown":
        params = getattr(getattr(item, "callspec", None), "params", {})
        entry["device"] = params.get("device", "none")  # where it ran: cpu, cuda, or none (no device parameter)
        if item.user_properties:  # record_property values: kill rates, bf16 verdicts
            entry["properties"] = {k: v for k, v in item.user_properties}


def pytest_sessionfinish(session):
    path = session.config.getoption("--results-json")
    if not path:
        return
    tests = list(session.config._results.values())
    cuda = torch.cuda.is_available()
    Path(path).write_text(json.dumps({
        "card": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "counts": dict(Counter(t["outcome"] for t in tests)),
        "counts_by_device": {d: dict(Counter(t["outcome"] for t in tests if t.get("device") == d))
                             for d in sorted({t.get("device", "none") for t in tests})},
        "examples_run": sum(t["examples"] or 0 for t in tests),
        "tests": tests,
    }, indent=2) + "\n")
