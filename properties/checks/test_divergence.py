"""Where a failing candidate first leaves the bound (verify.checks.divergence), named exactly: when the failure is
NaN or Inf only (no finite element beyond the bound anywhere), when only the second tensor of a submodule's output
(the text stream of an attention's (image, text)) is wrong, and only when the candidate, not the reference or the
standard model, produced the non-finite values. Directly on toy modules, then through runs: the Python API
(check_candidate) and `report --candidate`, whose full-model checks stream the model block by block."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from properties.checkpoint_files import standard_checkpoint
from verify.checks.divergence import first_divergence, leaves_bound
from verify.cli import main
from verify.implementations.fused import FusedQwenAttnProcessor, fuse_attention, joint_attentions
from verify.maths.naming import DEFAULT_NAMING
from verify.testing import check_candidate

F64, F32 = torch.float64, torch.float32


# --- leaves_bound ------------------------------------------------------------------------------------------------


def _triple(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ref in fp64, base = ref rounded to fp32, cand = base): a candidate exactly as good as the standard model."""
    ref = torch.randn(3, 5, generator=torch.Generator().manual_seed(seed), dtype=F64)
    base = ref.float()
    return ref, base, base.clone()


def test_a_candidate_as_good_as_the_standard_model_stays_within_the_bound():
    ref, base, cand = _triple()
    assert not leaves_bound(ref, base, cand, F32)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_one_non_finite_candidate_element_where_the_reference_is_finite_leaves_the_bound(bad):
    """Every other element exact: no finite element is beyond the bound, the non-finite one alone must say so."""
    ref, base, cand = _triple()
    cand[1, 2] = bad
    assert leaves_bound(ref, base, cand, F32)


def test_a_finite_element_beyond_the_bound_leaves_it():
    ref, base, cand = _triple()
    cand[0, 0] += 1.0
    assert leaves_bound(ref, base, cand, F32)


def test_non_finite_values_of_the_standard_model_alone_are_not_blamed_on_the_candidate():
    """The standard model (base) produced the NaN and Inf; the candidate is exact: no divergence of the candidate."""
    ref, base, cand = _triple()
    base[0, 1], base[2, 4] = math.nan, math.inf
    assert not leaves_bound(ref, base, cand, F32)


def test_non_finite_values_the_reference_has_too_are_not_a_divergence():
    """NaN and Inf where the fp64 reference has them as well: the candidate agrees with it."""
    ref, base, cand = _triple()
    for t in (ref, base, cand):
        t[1, 1], t[2, 3] = math.nan, math.inf
    assert not leaves_bound(ref, base, cand, F32)


def test_a_tensor_of_another_shape_leaves_the_bound():
    ref, base, cand = _triple()
    assert leaves_bound(ref, base, cand[:, :4], F32)


# --- first_divergence on toy modules -----------------------------------------------------------------------------


class _Pair(nn.Module):
    """A submodule with two outputs, like an attention's (image, text): `offset` is added to the second only."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.offset = None

    def forward(self, x):
        y = self.lin(x)
        second = y * 2
        if self.offset is not None:
            second = second + self.offset.to(second.dtype)
        return y, second


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.pair = _Pair()
        self.head = nn.Linear(4, 4)

    def forward(self, x):
        a, b = self.pair(self.pre(x))
        return self.head(a + b)


SHARED = {"pre", "pair", "pair.lin", "head"}


def _toys(offset: torch.Tensor | None) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(reference, standard, candidate): the same seeded weights; the candidate's pair adds `offset` to its second
    output."""
    torch.manual_seed(0)
    ref = _Toy().double()
    cand = copy.deepcopy(ref)
    cand.pair.offset = offset
    return ref, copy.deepcopy(ref), cand


def _runner(x: torch.Tensor):
    def run(module: nn.Module, dtype: torch.dtype) -> None:
        module.to(dtype)(x.to(dtype))

    return run


X = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=F64)


def _offset(value: float) -> torch.Tensor:
    offset = torch.zeros(6, 4, dtype=F64)
    offset[2, 1] = value
    return offset


