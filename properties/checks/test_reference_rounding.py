"""diffusers' Qwen-Image 2.1 rounds its RoPE (and RMSNorm, timestep embedding) to fp32 whatever the dtype, so its fp64
run, the oracle, is fp32-precise: fp64 runs judged against it are judged at fp32's floor (a bound finer than the
oracle failed the correct full-width merged reference on an H100: reports/gpu/NOTES.md, record of changes). The
model declares it (REFERENCE_PRECISION); Qwen-Image's oracle stays fp64-precise, and so does any reference that
declares nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from verify import models
from verify.checks.compare import compare
from verify.checks.equivalence import run_case
from verify.checks.tolerance import FLOORS, OUTPUTS
from verify.cli import main
from verify.implementations import fused_21
from verify.implementations.candidate import resolve, resolve_reference

GPU = Path(__file__).resolve().parents[2] / "reports" / "gpu"


class _Fp64Rope(fused_21.FusedQwenImage21AttnProcessor):
    def rotate(self, x, rotary_emb):
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())  # complex128 for fp64
        return torch.view_as_real(pairs * rotary_emb.unsqueeze(1).to(pairs.dtype)).flatten(3).type_as(x)


def fp64_rope(module, component):
    """The merged attention with RoPE computed in the input's precision: finer than diffusers' own, and correct."""
    return fused_21.fuse_model(module, "blocked", _Fp64Rope)


fp64_rope.layout = "blocked"


def _report(tmp_path, *args):
    code = main(["report", "--model", "qwen-image-2.1", "--candidate", f"{__name__}:fp64_rope", "--dtypes",
                 "fp64,fp32", "--out", str(tmp_path / "out"), "--force", *args])
    return code, json.loads((tmp_path / "out" / "summary.json").read_text())


def test_the_models_declare_how_finely_diffusers_computes_in_fp64():
    assert models.load("qwen-image-2.1").REFERENCE_PRECISION == "fp32"
    assert models.load("qwen-image").REFERENCE_PRECISION is None
    assert resolve_reference(None, "fp32").precision == "fp32"
    assert resolve_reference("reference", "fp32").precision is None  # another reference: its own declaration


def test_a_finer_rope_passes_and_the_report_says_the_oracle_is_fp32_precise(tmp_path):
    code, summary = _report(tmp_path)
    assert code == 0, [c["message"] for c in summary["checks"] if not c["passed"]]
    assert summary["reference"]["precision"] == "fp32" and summary["candidate"]["precision"] is None
    assert "the oracle is fp32-precise, so fp64 runs are judged at fp32's floor" in summary["compared"]
    fp64 = [c for c in summary["checks"] if c["dtype"] == "fp64" and c["component"] != "weights"]
    assert fp64 and all(c["rule"].endswith("at fp32's floor (the reference's precision)") for c in fp64)


def test_qwen_image_keeps_fp64s_floor(tmp_path):
    main(["report", "--dtypes", "fp64,fp32", "--out", str(tmp_path / "out"), "--force"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["reference"]["precision"] is None and "-precise" not in summary["compared"]
    assert not any("floor" in (c.get("rule") or "") for c in summary["checks"] if c["dtype"] == "fp64")


def test_a_21_case_is_judged_at_fp32s_floor_in_fp64_and_a_non_diffusers_reference_is_not():
    case = models.load("qwen-image-2.1").CASES["attention"]
    by_diffusers = run_case(case, [torch.float64], candidate="reference")
    by_itself = run_case(case, [torch.float64], candidate="reference", reference="reference")
    assert all(r.passed and r.rule.endswith("at fp32's floor (the reference's precision)") for r in by_diffusers)
    assert all(r.passed and "floor" not in r.rule for r in by_itself)


@pytest.mark.parametrize("reference_precision, side, passes", [
    ("fp32", 0.9, True), ("fp32", 1.1, False), (None, 0.9, False),
])
def test_an_fp32_precise_oracle_bounds_fp64_runs_at_fp32s_floor_exactly(reference_precision, side, passes):
    """The bound of an fp64 run with a bit-identical base: fp32's atol + rtol * |ref| (torch.testing's fp32
    defaults), pinned from both sides; without the declaration fp64's own floor, far below it."""
    atol, rtol = FLOORS[torch.float32]
    ref = torch.tensor([0.0, 1.0, -3.0], dtype=torch.float64)
    cand = ref + side * (atol + rtol * ref.abs())
    record = compare("t", "attention", {"x": ref}, {"x": cand}, OUTPUTS, torch.float64, "cpu", base={"x": ref},
                     reference_precision=reference_precision)
    assert record.passed is passes


def test_a_declared_candidate_and_an_fp32_precise_oracle_say_which_set_the_floor():
    ref = {"x": torch.ones(3, dtype=torch.float64)}
    declared = compare("t", "attention", ref, ref, OUTPUTS, torch.float64, "cpu", base=ref, precision="fp32",
                       reference_precision="fp32")
    oracle = compare("t", "attention", ref, ref, OUTPUTS, torch.float64, "cpu", base=ref, reference_precision="fp32")
    assert declared.rule.endswith("(declared)") and oracle.rule.endswith("(the reference's precision)")
    assert resolve("diffusers").precision is None  # the declaration is the model's, not the builtin's


def test_sample_on_21_records_the_oracles_precision_and_judges_fp64_steps_at_fp32s_floor(tmp_path):
    code = main(["sample", "--model", "qwen-image-2.1", "--steps", "2", "--out", str(tmp_path / "s"), "--force"])
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert code == 0 and summary["reference"]["precision"] == "fp32"
    assert "the oracle is fp32-precise" in summary["compared"]
    fp64 = [r for r in summary["trajectory"] if r["dtype"] == "fp64"]
    assert fp64 and all(r["rule"].endswith("at fp32's floor (the reference's precision)") for r in fp64)


def test_the_full_width_21_report_on_a_gpu_passes_the_merged_reference_at_fp32s_floor():
    """The committed run (reports/gpu/report-21-full.sh on one H100) that failed 50 of 52 before the oracle's
    precision entered the bound: every check passes, fp64's judged at fp32's floor, the fp64 runs really ran."""
    summary = json.loads((GPU / "report-21-full-h100.json").read_text())
    assert summary["inputs"]["config"] == "full" and summary["inputs"]["device"] == "cuda"
    assert summary["candidate"]["spec"] == "reference" and summary["reference"]["precision"] == "fp32"
    fp64 = [c for c in summary["checks"] if c["dtype"] == "fp64" and c["component"] != "weights"]
    assert fp64 and all(c["rule"].endswith("(the reference's precision)") for c in fp64)
    assert all(c["passed"] for c in summary["checks"]), [c["name"] for c in summary["checks"] if not c["passed"]]
