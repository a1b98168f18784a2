"""A property-suite results JSON (`pytest -p properties.results_json --results-json FILE`) as `report --properties`
reads it: parsed and validated before any run."""

from __future__ import annotations

import json
from pathlib import Path

from verify.errors import VerifyError


def load_property_results(path: Path) -> dict:
    """{"tests": [{"test": nodeid, "outcome": ...}, ...], ...}; VerifyError names the first entry the ledger cannot
    read."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise VerifyError(f"{path}: cannot read property results: {e}") from None
    tests = data.get("tests") if isinstance(data, dict) else None
    if not isinstance(tests, list):
        raise VerifyError(f"{path}: not property-suite results: expected an object with a list of tests")
    for i, test in enumerate(tests):
        if not (isinstance(test, dict) and isinstance(test.get("test"), str) and isinstance(test.get("outcome"), str)):
            raise VerifyError(f"{path}: tests[{i}]: expected an object with the test's id (test) and its outcome")
    return data
