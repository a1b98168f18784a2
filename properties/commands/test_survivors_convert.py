"""What `qkv-verify convert` says, where the mutation run (reports/mutation/verdicts-messages-writes.txt) left
survivors in verify/commands/convert.py: the missing --to's message, the size it reports, and --layout's help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from safetensors import safe_open

from properties.checkpoint_files import standard_checkpoint
from verify.cli import main


@pytest.fixture(scope="module")
def std(tmp_path_factory) -> Path:
    return standard_checkpoint(tmp_path_factory.mktemp("std") / "std", shard_size="40KB")


def test_convert_without_to_or_check_says_what_it_needs(tmp_path, std, capsys):
    """Kills x_command__mutmut_38 (the message upper-cased)."""
    capsys.readouterr()
    assert main(["convert", str(std), str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "qkv-verify: error: convert needs --to merged or --to standard (or --check)"]
    assert not (tmp_path / "m").exists()


def test_convert_reports_srcs_size_in_gb(tmp_path, std, capsys):
    """Kills x_command__mutmut_53 (bytes * 1e9 for GB): the size said is SRC's tensor bytes over 10^9, as counted
    here from the shards."""
    nbytes = 0
    for shard in std.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            nbytes += sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert nbytes > 0
    capsys.readouterr()
    assert main(["convert", str(std), str(tmp_path / "m"), "--to", "merged"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    said = re.search(r"\), (\S+) GB in \S+ s \(", line)
    assert said and said.group(1) == f"{nbytes / 1e9:.3f}", line


def test_convert_help_says_where_check_takes_the_layout_from(capsys):
    """Kills x_register__mutmut_101 and _102 (--layout's help text changed)."""
    with pytest.raises(SystemExit) as done:
        main(["convert", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("fused rows: blocked (all q, all k, all v; default) or interleaved (per head); with --check: DST's "
            "manifest, else blocked") in text
