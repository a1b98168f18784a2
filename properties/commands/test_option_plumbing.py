"""Options that must reach the check they configure, each shown to matter: a candidate's declared layout survives
`--fused-modules` and beats the default `--layout`; "compared" weight gradients were compared (a wrong weight gradient
fails, a passing record counts every weight); "not provided" names the side that returned None and is never a pass
or a failure of what was provided; `qkv-verify test` with a pytest filter that selects nothing is a usage error; and
the pytest plugin's `--qkv-fused-modules` reaches the candidate fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from verify.checks.equivalence import run_case
from verify.cli import main
from verify.implementations.candidate import DEFAULT_FUSED_MODULES, resolve
from verify.implementations.fused import fuse_attention, joint_attentions
from verify.maths import qkv
from verify.maths.naming import DEFAULT_NAMING, streams
from verify.models.qwen_image import CASES
from verify.testing import assert_candidate, check_candidate

pytest_plugins = ["pytester"]

FP64 = [torch.float64]
HERE = __name__  # SPECs of the candidates below: f"{HERE}:name"
FUSED_NAMES = ",".join(s.fused for s in streams(DEFAULT_NAMING))  # to_qkv,add_qkv_proj


def _fuse(standard, layout: str):
    """Every joint attention of `standard` fused in `layout`, run by the product's fused processor in that layout."""
    for attn in joint_attentions(standard):
        fuse_attention(attn, DEFAULT_NAMING, layout)
    return standard


def _interleaved(standard, component):
    """A correct candidate whose fused q/k/v rows are interleaved per head, and which says so."""
    return _fuse(standard, "interleaved")


_interleaved.layout = "interleaved"


def _interleaved_undeclared(standard, component):
    """The same candidate without a declared layout: --layout must say it."""
    return _fuse(standard, "interleaved")


def _gradients(records):
    return [r for r in records if r.name.endswith("/gradients")]


# --- survivor 1: a declared layout survives --fused-modules and is not overridden by the default --layout ----------

def test_the_interleaved_candidate_is_really_interleaved():
    """The control: read as blocked, the interleaved candidate's weight gradients fail (so the tests below that it
    passes show that its declared layout was used); read as interleaved, they pass."""
    attn = _interleaved_undeclared(CASES["attention"].build(CASES["attention"].config, 0), "attention")
    assert attn.heads > 1, "one head: interleaved and blocked rows coincide"
    image = streams(DEFAULT_NAMING)[0]
    fused = getattr(attn, image.fused).weight
    head_dim = attn.inner_dim // attn.heads
    blocked = qkv.merge(*qkv.split(fused, qkv.QKVShape.equal(fused.shape[0], head_dim), "interleaved"), "blocked",
                        head_dim)
    assert not torch.equal(fused, blocked)
    wrong = _gradients(check_candidate(_interleaved_undeclared, components=("attention",), dtypes=FP64))
    assert wrong and all(not r.passed and r.weight_gradients == "compared" and r.worst_index.startswith("weight.")
                         for r in wrong)
    right = _gradients(check_candidate(_interleaved_undeclared, components=("attention",), dtypes=FP64,
                                       layout="interleaved"))
    assert right and all(r.passed and r.weight_gradients == "compared" for r in right)


@pytest.mark.parametrize("fused_modules", [None, FUSED_NAMES])
def test_a_declared_interleaved_layout_maps_weight_gradients_with_or_without_fused_modules(fused_modules):
    """check_candidate with its default layout argument ('blocked'), with and without fused_modules."""
    candidate = resolve(_interleaved, fused_modules)
    assert candidate.layout == "interleaved"
    if fused_modules:
        assert candidate.fused_modules == tuple(fused_modules.split(","))
    records = check_candidate(_interleaved, components=("attention", "block"), dtypes=FP64,
                              fused_modules=fused_modules)
    grads = _gradients(records)
    assert {r.component for r in grads} == {"attention", "block"}
    assert all(r.weight_gradients == "compared" for r in grads)
    assert all(r.passed and r.fused_calls for r in records), [(r.name, r.message) for r in records if not r.passed]


