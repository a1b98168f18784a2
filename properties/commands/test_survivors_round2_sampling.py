"""`qkv-verify sample`'s judging, for the survivors of the second mutation run
(reports/mutation/verdicts-messages-writes.txt) in verify/checks/sampling.py: where a declared-fp32 candidate's failing
step is located, and the LoRA sweep's numbers on the 0-255 pixel scale."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

from properties.files.test_lora_files import STANDARD, random_modules, write_lora
from properties.precision_variants import Fp32Attention
from verify.checks import sampling
from verify.checks.report import SWEEP_FACTORS
from verify.files import lora_formats as formats
from verify.files import lora_mapping as mapping
from verify.implementations.fused import fuse_attention
from verify.testing import check_trajectory


class _Fp32AttentionOff(Fp32Attention):
    """The fp32 attention with its result 0.1% too large: a real bug, far above fp32's floor."""

    def attend(self, q, k, v, text_mask, hidden_states):
        return super().attend(q, k, v, text_mask, hidden_states) * (1 + 1e-3)


def _fp32_then_bug(standard, component):
    """Every joint attention computed in fp32 (within fp32's floor); the second block's also 0.1% off."""
    attentions = [m for m in standard.modules() if isinstance(m, Attention) and m.added_kv_proj_dim is not None]
    for i, attn in enumerate(attentions):
        processor = _Fp32AttentionOff if i == 1 else Fp32Attention
        fuse_attention(attn, layout="blocked", processor=processor(layout="blocked"))
    return standard


_fp32_then_bug.precision = "fp32"


def test_a_declared_fp32_candidate_is_located_where_it_leaves_fp32s_floor():
    """Kills x__locate__mutmut_49 (the floor dropped: located at fp64's, the run's dtype): the fp64 step fails, and
    its first divergence is the second block's attention output, the bug, not the first block's fp32 rounding that
    the declared precision allows."""
    [record] = check_trajectory(_fp32_then_bug, steps=1, dtypes=(torch.float64,))
    assert not record["passed"] and record["rule"].endswith("at fp32's floor (declared)")
    assert record["first_divergence"] == "step 1: transformer_blocks.1.attn.to_out.0"


def test_the_lora_sweep_measures_mean_absolute_pixel_differences_on_0_to_255(tmp_path, monkeypatch):
    """Kills x_lora_effect__mutmut_64 (/ 255) and _67 (* 256). The pipeline runs are stood in for by flat images
    (pixels in [0, 1]): the reference's at factor f is 0.25 + 0.05 f, the candidate's 0.01 above it; so the LoRA's
    effect is 0.05 f x 255 = 12.75 f levels, the candidate's deviation 2.55 levels, their ratio 5 f."""
    path = write_lora(tmp_path / "l.safetensors", "lightning",
                      random_modules(STANDARD, ["transformer_blocks.0.attn.to_q"], 2, 0), 4.0)
    plan = mapping.plan(formats.read(path), STANDARD)
    scale = plan.updates[0].factors.scale
    assert scale == 2.0  # alpha 4 over rank 2

    monkeypatch.setattr(sampling, "_updated", lambda weights, scaled: scaled.updates[0].factors.scale / scale)
    # _built(..., weights, dtype, device, role): the role and the factor _updated stood in for the weights
    monkeypatch.setattr(sampling, "_built", lambda *args: (args[-1], args[-4]))
    image = {"reference": lambda f: 0.25 + 0.05 * f, "candidate": lambda f: 0.26 + 0.05 * f}

    def run(module, transformer, vae, inputs, opts, dtype, device, impl, keep_calls=False):
        role, factor = transformer
        return SimpleNamespace(image=np.full((8, 8, 3), image[role](factor)))

    monkeypatch.setattr(sampling, "_run", run)
    opts = sampling.SampleOptions(lora=path)
    lora = sampling.lora_effect(None, "cand", "ref", ("std", "std"), None, {}, opts, plan)
    assert [row["factor"] for row in lora["sweep"]] == list(SWEEP_FACTORS)
    for row in lora["sweep"]:
        f = row["factor"]
        assert row["effect_mean_abs"] == pytest.approx(12.75 * f, rel=1e-9, abs=1e-9), row
        assert row["deviation_mean_abs"] == pytest.approx(2.55, rel=1e-9), row
        assert row["effect_over_deviation"] == pytest.approx(5 * f, rel=1e-9, abs=1e-9), row
    assert lora["scales"] == [2.0] and lora["modules_matched"] == 1 and lora["file"] == str(path)
