"""Every repository path a user document or a docstring names in backticks exists: a renamed file, or a log moved
out of reports/, must not leave README.md or the code pointing at nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAMED = re.compile(r"`((?:verify|properties|reports|\.ci)/[A-Za-z0-9_./*-]*)`")  # a backticked repository path or glob
DOCUMENTS = ["README.md", "reports/gpu/NOTES.md", "reports/mutation/survivors.md",
             *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("verify/**/*.py"))]


def named_paths(text: str) -> list[str]:
    return [m.group(1).rstrip(".") for m in NAMED.finditer(text)]


def test_the_pattern_finds_paths_and_only_paths():
    text = "see `verify/models/qwen_image.py`, `reports/gpu/`, `properties/test_*.py`, `qkv-verify`, `verify.models`."
    assert named_paths(text) == ["verify/models/qwen_image.py", "reports/gpu/", "properties/test_*.py"]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_named_path_exists(document):
    missing = [p for p in named_paths((ROOT / document).read_text()) if not any(ROOT.glob(p.rstrip("/")))]
    assert not missing, f"{document} names paths that do not exist: {missing}"