def test_report_keeps_a_declared_interleaved_layout_under_fused_modules_and_the_default_layout(tmp_path):
    """`report --candidate X --fused-modules NAMES` with no --layout (the default, blocked): X's own layout maps its
    weight gradients, and summary.json says which layout that was."""
    out = tmp_path / "out"
    code = main(["report", "--candidate", f"{HERE}:_interleaved", "--fused-modules", FUSED_NAMES,
                 "--dtypes", "fp64,fp32", "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0, [(c["name"], c["dtype"], c["message"]) for c in summary["checks"] if not c["passed"]]
    assert summary["candidate"]["layout"] == "interleaved"
    assert summary["candidate"]["fused_modules"] == FUSED_NAMES.split(",")
    grads = [c for c in summary["checks"] if c["name"].endswith("/gradients")]
    assert {c["component"] for c in grads} == {"attention", "block", "model"}  # it provides a model: judged whole
    assert all(c["passed"] and c["weight_gradients"] == "compared" and c["fused_calls"] for c in grads)


# --- survivor 2: "compared" weight gradients were compared -------------------------------------------------------

def _scaled_fused_weight_gradient(standard, component):
    """Forward and input gradients right; the image stream's fused weight gets 1.5 times its gradient."""
    built = _fuse(standard, "blocked")
    image = streams(DEFAULT_NAMING)[0]
    for attn in joint_attentions(built):
        getattr(attn, image.fused).weight.register_hook(lambda g: 1.5 * g)
    return built


_scaled_fused_weight_gradient.layout = "blocked"


@pytest.mark.parametrize("component", ["attention", "block"])
def test_a_wrong_weight_gradient_fails_the_gradient_record(component):
    records = check_candidate(_scaled_fused_weight_gradient, components=(component,), dtypes=FP64)
    outputs = [r for r in records if r.name.endswith("/outputs")]
    assert outputs and all(r.passed for r in outputs), "the forward is right"
    grads = _gradients(records)
    assert grads and all(not r.passed and r.weight_gradients == "compared" and r.mismatched for r in grads)
    image = streams(DEFAULT_NAMING)[0]
    separate = {f"{image.q}.weight", f"{image.k}.weight", f"{image.v}.weight"}
    assert all(r.worst_index.split("[")[0].removeprefix("weight.").removeprefix("attn.") in separate for r in grads), \
        [r.worst_index for r in grads]


@pytest.mark.parametrize("name", ["attention", "block"])
def test_compared_weight_gradients_count_every_weight_of_the_standard_component(name):
    """A passing "compared" record judged the input gradients and one gradient per standard parameter."""
    case = CASES[name]
    standard = case.build(case.config, 0)
    inputs = case.inputs(case.config, case.spec, 0)
    input_elements = inputs["hidden_states"].numel() + inputs["encoder_hidden_states"].numel()
    weight_elements = sum(p.numel() for p in standard.parameters())
    grads = _gradients(run_case(case, FP64, candidate="reference"))
    assert grads and all(r.passed and r.weight_gradients == "compared" for r in grads)
    assert all(r.numel == input_elements + weight_elements for r in grads), [r.numel for r in grads]


# --- survivors 3 and 4: "not provided" names its side, is never a pass, and fails nothing that was provided --------

def _provides_nothing(standard, component):
    return None


def _attention_only(standard, component):
    return resolve("reference").make(standard, component) if component == "attention" else None


@pytest.mark.parametrize("side", ["candidate", "reference"])
def test_not_provided_names_the_side_that_returned_none(side):
    spec = f"{HERE}:_provides_nothing"
    other = "reference" if side == "candidate" else "candidate"
    sides = {"candidate": spec, "reference": "diffusers"} if side == "candidate" else \
        {"candidate": "reference", "reference": spec}
    records = run_case(CASES["attention"], FP64, **sides)
    assert [r.name for r in records] == ["attention/outputs", "attention/gradients"]
    for r in records:
        assert not r.provided and not r.passed
        assert r.message == f"not provided: {side} {spec} returns None for 'attention'"
        assert f"{other} " not in r.message


def test_an_attention_only_candidate_has_its_block_and_model_checks_recorded_as_not_provided():
    records = check_candidate(f"{HERE}:_attention_only", dtypes=FP64)
    attention = [r for r in records if r.component == "attention"]
    assert attention and all(r.provided and r.passed for r in attention)
    absent = [r for r in records if r.component != "attention"]
    expected = {(f"{case.name}/{kind}", case.component) for case in CASES.values() if case.component != "attention"
                for kind in (("outputs", "gradients") if case.grads else ("outputs",))}
    assert {(r.name, r.component) for r in absent} == expected and len(absent) == len(expected), "none missing"
    assert all(not r.provided and not r.passed and r.message.startswith(f"not provided: candidate {HERE}:")
               for r in absent)


def test_report_refuses_a_candidate_without_blocks_naming_it_and_writing_nothing(tmp_path, capsys):
    """The report streams the full model one block at a time, so a candidate that builds no block cannot be judged
    there: exit 2, one line naming the candidate and 'block', no summary.json (never a pass, never missing checks)."""
    spec = f"{HERE}:_attention_only"
    out = tmp_path / "out"
    assert main(["report", "--candidate", spec, "--dtypes", "fp64,fp32", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"qkv-verify: error: candidate {spec} provides no 'block'"), err
    assert not out.exists()


def test_assert_candidate_passes_a_candidate_whose_provided_components_pass():
    records = assert_candidate(f"{HERE}:_attention_only", dtypes=FP64)
    assert {r.component for r in records if r.provided} == {"attention"}
    assert {r.component for r in records if not r.provided} == {"block", "model"}


def test_assert_candidate_fails_a_candidate_that_provides_none_of_the_components():
    with pytest.raises(AssertionError, match=f"provides none of the components checked: not provided: candidate "
                                             f"{HERE}:_provides_nothing"):
        assert_candidate(f"{HERE}:_provides_nothing", dtypes=FP64)


# --- survivor 5: a pytest filter that selects nothing is a usage error --------------------------------------------

def test_test_with_a_filter_that_selects_nothing_exits_2(capsys):
    assert main(["test", "reference", "--", "-q", "-k", "typo_that_selects_nothing"]) == 2
    assert "deselected" in capsys.readouterr().out


# --- survivor 6: the plugin's --qkv-fused-modules reaches the candidate -------------------------------------------

@pytest.mark.parametrize("option, expected", [
    (None, DEFAULT_FUSED_MODULES),
    ("none", ()),
    ("to_qkv,add_qkv_proj", ("to_qkv", "add_qkv_proj")),
])
def test_plugin_fused_modules_reach_the_candidate_fixture(pytester, option, expected):
    pytester.makepyfile(test_fused=(
        "def test_fused(qkv_candidate):\n"
        f"    assert qkv_candidate.fused_modules == {expected!r}\n"
        "    assert qkv_candidate.spec == 'reference'\n"))
    args = ["-p", "no:cacheprovider", "--qkv-candidate", "reference"]
    args += ["--qkv-fused-modules", option] if option else []
    pytester.runpytest(*args).assert_outcomes(passed=1)


def test_plugin_layout_and_device_reach_their_fixtures(pytester):
    pytester.makepyfile(test_options=(
        "def test_options(qkv_layout, qkv_device, qkv_reference):\n"
        "    assert (qkv_layout, qkv_device, qkv_reference.spec) == ('interleaved', 'cuda', 'fast')\n"))
    pytester.runpytest("-p", "no:cacheprovider", "--qkv-layout", "interleaved", "--qkv-reference", "fast",
                       "--qkv-device", "cuda").assert_outcomes(passed=1)


@pytest.mark.parametrize("option, expected", [(None, None), ("fp64", None), ("fp32", "fp32")])
def test_plugin_candidate_precision_reaches_the_candidate_fixture(pytester, option, expected):
    pytester.makepyfile(test_precision=(
        "def test_precision(qkv_candidate):\n"
        f"    assert qkv_candidate.precision == {expected!r}\n"))
    args = ["-p", "no:cacheprovider", "--qkv-candidate", "reference"]
    args += ["--qkv-candidate-precision", option] if option else []
    pytester.runpytest(*args).assert_outcomes(passed=1)


def test_test_passes_candidate_precision_to_the_suite():
    """`qkv-verify test --candidate-precision fp32`, run as a user runs it, reaches the suite's records: an
    fp32-computing attention fails the fp64 attention property without it and passes with it (that property only;
    the find profile, without shrinking)."""
    root = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "HYPOTHESIS_PROFILE": "find"}
    argv = [sys.executable, "-m", "verify.cli", "test", "properties.precision_variants:fp32_attention"]
    select = ["--", "-q", "-x", "-k", "attention and fp64", "-p", "no:cacheprovider"]
    without = subprocess.run([*argv, *select], env=env, capture_output=True, text=True, cwd=root)
    assert without.returncode == 1, without.stdout[-2000:] + without.stderr[-2000:]
    declared = subprocess.run([*argv, "--candidate-precision", "fp32", *select], env=env, capture_output=True,
                              text=True, cwd=root)
    assert declared.returncode == 0, declared.stdout[-2000:] + declared.stderr[-2000:]
