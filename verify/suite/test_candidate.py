"""Properties every merged-QKV implementation must have: over random head counts, head dims, sequence lengths,
batch sizes, padded text masks and zero_cond_t (Qwen-Image; condition images and the KV cache for Qwen-Image 2.1,
`--qkv-model qwen-image-2.1`), its attention and its block compute the reference's function in
fp64, fp32, bf16 and fp16, outputs and gradients, judged by the relative-to-base rule against the fp64 oracle (a
fused candidate whose fused modules never ran fails). Run by `qkv-verify test SPEC`, or by pytest with
`--qkv-candidate SPEC`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verify.checks.cases import case_for
from verify.checks.equivalence import run_case
from verify.checks.strategies import input_specs, input_specs_21, model_configs, model_configs_21, seeds
from verify.checks.tolerance import DTYPES
from verify.models import qwen_image_21
from verify.testing import describe


@pytest.mark.qkv_model("qwen-image")
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("component", ["attention", "block"])
@given(config=model_configs(max_layers=1, zero_cond_t=None, layered=False),
       spec=st.one_of(input_specs(), input_specs(padded=True)), seed=seeds())
def test_candidate_computes_the_reference_function(qkv_candidate, qkv_reference, qkv_layout, qkv_device, component,
                                                    dtype, config, spec, seed):
    _judge(run_case(case_for(component, config, spec), [dtype], qkv_device, seed, config=config, spec=spec,
                    candidate=qkv_candidate, reference=qkv_reference, layout=qkv_layout))


@pytest.mark.qkv_model("qwen-image-2.1")
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", ["attention", "attention-cache", "block"])
@given(config=model_configs_21(), spec=input_specs_21(), seed=seeds())
def test_21_candidate_computes_the_reference_function(qkv_candidate, qkv_reference, qkv_layout, qkv_device, case,
                                                       dtype, config, spec, seed):
    """Qwen-Image 2.1: the prefill (block-causal, condition images adjacent or not, padding) and the cached decode."""
    _judge(run_case(qwen_image_21.CASES[case], [dtype], qkv_device, seed, config=config, spec=spec,
                    candidate=qkv_candidate, reference=qkv_reference, layout=qkv_layout))


def _judge(records) -> None:
    judged = [r for r in records if r.provided]
    if not judged:
        pytest.skip(records[0].message)
    failed = [describe(r) for r in judged if not r.passed]
    assert not failed, "\n".join(failed)
