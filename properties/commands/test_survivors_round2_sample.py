"""`qkv-verify sample` up to the run itself (run_sampling replaced by a recorder that stops there), and its --help,
for the survivors of the second mutation run (reports/mutation/verdicts-messages-writes.txt) in
verify/commands/sample.py: what it refuses before sampling, and the candidate it hands the run."""

from __future__ import annotations

import pytest
import torch

import verify.checks.sampling
from properties.commands import help_paragraphs
from verify.cli import main


class Ran(Exception):
    """The sampling started."""


@pytest.fixture
def sample(tmp_path, monkeypatch, capsys):
    """`qkv-verify sample ARGS --out tmp/out`, stopped where it would sample: ("ran", the candidate handed to
    run_sampling) or (exit status, stderr)."""
    def stop(candidate, reference, opts):
        raise Ran(candidate)

    monkeypatch.setattr(verify.checks.sampling, "run_sampling", stop)

    def run(*args: str, out=None):
        capsys.readouterr()
        try:
            code = main(["sample", *args, "--out", str(out or tmp_path / "out")])
        except Ran as ran:
            return "ran", ran.args[0]
        return code, capsys.readouterr().err

    return run


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_device_cuda_without_a_cuda_device_is_refused_before_sampling(sample):
    """Kills x__sample__mutmut_16 (the check inverted: on a machine without CUDA, sampling starts on cuda)."""
    code, err = sample("--device", "cuda")
    assert code == 2
    assert err.strip().splitlines() == ["qkv-verify: error: --device cuda: no CUDA device is available"]


def test_an_out_folder_holding_the_lora_is_refused_naming_the_lora_flag(sample, tmp_path):
    """Kills x__sample__mutmut_46 (the flag named "XX--loraXX" in the message)."""
    out = tmp_path / "out"
    lora = out / "l.safetensors"
    code, err = sample("--lora", str(lora), out=out)
    assert code == 2
    assert err.strip().splitlines() == [
        f"qkv-verify: error: --out {out}: holds the input --lora {lora}, which the report would overwrite; choose "
        "another --out"]


def test_fused_modules_none_reaches_the_candidate(sample):
    """Kills x__sample__mutmut_58 (--fused-modules dropped): `--fused-modules none` judges the candidate as unfused
    (summary.json's candidate.fused_modules null), where the default names its fused projections."""
    code, default = sample("--candidate", "fast")
    assert code == "ran" and default.fused_modules
    code, candidate = sample("--candidate", "fast", "--fused-modules", "none")
    assert code == "ran" and candidate.fused_modules == ()
    assert candidate.describe()["fused_modules"] is None


@pytest.mark.parametrize("model, expected", [("qwen-image", "fast-compiled"), ("qwen-image-2.1", "reference")])
def test_the_default_candidate_on_cuda_is_the_one_fuse_model_installs_for_the_model(sample, monkeypatch, model,
                                                                                       expected):
    """Kills x__sample__mutmut_64 (the default candidate chosen for no model): on cuda, Qwen-Image's default is
    fast-compiled (the processor fuse_model installs there), Qwen-Image 2.1's its one fused processor, reference.
    (CUDA is pretended present: the run is stopped before anything reaches a device.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    code, candidate = sample("--model", model, "--device", "cuda")
    assert code == "ran" and candidate.spec == expected


def test_an_unknown_layout_is_a_usage_error_before_sampling(sample, capsys, monkeypatch):
    """Kills x_register_sample__mutmut_82 (--layout without choices: any word accepted, the run started)."""
    with pytest.raises(SystemExit) as done:
        sample("--layout", "diagonal")
    assert done.value.code == 2
    assert "argument --layout: invalid choice: 'diagonal'" in capsys.readouterr().err
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "[--layout {blocked,interleaved}]" in capsys.readouterr().out


def test_the_help_says_what_runs_and_the_default_candidate(capsys, monkeypatch):
    """Kills x_register_sample__mutmut_14, _21 (the description garbled) and _39 (--candidate's help garbled)."""
    paragraphs = help_paragraphs("sample", capsys, monkeypatch)
    assert paragraphs[1] == (
        "Runs diffusers' own pipeline three times from the same seeded noise, prompt embeddings (a padded negative "
        "prompt for true CFG) and scheduler: the oracle (the reference in fp64, its scheduler step in fp64), base "
        "(the reference in each dtype) and cand (the candidate in each dtype), and judges the latents after every "
        "step by the relative-to-base rule; the final latents are decoded by one fp64 VAE (PSNR, SSIM and the pixel "
        "mean against the oracle's image). Exit status: 0 every step passed, 1 otherwise, 2 bad usage or input.")
    assert ("--candidate SPEC the implementation judged (as report's; default: the processor fuse_model installs on "
            "--device)") in paragraphs[-1]
