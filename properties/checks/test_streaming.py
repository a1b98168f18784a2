"""The block-by-block runner the report uses is diffusers' full-model forward, and never alters its sources."""

from __future__ import annotations

import pytest
import torch

from verify.checks.compare import compare, compare_exact
from verify.checks.inputs import cast_inputs
from verify.checks.report import _updater
from verify.checks.streaming import StateDictSource, run_streaming
from verify.checks.tolerance import OUTPUTS
from verify.files import lora_formats as formats
from verify.files import lora_mapping as mapping
from verify.implementations.candidate import resolve
from verify.implementations.fused import fuse_model
from verify.implementations.loading import empty_model
from verify.models import qwen_image

REFERENCE, DIFFUSERS = resolve("reference"), resolve("diffusers")
FLAGS = [{}, {"zero_cond_t": True}, {"use_layer3d_rope": True, "use_additional_t_cond": True}]


@pytest.mark.parametrize("flags", FLAGS, ids=["plain", "zero_cond_t", "layered"])
@pytest.mark.parametrize("fixture", list(qwen_image.FIXTURES))
def test_streaming_equals_the_whole_model_forward_bit_for_bit(flags, fixture, device):
    config = qwen_image.model_config("tiny", **flags)
    model = qwen_image.build_model(config, seed=3)
    inputs = qwen_image.model_inputs(config, qwen_image.FIXTURES[fixture], seed=3)
    run = run_streaming(StateDictSource(model.state_dict(), config), inputs, [torch.float32], device, REFERENCE,
                        DIFFUSERS)
    with torch.no_grad():
        ref = torch.nn.Module.to(model, device=device)(**cast_inputs(inputs, torch.float64, device)).sample
        base = torch.nn.Module.to(model, dtype=torch.float32)(
            **cast_inputs(inputs, torch.float32, device)).sample
    assert torch.equal(run.ref["sample"], ref)
    assert torch.equal(run.base[torch.float32]["sample"], base)
    assert run.fused_calls[torch.float32] == 2 * config["num_layers"]


def _lora_file(tmp_path, config, seed=0):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    tensors = {}
    for i in range(config["num_layers"]):
        for m in ("attn.to_q", "attn.to_v", "attn.add_k_proj", "attn.to_out.0"):
            tensors[f"transformer_blocks.{i}.{m}.lora_down.weight"] = torch.randn(4, dim, generator=g) * 0.2
            tensors[f"transformer_blocks.{i}.{m}.lora_up.weight"] = torch.randn(dim, 4, generator=g) * 0.2
            tensors[f"transformer_blocks.{i}.{m}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(tmp_path / "lora.safetensors"))
    return formats.read(tmp_path / "lora.safetensors")


def test_lora_streamed_equals_lora_applied_to_the_whole_model_and_sources_stay_untouched(tmp_path):
    config = qwen_image.model_config("tiny")
    model = qwen_image.build_model(config, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lora = _lora_file(tmp_path, config)
    inputs = qwen_image.model_inputs(config, qwen_image.FIXTURES["edit"], 0)
    std_plan = mapping.plan(lora, mapping.spec_of(model))
    cand_plan = mapping.plan(lora, mapping.spec_of(fuse_model(empty_model(config))))
    source = StateDictSource(model.state_dict(), config)
    run = run_streaming(source, inputs, [torch.float64], "cpu", REFERENCE, DIFFUSERS, None,
                        _updater(std_plan.updates, 1.0), _updater(cand_plan.updates, 1.0))
    assert compare_exact("source", "weights", state, source.state).passed, "a LoRA run must not alter its source"
    mapping.apply(model, std_plan)
    with torch.no_grad():
        expected = model(**inputs).sample
    assert torch.allclose(run.ref["sample"], expected, rtol=0, atol=1e-12)


def test_lora_on_the_merged_model_at_the_wrong_multiplier_is_caught(tmp_path):
    """Planted bug: the merged model loads the LoRA at twice its scale; the report's comparison must fail."""
    config = qwen_image.model_config("tiny")
    model = qwen_image.build_model(config, seed=0)
    lora = _lora_file(tmp_path, config)
    std_plan = mapping.plan(lora, mapping.spec_of(empty_model(config)))
    cand_plan = mapping.plan(lora, mapping.spec_of(fuse_model(empty_model(config))))
    inputs = qwen_image.model_inputs(config, qwen_image.FIXTURES["text-to-image"], 0)
    source = StateDictSource(model.state_dict(), config)
    for factor, should_pass in ((1.0, True), (2.0, False)):
        run = run_streaming(source, inputs, [torch.float64, torch.float32], "cpu", REFERENCE, DIFFUSERS, None,
                            _updater(std_plan.updates, 1.0), _updater(cand_plan.updates, factor))
        for d in run.cand:
            record = compare("lora", "model", run.ref, run.cand[d], OUTPUTS, d, "cpu", base=run.base[d],
                             fused_calls=run.fused_calls[d])
            assert record.passed is should_pass, (factor, record.message)
