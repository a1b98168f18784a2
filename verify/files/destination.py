"""Where convert writes: DST's checks, a hidden temporary folder beside DST that is fsynced and renamed into place
when complete, and the removal of what a killed run left there."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from verify.errors import VerifyError


@contextlib.contextmanager
def staged(dst: Path, warn: Callable[[str], None]) -> Iterator[Path]:
    """A new temporary folder beside `dst` to write into: when the block ends without error it is fsynced and renamed
    to `dst`; on an error or interrupt it is removed (a killed process leaves it to `remove_stale_temporaries`)."""
    remove_stale_temporaries(dst, warn)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{owner()}.", suffix=TMP_SUFFIX, dir=dst.parent))
    try:
        yield tmp
        fsync_dir(tmp)
        replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_paths(src: Path, dst: Path, force: bool) -> None:
    """Refuse a DST that is SRC, lies inside SRC or holds SRC, exists (without --force), or has no parent folder."""
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise VerifyError(f"{dst}: DST is SRC; refusing to write over the source")
    if src.is_dir() and d.is_relative_to(s):
        raise VerifyError(f"{dst}: lies inside SRC {src}; refusing to write into the source")
    if s.is_relative_to(d):
        raise VerifyError(f"{dst}: holds SRC {src}; refusing to replace the source's folder")
    if not d.parent.is_dir():
        raise VerifyError(f"{dst.parent}: no such folder for DST")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise VerifyError(f"{dst}: exists; pass --force to replace it")


TMP_SUFFIX = ".qkv-verify-tmp"


def host() -> str:
    """This host as a temporary folder's name records it: a short hash of its name."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner() -> str:
    """This process as a temporary folder's name records it: host, then process id."""
    return f"{host()}-{os.getpid()}"


def remove_stale_temporaries(dst: Path, warn: Callable[[str], None]) -> None:
    """Remove the temporary folders that an earlier convert to `dst` left when it was killed: those whose process,
    on this host, is gone. A folder of a live process, of another host (a shared file system) or not named by us
    is left alone."""
    here = host()
    for tmp in dst.parent.glob(f".{glob.escape(dst.name)}.*{TMP_SUFFIX}"):
        tmp_host, _, pid = tmp.name[len(dst.name) + 2:].split(".")[0].partition("-")
        if tmp_host == here and pid.isdigit() and not _alive(int(pid)) and tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
            warn(f"removed {tmp.name} beside DST: left by a convert (process {pid}) that was interrupted")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def replace(tmp: Path, dst: Path) -> None:
    """Rename the finished `tmp` to `dst`; an existing `dst` (allowed by --force) is moved aside, then removed."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".qkv-verify-old", dir=dst.parent))
        old.rmdir()
        os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except OSError:
        if old is not None:
            os.rename(old, dst)
        raise
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Write and fsync a small text file."""
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
