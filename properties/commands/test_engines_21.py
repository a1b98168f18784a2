"""`qkv-verify inputs` and `qkv-verify judge` for Qwen-Image 2.1: every case of the model in the manifest, the KV-cache
ones included (their protocol spelled out), the block-causal BlockMask saved as its element mask; the model judged is
the one the manifest names. The engines, run as subprocesses: README's reference engine (a planted bug run as the
engine fails where it shows) and a merged-QKV 2.1 written in plain torch from the manifest alone (nothing of qkv-verify
or diffusers in its process), which passes every case and whose own planted bugs fail where they show."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from properties.commands.test_engines import judge, readme_engine, run_engine
from verify.checks.equivalence import run_case
from verify.cli import main
from verify.files.saved import decode_call
from verify.models import qwen_image_21

V21 = "qwen-image-2.1"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine-21") / "in"
    assert main(["inputs", "--model", V21, "--out", str(folder), "--dtypes", "fp64,fp32"]) == 0
    return folder


@pytest.fixture(scope="module")
def manifest(inputs) -> dict:
    return json.loads((inputs / "manifest.json").read_text())


def test_the_manifest_says_the_model_and_holds_every_case_of_21_with_its_fixture(manifest):
    assert manifest["model"] == V21 and manifest["left_out"] == []
    assert {(e["case"], e["dtype"]) for e in manifest["entries"]} == {
        (c, d) for c in qwen_image_21.CASES for d in ("fp64", "fp32")}
    fixtures = {e["case"]: e["fixture"] for e in manifest["entries"]}
    assert (fixtures["attention"], fixtures["attention-adjacent"], fixtures["model-text-to-image"]) == (
        "edit", "edit-adjacent", "text-to-image")
    calls = {e["case"]: e["call"]["protocol"] for e in manifest["entries"]}
    assert {c for c, p in calls.items() if p != "one call"} == {"attention-cache", "model-cache"}
    cache = next(e for e in manifest["entries"] if e["case"] == "attention-cache")
    # batch 2, the target image's 4 x 4 tokens, 4 heads x 16
    assert cache["outputs"] == {"prefill": [2, 16, 64], "cached": [2, 16, 64]}
    assert cache["call"]["not_arguments"] == ["next_target"] and "next_target" in cache["kwargs"]


def test_the_block_causal_mask_is_saved_as_its_element_mask_and_read_back_as_a_block_mask(inputs, manifest):
    entry = next(e for e in manifest["entries"] if e["case"] == "attention" and e["dtype"] == "fp32")
    tensors = load_file(inputs / entry["inputs_file"])
    dense = tensors[entry["kwargs"]["attention_mask"]["block_mask"]]
    # the edit fixture's joint sequence: 4 text, a 4 x 4 condition image, 4 text, the 4 x 4 target; sample 1's last
    # 3 text positions are padding
    ids = torch.tensor([-1] * 4 + [0] * 16 + [-1] * 4 + [1] * 16)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 21:24] = False
    q, kv = torch.arange(40)[:, None], torch.arange(40)[None]
    rule = ((q >= kv) | ((ids[:, None] == ids[None]) & (ids[:, None] >= 0)))[None] & valid[:, None, :]
    assert dense.dtype == torch.bool and torch.equal(dense[:, 0, :40, :40], rule) and not dense[:, :, 40:].any()
    mask = decode_call(entry["kwargs"], tensors)["attention_mask"]
    assert type(mask).__name__ == "BlockMask" and torch.equal(
        mask.to_dense(), qwen_image_21.CASES["attention"].inputs(qwen_image_21.CASES["attention"].config,
                                                                 qwen_image_21.FIXTURES["edit"], 0)
        ["attention_mask"].to_dense())


def test_the_reference_engine_passes_every_21_case_with_reports_records(inputs, tmp_path):
    run_engine(readme_engine("reference_engine.py", tmp_path), inputs, tmp_path / "out.safetensors")
    code, summary = judge(tmp_path, tmp_path / "out.safetensors", inputs)
    assert code == 0 and summary["inputs"]["model"] == V21 and summary["compared"].startswith(V21)
    judged = {(c["name"], c["dtype"]): c for c in summary["checks"] if c["provided"]}
    assert set(judged) == {(f"{c}/{kind}", d) for c, case in qwen_image_21.CASES.items() for d in ("fp64", "fp32")
                           for kind in (("outputs", "gradients") if case.grads else ("outputs",))}
    fields = ("passed", "max_abs_err", "base_max_abs_err", "ratio", "tolerance", "mismatched", "worst_index")
    for name in ("attention-cache", "block"):
        for r in run_case(qwen_image_21.CASES[name], [torch.float64, torch.float32], candidate="reference"):
            if r.name.endswith("/outputs"):
                assert {f: getattr(r, f) for f in fields} == {f: judged[(r.name, r.dtype)][f] for f in fields}


@pytest.mark.parametrize("planted, failing", [
    # shows on the cached path only: the decode, each case's third call, first leaves the bound at the attention's
    # output projection (the attention core over the swapped cache is no module)
    ("cache_k_v_swapped_21", {"attention-cache": "to_out.0 (call 3)",
                              "model-cache": "transformer_blocks.0.attn.to_out.0 (call 3)"}),
])
def test_a_planted_bug_run_as_the_engine_fails_where_it_shows(inputs, tmp_path, planted, failing):
    run_engine(readme_engine("reference_engine.py", tmp_path), inputs, tmp_path / "out.safetensors",
               f"verify.planted:{planted}")
    code, summary = judge(tmp_path, tmp_path / "out.safetensors", inputs)
    failed = {(c["name"].split("/")[0], c["first_divergence"]) for c in summary["checks"]
              if c["provided"] and not c["passed"]}
    assert code == 1 and failed == set(failing.items())


@pytest.mark.parametrize("model, fixtures, components, cases", [
    (V21, ["edit-adjacent", "text-to-image"], [], {"attention-adjacent", "model-edit-adjacent", "model-text-to-image"}),
    ("qwen-image", ["edit"], ["block"], {"block-edit-zero-cond"}),
])
def test_inputs_writes_the_cases_of_the_fixtures_asked(tmp_path, model, fixtures, components, cases):
    args = [a for f in fixtures for a in ("--fixture", f)] + [a for c in components for a in ("--component", c)]
    assert main(["inputs", "--model", model, "--out", str(tmp_path / "in"), "--dtypes", "fp32", *args]) == 0
    entries = json.loads((tmp_path / "in" / "manifest.json").read_text())["entries"]
    assert {e["case"] for e in entries} == cases and {e["fixture"] for e in entries} == set(fixtures)


@pytest.mark.parametrize("model, args, words", [
    (V21, ["--fixture", "edit", "--fixture", "edit-zero"],
     f"--fixture edit-zero: no fixture of {V21}; expected one of text-to-image, edit, edit-adjacent"),
    ("qwen-image", ["--fixture", "edit-adjacent"],
     "--fixture edit-adjacent: no fixture of qwen-image; expected one of text-to-image, edit"),
    ("qwen-image", ["--fixture", "edit", "--component", "attention"], "selects no case of qwen-image"),
])
def test_a_fixture_the_model_lacks_is_one_line_and_nothing_is_written(tmp_path, capsys, model, args, words):
    assert main(["inputs", "--model", model, "--out", str(tmp_path / "in"), "--dtypes", "fp32", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and not (tmp_path / "in").exists()


def test_a_case_the_manifest_cannot_express_is_left_out_with_its_reason(tmp_path, capsys, monkeypatch):
    def replayed(module, inputs):  # outputs of a sequence of calls the manifest has no words for
        return {"joint": module(**inputs)}

    odd = dataclasses.replace(qwen_image_21.CASES["attention"], name="attention-odd", outputs=replayed)
    monkeypatch.setitem(qwen_image_21.CASES, "attention-odd", odd)
    assert main(["inputs", "--model", V21, "--out", str(tmp_path / "in"), "--dtypes", "fp32", "--component",
                 "attention"]) == 0
    manifest = json.loads((tmp_path / "in" / "manifest.json").read_text())
    assert "attention-odd" not in {e["case"] for e in manifest["entries"]}
    assert [(o["case"], o["fixture"]) for o in manifest["left_out"]] == [("attention-odd", "edit")]
    assert "replayed" in manifest["left_out"][0]["reason"] and "left out: attention-odd" in capsys.readouterr().out


def test_outputs_holding_no_entry_are_refused_not_passed(inputs, tmp_path, capsys):
    save_file({}, tmp_path / "empty.safetensors")
    assert judge(tmp_path, tmp_path / "empty.safetensors", inputs)[0] == 2
    err = capsys.readouterr().err.strip()
    assert "holds no output of the manifest" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "judged").exists()


def run_torch_engine_21(inputs, folder, *args) -> tuple:
    """README's plain-torch 2.1 engine, as run_engine runs an engine (a process of its own, isolated from this one's
    paths and environment), on a copy of `inputs` that holds only the merged weights, with -X importtime: (its
    outputs, every module its process imported)."""
    engine, given = readme_engine("torch_engine_21.py", folder), folder / "in"
    shutil.copytree(inputs, given, ignore=shutil.ignore_patterns("*.standard.safetensors"))
    done = subprocess.run([sys.executable, "-I", "-X", "importtime", str(engine), str(given),
                           str(folder / "out.safetensors"), *args], check=True, cwd=folder,
                          env={"PATH": "/usr/bin:/bin"}, timeout=600, capture_output=True, text=True)
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return folder / "out.safetensors", imported


@pytest.fixture(scope="module")
def torch_engine_21(inputs, tmp_path_factory) -> tuple:
    return run_torch_engine_21(inputs, tmp_path_factory.mktemp("torch-engine-21"))


def expected_records() -> set[tuple[str, str]]:
    return {(f"{c}/{kind}", d) for c, case in qwen_image_21.CASES.items() for d in ("fp64", "fp32")
            for kind in (("outputs", "gradients") if case.grads else ("outputs",))}


def test_the_plain_torch_21_engine_passes_every_case_and_gradient_with_none_left_unprovided(inputs, torch_engine_21,
                                                                                           tmp_path):
    outputs, _ = torch_engine_21
    code, summary = judge(tmp_path, outputs, inputs)
    assert code == 0 and summary["candidate"]["spec"] == f"outputs:{outputs}"
    assert {(c["name"], c["dtype"]) for c in summary["checks"]} == expected_records()
    unjudged = [(c["name"], c["dtype"], c["message"]) for c in summary["checks"] if not c["provided"]]
    assert unjudged == [] and all(c["passed"] and c["mismatched"] == 0 for c in summary["checks"])
    # the outputs of its steps under the standard's names, on every call of the KV-cache protocol
    written = load_file(outputs)
    assert {"attention-cache/fp64/module/to_q (call 3)/0", "model-cache/fp32/module/transformer_blocks.1.attn.to_k "
            "(call 2)/0", "block/fp32/module/img_mlp.activation_fn/0", "model-edit/fp64/module/pos_embed/0"} <= set(
        written)


def test_the_plain_torch_21_engine_imports_nothing_of_qkv_verify_or_diffusers(torch_engine_21):
    _, imported = torch_engine_21
    assert {"torch", "safetensors.torch"} <= imported
    assert not [m for m in imported if m.split(".")[0] in ("verify", "diffusers")]
    # not for want of them: both are importable in the engine's process as it is run
    found = subprocess.run([sys.executable, "-I", "-c", "import importlib.util as u; print([bool(u.find_spec(m)) "
                            "for m in ('verify', 'diffusers')])"], check=True, env={"PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True)
    assert found.stdout.strip() == "[True, True]"


ATTENTIONS = ("attention", "attention-adjacent")
BLOCKS = ("block", "block-no-causal-condition")
MODELS = ("model-text-to-image", "model-edit", "model-edit-adjacent", "model-edit-no-causal-condition", "model-cache")


@pytest.mark.parametrize("planted, failing", [
    # the block-causal mask replaced by the padding alone on every prefill: every case fails (its gradients too), first
    # at the attention's output projection, but attention-cache, whose outputs are the target image's rows, which
    # attend to every valid key under either mask (the model's cache does not pass: block 0's prefix feeds block 1)
    ("full-attention", {(c, d, f"{where}to_out.0") for d in ("fp64", "fp32") for cases, where in (
        (ATTENTIONS, ""), (BLOCKS, "attn."), (MODELS, "transformer_blocks.0.attn.")) for c in cases}
     | {(c, d, None) for c in ("attention", "block", "model-text-to-image") for d in ("fp64", "fp32")}),
    # the decode reads the cached K as V: only the cached cases, first at the third call's output projection (the
    # attention core over the cache is no module)
    ("cache-k-v-swapped", {("attention-cache", d, "to_out.0 (call 3)") for d in ("fp64", "fp32")}
     | {("model-cache", d, "transformer_blocks.0.attn.to_out.0 (call 3)") for d in ("fp64", "fp32")}),
])
def test_a_bug_planted_in_the_plain_torch_21_engine_fails_where_it_shows(inputs, tmp_path, planted, failing):
    outputs, _ = run_torch_engine_21(inputs, tmp_path, "--plant", planted)
    code, summary = judge(tmp_path, outputs, inputs)
    assert code == 1 and all(c["provided"] for c in summary["checks"])
    assert {(c["name"].split("/")[0], c["dtype"], c["first_divergence"]) for c in summary["checks"]
            if not c["passed"]} == failing
