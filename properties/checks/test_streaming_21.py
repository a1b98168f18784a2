"""Qwen-Image 2.1 streamed block by block is diffusers' whole-model forward (its prefill), bit for bit: the standard
model, a fused candidate's blocks and diffusers' flex processor, in fp64 and fp32."""

from __future__ import annotations

import copy

import pytest
import torch

from verify.checks.inputs import cast_inputs
from verify.checks.streaming import SeededSource, StateDictSource, run_streaming
from verify.implementations import fused_21
from verify.implementations.candidate import resolve
from verify.models import qwen_image_21 as q21

MODEL = "qwen-image-2.1"
REFERENCE, DIFFUSERS, FLEX = resolve("reference"), resolve("diffusers"), resolve("diffusers-flex")


def _whole(model: torch.nn.Module, inputs: dict, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The whole model's forward, cast as the case runner casts it (nn.Module.to: buffers too)."""
    with torch.no_grad():
        return torch.nn.Module.to(copy.deepcopy(model), device=device, dtype=dtype)(
            **cast_inputs(inputs, dtype, device)).sample


@pytest.mark.parametrize("causal_condition", [True, False], ids=["causal-condition", "no-causal-condition"])
@pytest.mark.parametrize("fixture", list(q21.FIXTURES))
def test_streaming_21_equals_the_whole_model_forward_bit_for_bit(fixture, causal_condition, device):
    config = q21.model_config("tiny", causal_condition=causal_condition)
    model = q21.build_model(config, seed=3)
    inputs = q21.model_inputs(config, q21.FIXTURES[fixture], seed=3)
    run = run_streaming(StateDictSource(model.state_dict(), config), inputs, [torch.float32], device, REFERENCE,
                        DIFFUSERS, model=MODEL)
    fused = fused_21.fuse_model(copy.deepcopy(model))
    assert torch.equal(run.ref["sample"], _whole(model, inputs, torch.float64, device))
    assert torch.equal(run.base[torch.float32]["sample"], _whole(model, inputs, torch.float32, device))
    assert torch.equal(run.cand[torch.float32]["sample"], _whole(fused, inputs, torch.float32, device))
    assert run.fused_calls[torch.float32] == config["num_layers"]  # one fused attention per block
    assert run.first_divergence[torch.float32] is None


def test_streaming_21_hands_the_flex_processor_its_block_mask(device):
    """diffusers-flex's blocks get the BlockMask the forward builds for them (not the segments): bit for bit the whole
    model with QwenImage21FlexAttnProcessor installed, and not the SDPA prefill's bits."""
    config = q21.model_config("tiny")
    model = q21.build_model(config, seed=5)
    inputs = q21.model_inputs(config, q21.FIXTURES["edit-adjacent"], seed=5)
    run = run_streaming(StateDictSource(model.state_dict(), config), inputs, [torch.float32], device, FLEX,
                        DIFFUSERS, model=MODEL)
    flex = FLEX.make(copy.deepcopy(model), "model")
    expected = _whole(flex, inputs, torch.float32, device)
    assert torch.equal(run.cand[torch.float32]["sample"], expected)
    assert not torch.equal(expected, run.base[torch.float32]["sample"])  # the two paths differ: the test can tell


def test_planted_mask_bug_is_located_at_the_first_block():
    """A prefill that ignores the block-causal mask leaves the bound in block 0's attention."""
    from verify.planted import full_attention_21

    config = q21.model_config("tiny")
    model = q21.build_model(config, seed=0)
    inputs = q21.model_inputs(config, q21.FIXTURES["edit"], seed=0)
    run = run_streaming(StateDictSource(model.state_dict(), config), inputs, [torch.float32], "cpu",
                        resolve(full_attention_21), DIFFUSERS, model=MODEL)
    assert run.first_divergence[torch.float32].startswith("transformer_blocks.0.attn")


def test_seeded_source_21_draws_every_tensor_of_the_model():
    """Seeded per-tensor weights (--config full's source) name and shape every tensor of 2.1's model."""
    config = q21.model_config("tiny")
    source = SeededSource(config, seed=0, device="cpu", model=MODEL)
    state = source.top() | {f"transformer_blocks.{i}.{k}": v for i in range(config["num_layers"])
                            for k, v in source.block(i).items()}
    expected = {k: tuple(v.shape) for k, v in q21.build_model(config, 0).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
