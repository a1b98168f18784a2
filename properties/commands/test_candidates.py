"""The candidate seam, as a user drives it: README's two worked examples pass through `report --candidate`, the
same code with one planted bug fails with the first divergence named, bad SPECs exit 2 with one line and nothing
written, unprovided components are never passes, unmapped weight gradients are said, DiffSynth against diffusers
fails in fp64/fp32 at its MLP while bf16 passes, and the Python API and the pytest plugin judge the same way."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from properties.checkpoint_files import merged_checkpoint, standard_checkpoint
from verify.checks.equivalence import run_case
from verify.cli import main
from verify.implementations.candidate import resolve
from verify.maths import qkv
from verify.models.qwen_image import CASES
from verify.planted import PLANTED
from verify.testing import assert_candidate, check_candidate

README = Path(__file__).resolve().parents[2] / "README.md"
HIGH = (torch.float64, torch.float32)


def _readme_files(folder: Path) -> dict[str, Path]:
    """The README's code blocks that start with '# file: NAME', written into `folder`."""
    blocks = re.findall(r"```python\n# file: (\S+)\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2, "README lost its worked examples"
    for name, body in blocks:
        (folder / name).write_text(body)
    return {name: folder / name for name, _ in blocks}


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> dict[str, Path]:
    return _readme_files(tmp_path_factory.mktemp("examples"))


def _report(out: Path, *args: str) -> tuple[int, dict]:
    code = main(["report", "--out", str(out), *args])
    assert (out / "summary.json").is_file(), f"report {' '.join(args)} exited {code}, no summary (see its stderr)"
    return code, json.loads((out / "summary.json").read_text())


def test_readme_processor_example_passes_with_weight_gradients_and_its_own_source(examples, tmp_path):
    spec = f"{examples['my_processor.py']}:build"
    code, summary = _report(tmp_path / "out", "--candidate", spec, "--dtypes", "fp64,fp32,bf16")
    assert code == 0, [c["message"] for c in summary["checks"] if not c["passed"]]
    assert summary["candidate"]["spec"] == spec and summary["candidate"]["source"] == str(examples["my_processor.py"])
    assert summary["candidate"]["version"] is None  # a loose file has no package version
    assert summary["reference"]["spec"] == "diffusers"
    grads = [c for c in summary["checks"] if c["name"].endswith("/gradients")]
    assert grads and all(c["weight_gradients"] == "compared" for c in grads)
    judged = [c for c in summary["checks"] if c["component"] in ("attention", "block", "model")]
    assert judged and all(c["fused_calls"] for c in judged), "every check proves the fused projections ran"
    assert summary["compared"].startswith(f"qwen-image, candidate {spec} vs reference diffusers")
    compared = (tmp_path / "out" / "report.md").read_text().splitlines()[2]
    assert compared.startswith(f"Compared: qwen-image, candidate {spec}")


def test_readme_processor_with_k_and_v_swapped_fails_first_at_norm_k(examples, tmp_path):
    """The user's code with one planted bug: k read where v is. The first shared module fed by k is norm_k."""
    broken = tmp_path / "broken.py"
    source = examples["my_processor.py"].read_text()
    broken.write_text(source.replace("img_q, img_k, img_v = map(", "img_q, img_v, img_k = map("))
    assert broken.read_text() != source
    code, summary = _report(tmp_path / "out", "--candidate", f"{broken}:build", "--dtypes", "fp64,fp32")
    assert code == 1 and summary["verdict"] == "fail"
    failed = {(c["name"], c["dtype"]): c for c in summary["checks"] if not c["passed"]}
    assert failed[("attention/outputs", "fp64")]["first_divergence"] == "norm_k"
    assert failed[("block/outputs", "fp64")]["first_divergence"] == "attn.norm_k"
    assert failed[("model/text-to-image/outputs", "fp32")]["first_divergence"] == "transformer_blocks.0.attn.norm_k"
    assert "first divergence: attention/outputs [fp64] at norm_k" in summary["compared"]


def test_readme_diffsynth_example_matches_diffsynth_and_diffsynth_fails_diffusers_at_the_mlp(examples, tmp_path):
    """Needs DiffSynth-Studio and einops, which CI installs (.ci/run): without them this fails, it does not skip."""
    spec = f"{examples['merged_diffsynth.py']}:build"
    code, summary = _report(tmp_path / "merged", "--candidate", spec, "--reference", "diffsynth")
    assert code == 0, [c["message"] for c in summary["checks"] if not c["passed"]]
    assert summary["reference"]["version"].startswith("diffsynth ")
    code, summary = _report(tmp_path / "plain", "--candidate", "diffsynth")
    assert code == 1
    model = {c["dtype"]: c for c in summary["checks"] if c["name"] == "model/text-to-image/outputs"}
    for dtype in ("fp64", "fp32"):
        assert not model[dtype]["passed"] and model[dtype]["first_divergence"] == "transformer_blocks.0.img_mlp.net.0"
    assert model["bf16"]["passed"], "DiffSynth's MLP hides in bf16 noise"
    assert any("bf16 alone would pass" in n and "model/text-to-image/outputs" in n for n in summary["notes"])
    assert any("declared unfused" in n for n in summary["notes"])


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_every_planted_spec_fails_report_candidate(bug, tmp_path):
    code, summary = _report(tmp_path / "out", "--candidate", f"verify.planted:{bug}", "--dtypes", "fp64,fp32")
    assert code == 1
    assert summary["candidate"]["resolved"] == f"verify.planted:{bug}"
    caught = [c for c in summary["checks"] if not c["passed"] and c["mismatched"] and c["fused_calls"]]
    assert {c["dtype"] for c in caught} == {"fp64", "fp32"}
    assert all(c["first_divergence"] for c in caught), [c["name"] for c in caught if not c["first_divergence"]]


def test_a_merged_checkpoint_with_kv_swapped_in_block_1_diverges_at_block_1(tmp_path):
    std = standard_checkpoint(tmp_path / "std")

    def swap(sd):
        key = "transformer_blocks.1.attn.to_qkv.weight"
        q, k, v = qkv.split(sd[key], qkv.QKVShape.equal(sd[key].shape[0], 16), "blocked")
        return sd | {key: torch.cat([q, v, k])}

    bad = merged_checkpoint(std, tmp_path / "bad", mutate=swap)
    code, summary = _report(tmp_path / "out", "--checkpoint", str(std), "--merged-checkpoint", str(bad),
                            "--dtypes", "fp64,fp32")
    assert code == 1
    model = [c for c in summary["checks"] if c["name"].startswith("model/") and c["dtype"] == "fp64"]
    assert model and {c["first_divergence"] for c in model} == {"transformer_blocks.1.attn.norm_k"}


def _identity(standard, component):
    return standard


def test_an_unfused_candidate_fails_unless_declared_unfused():
    records = run_case(CASES["block"], HIGH, candidate=_identity)
    assert all(not r.passed and r.fused_calls == 0 and "never ran" in r.message for r in records)
    declared = run_case(CASES["block"], HIGH, candidate=resolve(_identity, "none"))
    assert all(r.passed and r.fused_calls is None for r in declared)


def test_report_says_a_candidate_is_declared_unfused(tmp_path):
    code, summary = _report(tmp_path / "out", "--candidate", "diffusers", "--dtypes", "fp64,fp32")
    assert code == 0 and summary["candidate"]["fused_modules"] is None
    assert "declared unfused" in summary["compared"]


def _block_only(standard, component):
    return None if component != "block" else resolve("reference").make(standard, component)


def test_an_unprovided_component_is_recorded_never_passed(tmp_path, capsys):
    records = check_candidate(_block_only, components=("attention", "block"), dtypes=HIGH)
    attention = [r for r in records if r.component == "attention"]
    assert attention and all(not r.provided and not r.passed and "not provided" in r.message for r in attention)
    assert all(r.passed for r in records if r.component == "block")
    code, summary = _report(tmp_path / "out", "--candidate", f"{__name__}:_block_only", "--dtypes", "fp64,fp32")
    assert code == 0, "not provided is not a failure"
    assert any(n.startswith("not provided, not judged: attention/outputs") for n in summary["notes"])
    assert not any(c["passed"] for c in summary["checks"] if c["component"] == "attention")
    # nor is it counted as passed in the verdict line: attention's outputs and gradients in fp64 and fp32 (the dtypes
    # asked) are not provided
    checks = summary["checks"]
    unprovided = [c for c in checks if c["component"] == "attention"]
    assert len(unprovided) == 2 * 2
    line = f"({len(checks) - len(unprovided)}/{len(checks)} checks passed, {len(unprovided)} not provided or not " \
           "compared)"
    assert line in capsys.readouterr().out


class _WithExtraParameter(nn.Module):
    """A fused block with a parameter of its own (a gain of exactly 1): its weight gradients cannot all be mapped."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.inner = block
        self.gain = nn.Parameter(torch.ones((), dtype=next(block.parameters()).dtype))

    def forward(self, **kwargs):
        return tuple(t * self.gain for t in self.inner(**kwargs))


def test_weight_gradients_map_through_a_wrapper_and_say_when_they_cannot():
    def wrapped(standard, component):
        wrapper = nn.Module()
        wrapper.inner = resolve("reference").make(standard, component)
        wrapper.forward = lambda **kwargs: wrapper.inner(**kwargs)
        return wrapper

    records = [r for r in run_case(CASES["block"], HIGH, candidate=wrapped) if r.name.endswith("gradients")]
    assert records and all(r.passed and r.weight_gradients == "compared" for r in records)

    def extra(standard, component):
        return _WithExtraParameter(resolve("reference").make(standard, component))

    case = CASES["block"]
    inputs = case.inputs(case.config, case.spec, 0)
    input_elements = inputs["hidden_states"].numel() + inputs["encoder_hidden_states"].numel()
    records = [r for r in run_case(case, HIGH, candidate=extra) if r.name.endswith("gradients")]
    assert records and all(r.weight_gradients.startswith("not compared: candidate") and "gain" in r.weight_gradients
                           for r in records)
    assert all(r.passed and r.numel == input_elements for r in records), "input gradients alone are judged"


BAD_SPECS = {
    "no module": "no_such_package_xyz.module:build",
    "no file": "missing_file.py:build",
    "no attribute": "verify.planted:no_such_bug",
    "not callable": "verify.planted:PLANTED",
    "no colon": "verify.planted",
    "raises while building": "{here}:_raises",
    "returns no module": "{here}:_returns_a_tensor",
    "wrong kind of output": "{here}:_returns_one_tensor",
    "wrong shapes": "{here}:_returns_wrong_shapes",
}


def _raises(standard, component):
    raise RuntimeError("boom")


def _returns_a_tensor(standard, component):
    return torch.zeros(1)


class _One(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)[0]


class _Shapes(_One):
    def forward(self, **kwargs):
        return tuple(t[:, :1] for t in self.inner(**kwargs))


def _returns_one_tensor(standard, component):
    return _One(resolve("reference").make(standard, component))


def _returns_wrong_shapes(standard, component):
    return _Shapes(resolve("reference").make(standard, component))


@pytest.mark.parametrize("command", ["report", "test"])
@pytest.mark.parametrize("fault", sorted(BAD_SPECS))
def test_a_bad_spec_exits_2_with_one_line_and_writes_nothing(fault, command, tmp_path, capsys):
    spec = BAD_SPECS[fault].format(here=Path(__file__).resolve())
    out = tmp_path / "out"
    args = ["report", "--candidate", spec, "--out", str(out), "--dtypes", "fp64,fp32"] if command == "report" \
        else ["test", spec]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qkv-verify: error: candidate") and spec in err[0], err
    assert "Traceback" not in err[0]
    assert not out.exists()


def test_assert_candidate_names_case_dtype_tensor_share_and_divergence():
    with pytest.raises(AssertionError) as e:
        assert_candidate("verify.planted:k_v_swapped", components=("attention",), dtypes=HIGH)
    text = str(e.value)
    assert "attention/outputs [fp64, cpu, relative_to_base(k=2)]" in text
    assert re.search(r"Mismatched elements: \d+ / \d+ \([\d.e+]+%\)", text)
    assert "worst element text[" in text or "worst element image[" in text
    assert "first divergence: norm_k" in text
    assert all(r.passed for r in assert_candidate("reference", components=("attention",), dtypes=HIGH))


def test_assert_candidate_refuses_a_candidate_that_provides_nothing():
    with pytest.raises(AssertionError, match="provides none"):
        assert_candidate(lambda standard, component: None, components=("attention",), dtypes=HIGH)


def test_pytest_plugin_gives_a_users_suite_the_candidate(tmp_path):
    (tmp_path / "test_mine.py").write_text(
        "from verify.testing import assert_candidate\n\n"
        "def test_mine(qkv_candidate):\n"
        "    assert_candidate(qkv_candidate, components=('attention',), dtypes=[__import__('torch').float64])\n")

    def run(*args):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path), *args],
                              cwd=tmp_path, capture_output=True, text=True)

    assert run("--qkv-candidate", "reference").returncode == 0
    failed = run("--qkv-candidate", "verify.planted:norm_q_swapped")
    assert failed.returncode == 1 and "first divergence" in failed.stdout
    skipped = run()
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout


def test_test_takes_its_options_after_spec_and_pytests_after_the_separator(capsys):
    """`qkv-verify test SPEC --device cpu -- -k attention --co`: the options after SPEC are ours (not pytest's),
    what follows `--` is pytest's; one of ours misspelt there is a usage error (exit 2), not a pytest argument."""
    assert main(["test", "reference", "--layout", "blocked", "--device", "cpu", "--", "-q", "-k", "attention",
                 "--co"]) == 0
    assert "tests collected" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:
        main(["test", "reference", "--devise", "cpu"])
    assert usage.value.code == 2 and "unrecognized arguments: --devise" in capsys.readouterr().err


def test_test_runs_where_pytest_does_not_load_the_plugin_itself(tmp_path):
    """From a checkout on PYTHONPATH (no pytest11 entry point, as on the GPU machine) or with plugin autoloading off,
    the suite hands pytest the plugin itself; installed, pytest loads it from the entry point (handing it over too
    would register it twice, an error)."""
    import os

    from verify.commands import test as suite_cli

    assert suite_cli._installed_plugin("verify.pytest_plugin")  # this environment installed the package
    assert not suite_cli._installed_plugin("no.such_plugin")
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run([sys.executable, "-m", "verify.cli", "test", "reference", "--", "-q", "-k", "attention",
                           "--co"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "tests collected" in done.stdout, done.stdout + done.stderr
