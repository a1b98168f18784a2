"""`lora-audit`, `lora-compare`, `regress` and `bench` refuse, before reading anything, a `--json FILE` that cannot
take the record: a folder, one of the command's own inputs (a regress baseline, a LoRA: never, --force or not), or an
existing file without --force. Exit 2, one line, every file as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from properties.bench.test_bench import TINY
from properties.commands.sampling_run import assert_refused
from properties.files.test_lora_files import STANDARD, random_modules, write_lora
from verify.cli import main

BASELINE = Path(__file__).resolve().parents[2] / "reports" / "baselines" / "default.json"


@pytest.fixture
def loras(tmp_path):
    modules = random_modules(STANDARD, ["transformer_blocks.0.attn.to_q"], 2, 0)
    return [write_lora(tmp_path / f"{n}.safetensors", "diffusers", modules, 2.0) for n in ("a", "b")]


def run(capsys, argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command, target, words", [
    ("lora-audit", "folder", "a folder (expected the name of the file to write)"),
    ("lora-audit", "a", "is LORA: the output would replace that input"),
    ("lora-compare", "folder", "a folder (expected the name of the file to write)"),
    ("lora-compare", "a", "is A: the output would replace that input"),
    ("lora-compare", "b", "is B: the output would replace that input"),
])
def test_a_json_target_that_cannot_take_the_record_is_refused(tmp_path, capsys, loras, command, target, words):
    (tmp_path / "folder").mkdir()
    path = tmp_path / ("folder" if target == "folder" else f"{target}.safetensors")
    before = {p: p.read_bytes() for p in loras}
    argv = [command, *map(str, loras if command == "lora-compare" else loras[:1]), "--config", "tiny", "--json",
            str(path)]
    code, err = run(capsys, argv)
    assert_refused(code, tmp_path / "never-written", err, words)
    assert {p: p.read_bytes() for p in loras} == before and not any((tmp_path / "folder").iterdir())


def test_the_same_input_through_another_path_is_refused(tmp_path, capsys, loras):
    """A symbolic link to the LoRA names the same file."""
    link = tmp_path / "link.json"
    link.symlink_to(loras[0])
    code, err = run(capsys, ["lora-audit", str(loras[0]), "--config", "tiny", "--json", str(link)])
    assert_refused(code, tmp_path / "never-written", err, "is LORA: the output would replace that input")


@pytest.mark.parametrize("target, words", [
    ("base.json", "is BASELINE: the output would replace that input"),
    ("cand.json", "is CANDIDATE: the output would replace that input"),
    ("report/summary.json", "is BASELINE: the output would replace that input"),  # a report folder's summary
    ("report", "a folder (expected the name of the file to write)"),
])
def test_regress_never_writes_its_json_over_a_summary_it_reads(tmp_path, capsys, target, words):
    (tmp_path / "report").mkdir()
    inputs = [tmp_path / "base.json", tmp_path / "cand.json", tmp_path / "report" / "summary.json"]
    for p in inputs:  # the committed baseline: a summary regress reads (and, unguarded, would overwrite)
        shutil.copyfile(BASELINE, p)
    before = {p: p.read_text() for p in inputs}
    baseline = tmp_path / ("report" if target.startswith("report/") else "base.json")
    code, err = run(capsys, ["regress", str(baseline), str(tmp_path / "cand.json"), "--json", str(tmp_path / target)])
    assert_refused(code, tmp_path / "never-written", err, words)
    assert {p: p.read_text() for p in inputs} == before


def argv_of(command: str, loras: list[Path], tmp_path: Path) -> list[str]:
    if command == "regress":
        for name in ("base.json", "cand.json"):
            shutil.copyfile(BASELINE, tmp_path / name)
        return ["regress", str(tmp_path / "base.json"), str(tmp_path / "cand.json")]
    if command == "bench":
        return ["bench", *TINY, "--modes", "eager", "--phases", "forward"]
    return [command, *map(str, loras if command == "lora-compare" else loras[:1]), "--config", "tiny"]


@pytest.mark.parametrize("command", ["lora-audit", "lora-compare", "regress", "bench"])
def test_an_existing_json_file_is_replaced_only_with_force(tmp_path, capsys, loras, command):
    target = tmp_path / "earlier.json"
    target.write_text("the user's own file")
    argv = argv_of(command, loras, tmp_path) + ["--json", str(target)]
    code, err = run(capsys, argv)
    assert_refused(code, tmp_path / "never-written", err, f"--json {target}: exists; pass --force to replace it")
    assert target.read_text() == "the user's own file"
    if command == "bench":
        return  # a bench run is not cheap; its --force is the same one-line path as the others'
    code, _ = run(capsys, argv + ["--force"])
    assert code in (0, 1) and json.loads(target.read_text())  # replaced by the record


def test_bench_appends_to_its_own_json_without_force(tmp_path, capsys):
    """--append FILE --json FILE extends that file, as asked: no --force needed (nor a refusal of the input)."""
    target = tmp_path / "bench.json"
    argv = argv_of("bench", [], tmp_path) + ["--json", str(target)]
    assert run(capsys, argv)[0] == 0
    code, _ = run(capsys, argv + ["--append", str(target)])
    assert code == 0 and json.loads(target.read_text())["appended_from"]
