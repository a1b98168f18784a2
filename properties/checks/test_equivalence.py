"""Equivalence properties: the merged attention, block and full model compute the standard one's function.

Each example draws a tiny config, inputs and a seed, runs the registry case through `run_case` (fp64 oracle, standard
and merged in each dtype, judged by the relative-to-base rule) and requires every record to pass with the fused
projections having run exactly once per stream and attention.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from properties.strategies import expensive, input_specs, layouts, model_configs, namings, seeds
from verify.checks.cases import case_for
from verify.checks.compare import assert_passed
from verify.checks.equivalence import run_case
from verify.implementations.fused import fuse_model
from verify.models.cases import Case
from verify.models.qwen_image import CASES, CONFIGS

HIGH = (torch.float64, torch.float32)  # every example; a bf16- or fp16-only pass is not an equivalence
LOW = st.sampled_from([None, torch.bfloat16, torch.float16])


def _check(case: Case, device: str, config: dict, spec, seed: int, naming: str, layout: str, low,
           dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    dtypes = dtypes or HIGH + ((low,) if low else ())
    records = run_case(case, dtypes=dtypes, device=device, seed=seed, config=config, spec=spec,
                       candidate=lambda module, component: fuse_model(module, naming, layout), layout=layout)
    attentions = config["num_layers"] if case.component == "model" else 1
    assert len(records) == len(dtypes) * (2 if case.grads else 1), [r.name for r in records]
    for record in records:
        assert_passed(record)
        assert record.fused_calls > 0, f"{record.name} [{record.dtype}]: the fused projections never ran"
        assert record.fused_calls == 2 * attentions, f"{record.fused_calls} fused calls, expected {2 * attentions}"
        if currently_in_test_context():  # Hypothesis statistics: how often the merged path is bit-identical
            event(f"{record.name} {record.dtype}: {'bit-identical' if record.bit_identical else 'within tolerance'}")


@settings(max_examples=expensive())
@given(config=model_configs(), spec=input_specs(), seed=seeds(), naming=namings(), layout=layouts(), low=LOW)
def test_fused_attention_equals_standard(device, config, spec, seed, naming, layout, low):
    """Outputs and gradients w.r.t. both input streams and every weight."""
    _check(case_for("attention", config, spec), device, config, spec, seed, naming, layout, low)


@settings(max_examples=expensive())
@given(config=model_configs(), spec=input_specs(), seed=seeds(), naming=namings(), layout=layouts(), low=LOW)
def test_fused_block_equals_standard(device, config, spec, seed, naming, layout, low):
    """Outputs and gradients, with and without zero_cond_t and a reference image."""
    _check(case_for("block", config, spec), device, config, spec, seed, naming, layout, low)


@settings(max_examples=expensive())
@given(config=model_configs(layered=None), spec=input_specs(edit=False), seed=seeds(), naming=namings(),
       layout=layouts(), low=LOW)
def test_fused_model_equals_standard_text_to_image(device, config, spec, seed, naming, layout, low):
    """The whole transformer, text-to-image: outputs and gradients; Layered flags drawn."""
    _check(case_for("model", config, spec), device, config, spec, seed, naming, layout, low)


@settings(max_examples=expensive())
@given(config=model_configs(layered=None), spec=input_specs(edit=True), seed=seeds(), naming=namings(),
       layout=layouts(), low=LOW)
def test_fused_model_equals_standard_edit(device, config, spec, seed, naming, layout, low):
    """The whole transformer with a reference image; zero_cond_t (Edit-2511: t = 0 for it) and Layered drawn."""
    _check(case_for("model", config, spec), device, config, spec, seed, naming, layout, low)


@pytest.mark.parametrize("name", sorted(CASES))
def test_registry_case_passes(device, name):
    """Every declared case at its own config and fixture, in all its dtypes: what the report runs."""
    case = CASES[name]
    _check(case, device, case.config, case.spec, 0, "seed", "blocked", None, dtypes=case.dtypes)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(CASES))
def test_registry_case_passes_at_small_width(device, name, seed):
    """The same at the `small` config (6 heads of 32, 4 layers), both layouts, every dtype of the case."""
    case = CASES[name]
    config = {**case.config, **CONFIGS["small"]}  # the case's flags (zero_cond_t, ...) at the wider sizes
    for layout in ("blocked", "interleaved"):
        _check(case, device, config, case.spec, seed, "diffusers", layout, None, dtypes=case.dtypes)
