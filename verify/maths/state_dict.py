"""Standard <-> merged conversion of a Qwen-Image transformer state dict; every other key passes through untouched."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from verify.errors import VerifyError
from verify.maths import qkv
from verify.maths.naming import Stream, streams

_KEY = re.compile(r"^(?P<prefix>.*\.)?(?P<leaf>[A-Za-z0-9_]+)\.(?P<param>weight|bias)$")


def merge_state_dict(
    sd: Mapping[str, torch.Tensor], naming: str, layout: str, head_dim: int
) -> dict[str, torch.Tensor]:
    """Fuse every (q, k, v) projection triple of `sd` into one tensor named after `naming`."""
    out: dict[str, torch.Tensor] = {}
    groups = _group(sd, naming, fused=False)
    for key, tensor in sd.items():
        if key not in groups.consumed:
            out[key] = tensor
    for (prefix, stream, param), keys in groups.items():
        q, k, v = (sd[key] for key in keys)
        out[f"{prefix}{stream.fused}.{param}"] = qkv.merge(q, k, v, layout, head_dim)
    return out


def split_state_dict(
    sd: Mapping[str, torch.Tensor], naming: str, layout: str, head_dim: int, shape: qkv.QKVShape | None = None
) -> dict[str, torch.Tensor]:
    """Split every fused projection of `sd` back into q, k and v (equal parts unless `shape` says otherwise)."""
    out: dict[str, torch.Tensor] = {}
    groups = _group(sd, naming, fused=True)
    for key, tensor in sd.items():
        if key not in groups.consumed:
            out[key] = tensor
    for (prefix, stream, param), (key,) in groups.items():
        fused = sd[key]
        parts = qkv.split(fused, shape or qkv.QKVShape.equal(fused.shape[0], head_dim), layout)
        for name, part in zip(stream.separate, parts):
            out[f"{prefix}{name}.{param}"] = part.clone()
    return out


class _Groups(dict):
    """(prefix, stream, param) -> the keys that form one fused tensor; `consumed` holds all those keys."""

    consumed: set[str]


def _group(sd: Mapping[str, torch.Tensor], naming: str, fused: bool) -> _Groups:
    leaves = {}
    for stream in streams(naming):
        for leaf in (stream.fused,) if fused else stream.separate:
            leaves[leaf] = stream
    found: dict[tuple[str, Stream, str], dict[str, str]] = {}
    for key in sd:
        m = _KEY.match(key)
        if m and m["leaf"] in leaves:
            stream = leaves[m["leaf"]]
            found.setdefault((m["prefix"] or "", stream, m["param"]), {})[m["leaf"]] = key
    groups = _Groups()
    groups.consumed = set()
    for (prefix, stream, param), by_leaf in found.items():
        wanted = (stream.fused,) if fused else stream.separate
        missing = [leaf for leaf in wanted if leaf not in by_leaf]
        if missing:
            have = ", ".join(sorted(by_leaf))
            raise VerifyError(f"{prefix}{{{have}}}.{param} has no {', '.join(missing)}: q, k and v must come together")
        groups[(prefix, stream, param)] = tuple(by_leaf[leaf] for leaf in wanted)
        groups.consumed.update(by_leaf.values())
    return groups


def matching_layout(standard: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor], naming: str,
                    head_dim: int) -> str | None:
    """The layout in which every fused q/k/v tensor of `merged` splits into exactly `standard`'s q, k and v (bit for
    bit), or None: where merged weights fail in the layout they were given, this names the one they were fused in."""
    for layout in qkv.LAYOUTS:
        try:
            parts = {k: v for k, v in split_state_dict(merged, naming, layout, head_dim).items() if k not in merged}
        except VerifyError:  # the rows do not fit this layout
            continue
        if parts and all(k in standard and _same_bits(v, standard[k]) for k, v in parts.items()):
            return layout
    return None


def layout_hint(layout: str, found: str | None) -> str:
    """The sentence a failed check of merged weights given in `layout` adds when they match in `found`."""
    if found is None or found == layout:
        return ""
    return (f"; the merged weights match bit for bit in the {found} layout: they were fused {found}, pass --layout "
            f"{found}")


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().contiguous().reshape(-1).view(torch.uint8), b.detach().contiguous().reshape(-1).view(torch.uint8))
