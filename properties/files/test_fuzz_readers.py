"""Fuzzing every safetensors reader with random and mutated files: each one succeeds or raises VerifyError, and none
crashes otherwise or hangs (each example runs under a deadline).

Readers: verify.files.checkpoint.read_header and Checkpoint (a single file, and a folder with config.json, every tensor
read), convert's planning (headers, grouping, shapes), and the LoRA reader verify.files.lora_formats.read. Inputs:
random bytes; valid files (a LoRA file and a small model-like file) with bytes flipped, truncated, a new header length,
a random JSON header, or one field of one tensor entry replaced by a random JSON value.

"Raises VerifyError" alone would pass a reader that refuses everything, so the positive control draws valid files
from the strategies the mutations start from (LoRA files in four key formats; standard and merged model-like files
with tensors of every safetensors dtype, NaN and Inf included) and requires each reader that should accept one to
accept it and read back exactly what was written.
"""

from __future__ import annotations

import json
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from properties.strategies import float_dtypes, layouts, namings, random_tensor, seeds
from verify.checks.compare import assert_passed, compare_exact
from verify.errors import VerifyError
from verify.files import lora_formats as formats
from verify.files.checkpoint import DTYPES, Checkpoint, read_header
from verify.files.convert import Plan, plan
from verify.maths.naming import DEFAULT_NAMING, NAMINGS, detect_naming
from verify.maths.state_dict import merge_state_dict, split_state_dict

FUZZ = settings(deadline=2000, suppress_health_check=[HealthCheck.too_slow])

LORA_TENSORS = {
    "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.arange(8.0).reshape(2, 4),
    "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.arange(8.0).reshape(4, 2).bfloat16(),
    "transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(2.0, dtype=torch.float64),
}
MODEL_TENSORS = {
    **{f"transformer_blocks.0.attn.{x}.weight": torch.ones(4, 4) for x in ("to_q", "to_k", "to_v")},
    **{f"transformer_blocks.0.attn.{x}.bias": torch.zeros(4).half() for x in ("to_q", "to_k", "to_v")},
    "transformer_blocks.0.attn.norm_q.weight": torch.ones(2, dtype=torch.bfloat16),
    "proj_out.weight": torch.zeros(3, 4, dtype=torch.float64),
    "step": torch.tensor([7], dtype=torch.int64),
}
LORA = save(LORA_TENSORS, metadata={"format": "pt"})
MODEL = save(MODEL_TENSORS)
HEADS, HEAD_DIM = 2, 2  # what _every_reader's config.json says; a single file gives head_dim by its norm_q
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


@dataclass(frozen=True)
class Valid:
    """A valid safetensors file and what every reader must find in it."""

    data: bytes
    tensors: dict[str, torch.Tensor]
    kind: str  # "lora" | "standard" | "merged"
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float | None, str]] = field(default_factory=dict)
    # lora: module path -> (A, B, alpha, format)


# LoRA key styles: (prefix, A suffix, B suffix, the format the reader names)
LORA_STYLES = [("transformer.", ".lora_A.weight", ".lora_B.weight", "diffusers"),
               ("base_model.model.", ".lora_A.weight", ".lora_B.weight", "peft"),
               ("diffusion_model.", ".lora_down.weight", ".lora_up.weight", "comfyui"),
               ("", ".lora_A.default.weight", ".lora_B.default.weight", "diffsynth")]
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.to_out.0", "attn.to_add_out",
                "img_mlp.net.0.proj"]
PROJECTIONS = {leaf for streams in NAMINGS.values() for s in streams for leaf in (*s.separate, s.fused)}
ALL_DTYPES = sorted(DTYPES.values(), key=str)


