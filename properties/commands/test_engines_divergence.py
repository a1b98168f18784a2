"""first_divergence through saved files: the manifest lists the standard's submodules an entry runs (execution order,
output shapes); an engine that also writes the outputs of its steps that stand for them
(`<case>/<dtype>/module/<name>/<i>`) has a failing output located at the first that leaves the bound. The engine is
README's plain-torch attention, run as a subprocess, with bugs planted in it."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

from properties.commands.test_engines import judge
from properties.commands.test_engines_gradients import torch_engine
from verify.cli import main

NORM_WEIGHTS_SWAPPED = ('rms_norm(q, w[f"{nq}.weight"]), rms_norm(k, w[f"{nk}.weight"])',
                        'rms_norm(q, w[f"{nk}.weight"]), rms_norm(k, w[f"{nq}.weight"])')
K_V_SWAPPED = ("((tq, iq), (tk, ik), (tv, iv))", "((tq, iq), (tv, iv), (tk, ik))")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("divergence") / "in"
    assert main(["inputs", "--out", str(folder), "--dtypes", "fp64,fp32", "--component", "attention"]) == 0
    return folder


def test_the_manifest_lists_the_submodules_in_execution_order_with_their_shapes(inputs):
    entry = json.loads((inputs / "manifest.json").read_text())["entries"][0]
    names = list(entry["modules"])
    # diffusers' joint attention: the image stream's projections and norms before the text stream's, out last
    assert names.index("to_q") < names.index("norm_q") < names.index("norm_added_q") < names.index("to_out.0")
    # batch 2, 16 image tokens, 8 text tokens, 4 heads of 16
    assert entry["modules"]["norm_q"] == [[2, 16, 4, 16]] and entry["modules"]["norm_added_k"] == [[2, 8, 4, 16]]
    assert entry["modules"]["to_add_out"] == [[2, 8, 64]]


@pytest.mark.parametrize("bug, where", [(NORM_WEIGHTS_SWAPPED, "norm_q"), (K_V_SWAPPED, "to_out.0")])
def test_a_failing_engine_is_located_at_its_first_divergent_submodule(inputs, tmp_path, bug, where):
    outputs = torch_engine(tmp_path, inputs, bug)
    code, summary = judge(tmp_path, outputs, inputs)
    failed = [c for c in summary["checks"] if c["name"] == "attention/outputs"]
    assert code == 1 and {c["dtype"] for c in failed if not c["passed"]} == {"fp64", "fp32"}
    assert {c["first_divergence"] for c in failed} == {where}
    save_file({k: v for k, v in load_file(outputs).items() if "/module/" not in k}, tmp_path / "bare.safetensors")
    code, summary = judge(tmp_path / "bare", tmp_path / "bare.safetensors", inputs)
    assert code == 1 and {c["first_divergence"] for c in summary["checks"] if c["name"] == "attention/outputs"} == {
        None}


def test_a_misshapen_submodule_output_is_refused(inputs, tmp_path, capsys):
    tensors = load_file(torch_engine(tmp_path, inputs))
    assert "attention/fp32/module/norm_q/0" in tensors
    save_file(tensors | {"attention/fp32/module/norm_q/0": tensors["attention/fp32/module/norm_q/0"].flatten(2)},
              tmp_path / "bad.safetensors")
    assert judge(tmp_path, tmp_path / "bad.safetensors", inputs)[0] == 2
    err = capsys.readouterr().err.strip()
    assert "attention/fp32/module/norm_q/0 has shape [2, 16, 64]" in err and len(err.splitlines()) == 1
