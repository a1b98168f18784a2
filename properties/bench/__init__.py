"""Shared by the bench tests: a bench run that must pass, its JSON and the table it printed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from verify.cli import main


def passing_bench(argv: list[str], out: Path) -> tuple[dict, str]:
    """`qkv-verify bench ARGV --json OUT` in this process with its printed lines kept: (its JSON, the lines); fails
    the caller, showing the last lines, when the run does not exit 0."""
    capture = pytest.MonkeyPatch()
    lines: list[str] = []
    capture.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    try:
        status = main(["bench", *argv, "--json", str(out)])
    finally:
        capture.undo()
    assert status == 0, "\n".join(lines[-20:])
    return json.loads(out.read_text()), "\n".join(lines)
