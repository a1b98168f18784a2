"""Gradients judged through saved files: the manifest gives, for each entry of a case with gradients, the cotangents
of its outputs (in the inputs file) and the inputs whose gradients are asked; an engine that also writes those input
gradients (`<case>/<dtype>/grad/<input>`) has them judged by report's relative-to-base rule, one that does not has
them recorded as not compared. The engines are README's plain-torch attention and the reference engine, run as
subprocesses."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from properties.commands.test_engines import judge, readme_engine, run_engine
from verify.cli import main
from verify.models import qwen_image, qwen_image_21

DETACHED_VARIANCE = ("x.to(torch.float32).pow(2).mean(-1, keepdim=True)",
                     "x.to(torch.float32).pow(2).mean(-1, keepdim=True).detach()")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grad") / "in"
    assert main(["inputs", "--out", str(folder), "--dtypes", "fp64,fp32", "--component", "attention"]) == 0
    return folder


def torch_engine(folder, inputs, change=None):
    """README's plain-torch engine (with `change`, a (text, replacement) planted in it) run on `inputs`."""
    engine = readme_engine("torch_engine.py", folder)
    if change:
        assert change[0] in engine.read_text()
        engine.write_text(engine.read_text().replace(*change))
    run_engine(engine, inputs, folder / "out.safetensors")
    return folder / "out.safetensors"


def records(summary, kind):
    return {c["dtype"]: c for c in summary["checks"] if c["name"] == f"attention/{kind}"}


def test_the_manifest_gives_cotangents_for_the_cases_with_gradients(inputs):
    manifest = json.loads((inputs / "manifest.json").read_text())
    for entry in manifest["entries"]:  # qwen-image's attention: outputs image and text, inputs of both streams
        spec = entry["gradients"]
        assert spec["inputs"] == {"hidden_states": [2, 16, 64], "encoder_hidden_states": [2, 8, 64]}
        tensors = load_file(inputs / entry["inputs_file"])
        assert set(spec["cotangents"]) == {"image", "text"}
        for output, key in spec["cotangents"].items():
            assert list(tensors[key].shape) == entry["outputs"][output]
            assert tensors[key].dtype == {"fp64": torch.float64, "fp32": torch.float32}[entry["dtype"]]
            assert 0.5 < float(tensors[key].double().std()) < 1.5  # a seeded normal draw, not zeros
    assert {n for n, c in qwen_image.CASES.items() if c.grads} >= {"attention", "block", "model-text-to-image"}


def test_an_engine_that_writes_input_gradients_has_them_judged(inputs, tmp_path):
    outputs = torch_engine(tmp_path, inputs)
    assert {"attention/fp32/grad/hidden_states", "attention/fp64/grad/encoder_hidden_states"} <= set(load_file(outputs))
    code, summary = judge(tmp_path, outputs, inputs)
    grads = records(summary, "gradients")
    assert code == 0 and set(grads) == {"fp64", "fp32"}
    assert all(g["provided"] and g["passed"] for g in grads.values())
    assert all(g["weight_gradients"].startswith("not compared") for g in grads.values())
    assert grads["fp32"]["ratio"] is not None and "input." in grads["fp32"]["message"]


def test_a_wrong_backward_fails_on_the_gradients_only(inputs, tmp_path):
    """The RMS norm's variance detached: the same forward, another backward (as a custom kernel might have it)."""
    code, summary = judge(tmp_path, torch_engine(tmp_path, inputs, DETACHED_VARIANCE), inputs)
    assert code == 1
    assert all(o["passed"] for o in records(summary, "outputs").values())
    assert all(g["provided"] and not g["passed"] for g in records(summary, "gradients").values())


def test_gradients_not_written_are_not_compared_and_misshapen_ones_are_refused(inputs, tmp_path, capsys):
    tensors = load_file(torch_engine(tmp_path, inputs))
    save_file({k: v for k, v in tensors.items() if "/grad/" not in k}, tmp_path / "no-grad.safetensors")
    code, summary = judge(tmp_path, tmp_path / "no-grad.safetensors", inputs)
    grads = records(summary, "gradients")
    assert code == 0 and all(not g["provided"] and g["message"].startswith("not compared") for g in grads.values())
    save_file(tensors | {"attention/fp32/grad/hidden_states": torch.zeros(2, 16)}, tmp_path / "bad.safetensors")
    assert judge(tmp_path / "bad", tmp_path / "bad.safetensors", inputs)[0] == 2
    err = capsys.readouterr().err.strip()
    assert "attention/fp32/grad/hidden_states has shape [2, 16]" in err and len(err.splitlines()) == 1


