"""`qkv-verify inputs` and `qkv-verify judge`: engines that cannot be imported, judged through saved files. The engines
README.md points to (properties/engines/) run as subprocesses: a merged attention in plain torch (nothing of
qkv-verify or diffusers in its process), the same exported to ONNX and run by ONNX Runtime, and the built-in reference
processor, whose round trip gives report's records bit for bit."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from verify.checks.equivalence import run_case
from verify.cli import main
from verify.models.qwen_image import CASES
from verify.testing import judge_outputs

ENGINES = Path(__file__).resolve().parents[1] / "engines"  # the engines README.md points to
DTYPES = "fp64,fp32"


def readme_engine(name: str, folder: Path) -> Path:
    """A copy, in `folder`, of an engine README points to (properties/engines/NAME), that a test may change."""
    path = folder / name
    path.write_text((ENGINES / name).read_text())
    return path


def run_engine(engine: Path, inputs: Path, outputs: Path, *args: str) -> None:
    """The engine in a process of its own, isolated from this one's paths and environment variables."""
    subprocess.run([sys.executable, "-I", str(engine), str(inputs), str(outputs), *args], check=True,
                   cwd=engine.parent, env={"PATH": "/usr/bin:/bin"}, timeout=600, capture_output=True)


def judge(tmp_path, outputs: Path, inputs: Path, *args) -> tuple[int, dict]:
    out = tmp_path / "judged"
    code = main(["judge", str(outputs), "--inputs", str(inputs), "--out", str(out), *args])
    return code, json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("engine") / "in"
    assert main(["inputs", "--out", str(folder), "--dtypes", DTYPES, "--component", "attention", "--component",
                 "block"]) == 0
    return folder


@pytest.fixture(scope="module")
def torch_outputs(inputs, tmp_path_factory) -> Path:
    """What the README's plain-torch engine writes for `inputs`."""
    folder = tmp_path_factory.mktemp("torch-engine")
    run_engine(readme_engine("torch_engine.py", folder), inputs, folder / "out.safetensors")
    return folder / "out.safetensors"


def test_inputs_writes_safetensors_a_manifest_and_a_readme(inputs):
    manifest = json.loads((inputs / "manifest.json").read_text())
    cases = {n for n, c in CASES.items() if c.component in ("attention", "block")}
    assert {(e["case"], e["dtype"]) for e in manifest["entries"]} == {(c, d) for c in cases for d in ("fp64", "fp32")}
    entry = next(e for e in manifest["entries"] if e["case"] == "attention" and e["dtype"] == "fp32")
    tensors = load_file(inputs / entry["inputs_file"])
    assert tensors["hidden_states"].dtype == torch.float32 and entry["kwargs"]["image_rotary_emb"]["tuple"]
    merged = load_file(inputs / entry["weights"]["merged"])
    assert "to_qkv.weight" in merged and "to_q.weight" not in merged
    assert {p.suffix for p in inputs.rglob("*") if p.is_file()} == {".safetensors", ".json", ".txt"}
    assert "<case>/<dtype>/<output>" in (inputs / "README.txt").read_text()


def test_a_plain_torch_engine_passes_its_attention_and_provides_no_block(inputs, torch_outputs, tmp_path):
    code, summary = judge(tmp_path, torch_outputs, inputs)
    assert code == 0 and summary["candidate"]["spec"] == f"outputs:{torch_outputs}"
    judged = [c for c in summary["checks"] if c["provided"]]
    assert {c["name"] for c in judged} == {"attention/outputs", "attention/gradients"} and all(
        c["passed"] for c in judged)
    absent = [c for c in summary["checks"] if c["name"].startswith("block") and c["name"].endswith("/outputs")]
    assert absent and all(not c["provided"] and c["message"].startswith("not provided") for c in absent)


