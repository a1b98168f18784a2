"""The files an engine that cannot be imported is judged through (Polygraphy's saved inputs and outputs): a folder of
inputs, weights and manifest.json written here, and the outputs file(s) the engine writes back. safetensors only.

Layout of the inputs folder: `inputs/<case>.<dtype>.safetensors` (the call's tensors, cast to the dtype; complex
tensors stored as their real view, (..., 2)), `weights/<case>.{standard,merged}.safetensors` (fp64, the diffusers
layout; merged: one fused projection per stream), `manifest.json` and `README.txt`. The engine writes one tensor per
expected output, keyed `<case>/<dtype>/<output>`, into one safetensors file or several in a folder; where the case
has gradients, optionally also the input gradients of the manifest's cotangents, keyed `<case>/<dtype>/grad/<input>`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

from verify.errors import VerifyError

FORMAT, VERSION = "qkv-verify-inputs", 1
MANIFEST = "manifest.json"

README = """Inputs for judging a merged-QKV implementation that qkv-verify cannot import (written by qkv-verify inputs).

For each entry of manifest.json ("entries"):
  1. load weights[<"standard" or "merged">] (safetensors, fp64, diffusers' parameter names) into your component,
     cast to the entry's dtype;
  2. load inputs_file (safetensors); build the call's keyword arguments from "kwargs": {"tensor": KEY} is that
     tensor (with "complex": true, torch.view_as_complex of it), {"tuple": [...]} a tuple of such values, {"value": V}
     a plain value, {"block_mask": KEY} an attention mask as flex_attention's BlockMask (Qwen-Image 2.1): KEY holds
     its element mask [batch, heads, q, kv] (bool, True: attended) over the sequence padded to "block_size"; the
     first rows and columns are the sequence's;
  3. run the entry's "call": "one call" is the component called once with those keyword arguments; another protocol
     (e.g. "kv-cache": a prefill that stores K and V, then a decode over them) is spelled out in its "how";
  4. write each output named in "outputs" (with the shape given there) under the key "<case>/<dtype>/<output>", e.g.
     "attention/fp32/image", into a safetensors file (or several, in one folder);
  5. optionally, for an entry with "gradients": the gradient of sum over the outputs of (output * cotangent) (the
     cotangents: tensors of inputs_file, keyed as "gradients"."cotangents" says by output) with respect to each
     input named in "gradients"."inputs", under "<case>/<dtype>/grad/<input>", e.g. "attention/fp32/grad/
     hidden_states". Without them the entry's gradients are recorded as not compared;
  6. optionally, the outputs of your submodules that stand for the standard's, under their standard names as
     "modules" lists them (execution order; "name (call N)" a later call; shapes given): the i-th tensor of
     a module's output under "<case>/<dtype>/module/<name>/<i>", e.g. "attention/fp32/module/norm_q/0". A failing
     output's first_divergence then names the first of them that leaves the bound.
Then: qkv-verify judge OUTPUTS --inputs THIS_FOLDER. Entries you do not write are recorded as not provided. Cases
the manifest cannot express are listed under "left_out" with the reason.
"""


def encode_call(inputs: dict, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors to save, the manifest's kwargs) of one call's keyword arguments; floating tensors cast to `dtype`."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(key: str, value):
        if isinstance(value, torch.Tensor):
            if value.is_complex():
                tensors[key] = torch.view_as_real(value).contiguous()
                return {"tensor": key, "complex": True}
            keep = not value.is_floating_point()
            tensors[key] = (value if keep else value.to(dtype)).contiguous()
            return {"tensor": key}
        if isinstance(value, BlockMask):  # flex_attention's mask: saved as its element mask, rebuilt on reading
            batch, heads, q_len, kv_len = value.shape
            tensors[key] = create_mask(value.mask_mod, batch, heads, q_len, kv_len,
                                       device=value.kv_num_blocks.device).contiguous()
            return {"block_mask": key, "block_size": list(value.BLOCK_SIZE)}
        if isinstance(value, tuple):
            return {"tuple": [encode(f"{key}.{i}", v) for i, v in enumerate(value)]}
        return {"value": json.loads(json.dumps(value))}  # plain data only (lists, numbers, strings, None)

    kwargs = {name: encode(name, value) for name, value in inputs.items()}
    return tensors, kwargs


def decode_call(kwargs: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The call's keyword arguments back from the manifest's kwargs and the saved tensors."""
    def decode(spec: dict):
        if "tensor" in spec:
            t = tensors[spec["tensor"]]
            return torch.view_as_complex(t) if spec.get("complex") else t
        if "tuple" in spec:
            return tuple(decode(s) for s in spec["tuple"])
        if "block_mask" in spec:
            return _block_mask(tensors[spec["block_mask"]].bool(), tuple(spec["block_size"]))
        return _tuples(spec["value"])

    return {name: decode(spec) for name, spec in kwargs.items()}


def _block_mask(dense: torch.Tensor, block_size: tuple[int, int]) -> BlockMask:
    """flex_attention's BlockMask of an element mask [batch, heads, q, kv]: the same mask as the one saved."""
    batch, heads, q_len, kv_len = dense.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[b, h if heads > 1 else 0, q_idx, kv_idx]

    return create_block_mask(mask_mod, batch, heads, q_len, kv_len, device=dense.device, BLOCK_SIZE=block_size)


def _tuples(value):
    """JSON's lists back to what diffusers passes: a list of lists stays a list, a list of scalars is a tuple
    (img_shapes [[(1, 4, 4)]])."""
    if not isinstance(value, list):
        return value
    if all(not isinstance(v, list) for v in value):
        return tuple(value)
    return [_tuples(v) for v in value]


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def read_manifest(folder: Path) -> dict:
    """manifest.json of an inputs folder, checked: this format and version, entries with the fields judge reads."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise VerifyError(f"--inputs {folder}: no {MANIFEST} (write one with qkv-verify inputs)") from None
    except (OSError, ValueError) as e:
        raise VerifyError(f"{path}: not a JSON manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise VerifyError(f"{path}: not a qkv-verify inputs manifest")
    if manifest.get("version") != VERSION:
        raise VerifyError(f"{path}: manifest version {manifest.get('version')!r}; this qkv-verify reads version "
                          f"{VERSION} (write the inputs again with this version)")
    return manifest


def read_outputs(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of OUTPUTS (a safetensors file, or a folder of them) and the sha256 of its bytes (in file-name
    order); a file that is not whole safetensors or a key given twice is a VerifyError."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not path.exists():
        raise VerifyError(f"OUTPUTS {path}: no such file or folder")
    if not files:
        raise VerifyError(f"OUTPUTS {path}: a folder without .safetensors files")
    digest, tensors = hashlib.sha256(), {}
    for file in files:
        data = file.read_bytes()
        digest.update(data)
        try:
            loaded = load(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise VerifyError(f"{file}: not a whole safetensors file ({e}); a half-written output is not judged") \
                from None
        twice = sorted(set(loaded) & set(tensors))
        if twice:
            raise VerifyError(f"{file}: {twice[0]} is given in two files")
        tensors.update(loaded)
    return tensors, digest.hexdigest()
