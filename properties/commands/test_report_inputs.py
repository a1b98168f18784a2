"""What `report` reads is never what it writes, and every file it reads is judged usable before the run: an input
inside --out, or --out inside an input, is refused with exit 2 (nothing written, the input untouched), whichever
flag names it; a bench or property-results file the report could not use is refused before the run, not a traceback
after it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from properties.checkpoint_files import standard_checkpoint
from verify.checks.claims import ledger
from verify.cli import main
from verify.errors import VerifyError
from verify.files.bench_file import NUMBER_FIELDS, ROW_FIELDS, load_bench
from verify.present.render import write_report

FAST = ["--dtypes", "fp64,fp32"]
GPU = Path(__file__).parents[2] / "reports" / "gpu"
CANDIDATE = "def build(standard, component):\n    return standard\n\nbuild.fused_modules = ()\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """An earlier report of the embedded default: a valid --baseline, and a folder a later --out may reuse."""
    out = tmp_path_factory.mktemp("earlier") / "report"
    assert main(["report", "--out", str(out), *FAST]) == 0
    return out


def _files(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def _an_input(flag: str, folder: Path, report: Path) -> list[str]:
    """argv naming a valid input of `flag` written into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    if flag == "--checkpoint":
        return [flag, str(standard_checkpoint(folder / "std"))]
    if flag == "--baseline":
        (folder / "summary.json").write_bytes((report / "summary.json").read_bytes())
        return [flag, str(folder / "summary.json")]
    if flag == "--claims":
        claim = {"id": "fp32", "metric": "checks[name=model-text-to-image/outputs,dtype=fp32].max_abs_err",
                 "op": "<", "expected": 1.0}
        (folder / "claims.json").write_text(json.dumps([claim]))
        return [flag, str(folder / "claims.json")]
    if flag == "--bench":
        (folder / "bench.json").write_bytes((GPU / "bench-h200.json").read_bytes())
        return [flag, str(folder / "bench.json")]
    if flag == "--properties":
        (folder / "properties.json").write_text(json.dumps({"tests": []}))
        return [flag, str(folder / "properties.json")]
    if flag == "--lora":
        import torch

        g = torch.Generator().manual_seed(0)
        save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 64, generator=g),
                   "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 2, generator=g)},
                  str(folder / "lora.safetensors"))
        return [flag, str(folder / "lora.safetensors")]
    assert flag == "--candidate"
    (folder / "cand.py").write_text(CANDIDATE)
    return [flag, f"{folder / 'cand.py'}:build", "--fused-modules", "none"]


FLAGS = ("--checkpoint", "--baseline", "--claims", "--bench", "--properties", "--lora", "--candidate")


@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("where", ["input inside --out", "--out is the input, or inside it"])
def test_report_never_writes_where_an_input_lies(tmp_path, capsys, report, flag, where):
    out = tmp_path / "out"
    if where == "input inside --out":  # --out an earlier report (allowed as such) that holds the input
        out.mkdir()
        for name, (data, _) in _files(report).items():
            (out / name).write_bytes(data)
        argv = _an_input(flag, out / "given", report)
    else:
        argv = _an_input(flag, tmp_path / "given", report)
        given = Path(argv[1].rpartition(":")[0] if flag == "--candidate" else argv[1])
        out = given / "out" if given.is_dir() else given
    before = _files(tmp_path)
    code, err = _run(["report", *argv, "--out", str(out), *FAST], capsys)
    assert code == 2, (code, err)
    assert len(err) == 1 and flag in err[0] and "--out" in err[0], err
    assert _files(tmp_path) == before, "an input changed, or something was written"


