"""Load a LoRA file onto a standard or merged model as exact PEFT adapters (trainable, savable with diffusers' own
LoRA saving, removable), wherever its keys land: a standard-layout LoRA on a merged model becomes fused adapters
(A stacked, B block-diagonal), a merged-layout LoRA on a standard model becomes separate ones (A copied, B split)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from verify.errors import VerifyError
from verify.files import lora_formats as formats
from verify.files import lora_mapping as mapping
from verify.implementations import adapters


def load_lora(model: nn.Module, file: str | Path, adapter_name: str = "default", *,
              adapter_config: str | Path | None = None, multiplier: float | None = None) -> mapping.LoadReport:
    """Install FILE (any format lora-audit reads, either layout) on `model` as PEFT adapter `adapter_name`, at the
    multiplier the file implies (or `multiplier`); returns the load report. VerifyError when nothing matches, and
    for an adapter name the model already has."""
    lora = formats.read(file, adapter_config)
    plan = mapping.plan(lora, mapping.spec_of(model), multiplier)  # VerifyError when no module matches
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        raise VerifyError(f"the model already has an adapter named {adapter_name!r}; choose another adapter_name")
    modules = dict(model.named_modules())
    report = mapping.LoadReport(len(plan.matched), plan.tensors, list(plan.unmatched))
    for u in plan.updates:
        parent, _, child = u.target.rpartition(".")
        layer = modules[u.target]
        adapter = adapters.Adapter(u.factors.A, u.factors.B, u.factors.scale, 0.0)
        setattr(modules[parent], child, adapters.wrap(layer, {adapter_name: adapter}, [adapter_name], False))
        W = adapters.base_layer(layer).weight
        relative = float(u.factors.delta().norm() / W.detach().double().norm())
        report.modules.append(mapping.ModuleLoad(u.target, relative, None, u.sources))
    _register(model, adapter_name, plan)
    return report


def _register(model: nn.Module, name: str, plan: mapping.Plan) -> None:
    """A LoraConfig in the model's `peft_config` that reproduces every module's rank and scaling, so that diffusers'
    save_lora_adapter writes the adapter and load_lora_adapter (or load_lora) reads it back exactly."""
    from peft import LoraConfig

    ranks = {u.target: u.factors.rank for u in plan.updates}
    alphas = {u.target: u.factors.scale * u.factors.rank for u in plan.updates}
    first = plan.updates[0]
    config = LoraConfig(r=first.factors.rank, lora_alpha=alphas[first.target], init_lora_weights=False,
                        target_modules=sorted({_module_name(t) for t in ranks}),
                        rank_pattern=ranks, alpha_pattern=alphas)
    if not hasattr(model, "peft_config"):
        model.peft_config = {}
    model.peft_config[name] = config
    model._hf_peft_config_loaded = True  # diffusers' flag: the model carries PEFT adapters


def _module_name(path: str) -> str:
    """The name PEFT's target_modules matches a module by: its last part, two for a list entry (to_out.0)."""
    parts = path.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]