def test_gradients_written_for_some_inputs_only_are_not_compared_naming_the_missing(inputs, tmp_path):
    """Judged on the inputs it wrote, a wrong gradient of the one it left out would pass unseen."""
    tensors = load_file(torch_engine(tmp_path, inputs))
    partial = {k: v for k, v in tensors.items() if not k.endswith("/grad/encoder_hidden_states")}
    save_file(partial, tmp_path / "partial.safetensors")
    code, summary = judge(tmp_path / "partial", tmp_path / "partial.safetensors", inputs)
    grads = records(summary, "gradients")
    assert code == 0 and set(grads) == {"fp64", "fp32"}
    for g in grads.values():
        assert not g["provided"] and not g["passed"]
        assert g["message"] == ("not compared: the engine saved the input gradients of hidden_states but not of "
                                "encoder_hidden_states")


def test_21_gradients_through_the_reference_engine_pass_and_a_planted_bug_fails_on_them(tmp_path):
    folder = tmp_path / "in"
    assert main(["inputs", "--model", "qwen-image-2.1", "--out", str(folder), "--dtypes", "fp32", "--component",
                 "block", "--fixture", "edit"]) == 0
    code, summary = judge(tmp_path / "ok", _reference(tmp_path, folder), folder)
    grads = {c["name"]: c for c in summary["checks"] if c["name"].endswith("/gradients")}
    expected = {f"{n}/gradients" for n, c in qwen_image_21.CASES.items() if c.grads and c.component == "block"}
    assert code == 0 and set(grads) == expected and all(g["provided"] and g["passed"] for g in grads.values())
    code, summary = judge(tmp_path / "bad", _reference(tmp_path, folder, "verify.planted:padded_keys_attended_21"),
                          folder)
    assert code == 1 and all(c["provided"] and not c["passed"] for c in summary["checks"]
                             if c["name"] in expected)


def _reference(tmp_path, folder, *spec):
    out = tmp_path / f"ref{len(list(tmp_path.glob('ref*')))}.safetensors"
    run_engine(readme_engine("reference_engine.py", tmp_path), folder, out, *spec)
    return out


def test_gradients_saved_by_report_are_the_base_of_an_engines_gradients(inputs, tmp_path):
    """report --save-outputs writes the input gradients too; judge --reference-outputs then judges an engine's
    gradients against them (and records them as not compared against a base without gradients)."""
    saved = tmp_path / "a.safetensors"
    assert main(["report", "--candidate", "reference", "--dtypes", "fp64,fp32", "--save-outputs", str(saved),
                 "--out", str(tmp_path / "report")]) == 0
    base = {k: v for k, v in load_file(saved).items() if k.startswith("attention/")}
    assert {"attention/fp32/grad/hidden_states", "attention/fp64/grad/encoder_hidden_states"} <= set(base)
    outputs = torch_engine(tmp_path, inputs)
    # base gradients 0.1% off the engine's: their error against the oracle exceeds the engine's, every ratio < 1
    engine_grads = {k: v for k, v in load_file(outputs).items() if "/grad/" in k}
    save_file(base | {k: v * 1.001 for k, v in engine_grads.items()}, tmp_path / "wide.safetensors")
    code, summary = judge(tmp_path / "wide", outputs, inputs, "--reference-outputs", str(tmp_path / "wide.safetensors"))
    grads = records(summary, "gradients")
    assert code == 0 and set(grads) == {"fp64", "fp32"}
    assert all(g["provided"] and g["passed"] and g["ratio"] is not None and g["ratio"] < 1 for g in grads.values())
    save_file(base, tmp_path / "base.safetensors")
    code, summary = judge(tmp_path / "base", outputs, inputs, "--reference-outputs", str(tmp_path / "base.safetensors"))
    assert code == 0 and all(g["provided"] and g["passed"] for g in records(summary, "gradients").values())
    save_file({k: v for k, v in base.items() if "/grad/" not in k}, tmp_path / "bare.safetensors")
    code, summary = judge(tmp_path / "bare", outputs, inputs, "--reference-outputs", str(tmp_path / "bare.safetensors"))
    assert code == 0 and all(g["message"] == "not compared: the base outputs hold no input gradients"
                             for g in records(summary, "gradients").values())
