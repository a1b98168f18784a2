"""`--model qwen-image|qwen-image-2.1` end to end: the report judges Qwen-Image 2.1's attention, block and whole-model
cases (the built-in reference passes with its fused path run, a planted cache bug fails on the cache cases only and is
located, diffusers' flex processor passes with its CPU gradients recorded as not compared); a checkpoint's
config.json names the model: a --model that contradicts it, or a class no model has, is exit 2 naming both, for
report, convert and the LoRA commands, and a checkpoint of either model runs with no --model or its own (the report
streams a 2.1 checkpoint: properties/commands/test_cli_report_21.py); `qkv-verify test --model` runs that model's
properties only; check_candidate/assert_candidate take `model=`; and the pytest plugin's `--qkv-model` reaches its
fixture."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from properties.checkpoint_files import standard_checkpoint
from verify.cli import main
from verify.errors import VerifyError
from verify.models import qwen_image, qwen_image_21
from verify.testing import assert_candidate, check_candidate

pytest_plugins = ["pytester"]

FP64 = [torch.float64]
FAST = ["--dtypes", "fp64,fp32"]
V21 = "qwen-image-2.1"
CLASSES = {"qwen-image": "QwenImageTransformer2DModel", V21: "QwenImage21Transformer2DModel"}
CACHE_CASES = {name for name in qwen_image_21.CASES if name.endswith("-cache")}
LORA_MODULES = [f"transformer_blocks.0.attn.{n}" for n in ("to_q", "to_k", "to_v")]  # in both models


def _report(tmp_path_factory, *args: str) -> tuple[int, dict]:
    out = tmp_path_factory.mktemp("report") / "out"
    code = main(["report", "--model", V21, *FAST, "--out", str(out), *args])
    return code, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    return _report(tmp_path_factory)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    return _report(tmp_path_factory, "--candidate", "verify.planted:cache_k_v_swapped_21")


@pytest.fixture(scope="module")
def flex_run(tmp_path_factory):
    return _report(tmp_path_factory, "--candidate", "diffusers-flex", "--fused-modules", "none")


def _names_model(compared: str) -> bool:
    """Whether the summary's `compared` line starts with the model's name (and not a longer one it begins)."""
    return re.match(rf"{re.escape(V21)}(?![\w.-])", compared) is not None


def _case(check: dict) -> str:
    return check["name"].split("/")[0]


def _judged(summary: dict) -> list[dict]:
    """The equivalence checks (the weight round trips aside)."""
    return [c for c in summary["checks"] if c["component"] != "weights"]


# --- the report on Qwen-Image 2.1 -----------------------------------------------------------------------------------

def test_report_on_21_passes_the_reference_with_its_fused_path_run_on_every_21_case(reference_run):
    code, summary = reference_run
    assert code == 0 and summary["verdict"] == "pass"
    assert summary["inputs"]["model"] == V21
    assert summary["inputs"]["model_config"] == json.loads(json.dumps(qwen_image_21.model_config("tiny")))
    assert set(summary["inputs"]["fixtures"]) == set(qwen_image_21.FIXTURES)
    assert _names_model(summary["compared"]) and "candidate reference" in summary["compared"]
    judged = _judged(summary)
    assert {_case(c) for c in judged} == set(qwen_image_21.CASES)  # attention, block and whole-model cases
    assert {c["component"] for c in judged} == {"attention", "block", "model"}
    assert {c["dtype"] for c in judged} == {"fp64", "fp32"}
    assert all(c["passed"] and c["provided"] for c in summary["checks"])
    assert all(c["fused_calls"] > 0 for c in judged), [(c["name"], c["fused_calls"]) for c in judged]
    assert all(c["weight_gradients"] == "compared" for c in judged if c["name"].endswith("/gradients"))


def test_report_on_21_fails_a_planted_cache_bug_on_the_cache_cases_only_and_names_where(planted_run):
    code, summary = planted_run
    assert code == 1 and summary["verdict"] != "pass"
    failed = [c for c in summary["checks"] if not c["passed"]]
    assert {_case(c) for c in failed} == CACHE_CASES
    assert {c["dtype"] for c in failed} == {"fp64", "fp32"}
    assert all(c["first_divergence"] and c["first_divergence"].endswith("(call 3)") for c in failed), failed
    first = failed[0]
    assert _names_model(summary["compared"]) and "candidate verify.planted:cache_k_v_swapped_21" in summary["compared"]
    assert summary["compared"].endswith(
        f"first divergence: {first['name']} [{first['dtype']}] at {first['first_divergence']}")


def test_report_on_21_passes_diffusers_flex_unfused_with_its_gradients_recorded_as_not_compared(flex_run):
    code, summary = flex_run
    assert code == 0 and summary["verdict"] == "pass"
    assert not summary["candidate"]["fused_modules"]  # none: declared unfused
    assert _names_model(summary["compared"]) and "candidate diffusers-flex, declared unfused" in summary["compared"]
    judged = _judged(summary)
    outputs = [c for c in judged if c["name"].endswith("/outputs")]
    gradients = [c for c in judged if c["name"].endswith("/gradients")]
    assert {_case(c) for c in outputs} == set(qwen_image_21.CASES)
    assert all(c["passed"] and c["provided"] for c in outputs)
    assert {_case(c) for c in gradients} == {n for n, case in qwen_image_21.CASES.items() if case.grads}
    assert all(not c["provided"] and not c["passed"] and c["message"].startswith("not compared: ")
               for c in gradients), [c["message"] for c in gradients]


# --- inputs: a checkpoint's config.json names the model ------------------------------------------------------------

def _unknown_class(path: Path) -> Path:
    """A folder that reads as a checkpoint of a class no model has (a config.json and one small safetensors file)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel",
                                                  **qwen_image.model_config("tiny")}))
    save_file({"x": torch.zeros(2)}, str(path / "diffusion_pytorch_model.safetensors"))
    return path


