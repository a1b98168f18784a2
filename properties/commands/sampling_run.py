"""`qkv-verify sample` run in-process for the sampling tests: its exit status (argparse's refusals included) and the
summary.json it wrote ({} when it wrote none)."""

from __future__ import annotations

import json
from pathlib import Path

from verify.cli import main


def run_sample(out: Path, *args: str) -> tuple[int, dict]:
    try:
        code = main(["sample", "--out", str(out), *args])
    except SystemExit as e:  # argparse's refusal of a flag's value
        code = e.code
    path = out / "summary.json"
    return code, json.loads(path.read_text()) if path.exists() else {}


def assert_refused(code: int, out: Path, err: str, words: str) -> None:
    """Bad input: exit 2, `words` on stderr's last line (argparse's usage may come first), no traceback, nothing
    written to `out`."""
    err = err.strip()
    assert code == 2 and words in err.splitlines()[-1] and "Traceback" not in err, err
    assert not out.exists()
