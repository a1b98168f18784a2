"""Run an equivalence case: the fp64 oracle, then standard vs merged in each dtype, judged by verify.compare."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

from verify.cases import Case, Outputs
from verify.compare import Record, compare
from verify.fixtures import InputSpec, cast_inputs
from verify.fused import count_fused_calls, fuse_model, joint_attentions
from verify.state_dict import split_state_dict
from verify.tolerance import GRADIENTS, OUTPUTS

Merge = Callable[[nn.Module], nn.Module]
GRAD_INPUTS = ("hidden_states", "encoder_hidden_states")


def run_case(case: Case, dtypes: Iterable[torch.dtype] | None = None, device: str = "cpu", seed: int = 0,
             config: dict | None = None, spec: InputSpec | None = None, merge: Merge = fuse_model) -> list[Record]:
    """Records for `case` in each dtype: outputs (and gradients when the case asks) of merge(standard) vs standard."""
    config, spec = config or case.config, spec or case.spec
    standard = case.build(config, seed)
    inputs = case.inputs(config, spec, seed)
    ref = _run(case, standard, cast_inputs(inputs, torch.float64, "cpu"), case.grads, seed)
    records = []
    for dtype in dtypes or case.dtypes:
        base_module = _to(copy.deepcopy(standard), dtype, device)
        cand_module = merge(_to(copy.deepcopy(standard), dtype, device))
        base = _run(case, base_module, cast_inputs(inputs, dtype, device), case.grads, seed)
        with count_fused_calls(cand_module) as calls:
            cand = _run(case, cand_module, cast_inputs(inputs, dtype, device), case.grads, seed)
        fused_calls = sum(calls.values())
        for kind, rule in (("outputs", OUTPUTS), ("gradients", GRADIENTS)):
            if kind in ref:
                cand_kind = _standard_names(cand[kind], cand_module) if kind == "gradients" else cand[kind]
                records.append(compare(f"{case.name}/{kind}", case.component, ref[kind], cand_kind, rule, dtype,
                                       device, base=base[kind], fused_calls=fused_calls))
    return records


def _to(module: nn.Module, dtype: torch.dtype, device: str) -> nn.Module:
    """Cast with nn.Module.to (diffusers' ModelMixin.to warns about fp32 modules this model does not have)."""
    return nn.Module.to(module, device=device, dtype=dtype)


def _run(case: Case, module: nn.Module, inputs: dict, grads: bool, seed: int) -> dict[str, Outputs]:
    """Named outputs; with `grads`, also gradients of a seeded projection of them w.r.t. inputs and weights."""
    if not grads:
        with torch.no_grad():
            return {"outputs": case.outputs(module, inputs)}
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in GRAD_INPUTS if k in inputs}
    inputs = {**inputs, **leaves}
    module.zero_grad(set_to_none=True)
    outputs = case.outputs(module, inputs)
    g = torch.Generator().manual_seed(seed + 2)
    cotangents = {k: torch.randn(o.shape, generator=g, dtype=torch.float64) for k, o in sorted(outputs.items())}
    loss = sum((o * cotangents[k].to(o.device, o.dtype)).sum() for k, o in outputs.items())
    loss.backward()
    gradients = {f"input.{k}": t.grad for k, t in leaves.items()}
    gradients.update({f"weight.{n}": p.grad for n, p in module.named_parameters() if p.grad is not None})
    return {"outputs": {k: o.detach() for k, o in outputs.items()}, "gradients": gradients}


def _standard_names(gradients: Outputs, module: nn.Module) -> Outputs:
    """Gradients of fused weights split back to q/k/v names, with the naming and layout the model was fused with."""
    procs = [attn.processor for attn in joint_attentions(module)]
    if not procs or not hasattr(procs[0], "layout"):
        return gradients
    head_dim = joint_attentions(module)[0].inner_dim // joint_attentions(module)[0].heads
    return split_state_dict(gradients, procs[0].naming, procs[0].layout, head_dim)