def _lora(path: Path, model: str) -> Path:
    """A rank-1 LoRA on block 0's q, k and v of the tiny `model`, in diffusers' keys."""
    module = qwen_image if model == "qwen-image" else qwen_image_21
    config = module.model_config("tiny")
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for key in LORA_MODULES:
        tensors[f"transformer.{key}.lora_A.weight"] = torch.randn(1, dim, generator=g)
        tensors[f"transformer.{key}.lora_B.weight"] = torch.randn(dim, 1, generator=g)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints of each model as diffusers saves them, one of an unknown class, and a LoRA for each model."""
    root = tmp_path_factory.mktemp("inputs")
    v21 = root / V21
    qwen_image_21.build_model(qwen_image_21.model_config("tiny"), 0, torch.float32).save_pretrained(v21)
    return {
        "qwen-image": standard_checkpoint(root / "qwen-image"),
        V21: v21,
        "unknown": _unknown_class(root / "unknown"),
        "lora qwen-image": _lora(root / "lora-qwen-image.safetensors", "qwen-image"),
        f"lora {V21}": _lora(root / "lora-21.safetensors", V21),
    }


def test_the_checkpoints_name_their_models_classes(inputs):
    """The control for the tests below: each checkpoint's config.json names its model's class."""
    for model, class_name in CLASSES.items():
        assert json.loads((inputs[model] / "config.json").read_text())["_class_name"] == class_name


CHECKPOINT_COMMANDS = ["report", "convert", "lora-audit", "lora-convert", "lora-compare"]


def _argv(command: str, checkpoint: Path, lora: Path, out: Path) -> list[str]:
    """`command` on `checkpoint` (and `lora`), writing (if it ran) `out`."""
    return {
        "report": ["report", "--checkpoint", str(checkpoint), *FAST, "--out", str(out)],
        "convert": ["convert", str(checkpoint), str(out), "--to", "merged"],
        "lora-audit": ["lora-audit", str(lora), "--checkpoint", str(checkpoint), "--json", str(out)],
        "lora-convert": ["lora-convert", str(lora), str(out), "--to", "merged", "--checkpoint", str(checkpoint)],
        "lora-compare": ["lora-compare", str(lora), str(lora), "--checkpoint", str(checkpoint), "--json", str(out)],
    }[command]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qkv-verify: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
@pytest.mark.parametrize("given, flag", [(V21, "qwen-image"), ("qwen-image", V21)])
def test_a_model_flag_that_contradicts_the_checkpoint_exits_2_naming_both(command, given, flag, inputs, tmp_path,
                                                                          capsys):
    out = tmp_path / "out"
    assert main([*_argv(command, inputs[given], inputs[f"lora {given}"], out), "--model", flag]) == 2
    line = _one_line_error(capsys)
    assert f"--model {flag} contradicts" in line and str(inputs[given]) in line, line
    assert f"{CLASSES[given]} ({given})" in line, line
    assert not out.exists()


@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
def test_a_checkpoint_of_a_class_no_model_has_exits_2_naming_it_and_the_known_ones(command, inputs, tmp_path,
                                                                                    capsys):
    out = tmp_path / "out"
    assert main(_argv(command, inputs["unknown"], inputs["lora qwen-image"], out)) == 2
    line = _one_line_error(capsys)
    assert str(inputs["unknown"]) in line and "FluxTransformer2DModel" in line, line
    assert all(f"{c} ({m})" in line for m, c in CLASSES.items()), line
    assert not out.exists()


@pytest.mark.parametrize("command", ["convert", "lora-audit", "lora-convert", "lora-compare"])
@pytest.mark.parametrize("model", list(CLASSES))
@pytest.mark.parametrize("flag", [False, True])
def test_a_checkpoint_of_either_model_runs_with_no_model_flag_or_the_one_it_names(command, model, flag, inputs,
                                                                                 tmp_path, capsys):
    """The control: the refusals above come from the model, not from the inputs; and with no --model the
    checkpoint's own model is taken (a Qwen-Image 2.1 checkpoint is not read as Qwen-Image)."""
    out = tmp_path / "out"
    argv = _argv(command, inputs[model], inputs[f"lora {model}"], out) + (["--model", model] if flag else [])
    assert main(argv) == 0, capsys.readouterr().err
    assert out.exists()


