"""A property-suite results JSON (`pytest -p properties.results_json --results-json FILE`) as `report --properties`
reads it: parsed and validated before any run."""

from __future__ import annotations

from pathlib import Path

from verify.errors import VerifyError
from verify.files.json_file import read_json


def load_property_results(path: Path) -> dict:
    """{"tests": [{"test": nodeid, "outcome": ...}, ...], ...}; VerifyError names the first entry the ledger cannot
    read."""
    data = read_json(path)
    tests = data.get("tests") if isinstance(data, dict) else None
    if not isinstance(tests, list):
        raise VerifyError(f"{path}: not property-suite results: expected an object with a list of tests")
    for i, test in enumerate(tests):
        if not (isinstance(test, dict) and isinstance(test.get("test"), str) and isinstance(test.get("outcome"), str)):
            raise VerifyError(f"{path}: tests[{i}]: expected an object with the test's id (test) and its outcome")
    return data
