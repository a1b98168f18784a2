"""Read diffusers-layout transformer checkpoints lazily and safely: config.json plus one or many safetensors shards.

Tensors are read one at a time through safetensors' safe_open, so a 41 GB checkpoint never sits whole in RAM;
headers are checked before they are trusted; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from verify.errors import VerifyError

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors dtype names -> torch dtypes (those torch can hold; others are refused as unknown)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, validated as safetensors itself would: size, JSON, every tensor's
    dtype, shape and offsets, the offsets packed back to back up to the end of the file."""
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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise VerifyError(f"{path}: corrupt safetensors header ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise VerifyError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise VerifyError(f"{path}: corrupt safetensors header (__metadata__ is not a map of strings)")
    end = 0
    for key, info in sorted(_tensor_entries(path, header), key=lambda kv: kv[1]["data_offsets"]):
        start, stop = info["data_offsets"]
        if start != end:
            raise VerifyError(f"{path}: tensor {key!r} starts at byte {start}, not {end} (overlapping or corrupt)")
        end = stop
    if end != size - 8 - n:
        raise VerifyError(f"{path}: tensor data ends at byte {end} of {size - 8 - n} (truncated or corrupt)")
    return header


def _tensor_entries(path: Path, header: dict) -> Iterator[tuple[str, dict]]:
    """(name, info) of every tensor, each info checked: a known dtype, a shape, offsets that hold exactly it."""
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise VerifyError(f"{path}: tensor {key!r} has no dtype/shape/data_offsets entry (corrupt header)")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (isinstance(dtype, str) and dtype in DTYPES):
            raise VerifyError(f"{path}: tensor {key!r} has unknown dtype {str(dtype)[:40]!r}")
        if not (isinstance(shape, list) and all(_natural(s) for s in shape)):
            raise VerifyError(f"{path}: tensor {key!r} has no valid shape (corrupt header)")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise VerifyError(f"{path}: tensor {key!r} lies outside the file (truncated or corrupt)")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise VerifyError(f"{path}: tensor {key!r} spans {offsets[1] - offsets[0]} bytes, its {dtype} shape "
                              f"{tuple(shape)} needs {nbytes} (corrupt header)")
        yield key, info


def _natural(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def non_finite(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of a tensor; (0, 0) for integer and boolean tensors."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0, 0
    if tensor.dtype.itemsize == 1:  # fp8: widened first, isnan/isinf are not implemented for it everywhere
        tensor = tensor.float()
    lo, hi = torch.aminmax(tensor)  # NaN propagates, an Inf is the min or the max: 30x faster than isfinite().all()
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return 0, 0
    return int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())


class Checkpoint:
    """A transformer checkpoint: its config and a lazy name -> tensor mapping over one or many shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise VerifyError(f"{self.path}: no such file or directory")
        self.config = self._read_config()
        self.shards = self._find_shards()
        self.index: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # from the headers: shapes known before any tensor is read
        for shard in self.shards:
            for key, info in read_header(shard).items():
                if key == "__metadata__":
                    continue
                if key in self.index:
                    raise VerifyError(f"{key} appears in both {self.index[key].name} and {shard.name}")
                self.index[key] = shard
                self.shapes[key] = tuple(info["shape"])
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

    def non_finite(self) -> dict[str, tuple[int, int]]:
        """name -> (NaN count, Inf count) of every tensor that holds a NaN or an Inf, read one tensor at a time."""
        found = {}
        for key in self.index:
            counts = non_finite(self.get(key))
            if any(counts):
                found[key] = counts
        return found

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
