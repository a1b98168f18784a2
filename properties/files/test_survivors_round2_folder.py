"""Writing one output file whole, for the survivors of the second mutation run
(reports/mutation/verdicts-messages-writes.txt) in verify/files/folder.py: the temporary file is made beside the
output (not in the system's temporary folder) and removed when the write fails."""

from __future__ import annotations

import tempfile

import pytest

from verify.files.folder import write_file


def test_a_file_is_written_whatever_the_systems_temporary_folder(tmp_path, monkeypatch):
    """Kills x_write_file__mutmut_7 (the temporary file made in the system's temporary folder, which may be missing
    or on another disk, where the final rename fails): with TMPDIR pointing nowhere the file is still written, and
    nothing else is left beside it."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    out = tmp_path / "out"
    out.mkdir()
    write_file(out / "audit.json", b'{"ok": true}\n')
    assert (out / "audit.json").read_bytes() == b'{"ok": true}\n'
    assert [p.name for p in out.iterdir()] == ["audit.json"]


def test_a_failed_write_raises_its_own_error_and_leaves_no_temporary_file(tmp_path):
    """Kills x_write_file__mutmut_20 (os.unlink(None): a TypeError instead of the real error, and the temporary file
    left): writing over a folder fails as the rename fails, and the folder beside it holds only what it held."""
    (tmp_path / "audit.json").mkdir()
    with pytest.raises(IsADirectoryError):
        write_file(tmp_path / "audit.json", b"{}")
    assert [p.name for p in tmp_path.iterdir()] == ["audit.json"]
