"""PEFT LoRA adapters carried exactly through fuse and unfuse: separate q/k/v adapters become one adapter on the fused
projection (A stacked, B block-diagonal in the fused layout, per adapter name, scaling kept) and back (A copied, B
split by rows). Pure functions read and build; verify.implementations.fused decides when (after every check has passed).

PEFT computes `base(x) + scaling * B(A(dropout(x)))` per active adapter. Where q, k and v scale differently the
ratios are folded into B, so the fused adapter keeps one scaling; dropout must agree (one mask serves all three).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from verify.errors import VerifyError
from verify.maths import qkv


@dataclass(frozen=True)
class Adapter:
    """One adapter of one layer as it acts: scaling * B @ A, with its dropout probability."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float
    dropout: float


def is_lora(layer: nn.Module) -> bool:
    """A PEFT LoRA layer (peft.tuners.lora.LoraLayer), recognised without importing peft."""
    return hasattr(layer, "lora_A") and hasattr(layer, "base_layer")


def base_layer(layer: nn.Module) -> nn.Module:
    return layer.get_base_layer() if is_lora(layer) else layer


def adapters_of(layer: nn.Module, where: str) -> dict[str, Adapter]:
    """Every adapter of a PEFT LoRA layer ({} for a plain layer); VerifyError for what cannot be carried exactly."""
    if not is_lora(layer):
        return {}
    if getattr(layer, "merged", False):
        raise VerifyError(f"{where}: its LoRA is merged into the base weights; unmerge it before fusing")
    out = {}
    for name in layer.lora_A:
        if layer.use_dora.get(name) or getattr(layer, "lora_variant", {}).get(name) is not None:
            raise VerifyError(f"{where}: adapter {name!r} is a LoRA variant (DoRA or other), which does not fuse "
                              "exactly")
        if layer.lora_B[name].bias is not None:
            raise VerifyError(f"{where}: adapter {name!r} has a LoRA bias, which does not fuse exactly")
        dropout = layer.lora_dropout[name]
        out[name] = Adapter(layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach(),
                            float(layer.scaling[name]), float(getattr(dropout, "p", 0.0)))
    return out


def fuse_adapters(parts: list[dict[str, Adapter]], rows: list[int], layout: str, head_dim: int,
                  where: str) -> dict[str, Adapter]:
    """One adapter per name on the fused projection from the q, k, v layers' adapters (a missing branch is zero)."""
    fused = {}
    for name in dict.fromkeys(n for p in parts for n in p):
        present = [p[name] for p in parts if name in p]
        if len({a.dropout for a in present}) > 1:
            raise VerifyError(f"{where}: adapter {name!r} has different dropout on q, k and v; one fused dropout "
                              "mask cannot reproduce them")
        scaling = present[0].scaling
        A = torch.cat([a.A for a in present])
        blocks, column = [], 0
        for part, n_rows in zip(parts, rows):
            B = A.new_zeros(n_rows, A.shape[0])
            if name in part:
                a = part[name]
                B[:, column:column + a.A.shape[0]] = a.B * (a.scaling / scaling)
                column += a.A.shape[0]
            blocks.append(B)
        fused[name] = Adapter(A, qkv.merge(*blocks, layout, head_dim), scaling, present[0].dropout)
    return fused


def split_adapters(adapters: dict[str, Adapter], shape: qkv.QKVShape, layout: str) -> list[dict[str, Adapter]]:
    """The q, k, v adapters of a fused projection's adapters: A copied to each, B split by rows in `layout`."""
    parts: list[dict[str, Adapter]] = [{}, {}, {}]
    for name, a in adapters.items():
        for part, B in zip(parts, qkv.split(a.B, shape, layout)):
            part[name] = Adapter(a.A.clone(), B.clone(), a.scaling, a.dropout)
    return parts


def wrap(layer: nn.Module, adapters: dict[str, Adapter], active: list[str], rslora: bool) -> nn.Module:
    """`layer` behind a PEFT LoRA layer holding `adapters` exactly (itself when there are none); a layer that is
    already a LoRA layer gains them beside its own."""
    if not adapters:
        return layer
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    lora = layer if is_lora(layer) else None
    base = base_layer(layer)
    for name, a in adapters.items():
        rank = a.A.shape[0]
        alpha = a.scaling * (rank**0.5 if rslora else rank)  # PEFT's scaling = lora_alpha / r (sqrt r for rsLoRA)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=a.dropout, init_lora_weights=False,
                            use_rslora=rslora)
        if lora is None:
            lora = LoraLinear(base, name, config=config, r=rank, lora_alpha=alpha)
        else:
            lora.update_layer(name, rank, alpha, config=config)
        lora.lora_A[name].to(device=base.weight.device, dtype=base.weight.dtype)
        lora.lora_B[name].to(device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            lora.lora_A[name].weight.copy_(a.A)
            lora.lora_B[name].weight.copy_(a.B)
        lora.scaling[name] = a.scaling
    lora.set_adapter(list(dict.fromkeys([n for n in active if n in lora.lora_A] + list(adapters))))
    return lora


def active_adapters(layers: list[nn.Module]) -> list[str]:
    """The adapter names active on any of `layers`, in order."""
    return list(dict.fromkeys(n for layer in layers if is_lora(layer) for n in layer.active_adapters))


def uses_rslora(layers: list[nn.Module]) -> bool:
    flags = {flag for layer in layers if is_lora(layer) for flag in layer.use_rslora.values()}
    return flags == {True}


def retarget(model: nn.Module, naming: str, fused: bool) -> None:
    """The model's PEFT configs (diffusers' `peft_config`) name the projections their adapters now sit on."""
    from verify.maths.naming import streams

    for config in (getattr(model, "peft_config", None) or {}).values():
        targets = config.target_modules
        if not isinstance(targets, (set, list, tuple)):
            continue  # a regex: PEFT matched it once, at injection
        targets = set(targets)
        for stream in streams(naming):
            old, new = (stream.separate, (stream.fused,)) if fused else ((stream.fused,), stream.separate)
            if targets & set(old):
                targets = (targets - set(old)) | set(new)
        config.target_modules = targets