def test_the_plain_torch_engine_with_k_and_v_swapped_fails(inputs, tmp_path):
    engine = readme_engine("torch_engine.py", tmp_path)
    text = engine.read_text()
    assert "((tq, iq), (tk, ik), (tv, iv))" in text
    engine.write_text(text.replace("((tq, iq), (tk, ik), (tv, iv))", "((tq, iq), (tv, iv), (tk, ik))"))
    run_engine(engine, inputs, tmp_path / "out.safetensors")
    code, summary = judge(tmp_path, tmp_path / "out.safetensors", inputs)
    assert code == 1
    assert {c["dtype"] for c in summary["checks"] if c["provided"] and not c["passed"]} == {"fp64", "fp32"}


def test_the_round_trip_through_the_reference_engine_gives_reports_records(inputs, tmp_path):
    engine = readme_engine("reference_engine.py", tmp_path)
    run_engine(engine, inputs, tmp_path / "out.safetensors")
    summary = judge_outputs(tmp_path / "out.safetensors", inputs)
    saved = {(c["name"], c["dtype"]): c for c in summary["checks"] if c["name"].endswith("/outputs")}
    fields = ("passed", "max_abs_err", "base_max_abs_err", "ratio", "tolerance", "mismatched", "worst_index")
    compared = 0
    for case in CASES.values():
        if case.component not in ("attention", "block"):
            continue
        for r in run_case(case, [torch.float64, torch.float32], candidate="reference"):
            if r.name.endswith("/outputs"):
                assert {f: getattr(r, f) for f in fields} == {f: saved[(r.name, r.dtype)][f] for f in fields}
                compared += 1
    assert compared == 6


@pytest.mark.parametrize("change, words", [
    (lambda t: t | {"attention/fp32/extra": torch.zeros(1)}, "attention/fp32/extra is no entry of the manifest"),
    (lambda t: t | {"attention/fp32/image": torch.zeros(1, 2)}, "attention/fp32/image has shape [1, 2]"),
    (lambda t: t | {"attention/fp32/image": torch.full(list(t["attention/fp32/image"].shape), float("nan"))},
     "attention/fp32/image is NaN everywhere"),
])
def test_outputs_that_cannot_be_judged_are_one_line_and_nothing_is_written(inputs, torch_outputs, tmp_path, capsys,
                                                                          change, words):
    save_file(change(load_file(torch_outputs)), tmp_path / "bad.safetensors")
    code, summary = judge(tmp_path, tmp_path / "bad.safetensors", inputs)
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1 and not (tmp_path / "judged").exists()


