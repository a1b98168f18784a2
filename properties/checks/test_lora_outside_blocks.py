"""`report --lora` with a LoRA whose only targets lie outside the transformer blocks (img_in, txt_in, norm_out.linear,
proj_out: the streamed model's prologue and epilogue modules). It must be applied to the oracle, the standard and the
merged model alike: the alpha sweep's deviation from the base model at factor 1 is the one diffusers' own model shows
with the LoRA's delta W added to those weights (computed here, unstreamed), standard and merged show it too, and the
standard+LoRA vs merged+LoRA checks pass. A streamed run that dropped the LoRA from the candidate fails those checks;
one that dropped it everywhere, or from the standard model only, shows a deviation of 0 where diffusers' is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from properties.files.test_lora_files import STANDARD, write_lora
from verify.cli import main
from verify.models import qwen_image

TOP = ("img_in", "txt_in", "norm_out.linear", "proj_out")
RANK, ALPHA = 4, 2.0  # multiplier alpha / rank = 0.5
SEED = 0  # the report's default seed: its weights and inputs


def _modules() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """target -> (A, B), scaled as verify.models.qwen_image.seeded_lora scales its factors."""
    g = torch.Generator().manual_seed(11)
    out = {}
    for target in TOP:
        rows, cols = STANDARD.targets[target]
        out[target] = (torch.randn(RANK, cols, generator=g) / cols**0.5,
                       torch.randn(rows, RANK, generator=g) * 0.3 / RANK**0.5)
    return out


def _diffusers_deviation(fixture: str) -> float:
    """||out(W + m B A) - out(W)|| / ||out(W)|| of diffusers' model in fp64 on the report's seeded tiny weights and
    the fixture's inputs, the LoRA added to the weights by hand."""
    config = qwen_image.model_config("tiny")
    model = qwen_image.build_model(config, SEED)
    inputs = qwen_image.model_inputs(config, qwen_image.FIXTURES[fixture], SEED)
    with torch.no_grad():
        base = model(**inputs).sample
        for target, (A, B) in _modules().items():
            model.get_submodule(target).weight += (ALPHA / RANK) * (B.double() @ A.double())
        with_lora = model(**inputs).sample
    return float((with_lora - base).norm() / base.norm())


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[int, dict]:
    root = tmp_path_factory.mktemp("top-lora")
    lora = write_lora(root / "top.safetensors", "lightning", _modules(), ALPHA)
    out = root / "out"
    code = main(["report", "--lora", str(lora), "--dtypes", "fp64,fp32", "--out", str(out)])
    return code, json.loads((Path(out) / "summary.json").read_text())


def test_the_lora_lands_on_the_modules_outside_the_blocks(run):
    _, summary = run
    lora = summary["lora"]
    assert lora["modules_matched"] == len(TOP) and lora["unmatched_keys"] == []
    assert sorted(m["target"] for m in lora["modules"]) == sorted(TOP)
    assert lora["scale"]["value"] == pytest.approx(ALPHA / RANK)


def test_standard_and_merged_with_the_lora_agree(run):
    code, summary = run
    checks = [c for c in summary["checks"] if c["name"].startswith("lora/") and c["name"].endswith("/outputs")]
    assert {c["name"] for c in checks} == {f"lora/{f}/outputs" for f in qwen_image.FIXTURES}
    assert {c["dtype"] for c in checks} == {"fp64", "fp32"}
    assert all(c["passed"] for c in checks), [(c["name"], c["dtype"], c["message"]) for c in checks if not c["passed"]]
    assert code == 0, summary["verdict_reasons"]


def test_the_sweep_moves_oracle_standard_and_merged_as_the_lora_moves_diffusers_model(run):
    _, summary = run
    sweep = {row["factor"]: row for row in summary["lora"]["sweep"]}
    expected = _diffusers_deviation(sweep[1.0]["fixture"])
    assert expected > 1e-3, "the LoRA changes the model's output"
    for impl in ("oracle", "standard", "merged"):
        assert sweep[0.0][f"{impl}_rel_dev"] == 0.0
    assert sweep[1.0]["oracle_rel_dev"] == pytest.approx(expected, rel=1e-9)
    for impl in ("standard", "merged"):  # fp32 runs: fp32's noise, far below the deviation itself
        assert sweep[1.0][f"{impl}_rel_dev"] == pytest.approx(expected, rel=1e-4), impl
