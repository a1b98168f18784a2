"""`lora-audit --json FILE` and `lora-compare --json FILE` refuse, before reading anything, a FILE that cannot take
the record (a folder, or one of the command's own inputs, which it would replace): exit 2, one line, every file as
it was."""

from __future__ import annotations

import pytest

from properties.commands.sampling_run import assert_refused
from properties.files.test_lora_files import STANDARD, random_modules, write_lora
from verify.cli import main


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
    ("lora-audit", "folder", "a folder (expected the name of the JSON file to write)"),
    ("lora-audit", "a", "is LORA: the record would replace that input"),
    ("lora-compare", "folder", "a folder (expected the name of the JSON file to write)"),
    ("lora-compare", "a", "is A: the record would replace that input"),
    ("lora-compare", "b", "is B: the record would replace that input"),
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
    assert_refused(code, tmp_path / "never-written", err, "is LORA: the record would replace that input")