def test_a_half_written_file_and_a_manifest_of_another_version_are_refused(inputs, torch_outputs, tmp_path, capsys):
    data = torch_outputs.read_bytes()
    (tmp_path / "half.safetensors").write_bytes(data[: len(data) // 2])
    assert judge(tmp_path, tmp_path / "half.safetensors", inputs)[0] == 2
    assert "not a whole safetensors file" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    manifest = json.loads((inputs / "manifest.json").read_text()) | {"version": 99}
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert judge(tmp_path, torch_outputs, other)[0] == 2
    assert "manifest version 99" in capsys.readouterr().err


def test_inputs_never_writes_into_a_non_empty_folder_without_force(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["inputs", "--out", str(tmp_path / "mine"), "--component", "attention", "--dtypes", "fp32"]) == 2
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in (tmp_path / "mine").iterdir()) == [
        "notes.txt"]


def test_an_onnx_runtime_engine_passes_in_fp32_and_its_fp64_is_fp32_precision_until_declared(inputs, tmp_path):
    run_engine(readme_engine("onnx_engine.py", tmp_path), inputs, tmp_path / "onnx.safetensors")
    code, summary = judge(tmp_path, tmp_path / "onnx.safetensors", inputs)
    judged = {c["dtype"]: c for c in summary["checks"] if c["provided"]}
    assert code == 1 and judged["fp32"]["passed"] and not judged["fp64"]["passed"]
    assert judged["fp64"]["message"].startswith("computes at fp32 precision")
    code, summary = judge(tmp_path / "declared", tmp_path / "onnx.safetensors", inputs, "--candidate-precision", "fp32")
    assert code == 0 and "declared fp32 precision" in summary["compared"]


def test_an_onnx_graph_exported_with_k_and_v_swapped_fails_even_declared_fp32(inputs, tmp_path):
    engine = readme_engine("onnx_engine.py", tmp_path)
    text = engine.read_text()
    assert "q, k, v = (torch.cat(pair" in text
    engine.write_text(text.replace("q, k, v = (torch.cat(pair", "q, v, k = (torch.cat(pair"))
    run_engine(engine, inputs, tmp_path / "onnx.safetensors")
    code, summary = judge(tmp_path, tmp_path / "onnx.safetensors", inputs, "--candidate-precision", "fp32")
    assert code == 1 and all(not c["passed"] for c in summary["checks"] if c["provided"])


def test_two_runs_are_judged_against_each_other_through_saved_outputs(inputs, torch_outputs, tmp_path, capsys):
    """report --save-outputs on "machine A" (the built-in reference), then the plain-torch engine judged with A's
    outputs as base: the oracle is computed here, base is A's file, and the summary cites both hashes."""
    saved = tmp_path / "a.safetensors"
    assert main(["report", "--candidate", "reference", "--dtypes", DTYPES, "--save-outputs", str(saved),
                 "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert report["inputs"]["saved_outputs"]["file"] == str(saved)
    a = load_file(saved)
    assert {"attention/fp64/image", "attention/fp32/text", "block/fp32/image"} <= set(a)
    expected = {k: v for k, v in a.items() if k.split("/")[0] in {"attention", "block", "block-edit-zero-cond"}}
    save_file(expected, tmp_path / "base.safetensors")
    code, summary = judge(tmp_path, torch_outputs, inputs, "--reference-outputs", str(tmp_path / "base.safetensors"))
    assert code == 0 and summary["reference"]["base_outputs"] == str(tmp_path / "base.safetensors")
    judged = [c for c in summary["checks"] if c["provided"]]
    assert judged and all(c["passed"] for c in judged) and "base: outputs" in summary["compared"]
    # a base 0.1% off the engine's outputs: its error against the oracle exceeds the engine's, so every ratio falls
    # below 1 (the reference run here matches the engine: ratio 1 in fp32, exact in fp64), and the wider bound passes
    wide = {k: v * 1.001 for k, v in load_file(torch_outputs).items()}
    save_file(wide, tmp_path / "wide.safetensors")
    code, summary = judge(tmp_path / "wide", torch_outputs, inputs, "--reference-outputs",
                          str(tmp_path / "wide.safetensors"))
    ratios = [c["ratio"] for c in summary["checks"] if c["provided"]]
    assert code == 0 and ratios and all(r is not None and r < 1 for r in ratios)


def test_save_outputs_never_replaces_a_file_without_force(tmp_path, capsys):
    (tmp_path / "mine.safetensors").write_bytes(b"keep")
    assert main(["report", "--save-outputs", str(tmp_path / "mine.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "mine.safetensors").read_bytes() == b"keep"


def test_the_readmes_out_of_process_commands_run_as_written_and_pass(tmp_path):
    """README's "Judge an engine you cannot import" block, run by bash as a user runs it from the repository's root
    (here a folder whose properties/ and .venv/ are this run's): every attention entry of the manifest passes."""
    readme = (ENGINES.parents[1] / "README.md").read_text()
    block = re.search(r"### Judge an engine you cannot import.*?```bash\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "properties").symlink_to(ENGINES.parent)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1])  # the venv this suite runs in
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(["bash", "-ec", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((tmp_path / "in" / "manifest.json").read_text())
    summary = json.loads((tmp_path / "qkv-verify-judge" / "summary.json").read_text())
    entries = {(e["case"], e["dtype"]) for e in manifest["entries"]}
    assert entries and {e["component"] for e in manifest["entries"]} == {"attention"}
    assert {(c["name"].split("/")[0], c["dtype"]) for c in summary["checks"]} == entries
    assert summary["verdict"] == "pass" and all(c["passed"] and c["provided"] for c in summary["checks"])
