"""The conversion manifest: every tensor's shape, dtype and sha256, the source's identity, and how it was converted."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from verify import __version__
from verify.errors import VerifyError

NAME = "qkv-verify-manifest.json"
FORMAT = "qkv-verify-manifest/1"


@dataclass(frozen=True)
class Entry:
    """One tensor as it sits in a file: shape, safetensors dtype name, sha256 of its bytes."""

    shape: tuple[int, ...]
    dtype: str
    sha256: str

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "sha256": self.sha256}


def identity(entries: Mapping[str, Entry]) -> str:
    """A checkpoint's identity: sha256 of its canonical tensor table (names, shapes, dtypes, hashes)."""
    table = {key: entries[key].to_json() for key in sorted(entries)}
    canonical = json.dumps(table, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def build(entries: Mapping[str, Entry], source: Mapping[str, Entry], source_path: Path, conversion: dict) -> dict:
    """The manifest written with a converted checkpoint."""
    return {
        "format": FORMAT,
        "identity": identity(entries),
        "source": {"path": str(source_path), "identity": identity(source), "tensors": len(source)},
        "conversion": dict(conversion),
        "tool": {"qkv_verify": __version__},
        "tensors": {key: entries[key].to_json() for key in sorted(entries)},
    }


def read(folder: Path) -> dict | None:
    """The manifest in `folder`, or None when there is none; VerifyError when it is there but malformed."""
    path = folder / NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise VerifyError(f"{path}: not valid JSON ({e.__class__.__name__})") from None
    ok = (isinstance(manifest, dict) and manifest.get("format") == FORMAT
          and isinstance(manifest.get("tensors"), dict) and isinstance(manifest.get("conversion"), dict)
          and isinstance(manifest.get("source"), dict))
    if not ok:
        raise VerifyError(f"{path}: not a {FORMAT} manifest")
    return manifest


def entries_of(manifest: dict) -> dict[str, Entry]:
    """The tensor table of a manifest read by `read`."""
    out = {}
    for key, e in manifest["tensors"].items():
        try:
            out[key] = Entry(tuple(e["shape"]), e["dtype"], e["sha256"])
        except (KeyError, TypeError):
            raise VerifyError(f"manifest entry {key!r} lacks shape, dtype or sha256") from None
    return out
