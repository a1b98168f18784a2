"""Fuzzing every safetensors reader with random and mutated files: each one succeeds or raises VerifyError, and none
crashes otherwise or hangs (each example runs under a deadline).

Readers: verify.checkpoint.read_header and Checkpoint (a single file, and a folder with config.json, every tensor
read), convert's planning (headers, grouping, shapes), and the LoRA reader verify.lora.formats.read. Inputs: random
bytes; valid files (a LoRA file and a small model-like file) with bytes flipped, truncated, a new header length, a
random JSON header, or one field of one tensor entry replaced by a random JSON value.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from verify.checkpoint import Checkpoint, read_header
from verify.convert import plan
from verify.errors import VerifyError
from verify.lora import formats

FUZZ = settings(deadline=2000, suppress_health_check=[HealthCheck.too_slow])

LORA = save({
    "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.arange(8.0).reshape(2, 4),
    "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.arange(8.0).reshape(4, 2).bfloat16(),
    "transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(2.0, dtype=torch.float64),
}, metadata={"format": "pt"})
MODEL = save({
    **{f"transformer_blocks.0.attn.{x}.weight": torch.ones(4, 4) for x in ("to_q", "to_k", "to_v")},
    **{f"transformer_blocks.0.attn.{x}.bias": torch.zeros(4).half() for x in ("to_q", "to_k", "to_v")},
    "transformer_blocks.0.attn.norm_q.weight": torch.ones(2, dtype=torch.bfloat16),
    "proj_out.weight": torch.zeros(3, 4, dtype=torch.float64),
    "step": torch.tensor([7], dtype=torch.int64),
})
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


@st.composite
def mutated(draw) -> bytes:
    """A valid LoRA or model file, mutated in one of several ways."""
    data = draw(st.sampled_from([LORA, MODEL]))
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


def _every_reader(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        folder.mkdir()
        path = folder / "diffusion_pytorch_model.safetensors"
        path.write_bytes(data)
        (folder / "config.json").write_text(json.dumps({"num_attention_heads": 2, "attention_head_dim": 2,
                                                         "num_layers": 1, "axes_dims_rope": [2, 0, 0]}))
        for read in (lambda: read_header(path), lambda: _read_all(Checkpoint(path)),
                     lambda: _read_all(Checkpoint(folder)), lambda: plan(Checkpoint(path), "merged"),
                     lambda: plan(Checkpoint(path), "standard"), lambda: formats.read(path)):
            try:
                read()
            except VerifyError:
                pass


def _read_all(ckpt: Checkpoint) -> None:
    for _ in ckpt.items():
        pass
    ckpt.non_finite()
    ckpt.leaf_names()


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
