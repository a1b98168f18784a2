"""`qkv-verify convert`'s files and messages where the mutation run (reports/mutation/verdicts-messages-writes.txt)
left survivors in verify/files/convert.py, manifest.py and destination.py: odd but valid sources, the manifest's
recorded values recomputed independently, malformed manifests, and what DST's folder holds after a --force replace
that fails or is interrupted."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from properties.checkpoint_files import standard_checkpoint
from verify.cli import main
from verify.files import convert as conv
from verify.files import destination
from verify.files import manifest as mf

ATTN = "transformer_blocks.0.attn."


def convert(*argv) -> int:
    return main(["convert", *map(str, argv)])


def err_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def std(tmp_path_factory) -> Path:
    return standard_checkpoint(tmp_path_factory.mktemp("std") / "std", shard_size="40KB")


def _file_tensors(folder: Path) -> dict[str, tuple[torch.Tensor, str]]:
    """Every tensor of a folder's safetensors files, with the dtype name its header gives."""
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        data = shard.read_bytes()
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        with safe_open(str(shard), framework="pt") as f:
            out.update({k: (f.get_tensor(k), header[k]["dtype"]) for k in f.keys()})
    return out


def _identity(folder: Path) -> str:
    """A checkpoint's identity as manifest.identity documents it, computed here from the files: sha256 of the
    canonical JSON (keys sorted, no spaces) of {name: {shape, dtype, sha256 of its bytes}}, prefixed 'sha256:'."""
    table = {k: {"shape": list(t.shape), "dtype": dtype,
                 "sha256": hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()}
             for k, (t, dtype) in _file_tensors(folder).items()}
    return "sha256:" + hashlib.sha256(json.dumps(table, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --- the manifest's recorded values (manifest.identity, manifest.build, convert's Result) -------------------------

def test_manifest_identities_are_the_documented_hash_of_the_tensor_tables(tmp_path, std):
    """Kills x_identity__mutmut_1 (table None), _5 (fields unsorted), _14 and _15 (the 'sha256:' prefix changed):
    the existing manifest test compared against mf.identity itself, so a changed recipe went unseen."""
    dst = tmp_path / "m"
    assert convert(std, dst, "--to", "merged") == 0
    m = json.loads((dst / mf.NAME).read_text())
    assert m["identity"] == _identity(dst)
    assert m["source"]["identity"] == _identity(std)
    assert m["identity"] != m["source"]["identity"]


def test_manifest_names_the_source_path_given(tmp_path, std):
    """Kills x_build__mutmut_9 ('PATH' key) and _10 (str(None))."""
    assert convert(std, tmp_path / "m", "--to", "merged") == 0
    source = json.loads((tmp_path / "m" / mf.NAME).read_text())["source"]
    assert source["path"] == str(std) and source["tensors"] == len(_file_tensors(std))


def test_convert_returns_the_manifest_it_wrote(tmp_path, std):
    """Kills x_convert__mutmut_93 (Result.manifest None): the Python API's result carries the manifest."""
    r = conv.convert(std, tmp_path / "m", "merged")
    assert r.manifest == json.loads((tmp_path / "m" / mf.NAME).read_text())
    assert r.manifest["conversion"]["to"] == "merged"


# --- malformed manifests in --check's DST (manifest.read) ----------------------------------------------------------

@pytest.mark.parametrize("fault", ["another format", "tensors a list", "conversion a string", "source missing"])
def test_check_refuses_a_manifest_not_of_its_format(tmp_path, std, capsys, fault):
    """Kills x_read__mutmut_8 (`... or source is a dict` accepted another format) and _9 (`tensors is a dict or
    conversion and source are` accepted tensors as a list): each fault alone makes the manifest not one of ours."""
    dst = tmp_path / "m"
    assert convert(std, dst, "--to", "merged") == 0
    m = json.loads((dst / mf.NAME).read_text())
    if fault == "another format":
        m["format"] = "qkv-verify-manifest/2"
    elif fault == "tensors a list":
        m["tensors"] = sorted(m["tensors"])
    elif fault == "conversion a string":
        m["conversion"] = "merged"
    else:
        del m["source"]
    (dst / mf.NAME).write_text(json.dumps(m))
    capsys.readouterr()
    assert convert("--check", std, dst) == 2
    assert err_lines(capsys) == [f"qkv-verify: error: {dst / mf.NAME}: not a qkv-verify-manifest/1 manifest"]


# --- odd but valid sources (files/convert.py's planning) -----------------------------------------------------------

def test_a_single_attention_file_with_top_level_keys_converts(tmp_path):
    """Kills x__split_key__mutmut_10 (an empty prefix became '.'): q/k/v keys with no module path before them, as an
    attention layer's own state dict has them, merge into to_qkv (blocked: q rows, then k, then v)."""
    g = torch.Generator().manual_seed(0)
    sd = {f"{x}.{p}": torch.randn(6, 4, generator=g) if p == "weight" else torch.randn(6, generator=g)
          for x in ("to_q", "to_k", "to_v") for p in ("weight", "bias")}
    save_file(sd, str(tmp_path / "attn.safetensors"))
    assert convert(tmp_path / "attn.safetensors", tmp_path / "m", "--to", "merged") == 0
    out = {k: t for k, (t, _) in _file_tensors(tmp_path / "m").items()}
    assert sorted(out) == ["to_qkv.bias", "to_qkv.weight"]
    for p in ("weight", "bias"):
        assert torch.equal(out[f"to_qkv.{p}"], torch.cat([sd[f"to_q.{p}"], sd[f"to_k.{p}"], sd[f"to_v.{p}"]]))


def test_a_fused_source_that_also_holds_one_separate_part_is_one_error_line(tmp_path, capsys):
    """Kills x__groups__mutmut_26 (the message took the path of the second clashing key: with one, an IndexError
    traceback)."""
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "m.safetensors"
    save_file({ATTN + "to_qkv.weight": torch.randn(12, 4, generator=g),
               ATTN + "add_qkv_proj.weight": torch.randn(12, 4, generator=g),
               ATTN + "to_q.weight": torch.randn(4, 4, generator=g)}, str(src))
    capsys.readouterr()
    assert convert(src, tmp_path / "s", "--to", "standard") == 2
    (line,) = err_lines(capsys)
    assert line.startswith(f"qkv-verify: error: {src}: holds {ATTN}to_q.weight as well as {ATTN}to_qkv.weight")
    assert not (tmp_path / "s").exists()


def test_a_fused_bias_that_does_not_divide_in_three_is_named(tmp_path, capsys):
    """Kills x__check_rows__mutmut_15 (biases left out of the row check): the error names the bias and its file,
    not an anonymous 'fused tensor' from the split."""
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "m.safetensors"
    save_file({ATTN + "to_qkv.weight": torch.randn(12, 4, generator=g),
               ATTN + "to_qkv.bias": torch.randn(11, generator=g),
               ATTN + "add_qkv_proj.weight": torch.randn(12, 4, generator=g)}, str(src))
    capsys.readouterr()
    assert convert(src, tmp_path / "s", "--to", "standard") == 2
    assert err_lines(capsys) == [f"qkv-verify: error: {src}: {ATTN}to_qkv.bias has 11 rows, which do not divide "
                                 "into equal q, k, v"]


# --- DST's folder (destination.py) ---------------------------------------------------------------------------------

def test_dst_in_a_missing_folder_names_the_folder(tmp_path, std, capsys):
    """Kills x_check_paths__mutmut_10 (VerifyError(None): 'error: None')."""
    capsys.readouterr()
    assert convert(std, tmp_path / "nowhere" / "m", "--to", "merged") == 2
    assert err_lines(capsys) == [f"qkv-verify: error: {tmp_path / 'nowhere'}: no such folder for DST"]


def test_a_dead_converts_temporary_folder_is_removed_and_a_live_ones_kept(tmp_path, std, capsys):
    """Kills x_remove_stale_temporaries__mutmut_7, _9, _10 (host and pid misread from the folder's name: nothing
    removed) and _20 (int(None): a TypeError). The in-process twin of test_convert.py's
    test_temporary_folders_of_a_killed_convert_are_removed_and_no_others (left out of mutmut's runs): no process is
    started; pid_max is a process id the kernel never hands out, so its process is gone."""
    pid_max = Path("/proc/sys/kernel/pid_max")
    if not pid_max.is_file():
        pytest.skip("no /proc/sys/kernel/pid_max")
    dead = int(pid_max.read_text())
    stale = tmp_path / f".out.{destination.host()}-{dead}.abcd1234{destination.TMP_SUFFIX}"
    live = tmp_path / f".out.{destination.host()}-{os.getpid()}.abcd1234{destination.TMP_SUFFIX}"
    for folder in (stale, live):
        folder.mkdir()
        (folder / conv.WEIGHTS).write_bytes(b"half-written")
    capsys.readouterr()
    assert convert(std, tmp_path / "out", "--to", "merged") == 0
    assert not stale.exists() and live.exists()
    assert (f"qkv-verify: warning: removed {stale.name} beside DST: left by a convert (process {dead}) that was "
            "interrupted") in err_lines(capsys)


def test_force_over_dst_works_with_the_temporary_directory_on_another_file_system(tmp_path, std, monkeypatch):
    """Kills x_replace__mutmut_10 (the old DST moved aside into the system temporary directory, not beside DST):
    with TMPDIR on another file system (a tmpfs) that rename fails with EXDEV."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev or not os.access(shm, os.W_OK):
        pytest.skip("no writable directory on another file system than the test's")
    with tempfile.TemporaryDirectory(dir=shm) as other:
        monkeypatch.setattr(tempfile, "tempdir", other)
        dst = tmp_path / "m"
        dst.mkdir()
        (dst / "keep").write_text("old")
        assert convert(std, dst, "--to", "merged", "--force") == 0
        assert not (dst / "keep").exists() and (dst / mf.NAME).is_file()
        assert os.listdir(other) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_interrupted_force_leaves_the_old_dst_named_as_qkv_verifys(tmp_path, std, monkeypatch):
    """Kills x_replace__mutmut_6 (suffix None): interrupted after the new DST is in place and before the old one is
    deleted, the old DST is left beside it in a hidden folder whose name says what it is (.qkv-verify-old)."""
    dst = tmp_path / "m"
    dst.mkdir()
    (dst / "keep").write_text("old")
    real = destination.fsync_dir

    def interrupted(path):
        if Path(path) == tmp_path:  # replace's fsync of DST's parent: after the renames, before the old is removed
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(destination, "fsync_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(std, dst, "--to", "merged", "--force")
    (old,) = [p for p in tmp_path.iterdir() if p.name != "m"]
    assert old.name.startswith(".m.") and old.name.endswith(".qkv-verify-old")
    assert (old / "keep").read_text() == "old" and (dst / mf.NAME).is_file()


def test_a_failed_replace_puts_the_old_dst_back(tmp_path):
    """Kills x_replace__mutmut_22 (os.rename(None, dst): a TypeError, the old DST left under its hidden name):
    when the finished folder cannot be renamed into place, the existing DST is restored and the error raised."""
    dst = tmp_path / "m"
    dst.mkdir()
    (dst / "keep").write_text("old")
    with pytest.raises(FileNotFoundError):
        destination.replace(tmp_path / "gone", dst)
    assert (dst / "keep").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
