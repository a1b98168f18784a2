"""A checkpoint streamed between standard and merged QKV, and the check that proves a conversion (both run by
`qkv-verify convert`, verify.commands.convert).

Planning reads headers only: SRC's tensors on the meta device go through verify.maths.state_dict's merge/split, which
names the output tensors and checks every q/k/v group, and the standard side must fit the model of config.json. Writing
streams: a tensor outside the q/k/v groups is copied file to file by the kernel while a worker thread hashes and scans
it where it lies in SRC; a group's tensors are read whole (from whichever shards hold them), merged by the same merge
(or split into qkv.split's views, not copies), written, hashed by a worker and dropped. Memory never holds a shard: a
few groups and copy buffers at most. Output shard i holds what source shard i held (a fused tensor goes where its q was;
q, k, v where their fused tensor was), named as diffusers names shards, written into a temporary folder beside DST,
fsynced, and renamed to DST at the end.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from verify.errors import VerifyError
from verify.files import destination
from verify.files import manifest as mf
from verify.files.checkpoint import DTYPES, Checkpoint, read_header
from verify.files.model_config import MERGE_KEY, differing_fields, merge_recorded, model_class, model_config, parameters
from verify.files.scan import CHUNK, IN_FLIGHT, Scan, Workers, scan_file, tensor_bytes
from verify.maths import qkv
from verify.maths.naming import DEFAULT_NAMING, NAMINGS, detect_naming, streams
from verify.maths.qkv import LAYOUTS, QKVShape
from verify.maths.state_dict import merge_state_dict, split_state_dict

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
WRITE = 2**20  # bytes per write() of a converted tensor
DIRECTIONS = ("merged", "standard")
FUSED_LEAVES = {s.fused for pair in NAMINGS.values() for s in pair}
# sizes a config.json may leave out (its class's defaults fill them); a single file without one: Qwen-Image's
DIFFUSERS_DEFAULTS = {"num_attention_heads": 24, "attention_head_dim": 128}


@dataclass(frozen=True)
class Tensor:
    """Where one tensor's bytes sit: file, absolute offset, size; with its safetensors dtype and shape."""

    key: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Group:
    """One fused tensor and its q, k, v; `sources` are the keys read, `targets` the keys written."""

    fused: str
    parts: tuple[str, str, str]
    to: str

    @property
    def sources(self) -> tuple[str, ...]:
        return self.parts if self.to == "merged" else (self.fused,)

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.fused,) if self.to == "merged" else self.parts


