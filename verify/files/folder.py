"""Writing output files whole (a folder, or one file): written beside their place, then moved in, so that no reader
ever sees a half-written output."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from verify.errors import VerifyError


def write_folder(out: Path, files: dict[str, str | bytes]) -> None:
    """Write every file into a temporary folder beside `out`, then move them in: no half-written output."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in files.items():  # a name may hold a subfolder ("weights/x.safetensors")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        out.mkdir(exist_ok=True)
        for name in files:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_file(path: Path, data: bytes) -> None:
    """Write one file whole: a temporary file beside it, then renamed over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def same_file(a: Path | None, b: Path | None) -> bool:
    """Whether `a` and `b` both exist and are one file (links and relative paths resolved)."""
    return a is not None and b is not None and Path(a).exists() and Path(b).exists() and Path(a).samefile(b)


def refuse_output_file(flag: str, path: Path | None, inputs: dict[str, Path | None], force: bool = False) -> None:
    """VerifyError, before anything is read, where `flag` PATH cannot take the file a command writes: no folder to
    hold it, a folder, one of the command's own input files (which the output would replace, --force or not), or an
    existing file without --force."""
    if path is None:
        return
    if not path.parent.is_dir():
        raise VerifyError(f"{path.parent}: no such folder for {flag}")
    if path.is_dir():
        raise VerifyError(f"{flag} {path}: a folder (expected the name of the file to write)")
    same = next((name for name, given in inputs.items() if same_file(path, given)), None)
    if same:
        raise VerifyError(f"{flag} {path} is {same}: the output would replace that input")
    if path.exists() and not force:
        raise VerifyError(f"{flag} {path}: exists; pass --force to replace it")
