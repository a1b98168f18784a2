"""pytest plugin for mutation runs (`tox -e mutation`): cheapest tests first, so that a killed mutant dies early.

mutmut runs each mutant's tests with -x in the order it lists them (a set); this sorts them instead: tests without a
module-scoped fixture of their own first, by the call time mutmut recorded (mutmut-stats.json), then the tests of each
module that builds an expensive module fixture (reports run for test_claims and test_regress), module by module so
that the fixture is built once. Order only: which tests run, and so which mutants are killed, is mutmut's choice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _durations() -> dict[str, float]:
    try:
        return json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return {}


def _module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return False
    return any(defs and defs[-1].scope == "module" for defs in info.name2fixturedefs.values())


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    durations = _durations()

    def key(item: pytest.Item) -> tuple:
        heavy = _module_fixture(item)
        return heavy, item.path.name if heavy else "", durations.get(item.nodeid, 0.0)

    items.sort(key=key)
