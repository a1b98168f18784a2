"""The registry of equivalence cases: each declared once, iterated by the property tests and by the report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
from torch import nn

from verify.checks import fixtures
from verify.checks.fixtures import FIXTURES, InputSpec
from verify.checks.tolerance import DTYPES

Outputs = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One equivalence case: a component, how to build it and its inputs, what it outputs, which dtypes."""

    name: str
    component: str  # "attention" | "block" | "model"
    build: Callable[[dict, int], nn.Module]  # (config, seed) -> standard fp64 module on the CPU
    inputs: Callable[[dict, InputSpec, int], dict]  # (config, spec, seed) -> fp64 CPU inputs
    outputs: Callable[[nn.Module, dict], Outputs]  # run the module -> named outputs
    config: dict = field(default_factory=lambda: fixtures.model_config("tiny"))
    spec: InputSpec = InputSpec()
    dtypes: tuple[torch.dtype, ...] = tuple(DTYPES.values())
    grads: bool = False  # also compare gradients w.r.t. inputs and weights
    tags: frozenset[str] = frozenset()


def build_block(config: dict, seed: int) -> QwenImageTransformerBlock:
    """One seeded standard transformer block at the config's width, in fp64."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = QwenImageTransformerBlock(
            dim=config["num_attention_heads"] * config["attention_head_dim"],
            num_attention_heads=config["num_attention_heads"],
            attention_head_dim=config["attention_head_dim"],
            zero_cond_t=config.get("zero_cond_t", False),
        )
    fixtures.randomise_norms(block, seed)
    return block.double().eval()


def build_attention(config: dict, seed: int) -> nn.Module:
    return build_block(config, seed).attn


def attention_outputs(attn: nn.Module, inputs: dict) -> Outputs:
    img, txt = attn(**inputs)
    return {"image": img, "text": txt}


def block_outputs(block: nn.Module, inputs: dict) -> Outputs:
    txt, img = block(**inputs)
    return {"image": img, "text": txt}


def model_outputs(model: nn.Module, inputs: dict) -> Outputs:
    return {"sample": model(**inputs).sample}


def _model_case(name: str, spec: InputSpec, grads: bool = False, **overrides) -> Case:
    return Case(
        name=name, component="model", build=fixtures.build_model, inputs=fixtures.model_inputs,
        outputs=model_outputs, config=fixtures.model_config("tiny", **overrides), spec=spec, grads=grads,
        tags=frozenset({"model"}),
    )


CASES: dict[str, Case] = {
    case.name: case
    for case in [
        Case("attention", "attention", build_attention, fixtures.attention_inputs, attention_outputs, grads=True),
        Case("block", "block", build_block, fixtures.block_inputs, block_outputs, grads=True),
        Case("block-edit-zero-cond", "block", build_block, fixtures.block_inputs, block_outputs,
             config=fixtures.model_config("tiny", zero_cond_t=True), spec=InputSpec(edit=True), grads=True),
        _model_case("model-text-to-image", FIXTURES["text-to-image"], grads=True),
        _model_case("model-edit", FIXTURES["edit"]),
        _model_case("model-edit-zero-cond", FIXTURES["edit"], zero_cond_t=True),  # Qwen-Image-Edit-2511
        _model_case("model-layered", FIXTURES["edit"], use_layer3d_rope=True, use_additional_t_cond=True),
    ]
}
