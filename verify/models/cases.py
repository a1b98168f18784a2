"""What an equivalence case is: a component, how to build it and its inputs, what it outputs. Each model module of
verify.models declares its cases (its CASES), iterated by the runners, the property tests and the report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Outputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One equivalence case: a component, how to build it and its inputs, what it outputs, which dtypes."""

    name: str
    component: str  # "attention" | "block" | "model"
    build: Callable[[dict, int], nn.Module]  # (config, seed) -> standard fp64 module on the CPU
    inputs: Callable[[dict, object, int], dict]  # (config, spec, seed) -> fp64 CPU inputs
    outputs: Callable[[nn.Module, dict], Outputs]  # run the module -> named outputs
    config: dict  # the model's diffusers config
    spec: object  # the model's input spec (sizes of the fixture)
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    grads: bool = False  # also compare gradients w.r.t. inputs and weights
    reference_precision: str | None = None  # the finest diffusers' component computes at (its REFERENCE_PRECISION)


def model_outputs(model: nn.Module, inputs: dict) -> Outputs:
    """A diffusers transformer's output: its `.sample`."""
    return {"sample": model(**inputs).sample}