def _values(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Seeded values of any safetensors dtype: floats with NaN, +-Inf and -0.0 among them, integers, booleans."""
    if dtype.is_floating_point:
        return random_tensor(shape, seed=seed, dtype=torch.float64, specials=True).to(dtype)
    g = torch.Generator().manual_seed(seed)
    high = 2 if dtype == torch.bool else 120
    return torch.randint(0, high, shape, generator=g, dtype=torch.int64).to(dtype)


def _save(draw, tensors: dict[str, torch.Tensor]) -> bytes:
    metadata = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2), label="metadata")
    return save(tensors, metadata=metadata or None)


@st.composite
def lora_files(draw) -> Valid:
    """A LoRA file: 1-3 modules, each with its A (r, in), B (out, r) and, or not, an alpha, in one key style."""
    prefix, a_suffix, b_suffix, fmt = draw(st.sampled_from(LORA_STYLES), label="key style")
    paths = draw(st.lists(st.sampled_from([f"transformer_blocks.{b}.{t}" for b in range(2) for t in LORA_TARGETS]),
                          min_size=1, max_size=3, unique=True), label="modules")
    seed, tensors, pairs = draw(seeds()), {}, {}
    for i, path in enumerate(paths):
        rank, fan_in, fan_out = (draw(st.integers(1, 4)) for _ in range(3))
        A = _values((rank, fan_in), draw(float_dtypes()), seed + 3 * i)
        B = _values((fan_out, rank), draw(float_dtypes()), seed + 3 * i + 1)
        tensors[f"{prefix}{path}{a_suffix}"], tensors[f"{prefix}{path}{b_suffix}"] = A, B
        alpha = None
        if draw(st.booleans()):
            value = torch.tensor(draw(st.floats(0.25, 64.0)), dtype=draw(float_dtypes()))
            tensors[f"{prefix}{path}.alpha"] = value
            alpha = float(value.double())
        pairs[path] = (A, B, alpha, fmt)
    return Valid(_save(draw, tensors), tensors, "lora", pairs)


@st.composite
def model_files(draw) -> Valid:
    """A model-like file: 1-2 blocks of q/k/v projections for both streams (HEADS x HEAD_DIM rows, with or without
    biases, one dtype per stream), norm_q, and other tensors of every dtype and shape (empty ones included); or the
    same file merged, in either naming and layout."""
    seed, tensors = draw(seeds()), {}
    for block in range(draw(st.integers(1, 2), label="blocks")):
        attn = f"transformer_blocks.{block}.attn"
        for stream in NAMINGS[DEFAULT_NAMING]:
            dtype, fan_in, bias = draw(float_dtypes()), draw(st.integers(1, 5)), draw(st.booleans())
            for leaf in stream.separate:
                seed += 2
                tensors[f"{attn}.{leaf}.weight"] = _values((HEADS * HEAD_DIM, fan_in), dtype, seed)
                if bias:
                    tensors[f"{attn}.{leaf}.bias"] = _values((HEADS * HEAD_DIM,), dtype, seed + 1)
        tensors[f"{attn}.norm_q.weight"] = _values((HEAD_DIM,), draw(float_dtypes()), seed + 2)
    names = st.from_regex(r"[a-z0-9_]{1,6}(\.[a-z0-9_]{1,6}){0,2}", fullmatch=True)
    for i in range(draw(st.integers(0, 4), label="other tensors")):
        name = f"other{i}.{draw(names.filter(lambda n: not PROJECTIONS & set(n.split('.'))))}"
        shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
        tensors[name] = _values(shape, draw(st.sampled_from(ALL_DTYPES)), seed + 3 + i)
    if draw(st.booleans(), label="merged"):
        merged = merge_state_dict(tensors, draw(namings()), draw(layouts()), HEAD_DIM)
        return Valid(_save(draw, merged), merged, "merged")
    return Valid(_save(draw, tensors), tensors, "standard")


def valid_files() -> st.SearchStrategy[Valid]:
    return st.one_of(lora_files(), model_files())


@st.composite
def mutated(draw) -> bytes:
    """A valid LoRA or model file (the fixed two, or one drawn by valid_files), mutated in one of several ways."""
    data = draw(st.one_of(st.sampled_from([LORA, MODEL]), valid_files().map(lambda valid: valid.data)))
    how = draw(st.sampled_from(["flip", "truncate", "length", "header", "field", "append"]))
    if how == "flip":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        return bytes(buf)
    if how == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if how == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[8:]
    if how == "append":
        return data + draw(st.binary(min_size=1, max_size=16))
    header, body = _split(data)
    if how == "header":
        return _join(draw(JSON), body)
    key = draw(st.sampled_from(sorted(header)))
    if key == "__metadata__" or draw(st.booleans()):
        header[key] = draw(JSON)
    else:
        header[key][draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON)
    return _join(header, body)


READERS = {
    "read_header": lambda path, folder: read_header(path),
    "Checkpoint(file)": lambda path, folder: _read_all(Checkpoint(path)),
    "Checkpoint(folder)": lambda path, folder: _read_all(Checkpoint(folder)),
    "plan merged": lambda path, folder: plan(Checkpoint(path), "merged"),
    "plan standard": lambda path, folder: plan(Checkpoint(path), "standard"),
    "LoRA read": lambda path, folder: formats.read(path),
}
MUST_ACCEPT = {  # which readers a valid file of each kind must get through (the others may refuse it)
    "lora": {"read_header", "Checkpoint(file)", "Checkpoint(folder)", "LoRA read"},
    "standard": {"read_header", "Checkpoint(file)", "Checkpoint(folder)", "plan merged"},
    "merged": {"read_header", "Checkpoint(file)", "Checkpoint(folder)", "plan standard"},
}


def _every_reader(data: bytes) -> dict[str, object]:
    """Each reader's result on `data`, or the VerifyError it raised; any other exception is a crash and propagates."""
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        folder.mkdir()
        path = folder / "diffusion_pytorch_model.safetensors"
        path.write_bytes(data)
        (folder / "config.json").write_text(json.dumps({"num_attention_heads": HEADS, "attention_head_dim": HEAD_DIM,
                                                         "num_layers": 1, "axes_dims_rope": [2, 0, 0]}))
        for name, read in READERS.items():
            try:
                results[name] = read(path, folder)
            except VerifyError as e:
                results[name] = e
    return results


def _read_all(ckpt: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Every tensor (read one by one) and the NaN/Inf counts."""
    tensors = {key: tensor.clone() for key, tensor in ckpt.items()}
    ckpt.leaf_names()
    return tensors, ckpt.non_finite()


def _non_finite(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Expected NaN/Inf counts, computed here in fp64 (fp8 included)."""
    counts = {}
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel():
            wide = t.double()
            found = (int(wide.isnan().sum()), int(wide.isinf().sum()))
            if any(found):
                counts[key] = found
    return counts


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


@FUZZ
@given(data=st.binary(max_size=300))
@example(data=b"")
@example(data=struct.pack("<Q", 2) + b"{}")
@example(data=struct.pack("<Q", 2**63) + b"{}")
@example(data=struct.pack("<Q", 100_000) + b"[" * 100_000)
def test_random_bytes(data):
    _every_reader(data)


@FUZZ
@given(data=mutated())
@example(data=LORA)
@example(data=MODEL)
@example(data=_join({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}, b"\0" * 4))
@example(data=_join({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4))
@example(data=_join({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, b"\0" * 4))
@example(data=_join({"transformer_blocks.0.attn.to_q.weight": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
                     "transformer_blocks.0.attn.to_k.weight": {"dtype": "F32", "shape": [], "data_offsets": [4, 8]},
                     "transformer_blocks.0.attn.to_v.weight": {"dtype": "F32", "shape": [], "data_offsets": [8, 12]}},
                    b"\0" * 12))
def test_mutated_files(data):
    _every_reader(data)


@FUZZ
@given(valid=valid_files())
@example(valid=Valid(LORA, LORA_TENSORS, "lora", {"transformer_blocks.0.attn.to_q": (
    LORA_TENSORS["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"],
    LORA_TENSORS["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"], 2.0, "diffusers")}))
@example(valid=Valid(MODEL, MODEL_TENSORS, "standard"))
def test_valid_files_are_accepted_and_read_back_exactly(valid):
    """The positive control: a reader that refuses (or misreads) a valid file fails here, where the fuzz tests above
    would take its VerifyError as a proper refusal."""
    event(f"valid {valid.kind} file")
    results = _every_reader(valid.data)
    refused = {name: str(results[name]) for name in MUST_ACCEPT[valid.kind] if isinstance(results[name], VerifyError)}
    assert not refused, f"valid {valid.kind} file refused: {refused}"
    header = results["read_header"]
    assert set(header) - {"__metadata__"} == set(valid.tensors)
    for key, t in valid.tensors.items():
        assert (header[key]["dtype"], header[key]["shape"]) == (_dtype_name(t.dtype), list(t.shape)), key
    for name in ("Checkpoint(file)", "Checkpoint(folder)"):
        tensors, non_finite = results[name]
        assert_passed(compare_exact(f"{name} of a valid {valid.kind} file", "checkpoint", valid.tensors, tensors))
        assert non_finite == _non_finite(valid.tensors), name
    if valid.kind == "standard":
        expected = merge_state_dict(valid.tensors, DEFAULT_NAMING, "blocked", HEAD_DIM)
        _assert_plans(results["plan merged"], "merged", expected)
    if valid.kind == "merged":
        naming = detect_naming({key.rsplit(".", 2)[-2] for key in valid.tensors if "." in key})
        _assert_plans(results["plan standard"], "standard", split_state_dict(valid.tensors, naming, "blocked",
                                                                             HEAD_DIM))
    if valid.kind == "lora":
        lora = results["LoRA read"]
        found = {p.path: p for p in lora.pairs}
        assert set(found) == set(valid.pairs)
        for path, (A, B, alpha, fmt) in valid.pairs.items():
            pair = found[path]
            assert_passed(compare_exact(f"LoRA {path}", "lora", {"A": A, "B": B}, {"A": pair.A, "B": pair.B}))
            assert (pair.alpha, pair.format, pair.rank) == (alpha, fmt, A.shape[0]), path


def _assert_plans(result: object, to: str, expected: dict[str, torch.Tensor]) -> None:
    """plan's outputs are the keys, dtypes and shapes that state_dict's own conversion gives."""
    assert isinstance(result, Plan) and result.to == to
    assert result.out == {k: (_dtype_name(t.dtype), tuple(t.shape)) for k, t in expected.items()}