@pytest.mark.parametrize("dtype", [F64, F32])
def test_a_correct_candidate_does_not_diverge(dtype):
    assert first_divergence(*_toys(None), _runner(X), dtype, SHARED) is None


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("value", [0.5, math.nan, math.inf])
def test_only_the_second_output_of_a_submodule_wrong_is_located_at_that_submodule(dtype, value):
    """pair's first output is right and its second wrong in one element (by 0.5, or NaN/Inf, after which nothing
    finite anywhere is beyond the bound): the divergence is pair, not head (fed by both) nor nothing."""
    assert first_divergence(*_toys(_offset(value)), _runner(X), dtype, SHARED) == "pair"


def test_a_nan_in_the_input_everywhere_is_no_divergence_of_the_candidate():
    """Reference, standard and candidate all compute NaN from a NaN input, in the same places: nothing to blame."""
    x = X.clone()
    x[3, 0] = math.nan
    assert first_divergence(*_toys(None), _runner(x), F32, SHARED) is None


def test_names_outside_shared_are_never_named():
    assert first_divergence(*_toys(_offset(0.5)), _runner(X), F64, {"pre", "pair.lin", "head"}) == "head"


# --- through runs: the Python API, and report --candidate (streamed full model) --------------------------------


class _TextOutputOff(FusedQwenAttnProcessor):
    """The attention's image output right, its text output (the second of (image, text)) 1.5 times too large."""

    def outputs(self, attn, joint, text_len):
        img, txt = super().outputs(attn, joint, text_len)
        return img, txt * 1.5


class _ImageOutputNaN(FusedQwenAttnProcessor):
    """One NaN in the attention's image output; everything else exact."""

    def outputs(self, attn, joint, text_len):
        img, txt = super().outputs(attn, joint, text_len)
        img = img.clone()
        img[:, 0, 0] = math.nan
        return img, txt


def _with(processor: type[FusedQwenAttnProcessor]):
    def build(module: nn.Module, component: str) -> nn.Module:
        for attn in joint_attentions(module):
            fuse_attention(attn, DEFAULT_NAMING, "blocked", processor=processor(DEFAULT_NAMING, "blocked"))
        return module

    build.layout = "blocked"
    return build


text_output_off = _with(_TextOutputOff)  # SPEC properties.checks.test_divergence:text_output_off
image_output_nan = _with(_ImageOutputNaN)
CANDIDATES = {"text_output_off": text_output_off, "image_output_nan": image_output_nan}


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_check_candidate_names_the_attention_in_the_block_and_the_model(name):
    records = check_candidate(CANDIDATES[name], components=("block", "model"), dtypes=(F64,))
    outputs = {r.name: r for r in records if r.name.endswith("/outputs")}
    assert outputs and not any(r.passed for r in outputs.values())
    if name == "image_output_nan":
        assert all(r.nonfinite for r in outputs.values())
    located = {n: r.first_divergence for n, r in outputs.items()}
    assert located == {n: "attn" if n.startswith("block") else "transformer_blocks.0.attn" for n in outputs}, located


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_report_names_the_first_block_and_its_attention_in_every_dtype(name, tmp_path):
    """Streamed: block 0's text state alone is wrong after it (text_output_off), or its image state holds a NaN
    row only (image_output_nan); either way block 0 and its attention are named, not block 1 nor nothing."""
    std = standard_checkpoint(tmp_path / "std")
    out = tmp_path / "out"
    code = main(["report", "--checkpoint", str(std), "--candidate", f"{__name__}:{name}", "--dtypes", "fp64,fp32",
                 "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert code == 1 and summary["verdict"] == "fail"
    model = [c for c in summary["checks"] if c["name"].startswith("model/") and c["name"].endswith("/outputs")]
    assert {c["dtype"] for c in model} == {"fp64", "fp32"} and not any(c["passed"] for c in model)
    assert {c["first_divergence"] for c in model} == {"transformer_blocks.0.attn"}, [
        (c["name"], c["dtype"], c["first_divergence"]) for c in model]
    blocks = [c for c in summary["checks"] if c["name"] == "block/outputs"]
    assert blocks and {c["first_divergence"] for c in blocks} == {"attn"}