def test_report_takes_the_model_from_the_checkpoint(inputs, tmp_path, capsys):
    """No --model: the config.json's class says 2.1, and the report judges the checkpoint as 2.1's."""
    out = tmp_path / "out"
    assert main(["report", "--checkpoint", str(inputs[V21]), *FAST, "--out", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["model"] == V21 and summary["inputs"]["checkpoint"] == str(inputs[V21])


def test_report_refuses_a_checkpoint_and_a_merged_checkpoint_of_two_models(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", "--checkpoint", str(inputs["qwen-image"]), "--merged-checkpoint", str(inputs[V21]),
                 *FAST, "--out", str(out)]) == 2
    line = _one_line_error(capsys)
    assert str(inputs["qwen-image"]) in line and str(inputs[V21]) in line and "two models" in line, line
    assert not out.exists()


def test_an_unknown_model_flag_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as usage:
        main(["report", "--model", "flux", "--out", str(out)])
    assert usage.value.code == 2 and "invalid choice: 'flux'" in capsys.readouterr().err
    assert not out.exists()


# --- qkv-verify test --model ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, prefix", [(None, "test_candidate_"), (V21, "test_21_")])
def test_test_runs_the_properties_of_the_model_it_names_only(model, prefix, capsys):
    argv = ["test", "reference", *(["--model", model] if model else []), "--", "--collect-only", "-q",
            "-p", "no:cacheprovider"]
    assert main(argv) == 0
    collected = [line.split("::")[1] for line in capsys.readouterr().out.splitlines() if "::" in line]
    assert collected and all(name.startswith(prefix) for name in collected), collected


# --- the public API -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, cases", [(None, qwen_image.CASES), ("qwen-image", qwen_image.CASES),
                                          (V21, qwen_image_21.CASES)])
def test_check_candidate_judges_the_cases_of_the_model_it_names(model, cases):
    records = check_candidate("reference", components=("attention",), dtypes=FP64,
                              **({"model": model} if model else {}))
    assert {r.name.split("/")[0] for r in records} == {n for n, c in cases.items() if c.component == "attention"}
    assert all(r.passed and r.fused_calls > 0 for r in records), [r.message for r in records if not r.passed]


def test_assert_candidate_fails_a_planted_21_bug_on_21_naming_the_cache_case():
    with pytest.raises(AssertionError, match=r"attention-cache/outputs \[fp64.*first divergence: .*\(call 3\)"):
        assert_candidate("verify.planted:cache_k_v_swapped_21", components=("attention",), dtypes=FP64, model=V21)


@pytest.mark.parametrize("api", [check_candidate, assert_candidate])
def test_an_unknown_model_is_a_one_line_error_naming_the_known_ones(api):
    with pytest.raises(VerifyError) as error:
        api("reference", components=("attention",), dtypes=FP64, model="flux")
    message = str(error.value)
    assert "\n" not in message and "'flux'" in message and "qwen-image, qwen-image-2.1" in message, message


# --- the pytest plugin's --qkv-model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("option, expected", [(None, "qwen-image"), (V21, V21)])
def test_plugin_model_reaches_its_fixture(pytester, option, expected):
    pytester.makepyfile(test_model=(
        "def test_model(qkv_model):\n"
        f"    assert qkv_model == {expected!r}\n"))
    args = ["-p", "no:cacheprovider", *(["--qkv-model", option] if option else [])]
    pytester.runpytest(*args).assert_outcomes(passed=1)