def test_a_baseline_in_the_default_out_is_never_overwritten(tmp_path, capsys, report, monkeypatch):
    """The reported defect: `report --baseline qkv-verify-report/summary.json` with the default --out replaced the
    baseline it was judging against by the new run (exit 0)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qkv-verify-report").mkdir()
    for name, (data, _) in _files(report).items():
        (tmp_path / "qkv-verify-report" / name).write_bytes(data)
    before = _files(tmp_path)
    code, err = _run(["report", "--baseline", "qkv-verify-report/summary.json", *FAST], capsys)
    assert code == 2 and "--baseline" in err[0] and "overwrite" in err[0], err
    assert _files(tmp_path) == before
    assert _run(["report", "--baseline", "qkv-verify-report/summary.json", "--out", "next", *FAST], capsys)[0] == 0
    kept = {f"qkv-verify-report/{k}": v for k, v in _files(tmp_path / "qkv-verify-report").items()}
    assert kept == before, "the baseline, read, is as it was"


# --- bench files ----------------------------------------------------------------------------------------------------

def _bench() -> dict:
    return json.loads((GPU / "bench-h200.json").read_text())


def test_lora_rows_without_the_standard_kernel_count_are_judged_against_lean(tmp_path, capsys):
    """The reported traceback (KeyError: 'kernels_standard' after the whole run): LoRA-training rows with
    kernels_lean_unfused and kernels_merged only. The kernel claim is fusion's own saving, lean -> merged."""
    bench = _bench()
    for r in bench["rows"]:
        r.pop("kernels_standard")
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    code, err = _run(["report", "--bench", str(tmp_path / "bench.json"), "--out", str(tmp_path / "out"), *FAST],
                     capsys)
    assert code == 0, err
    row = next(r for r in json.loads((tmp_path / "out" / "summary.json").read_text())["claims"]
               if r["id"] == "kernels-67pct-fewer")
    lora = [r for r in bench["rows"] if r["phase"] == "lora-train"]
    assert row["measured"] == pytest.approx(min(1 - r["kernels_merged"] / r["kernels_lean_unfused"] for r in lora))
    assert "? / lean" in row["detail"], "the absent standard count is shown as unknown, not invented"


def _bad_benches() -> dict[str, object]:
    good = _bench()

    def edit(change) -> dict:
        bench = copy.deepcopy(good)
        change(bench)
        return bench

    return {
        "not an object": 3,
        "no rows": {"device": "x"},
        "rows not a list": edit(lambda b: b.update(rows={"a": 1})),
        "row not an object": edit(lambda b: b["rows"].__setitem__(0, [1, 2])),
        "row without mode": edit(lambda b: b["rows"][0].pop("mode")),
        "row without speedup": edit(lambda b: b["rows"][1].pop("speedup")),
        "speedup a string": edit(lambda b: b["rows"][2].update(speedup="1.2x")),
        "kernel count a bool": edit(lambda b: b["rows"][0].update(kernels_merged=True)),
        "time not finite": edit(lambda b: b["rows"][0].update(merged_ms=float("nan"))),
        "interval of one": edit(lambda b: b["rows"][0].update(speedup_ci=[1.0])),
        "floor without merged time": edit(lambda b: b["rows"][0].pop("merged_ms")),
        "config without dim": edit(lambda b: b["config"].pop("dim")),
        "compiled forward without its floor": edit(lambda b: [r.pop(k, None) for r in b["rows"]
                                                               for k in ("floor_ms", "floor_sustained_ms")]),
        "full-model row not an object": edit(lambda b: b.update(full_model=["row"])),
    }


@pytest.mark.parametrize("fault", list(_bad_benches()))
def test_an_unusable_bench_is_refused_before_the_run(tmp_path, capsys, fault):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(_bad_benches()[fault]))
    code, err = _run(["report", "--bench", str(path), "--out", str(tmp_path / "out"), *FAST], capsys)
    assert code == 2 and len(err) == 1 and str(path) in err[0], err
    assert not (tmp_path / "out").exists()


def test_the_committed_benches_are_valid():
    for path in sorted(GPU.glob("bench*.json")):
        assert load_bench(path), path


OPTIONAL = sorted({k for r in _bench()["rows"] for k in r} - set(ROW_FIELDS))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dropped=st.lists(st.sampled_from(OPTIONAL), unique=True), row=st.integers(0, 17),
       wrong=st.sampled_from([None, *NUMBER_FIELDS]))
def test_a_bench_the_loader_accepts_is_one_the_report_renders(tmp_path, runs_summary, dropped, row, wrong):
    """Generalises the reported traceback: any field dropped from the committed bench's rows, or one set to a
    string, is either refused by load_bench or judged and rendered without an error."""
    bench = _bench()
    for r in bench["rows"]:
        for k in dropped:
            r.pop(k, None)
    if wrong:
        bench["rows"][row][wrong] = "fast"
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    try:
        loaded = load_bench(path)
    except VerifyError:
        return
    summary = {**runs_summary, "claims": ledger(runs_summary, None, loaded), "speed": loaded}
    write_report(summary, tmp_path / "out")


@pytest.fixture(scope="module")
def runs_summary(report) -> dict:
    return json.loads((report / "summary.json").read_text())


@pytest.mark.parametrize("content", ["[1, 2]", '{"tests": 3}', '{"tests": [{"outcome": "passed"}]}', "{"])
def test_unusable_property_results_are_refused_before_the_run(tmp_path, capsys, content):
    path = tmp_path / "properties.json"
    path.write_text(content)
    code, err = _run(["report", "--properties", str(path), "--out", str(tmp_path / "out"), *FAST], capsys)
    assert code == 2 and len(err) == 1 and str(path) in err[0], err
    assert not (tmp_path / "out").exists()
