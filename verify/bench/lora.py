"""The LoRA training rows (the write-up's setting): PEFT adapters on the write-up's targets, base frozen, checked."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch._dynamo
from torch import nn

from verify.bench.gate import has_no_separate_projections
from verify.bench.options import DTYPE


def lora_targets(arm: str, targets: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The PEFT target modules of `arm` from the model's BENCH_LORA_TARGETS (the write-up's for Qwen-Image): the
    separate q/k/v projections of every stream for the standard and lean-unfused arms, the fused ones for the merged
    arm, and the output projections for all."""
    return (*_qkv_targets(arm, targets), *targets["out"])


def _qkv_targets(arm: str, targets: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    return targets["merged" if arm == "merged" else "standard"]


def attentions(module: nn.Module) -> list[nn.Module]:
    """Every attention of `module`: Qwen-Image's joint ones, or Qwen-Image 2.1's."""
    from verify.implementations import fused_21
    from verify.implementations.fused import joint_attentions

    return joint_attentions(module) or fused_21.attentions(module)


def is_lora_parameter(name: str) -> bool:
    """A parameter of a PEFT LoRA adapter (lora_A / lora_B, ...), not of the base model."""
    return any(part.startswith("lora_") for part in name.split("."))


def freeze_base(module: nn.Module) -> None:
    """Train only the adapters: every base parameter frozen (requires_grad False), every LoRA parameter trainable."""
    for name, p in module.named_parameters():
        p.requires_grad_(is_lora_parameter(name))


def add_lora(module: nn.Module, arm: str, rank: int, seed: int, targets: dict[str, tuple[str, ...]]) -> nn.Module:
    """PEFT LoRA adapters of `rank` on `module`'s targets for `arm`, in place: alpha = rank (scale 1), A and B both
    random (init_lora_weights=False: B is not zero, so the adapters change the output and their gradients are
    general), in the bench's dtype, base frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, init_lora_weights=False,
                        target_modules=list(lora_targets(arm, targets)))
    torch.manual_seed(seed)
    inject_adapter_in_model(config, module)
    nn.Module.to(module, dtype=DTYPE)
    freeze_base(module)
    return module


def lora_blocks(std: nn.Module, merged: nn.Module, lean: nn.Module | None, rank: int, seed: int,
                targets: dict[str, tuple[str, ...]]) -> dict[str, nn.Module]:
    """The arms of a lora-train row: copies of `std`, `merged` and `lean` (where there is one) with PEFT adapters on
    their targets (the model's BENCH_LORA_TARGETS), base frozen. The merged arm's adapters are random; the standard
    and lean-unfused arms get the same ones split (each of to_q, to_k, to_v: the fused adapter's A and its rows of B
    in the merged layout), so all compute one function and every timed size can be checked like the other rows."""
    from verify.maths import qkv
    from verify.maths.naming import DEFAULT_NAMING, streams

    out = {"merged": add_lora(copy.deepcopy(merged), "merged", rank, seed, targets)}
    out["standard"] = add_lora(copy.deepcopy(std), "standard", rank, seed, targets)
    with torch.no_grad():
        for fused_attn, attn in zip(attentions(out["merged"]), attentions(out["standard"])):
            layout = fused_attn.processor.layout
            for stream in (s for s in streams(DEFAULT_NAMING) if hasattr(fused_attn, s.fused)):
                fused = getattr(fused_attn, stream.fused)
                a, b = fused.lora_A["default"].weight, fused.lora_B["default"].weight
                parts = qkv.split(b, qkv.QKVShape.equal(b.shape[0], attn.inner_dim // attn.heads), layout)
                for name, part in zip(stream.separate, parts):
                    getattr(attn, name).lora_A["default"].weight.copy_(a)
                    getattr(attn, name).lora_B["default"].weight.copy_(part)
            for name in (n for n in ("to_out", "to_add_out") if hasattr(fused_attn, n)):
                src, dst = getattr(fused_attn, name), getattr(attn, name)
                src, dst = (src[0], dst[0]) if name == "to_out" else (src, dst)
                for side in ("lora_A", "lora_B"):
                    getattr(dst, side)["default"].weight.copy_(getattr(src, side)["default"].weight)
    if lean is not None:
        lean_lora = copy.deepcopy(out["standard"])
        for attn, lean_attn in zip(attentions(lean_lora), attentions(lean)):
            attn.set_processor(copy.deepcopy(lean_attn.processor))
        out["lean_unfused"] = lean_lora
    return out


def lora_gradients(module: nn.Module, step: Callable[[], object]) -> dict:
    """One training step of `module`, then which parameters hold a gradient: the base ones that do (must be none)
    and the LoRA ones that do not, or whose gradient is all zeros (must be none)."""
    module.zero_grad(set_to_none=True)
    step()
    named = list(module.named_parameters())
    lora = [(n, p) for n, p in named if is_lora_parameter(n)]
    return dict(lora_parameters=len(lora), base_parameters=len(named) - len(lora),
                base_with_grad=[n for n, p in named if not is_lora_parameter(n) and p.grad is not None],
                base_trainable=[n for n, p in named if not is_lora_parameter(n) and p.requires_grad],
                lora_without_grad=[n for n, p in lora if p.grad is None or not bool(p.grad.ne(0).any())])


def lora_check(name: str, arm: str, module: nn.Module, run: nn.Module, step: Callable[[], object],
               inputs: dict, targets: dict[str, tuple[str, ...]]) -> dict:
    """A LoRA arm before it is timed: PEFT LoRA layers on exactly its targets, one training step of `run` (the
    timed module, compiled or not) that trains every adapter and no base weight, and in eager (`run` is `module`)
    the q/k/v LoRA layers counted as they run (merged: the fused to_qkv / add_qkv_proj wrappers, one call per
    stream; their base layers are the fused projections). `targets`: the model's BENCH_LORA_TARGETS."""
    from peft.tuners.lora import LoraLayer

    from verify.checks.runner import counting

    qkv_targets = _qkv_targets(arm, targets)
    targets = lora_targets(arm, targets)
    wrapped = sorted(n for n, m in module.named_modules() if isinstance(m, LoraLayer))
    expected = sorted(n for n, _ in module.named_modules() if n and any(n == t or n.endswith("." + t) for t in targets)
                      and not n.endswith(".base_layer"))
    grads = lora_gradients(module, step)
    problems = []
    if wrapped != expected or not wrapped:
        problems.append(f"LoRA layers on {wrapped}, expected {expected}")
    if grads["base_with_grad"] or grads["base_trainable"]:
        problems.append(f"base weights trained: {(grads['base_with_grad'] or grads['base_trainable'])[:4]}")
    if grads["lora_without_grad"] or not grads["lora_parameters"]:
        problems.append(f"LoRA parameters without a gradient: {grads['lora_without_grad'][:4]}")
    if arm == "merged" and not has_no_separate_projections(module):
        problems.append("the merged block still has separate q/k/v projections")
    qkv_calls = None
    if run is module:
        with torch.no_grad(), counting(module, qkv_targets) as calls:
            module(**inputs)
        qkv_calls = calls()
        if qkv_calls != len(qkv_targets) * len(attentions(module)):
            problems.append(f"{qkv_calls} calls of the q/k/v LoRA layers {qkv_targets}")
    return dict(name=name, rule="lora(targets, base frozen, every adapter trained)", passed=not problems,
                message="; ".join(problems) or None, lora_layers=len(wrapped), qkv_lora_calls=qkv_calls,
                **{k: grads[k] for k in ("lora_parameters", "base_parameters")},
                base_with_grad=grads["base_with_grad"][:8], lora_without_grad=grads["lora_without_grad"][:8])
