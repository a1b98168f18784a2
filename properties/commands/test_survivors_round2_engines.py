"""`qkv-verify inputs`, for the survivors of the second mutation run (reports/mutation/verdicts-messages-writes.txt)
in verify/commands/engines.py and verify/checks/engines.py: the line naming the files written, and manifest.json
written for people to read (indented, one field per line)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from verify.cli import main


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """`qkv-verify inputs` of the attention in fp32: its folder and what it printed."""
    out = tmp_path_factory.mktemp("inputs") / "in"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["inputs", "--out", str(out), "--component", "attention", "--dtypes", "fp32"]) == 0
    lines = printed.getvalue().splitlines()
    return out, lines


def test_inputs_says_where_the_manifest_and_readme_are(written):
    """Kills x_inputs_command__mutmut_27 (prints "None") and _34 (names README.TXT, a file that is not there): the
    first line names the folder, its manifest.json and its README.txt, both of which exist."""
    out, lines = written
    assert lines[0] == (f"wrote {out}: the entries of {out}/manifest.json; {out}/README.txt says what an engine "
                        "writes back")
    assert (out / "manifest.json").is_file() and (out / "README.txt").is_file()
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["README.txt", "manifest.json"]


def test_the_manifest_is_indented_one_field_per_line(written):
    """Kills verify.checks.engines.x_inputs_files__mutmut_196 (indent=None: the manifest on one line): README.txt
    tells a person to read manifest.json's entries, and it is written indented by two spaces."""
    out, _ = written
    text = (out / "manifest.json").read_text()
    manifest = json.loads(text)
    lines = text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}" and text.endswith("}\n")
    assert sum(line.startswith('  "') and not line.startswith('   ') for line in lines) == len(manifest)
    assert '    {' in lines, "each entry on lines of its own, indented a level further"
