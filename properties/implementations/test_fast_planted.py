"""Planted bugs in the fast processors' own code paths (the planted bugs of verify.planted override the reference
processor's methods, which the fast processors never call): the q/k/v split, the norm, the RoPE coefficients and
rotation, the joint layout of v, the compile expression's norm. Each must be caught in fp32 (and in fp64 where that
path computes it itself) by the same comparison that passes the correct code, on the path that runs it: the eager
kernels, the compile expression (traced eagerly), and the compiled region (aot_eager on the CPU)."""

from __future__ import annotations

import pytest
import torch

from verify.checks.equivalence import run_case
from verify.implementations import fast_fused
from verify.implementations.fused import fuse_attention, joint_attentions
from verify.models.qwen_image import CASES

HIGH = (torch.float64, torch.float32)


def _kv_swapped(fused, head_dim, layout, split=fast_fused.split_heads):
    q, k, v = split(fused, head_dim, layout)
    return q, v, k


def _norm_skipped(norm, x):
    return x


def _rotated_backwards(out, x, cos, sin, sign, rope=fast_fused._rope_into):
    rope(out, x, cos, sin, -sign)


def _pairs_unsigned(cos_sin, pair=fast_fused.pair_coefficients):
    cos, sin = pair(cos_sin)
    return cos, sin.abs()


class _VImageFirst(torch.autograd.Function):
    """The joint copy in [image, text] order where the attention expects [text, image] (v, and q/k in fp64)."""

    @staticmethod
    def forward(ctx, txt, img):
        ctx.image_len = img.shape[1]
        return torch.cat([img, txt], dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.image_len:], grad[:, :ctx.image_len]


def _weight_dropped(x, weight, eps, cos_sin, rms_rope=fast_fused._rms_rope):
    return rms_rope(x, None if weight is None else torch.ones_like(weight), eps, cos_sin)


# name -> (module attribute, replacement, the paths that run it, the dtypes in which that path computes it itself)
PLANTED = {
    "split_k_v_swapped": ("split_heads", _kv_swapped, ("kernels", "expression", "region"), HIGH),
    "norm_skipped": ("_norm", _norm_skipped, ("kernels",), (torch.float32,)),
    "rope_rotated_backwards": ("_rope_into", _rotated_backwards, ("kernels",), (torch.float32,)),
    "rope_pairs_unsigned": ("pair_coefficients", _pairs_unsigned, ("kernels", "expression", "region"),
                            (torch.float32,)),
    "expression_weight_dropped": ("_rms_rope", _weight_dropped, ("expression", "region"), (torch.float32,)),
    "joint_copy_image_first": ("_JointCopy", _VImageFirst, ("kernels",), HIGH),
}


def _candidate(path: str):
    def build(standard, component):
        for attn in joint_attentions(standard):
            if path == "region":
                processor = fast_fused.RegionCompiledFusedQwenAttnProcessor("seed", "blocked", backend="aot_eager")
            else:
                processor = fast_fused.FastFusedQwenAttnProcessor("seed", "blocked", functional=path == "expression")
            fuse_attention(attn, "seed", "blocked", processor)
        return standard

    build.layout = "blocked"
    return build


def _records(path: str) -> dict[str, object]:
    torch._dynamo.reset()  # the region's graph is traced anew, with whatever the module holds now
    fast_fused._REGIONS.clear()
    fast_fused._COEFFICIENTS.clear()
    return {f"{r.name} {r.dtype}": r for r in run_case(CASES["block"], HIGH, candidate=_candidate(path))}


@pytest.mark.parametrize("path", ["kernels", "expression", "region"])
def test_the_correct_fast_paths_pass(path):
    records = _records(path)
    assert records and all(r.passed and r.fused_calls for r in records.values()), [
        r.message for r in records.values() if not r.passed]


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_a_planted_bug_in_a_fast_path_is_caught(bug, monkeypatch):
    attribute, replacement, paths, dtypes = PLANTED[bug]
    monkeypatch.setattr(fast_fused, attribute, replacement)
    for path in paths:
        records = _records(path)
        for dtype in dtypes:
            name = {torch.float64: "fp64", torch.float32: "fp32"}[dtype]
            record = records[f"block/outputs {name}"]
            assert not record.passed and record.mismatched and record.fused_calls, (bug, path, name, record.message)
    torch._dynamo.reset()
    fast_fused._REGIONS.clear()
    fast_fused._COEFFICIENTS.clear()
