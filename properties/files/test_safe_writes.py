"""Safe writes of the commands that write where the user says: a DST that is a dangling symlink is an existing DST
(`convert` and `lora-convert` refuse it without --force, exit 2, the link untouched; with --force the link, never
its target, is replaced), and `report --out` inside an input folder is refused (exit 2, one line, nothing
written, the run never started)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from properties.checkpoint_files import merged_checkpoint, standard_checkpoint
from properties.files.test_lora_files import STANDARD, random_modules, write_lora
from verify.checks import report as report_run
from verify.cli import main
from verify.files import lora_formats as formats

QKV = [f"transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v")]


def _files(folder: Path) -> dict[str, tuple]:
    """Every entry under `folder`: a link's target, a file's bytes and mtime, a folder as such."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = ("file", p.read_bytes(), p.stat().st_mtime_ns)
        else:
            out[rel] = ("dir",)
    return out


def _one_error_line(capsys, *needles: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qkv-verify: error:"), captured.err
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def std(tmp_path_factory) -> Path:
    return standard_checkpoint(tmp_path_factory.mktemp("std") / "std")


def _dangling(where: Path) -> tuple[Path, Path]:
    """(a symlink at where/dst, its target where/gone): the target's folder exists, the target does not."""
    where.mkdir()
    target, link = where / "gone", where / "dst"
    os.symlink(target, link)
    assert link.is_symlink() and not link.exists()
    return link, target


# --- convert -----------------------------------------------------------------------------------------------------


def test_convert_refuses_a_dangling_symlink_dst_without_force(tmp_path, std, capsys):
    link, target = _dangling(tmp_path / "w")
    before = _files(tmp_path)
    capsys.readouterr()
    assert main(["convert", str(std), str(link), "--to", "merged"]) == 2
    _one_error_line(capsys, str(link), "--force")
    assert _files(tmp_path) == before and os.readlink(link) == str(target) and not target.exists()


def test_convert_with_force_replaces_a_dangling_symlink_dst_not_its_target(tmp_path, std):
    link, target = _dangling(tmp_path / "w")
    assert main(["convert", str(std), str(link), "--to", "merged", "--force"]) == 0
    assert link.is_dir() and not link.is_symlink() and not target.exists()
    assert main(["convert", "--check", str(std), str(link)]) == 0
    assert sorted(p.name for p in link.parent.iterdir()) == ["dst"], "no temporary or old entry left beside DST"


# --- lora-convert ------------------------------------------------------------------------------------------------


@pytest.fixture
def lora_src(tmp_path) -> Path:
    return write_lora(tmp_path / "src.safetensors", "lightning", random_modules(STANDARD, QKV, 2, 0), 2.0)


def test_lora_convert_refuses_a_dangling_symlink_dst_without_force(tmp_path, lora_src, capsys):
    link, target = _dangling(tmp_path / "w")
    before = _files(tmp_path)
    capsys.readouterr()
    assert main(["lora-convert", str(lora_src), str(link), "--to", "merged", "--config", "tiny"]) == 2
    _one_error_line(capsys, str(link), "--force")
    assert _files(tmp_path) == before and os.readlink(link) == str(target) and not target.exists()


def test_lora_convert_with_force_replaces_a_dangling_symlink_dst_not_its_target(tmp_path, lora_src):
    link, target = _dangling(tmp_path / "w")
    assert main(["lora-convert", str(lora_src), str(link), "--to", "merged", "--config", "tiny", "--force"]) == 0
    assert link.is_file() and not link.is_symlink() and not target.exists()
    assert formats.read(link).alpha_source == "alpha keys"
    assert sorted(p.name for p in link.parent.iterdir()) == ["dst"]


# --- report --out inside an input --------------------------------------------------------------------------------


@pytest.fixture
def never_run(monkeypatch):
    """The report's run, replaced: a refusal must come before anything runs."""
    def run(*_):
        raise AssertionError("the report ran: --out was not refused before the run")

    monkeypatch.setattr(report_run, "run_report", run)


@pytest.mark.parametrize("flag, inside", [("--checkpoint", "out"), ("--checkpoint", "a/b/out"),
                                          ("--checkpoint", "."), ("--merged-checkpoint", "out"),
                                          ("--lora", "out")])
def test_report_refuses_an_out_inside_an_input_folder(tmp_path, std, capsys, never_run, flag, inside):
    work = tmp_path / "work"
    work.mkdir()
    given = {"--checkpoint": std}
    if flag == "--merged-checkpoint":
        given[flag] = merged_checkpoint(std, work / "merged")
    if flag == "--lora":
        folder = work / "adapter"
        folder.mkdir()
        write_lora(folder / "adapter_model.safetensors", "peft", random_modules(STANDARD, QKV, 2, 0), 2.0)
        given[flag] = folder
    out = given[flag] / inside
    before_std, before_work = _files(std), _files(work)
    capsys.readouterr()
    argv = ["report", *(a for f, p in given.items() for a in (f, str(p))), "--dtypes", "fp64,fp32", "--out", str(out)]
    assert main(argv) == 2
    _one_error_line(capsys, "--out", flag)
    assert _files(std) == before_std and _files(work) == before_work
    if inside != ".":  # nothing created where --out pointed (no folder made on the way to it either)
        assert not (given[flag] / inside.split("/")[0]).exists()


def test_report_refuses_a_dangling_symlink_out_before_running(tmp_path, capsys, never_run):
    link, target = _dangling(tmp_path / "w")
    capsys.readouterr()
    assert main(["report", "--dtypes", "fp64,fp32", "--out", str(link)]) == 2
    _one_error_line(capsys, str(link))
    assert os.readlink(link) == str(target) and not target.exists()
