"""`qkv-verify convert`'s refusals and --check with --to, for the survivors of the second mutation run
(reports/mutation/verdicts-messages-writes.txt) in verify/commands/convert.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from properties.checkpoint_files import standard_checkpoint
from verify.cli import main


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny standard checkpoint and its conversion to merged, written by convert itself."""
    root = tmp_path_factory.mktemp("convert")
    std = standard_checkpoint(root / "std")
    assert main(["convert", str(std), str(root / "merged"), "--to", "merged"]) == 0
    return std, root / "merged"


def test_an_unknown_layout_is_refused_naming_it_and_the_known_ones(tmp_path, pair, capsys):
    """Kills x_command__mutmut_11 (VerifyError(None): the error line says "None")."""
    capsys.readouterr()
    assert main(["convert", str(pair[0]), str(tmp_path / "m"), "--to", "merged", "--layout", "diagonal"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "qkv-verify: error: unknown layout 'diagonal'; expected one of blocked, interleaved"]
    assert not (tmp_path / "m").exists()


def test_check_with_the_direction_src_converts_to_proves_the_conversion(pair, capsys):
    """Kills x_command__mutmut_20 (the agreeing --to refused) and _21 (SRC's direction read from None): a standard SRC
    converts to merged, so --check --to merged goes on to prove it (exit 0)."""
    std, merged = pair
    capsys.readouterr()
    assert main(["convert", "--check", str(std), str(merged), "--to", "merged"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and out.out.strip() and not out.out.startswith("not proven")


def test_check_with_the_other_direction_is_refused_saying_which_one_src_converts_to(pair, capsys):
    std, merged = pair
    capsys.readouterr()
    assert main(["convert", "--check", str(std), str(merged), "--to", "standard"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qkv-verify: error: --to standard: SRC {std} converts to merged"]
