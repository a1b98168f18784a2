"""diffusers' Qwen-Image 2.1 rounds its RoPE (and RMSNorm, timestep embedding) to fp32 whatever the dtype, so its fp64
run, the oracle, is fp32-precise there. An implementation that rotates in fp64 is finer than the oracle, and differs
from it at fp32's level: the report fails it in fp64, says why in a note, and passes it with --candidate-precision
fp32."""

from __future__ import annotations

import json

import torch

from verify.cli import main
from verify.implementations import fused_21


class _Fp64Rope(fused_21.FusedQwenImage21AttnProcessor):
    def rotate(self, x, rotary_emb):
        pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())  # complex128 for fp64
        return torch.view_as_real(pairs * rotary_emb.unsqueeze(1).to(pairs.dtype)).flatten(3).type_as(x)


def fp64_rope(module, component):
    """The merged attention with RoPE computed in the input's precision."""
    return fused_21.fuse_model(module, "blocked", _Fp64Rope)


fp64_rope.layout = "blocked"


def _report(tmp_path, *args):
    code = main(["report", "--model", "qwen-image-2.1", "--candidate", f"{__name__}:fp64_rope", "--dtypes",
                 "fp64,fp32", "--out", str(tmp_path / "out"), "--force", *args])
    return code, json.loads((tmp_path / "out" / "summary.json").read_text())


def test_finer_rope_fails_fp64_at_fp32s_level_and_the_report_says_why(tmp_path):
    code, summary = _report(tmp_path)
    failed = [c for c in summary["checks"] if not c["passed"]]
    assert code == 1 and failed and {c["dtype"] for c in failed} == {"fp64"}
    assert all(c["effective_precision"] == "fp32" for c in failed)
    assert any("computes its RoPE, RMSNorm and timestep embedding in fp32" in n and "--candidate-precision fp32" in n
               for n in summary["notes"])


def test_declared_fp32_it_passes(tmp_path):
    code, summary = _report(tmp_path, "--candidate-precision", "fp32")
    assert code == 0, [c["message"] for c in summary["checks"] if not c["passed"]]
    assert not any("computes its RoPE" in n for n in summary["notes"])
