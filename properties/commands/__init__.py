"""Shared by the command tests."""

from __future__ import annotations

import pytest

from verify.cli import main


def help_paragraphs(command: str, capsys, monkeypatch) -> list[str]:
    """The paragraphs of `qkv-verify COMMAND --help`, each on one line with single spaces (exit 0 checked)."""
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at the terminal's width
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return [" ".join(p.split()) for p in capsys.readouterr().out.split("\n\n")]
