"""Bench JSONs that `report --bench` accepts or refuses, where the mutation run
(reports/mutation/verdicts-messages-writes.txt) left survivors in verify/files/bench_file.py: the shapes a bench may
take (a bare list of rows, full-model rows only, the sustained floor alone) and the words of a refusal."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from verify.errors import VerifyError
from verify.files.bench_file import load_bench

GPU = Path(__file__).parents[2] / "reports" / "gpu"
BLOCKS = json.loads((GPU / "bench-h200.json").read_text())
FULL_MODEL = json.loads((GPU / "bench-full-model-h200.json").read_text())


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return path


def test_a_bare_list_of_rows_is_a_bench(tmp_path):
    """Kills x_load_bench__mutmut_22 (the list wrapped under 'ROWS', then refused as having no rows)."""
    assert load_bench(_write(tmp_path, BLOCKS["rows"])) == {"rows": BLOCKS["rows"]}


def test_full_model_rows_alone_are_a_bench(tmp_path):
    """Kills x_bench_problem__mutmut_30 (only 'rows' counted: a bench of full-model rows refused as having none)."""
    bench = {k: v for k, v in FULL_MODEL.items() if k not in ("rows", "config")}
    assert bench["full_model"]
    assert load_bench(_write(tmp_path, bench)) == bench


def test_the_sustained_floor_alone_judges_a_compiled_row(tmp_path):
    """Kills x_bench_problem__mutmut_73 (floor_sustained_ms misspelt: rows with only the sustained floor refused)."""
    bench = copy.deepcopy(BLOCKS)
    for row in bench["rows"]:
        row.pop("floor_ms", None)
    assert any((r["mode"], r["phase"]) == ("compiled", "forward") and r.get("floor_sustained_ms")
               for r in bench["rows"])
    assert load_bench(_write(tmp_path, bench)) == bench


def test_a_compiled_row_without_a_floor_is_refused_in_words(tmp_path):
    """Kills x_bench_problem__mutmut_78 (the refusal's words changed)."""
    bench = copy.deepcopy(BLOCKS)
    for row in bench["rows"]:
        row.pop("floor_ms", None)
        row.pop("floor_sustained_ms", None)
    path = _write(tmp_path, bench)
    with pytest.raises(VerifyError) as refused:
        load_bench(path)
    assert str(refused.value) == (f"{path}: not a qkv-verify bench result: a compiled forward row without merged_ms "
                                  "and its matmul floor (floor_ms), which its goal judges")