@dataclass
class Plan:
    """What a conversion reads and writes, worked out from SRC's headers before anything is written."""

    to: str
    naming: str
    layout: str
    head_dim: int
    shape: QKVShape | None  # q/k/v rows from config.json; None without one (equal thirds)
    src: dict[str, Tensor]
    out: dict[str, tuple[str, tuple[int, ...]]]  # key -> (dtype, shape)
    groups: dict[str, Group]  # every target key -> its group
    shards: list[tuple[Path, list[str]]] = field(default_factory=list)  # source shard -> output keys, write order

    @property
    def conversion(self) -> dict:
        return {"to": self.to, "naming": self.naming, "layout": self.layout, "head_dim": self.head_dim}

    def convert(self, group: Group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One group's target tensors from its source tensors: merged by verify.maths.state_dict's merge, split by
        qkv.split into views of the fused tensor (split_state_dict would copy each part; they are only written)."""
        if self.to == "merged":
            return merge_state_dict(tensors, self.naming, self.layout, self.head_dim)
        fused = tensors[group.fused]
        shape = self.shape or QKVShape.equal(fused.shape[0], self.head_dim)
        return dict(zip(group.parts, qkv.split(fused, shape, self.layout)))


# ---------------------------------------------------------------------------------------------------------------
# Planning


def tensors_of(ckpt: Checkpoint) -> dict[str, Tensor]:
    """Every tensor of a checkpoint located in its shard (headers only), each shard also opened by safetensors."""
    out = {}
    for shard in ckpt.shards:
        header = read_header(shard)
        with shard.open("rb") as f:
            start = 8 + struct.unpack("<Q", f.read(8))[0]
        try:
            with safe_open(str(shard), framework="pt"):
                pass
        except Exception as e:  # safetensors raises its own error types
            raise VerifyError(f"{shard}: cannot be read as safetensors ({e})") from None
        for key, info in header.items():
            if key != "__metadata__":
                a, b = info["data_offsets"]
                out[key] = Tensor(key, shard, info["dtype"], tuple(info["shape"]), start + a, b - a)
    return out


def open_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint folder or file; a folder without config.json that holds one weights file (what convert writes
    from a single-file SRC) is read as that file."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").exists() and (path / WEIGHTS).is_file():
        if len(list(path.glob("*.safetensors"))) == 1:
            return Checkpoint(path / WEIGHTS)
    return Checkpoint(path)


def fused_leaves(ckpt: Checkpoint) -> set[str]:
    return ckpt.leaf_names() & FUSED_LEAVES


def plan(ckpt: Checkpoint, to: str, naming: str | None = None, layout: str = "blocked") -> Plan:
    """Work out the conversion of `ckpt` to `to` from its headers; VerifyError for anything that cannot convert."""
    if to not in DIRECTIONS:
        raise VerifyError(f"unknown --to {to!r}; expected merged or standard")
    if layout not in LAYOUTS:
        raise VerifyError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if naming is not None:
        streams(naming)
    src = tensors_of(ckpt)
    fused = fused_leaves(ckpt)
    if to == "merged" and fused:
        raise VerifyError(f"{ckpt.path}: already holds fused tensors ({', '.join(sorted(fused))}); nothing to merge")
    if to == "standard" and not fused:
        raise VerifyError(f"{ckpt.path}: holds no fused q/k/v tensors; it is standard already")
    if to == "standard":
        found = detect_naming(ckpt.leaf_names())
        if naming not in (None, found):
            raise VerifyError(f"{ckpt.path}: its fused tensors use the {found} naming, not {naming}")
        naming = found
    naming = naming or DEFAULT_NAMING
    head_dim, shape = _dims(ckpt, src)
    _check_rows(src, to, naming, shape)
    meta = {k: torch.empty(t.shape, dtype=DTYPES[t.dtype], device="meta") for k, t in src.items()}
    try:
        out = merge_state_dict(meta, naming, layout, head_dim) if to == "merged" else \
            split_state_dict(meta, naming, layout, head_dim, shape)
    except VerifyError as e:
        raise VerifyError(f"{ckpt.path}: {e}") from None
    _check_fit(ckpt, meta if to == "merged" else out)
    p = Plan(to, naming, layout, head_dim, shape, src, {k: (_dtype_name(t.dtype), tuple(t.shape))
                                                         for k, t in out.items()}, {})
    for group in _groups(src, out, naming, to):
        _check_group(group, src)
        p.groups.update(dict.fromkeys(group.targets, group))
    p.shards = _layout_shards(ckpt, p)
    return p


def _dims(ckpt: Checkpoint, src: dict[str, Tensor]) -> tuple[int, QKVShape | None]:
    """head_dim, and the q/k/v rows config.json implies (None for a single file without a config)."""
    config = ckpt.config
    norm = next((t for k, t in src.items() if k.endswith("attn.norm_q.weight") and len(t.shape) == 1), None)
    if config is None:
        return (norm.shape[0] if norm else DIFFUSERS_DEFAULTS["attention_head_dim"]), None
    args = parameters(model_class(ckpt))
    dims = {k: config.get(k, args[k].default) for k in DIFFUSERS_DEFAULTS}
    for k, v in dims.items():
        if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise VerifyError(f"{ckpt.path}/config.json: {k} must be a positive integer, got {v!r}")
    heads, head_dim = dims["num_attention_heads"], dims["attention_head_dim"]
    if norm and norm.shape != (head_dim,):
        raise VerifyError(f"{norm.path}: {norm.key} has shape {norm.shape}, config.json says attention_head_dim "
                          f"{head_dim}")
    rows = heads * head_dim
    return head_dim, QKVShape(rows, rows, rows, head_dim)


def _check_rows(src: dict[str, Tensor], to: str, naming: str, shape: QKVShape | None) -> None:
    """Each q/k/v (or fused) tensor has the rows config.json implies, or thirds of equal rows without a config."""
    leaves = {leaf for s in streams(naming) for leaf in ((s.fused,) if to == "standard" else s.separate)}
    for key, t in src.items():
        _, leaf, param = _split_key(key)
        if leaf not in leaves or param not in ("weight", "bias"):
            continue
        if len(t.shape) != (2 if param == "weight" else 1) or not t.shape[0]:
            raise VerifyError(f"{t.path}: {key} has shape {t.shape}, not that of a projection's {param}")
        rows = t.shape[0]
        if shape is None:
            if to == "standard" and (rows == 0 or rows % 3):
                raise VerifyError(f"{t.path}: {key} has {rows} rows, which do not divide into equal q, k, v")
            continue
        want = shape.rows if to == "standard" else shape.q_rows
        if rows != want:
            times = "3 x " if to == "standard" else ""
            raise VerifyError(f"{t.path}: {key} has {rows} rows; config.json implies {want} "
                              f"({times}{shape.q_rows // shape.head_dim} heads x {shape.head_dim})")


def _check_fit(ckpt: Checkpoint, standard: dict[str, torch.Tensor]) -> None:
    """The standard side of the conversion has exactly the parameters (names, shapes) of the model of config.json."""
    if ckpt.config is None:
        return  # a single file: no config to hold it to
    config = model_config(ckpt)
    try:
        with torch.device("meta"):
            model = config.model_class(**config)
    except Exception as e:  # a config diffusers cannot build a model from
        raise VerifyError(f"{ckpt.path}/config.json: no model can be built from it ({type(e).__name__}: {e})") from None
    want = {k: tuple(p.shape) for k, p in model.named_parameters()}
    missing, unexpected = sorted(set(want) - set(standard)), sorted(set(standard) - set(want))
    if missing or unexpected:
        what = ", ".join([f"missing {missing[0]}"] * bool(missing) + [f"unexpected {unexpected[0]}"] * bool(unexpected))
        raise VerifyError(f"{ckpt.path}: does not fit the model of its config.json ({what}; {len(missing)} missing, "
                          f"{len(unexpected)} unexpected)")
    for key, shape in want.items():
        if tuple(standard[key].shape) != shape:
            raise VerifyError(f"{ckpt.path}: {key} has shape {tuple(standard[key].shape)}, config.json implies "
                              f"{shape}")


def _groups(src: dict, out: dict, naming: str, to: str) -> Iterator[Group]:
    """The q/k/v groups merge/split formed: from the keys they consumed; a target that SRC also holds is refused."""
    consumed = sorted(set(src) - set(out))
    by_leaf = {leaf: s for s in streams(naming) for leaf in (s.fused, *s.separate)}
    seen = set()
    for key in consumed:
        prefix, leaf, param = _split_key(key)
        s = by_leaf[leaf]
        group = Group(f"{prefix}{s.fused}.{param}", tuple(f"{prefix}{x}.{param}" for x in s.separate), to)
        if group.fused in seen:
            continue
        seen.add(group.fused)
        clash = [k for k in group.targets if k in src]
        if clash:
            raise VerifyError(f"{src[clash[0]].path}: holds {clash[0]} as well as "
                              f"{', '.join(group.sources)}: fused and separate q/k/v of one projection")
        yield group


def _check_group(group: Group, src: dict[str, Tensor]) -> None:
    dtypes = [src[k].dtype for k in group.sources]
    if len(set(dtypes)) > 1:
        raise VerifyError(f"{src[group.sources[0]].path}: {', '.join(group.sources)} have dtypes "
                          f"{', '.join(dtypes)}; one fused tensor needs one dtype")


def _layout_shards(ckpt: Checkpoint, p: Plan) -> list[tuple[Path, list[str]]]:
    """Output keys per source shard: a group's targets go where its first source is, next to each other."""
    def anchor(key: str) -> str:
        return min(p.groups[key].targets) if key in p.groups else key

    home = {key: p.src[p.groups[key].sources[0] if key in p.groups else key].path for key in p.out}
    shards = []
    for shard in ckpt.shards:
        keys = [k for k in p.out if home[k] == shard]
        keys.sort(key=lambda k: (-DTYPES[p.out[k][0]].itemsize, anchor(k), k))  # as safetensors orders them
        if keys:
            shards.append((shard, keys))
    return shards


def _split_key(key: str) -> tuple[str, str, str]:
    """'a.b.to_q.weight' -> ('a.b.', 'to_q', 'weight')."""
    head, _, param = key.rpartition(".")
    prefix, _, leaf = head.rpartition(".")
    return (prefix + "." if prefix else ""), leaf, param


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing


def load(t: Tensor) -> torch.Tensor:
    """One tensor read from its file into a new tensor: one copy out of the page cache, no mapping of the shard."""
    data = torch.empty(t.nbytes, dtype=torch.uint8)
    with t.path.open("rb") as f:
        f.seek(t.offset)
        if f.readinto(data.numpy()) != t.nbytes:
            raise VerifyError(f"{t.path}: ends inside tensor {t.key!r} (was it changed while being read?)")
    return data.view(DTYPES[t.dtype]).reshape(t.shape)


def raw_bytes(t: Tensor, buffer: bytearray) -> Iterator[memoryview]:
    """The bytes of `t` straight from its file, a buffer's worth at a time."""
    view = memoryview(buffer)
    with t.path.open("rb") as f:
        f.seek(t.offset)
        left = t.nbytes
        while left:
            n = f.readinto(view[: min(left, len(buffer))])
            if not n:
                raise VerifyError(f"{t.path}: ends inside tensor {t.key!r} (was it changed while being read?)")
            left -= n
            yield view[:n]


Warn = Callable[[str], None]


def _warn_stderr(message: str) -> None:
    print(f"qkv-verify: warning: {message}", file=sys.stderr)


def write(p: Plan, folder: Path, warn: Warn = _warn_stderr) -> tuple[dict[str, mf.Entry], dict[str, mf.Entry]]:
    """Write the converted shards (and index) into `folder`; returns the (output, source) manifest entries.

    A copied tensor goes file to file in the kernel (copy_file_range) while a worker hashes and scans it from SRC; a
    q/k/v group is read, converted and written here, its hashing left to a worker too.
    """
    single = len(p.shards) == 1
    names = [WEIGHTS if single else f"diffusion_pytorch_model-{i:05d}-of-{len(p.shards):05d}.safetensors"
             for i in range(1, len(p.shards) + 1)]
    largest = max(shard.stat().st_size for shard, _ in p.shards)  # the streaming bound's share for bytes in flight
    with Workers(budget=min(IN_FLIGHT, largest)) as workers, \
            ThreadPoolExecutor(1, thread_name_prefix="qkv-verify-fsync") as syncer:
        synced = []
        for name, (shard, keys) in zip(names, p.shards):
            metadata = read_header(shard).get("__metadata__") or {"format": "pt"}
            fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                _write_all(fd, _header(p, keys, metadata))
                _write_shard(p, keys, fd, workers)
            except BaseException:
                os.close(fd)
                raise
            synced.append(syncer.submit(_fsync_close, fd))  # reaches the disk while the next shard is written
        results = workers.results()
        for done in synced:
            done.result()
    out_entries, src_entries = {}, {}
    for r in sorted(results, key=lambda r: (r.key, r.side)):
        if r.side in ("src", "both"):
            src_entries[r.key] = r.entry
            if r.nan or r.inf:
                warn(f"{r.key} in {p.src[r.key].path.name} holds {r.nan} NaN and {r.inf} Inf values; converted "
                     "exactly as is")
        if r.side in ("out", "both"):
            out_entries[r.key] = r.entry
    if not single:
        weight_map = {key: name for name, (_, keys) in zip(names, p.shards) for key in keys}
        total = sum(t.nbytes for t in p.src.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        destination.write_text(folder / INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out_entries, src_entries


def _write_shard(p: Plan, keys: list[str], fd: int, workers: Workers) -> None:
    pending: dict[str, torch.Tensor] = {}
    for key in keys:
        if key not in p.groups:
            t = p.src[key]
            workers.submit(t.nbytes, _file_job, t)
            _kernel_copy(t, fd)
            continue
        if not pending:
            sources, pending = _materialize(p, p.groups[key])
            for k, x in sources.items():
                workers.submit(x.nbytes, _bytes_job, k, "src", p.src[k].shape, p.src[k].dtype, tensor_bytes(x))
        data = tensor_bytes(pending.pop(key))
        _write_all(fd, data)
        workers.submit(len(data), _bytes_job, key, "out", p.out[key][1], p.out[key][0], data)
    assert not pending, f"group outputs left unwritten: {sorted(pending)}"


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Scanned:
    """What a worker found about one tensor (small: the scan's buffers are gone with it)."""

    key: str
    side: str  # "src", "out" or "both": which manifest the entry belongs to
    entry: mf.Entry
    nan: int
    inf: int


def _file_job(t: Tensor) -> Scanned:
    scan = scan_file(t)
    return Scanned(t.key, "both", scan.entry(t.shape, t.dtype), scan.nan, scan.inf)


def _bytes_job(key: str, side: str, shape: tuple[int, ...], dtype: str, data: memoryview) -> Scanned:
    scan = Scan(dtype).update(data)
    return Scanned(key, side, scan.entry(shape, dtype), scan.nan, scan.inf)


def _kernel_copy(t: Tensor, fd: int) -> None:
    """Append `t`'s bytes to `fd`, copied inside the kernel; a read/write loop where copy_file_range cannot."""
    with t.path.open("rb") as f:
        offset, left = t.offset, t.nbytes
        while left:
            try:
                n = os.copy_file_range(f.fileno(), fd, min(left, CHUNK), offset)
            except OSError:  # another file system, or no copy_file_range: copy through a buffer
                n = 0
            if not n:
                for piece in raw_bytes(Tensor(t.key, t.path, t.dtype, t.shape, offset, left), bytearray(CHUNK)):
                    _write_all(fd, piece)
                return
            offset, left = offset + n, left - n


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while len(view):  # in pieces: single writes of hundreds of MB were up to 8x slower here
        view = view[os.write(fd, view[:WRITE]):]


def _header(p: Plan, keys: list[str], metadata: dict) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key in keys:
        dtype, shape = p.out[key]
        nbytes = DTYPES[dtype].itemsize * math.prod(shape)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    return struct.pack("<Q", len(text)) + text


def _materialize(p: Plan, group: Group) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A group's source tensors (each read from its own shard) and its converted target tensors."""
    sources = {key: load(p.src[key]) for key in group.sources}
    targets = p.convert(group, sources)
    assert set(targets) == set(group.targets), (sorted(targets), group)
    return sources, targets


# ---------------------------------------------------------------------------------------------------------------
# Converting, and proving a conversion (--check)


@dataclass
class Result:
    """What a conversion wrote."""

    dst: Path
    plan: Plan
    shards: int
    nbytes: int
    seconds: float
    manifest: dict


def convert(src: Path, dst: Path, to: str, naming: str | None = None, layout: str | None = None, force: bool = False,
            warn: Warn = _warn_stderr) -> Result:
    """Convert SRC into DST (a new folder, renamed into place once complete); SRC is only read. `layout` None: the
    one a merged SRC's config.json records (qkv_merge), else blocked; DST's config.json records the merge it holds."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    ckpt = open_checkpoint(src)
    destination.check_paths(src, dst, force)
    p = plan(ckpt, to, naming, _layout(ckpt, to, layout))
    with destination.staged(dst, warn) as tmp:
        out_entries, src_entries = write(p, tmp, warn)
        if ckpt.config is not None:
            config = {k: v for k, v in ckpt.config.items() if k != MERGE_KEY}
            if p.to == "merged":
                config[MERGE_KEY] = {"naming": p.naming, "layout": p.layout}
            destination.write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        manifest = mf.build(out_entries, src_entries, src, p.conversion)
        destination.write_text(tmp / mf.NAME, json.dumps(manifest, indent=2) + "\n")
    nbytes = sum(t.nbytes for t in p.src.values())
    return Result(dst, p, len(p.shards), nbytes, time.perf_counter() - start, manifest)


def _layout(ckpt: Checkpoint, to: str, layout: str | None) -> str:
    """The fused layout to read or write: a merged SRC's recorded one must agree with a given one."""
    recorded = merge_recorded(ckpt) if to == "standard" and ckpt.config is not None else None
    if recorded and layout and layout != recorded["layout"]:
        raise VerifyError(f"{ckpt.path}/config.json records layout {recorded['layout']}; --layout {layout} would "
                          f"split its fused tensors wrongly (pass --layout {recorded['layout']} or leave it out)")
    return layout or (recorded or {}).get("layout") or "blocked"


@dataclass
class Verdict:
    """The outcome of --check: proven, or the first tensor that differs and how many do."""

    proven: bool
    message: str


def check(src: Path, dst: Path, naming: str | None = None, layout: str | None = None) -> Verdict:
    """Prove that DST holds exactly SRC's tensors in the other layout, reading both files in full."""
    src, dst = Path(src), Path(dst)
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise VerifyError(f"{dst}: DST is SRC; nothing to prove")
    src_ckpt, dst_ckpt = open_checkpoint(src), open_checkpoint(dst)
    to = "standard" if fused_leaves(src_ckpt) else "merged"
    manifest = mf.read(dst) if dst.is_dir() else None
    conversion = manifest["conversion"] if manifest and manifest["conversion"].get("to") == to else {}
    if layout is not None and conversion.get("layout", layout) != layout:
        raise VerifyError(f"--layout {layout} contradicts {dst / mf.NAME}, which says {conversion['layout']}")
    layout = layout or conversion.get("layout", "blocked")
    if to == "merged" and fused_leaves(dst_ckpt):
        naming = detect_naming(dst_ckpt.leaf_names())
    p = plan(src_ckpt, to, naming or conversion.get("naming"), layout)
    got = tensors_of(dst_ckpt)
    models = _different_models(src_ckpt, dst_ckpt)
    missing, extra = sorted(set(p.out) - set(got)), sorted(set(got) - set(p.out))
    if missing or extra:
        what = [f"lacks {missing[0]}" for _ in missing[:1]] + [f"holds {extra[0]}, which SRC's conversion does not"
                                                                for _ in extra[:1]]
        return Verdict(False, f"DST {' and '.join(what)} ({len(missing)} missing, {len(extra)} extra){models}")
    for key in sorted(p.out):
        if p.out[key] != (got[key].dtype, got[key].shape):
            return Verdict(False, f"tensor {key} differs: SRC converts to {p.out[key][0]} {p.out[key][1]}, DST "
                                  f"holds {got[key].dtype} {got[key].shape}{models}")
    differ, dst_entries, src_entries = _compare_all(p, got)
    what = f"{len(p.out)} tensors, {p.to} layout (naming {p.naming}, layout {p.layout})"
    if differ:
        hint = _other_layout_hint(src_ckpt, p, got, differ)
        return Verdict(False, f"tensor {differ[0]} differs ({len(differ)} of {what} differ){hint}")
    if manifest is not None:
        listed = mf.entries_of(manifest)
        wrong = sorted(k for k in set(listed) | set(dst_entries) if listed.get(k) != dst_entries.get(k))
        if wrong:
            return Verdict(False, f"{dst / mf.NAME}: entry for {wrong[0]} does not match DST ({len(wrong)} wrong)")
        if manifest["source"].get("identity") != mf.identity(src_entries):
            return Verdict(False, f"{dst / mf.NAME}: names a source other than SRC (identity differs)")
    return Verdict(True, f"proven: DST holds exactly SRC's tensors in the other layout: {what}"
                         + ("; manifest matches" if manifest is not None else "; DST has no manifest"))


def _different_models(src: Checkpoint, dst: Checkpoint) -> str:
    """'; SRC/config.json and DST/config.json describe different models (fields)' when both have one and they do."""
    if src.config is None or dst.config is None:
        return ""
    fields = differing_fields(model_config(src), model_config(dst))
    if not fields:
        return ""
    return (f"; {src.path / 'config.json'} and {dst.path / 'config.json'} describe different models "
            f"({'; '.join(fields)})")


def _other_layout_hint(ckpt: Checkpoint, p: Plan, got: dict[str, Tensor], differ: list[str]) -> str:
    """'; ... match in the other layout: pass --layout X' when every differing tensor is a q/k/v conversion that SRC
    gives bit for bit in the other layout (the weights were fused in the other row order); else ''."""
    if not all(k in p.groups for k in differ):
        return ""
    other = next(layout for layout in LAYOUTS if layout != p.layout)
    try:
        q = plan(ckpt, p.to, p.naming, other)
    except VerifyError:  # the shapes do not fit the other layout
        return ""
    a, b = bytearray(CHUNK), bytearray(CHUNK)
    groups = {q.groups[k].fused: q.groups[k] for k in differ}
    for group in groups.values():
        _, targets = _materialize(q, group)
        if not all(_same(None, want, got[k], a, b)[0] for k, want in targets.items()):
            return ""
    return (f"; the {len(differ)} differing tensors match SRC bit for bit in the {other} layout: the weights were "
            f"fused {other}, pass --layout {other}")


def _compare_all(p: Plan, got: dict[str, Tensor]) -> tuple[list[str], dict, dict]:
    """Keys whose bytes differ (sorted), and the DST and SRC manifest entries computed on the way."""
    differ, dst_entries, src_entries = [], {}, {}
    a, b = bytearray(CHUNK), bytearray(CHUNK)
    done = set()
    for _, keys in p.shards:
        for key in keys:
            if key in done:
                continue
            if key in p.groups:
                sources, targets = _materialize(p, p.groups[key])
                src_entries.update({k: Scan(p.src[k].dtype).update(tensor_bytes(x)).entry(p.src[k].shape,
                                                                                          p.src[k].dtype)
                                    for k, x in sources.items()})
            else:
                targets = {key: None}
            for k, want in targets.items():
                done.add(k)
                same, sha = _same(p.src.get(k), want, got[k], a, b)
                dst_entries[k] = mf.Entry(got[k].shape, got[k].dtype, sha)
                if k not in p.groups:
                    src_entries[k] = dst_entries[k]
                if not same:
                    differ.append(k)
    return sorted(differ), dst_entries, src_entries


def _same(src: Tensor | None, want: torch.Tensor | None, t: Tensor, a: bytearray, b: bytearray) -> tuple[bool, str]:
    """Whether DST's tensor `t` has the bytes of SRC's tensor `src` (copied) or of `want` (converted); its sha256."""
    h = hashlib.sha256()
    if want is not None:
        data = tensor_bytes(load(t))
        h.update(data)
        return data == tensor_bytes(want), h.hexdigest()
    same = True
    for x, y in zip(raw_bytes(src, a), raw_bytes(t, b)):
        h.update(y)
        same = same and x == y
    return same, h.hexdigest()
