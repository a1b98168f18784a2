"""Read diffusers-layout transformer checkpoints lazily and safely: config.json plus one or many safetensors shards.

Tensors are read one at a time through safetensors' safe_open, so a 41 GB checkpoint never sits whole in RAM;
headers are checked before they are trusted; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from verify.errors import VerifyError

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, validated: size, JSON, and every tensor's offsets inside the file."""
    if not path.is_file():
        raise VerifyError(f"{path}: no such file")
    if path.suffix in PICKLE_SUFFIXES:
        raise VerifyError(f"{path}: pickle checkpoints are refused (they can run code); convert to .safetensors")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise VerifyError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise VerifyError(f"{path}: corrupt safetensors header (claims {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VerifyError(f"{path}: corrupt safetensors header ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise VerifyError(f"{path}: corrupt safetensors header (not a JSON object)")
    data = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data):
            raise VerifyError(f"{path}: tensor {key!r} lies outside the file (truncated or corrupt)")
    return header


class Checkpoint:
    """A transformer checkpoint: its config and a lazy name -> tensor mapping over one or many shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise VerifyError(f"{self.path}: no such file or directory")
        self.config = self._read_config()
        self.shards = self._find_shards()
        self.index: dict[str, Path] = {}
        for shard in self.shards:
            for key in read_header(shard):
                if key == "__metadata__":
                    continue
                if key in self.index:
                    raise VerifyError(f"{key} appears in both {self.index[key].name} and {shard.name}")
                self.index[key] = shard
        self._declared_map_check()
        self._handles: dict[Path, object] = {}

    def keys(self) -> list[str]:
        return list(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from its shard."""
        shard = self.index[key]
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(shard), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise VerifyError(f"{shard}: cannot be read as safetensors ({e})") from None
        try:
            return self._handles[shard].get_tensor(key)
        except Exception as e:
            raise VerifyError(f"{shard}: tensor {key!r} cannot be read ({e})") from None

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self.index:
            yield key, self.get(key)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.items())

    def leaf_names(self) -> set[str]:
        """Module leaf names of all parameters ('to_q', 'to_added_qkv', ...)."""
        return {key.rsplit(".", 2)[-2] for key in self.index if key.count(".") >= 1}

    def _read_config(self) -> dict | None:
        if self.path.is_file():
            return None
        path = self.path / "config.json"
        if not path.is_file():
            raise VerifyError(f"{self.path}: no config.json (expected a diffusers-layout transformer folder)")
        try:
            config = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VerifyError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise VerifyError(f"{path}: not a JSON object")
        return config

    def _find_shards(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        indexes = sorted(self.path.glob("*.safetensors.index.json"))
        if len(indexes) > 1:
            raise VerifyError(f"{self.path}: several index files ({', '.join(p.name for p in indexes)})")
        if indexes:
            self._weight_map = self._read_index(indexes[0])
            names = sorted(set(self._weight_map.values()))
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise VerifyError(f"{indexes[0]}: names shard {missing[0]}, which is missing")
            return [self.path / n for n in names]
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            pickles = [p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            hint = f" (found {pickles[0]}: pickle checkpoints are refused)" if pickles else ""
            raise VerifyError(f"{self.path}: no .safetensors files{hint}")
        return shards

    def _read_index(self, path: Path) -> dict[str, str]:
        try:
            index = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise VerifyError(f"{path}: not valid JSON ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise VerifyError(f"{path}: no weight_map of tensor name -> shard file")
        if any(Path(v).name != v for v in weight_map.values()):
            raise VerifyError(f"{path}: shard names must be plain file names inside the folder")
        return weight_map

    def _declared_map_check(self) -> None:
        weight_map = getattr(self, "_weight_map", None)
        if weight_map is None:
            return
        for key, shard in weight_map.items():
            if key not in self.index:
                raise VerifyError(f"index names {key!r} in {shard}, but that shard does not hold it")
            if self.index[key].name != shard:
                raise VerifyError(f"index puts {key!r} in {shard}, but it is in {self.index[key].name}")
