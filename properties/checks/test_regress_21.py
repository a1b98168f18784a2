"""`regress` on Qwen-Image 2.1's seeded reports: they judge cases, not streamed fixtures, so their output_stats are
empty and their checks are what regress compares (such a report was once refused as "not a qkv-verify summary")."""

from __future__ import annotations

import json

import pytest

from verify.cli import main

RUN = ["report", "--model", "qwen-image-2.1", "--dtypes", "fp64,fp32"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("regress21") / "baseline"
    assert main([*RUN, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["output_stats"] == [] and summary["checks"]
    return out / "summary.json"


def test_an_identical_run_moves_nothing(baseline, tmp_path):
    assert main([*RUN, "--out", str(tmp_path / "again"), "--baseline", str(baseline)]) == 0
    assert main(["regress", str(baseline), str(tmp_path / "again" / "summary.json"),
                 "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["passed"] and not result["moved"] and result["compared"] > 0


def test_a_planted_bug_moves_the_checks_it_breaks(baseline, tmp_path):
    assert main([*RUN, "--candidate", "verify.planted:cache_k_v_swapped_21", "--out", str(tmp_path / "bug")]) == 1
    assert main(["regress", str(baseline), str(tmp_path / "bug" / "summary.json"),
                 "--json", str(tmp_path / "r.json")]) == 1
    moved = json.loads((tmp_path / "r.json").read_text())["moved"]
    assert moved and all("cache" in m["name"] for m in moved), [m["name"] for m in moved][:5]
