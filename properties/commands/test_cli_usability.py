"""The command line as a new user meets it: --version, help for every flag, a fast `--help`, quiet broken pipes, and
errors that point at the fix (the other q/k/v layout; two checkpoints of different sizes)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from properties.checkpoint_files import merged_checkpoint, standard_checkpoint
from verify import __version__
from verify.cli import COMMANDS, main, parser
from verify.errors import BROKEN_PIPE
from verify.maths import qkv
from verify.maths.state_dict import matching_layout, merge_state_dict

PYTHON = [sys.executable, "-c"]
ROOT = Path(__file__).resolve().parents[2]


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "verify.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                          **kwargs)


# --- --version, --help -------------------------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"qkv-verify {__version__}\n"
    assert __version__ == importlib.metadata.version("qkv-verify")


def test_top_level_help_speaks_to_users_and_lists_every_command():
    result = run("--help")
    assert result.returncode == 0 and result.stderr == ""
    text = " ".join(result.stdout.split())
    assert "checks that a Qwen-Image transformer whose q, k and v projections are fused" in text
    for name, (_, _, line) in COMMANDS.items():
        assert f"{name} {line}" in text, name


def test_help_imports_no_torch_and_answers_in_under_a_second():
    probe = "import sys; from verify.cli import parser; parser(); print('torch' in sys.modules)"
    assert subprocess.run([*PYTHON, probe], capture_output=True, text=True, cwd=ROOT).stdout == "False\n"
    light = ("import sys; from verify.cli import parser; parser('lora-audit', 'lora-convert', 'lora-compare', 'test');"
             " import verify.commands.report;"
             " print(sorted(m for m in ('torch', 'diffusers', 'pandas') if m in sys.modules))")
    assert subprocess.run([*PYTHON, light], capture_output=True, text=True, cwd=ROOT).stdout == "[]\n"
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        assert run("--help").returncode == 0
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 1.0, seconds


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    p = parser(*COMMANDS)
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_has_help_and_shows_its_choices(command):
    sub = _subparsers()[command]
    text = sub.format_help()
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, f"{command} {action.option_strings or action.dest}"
        if action.choices and not isinstance(action.choices, range):
            assert "{" + ",".join(map(str, action.choices)) + "}" in text, (command, action.dest)


def test_convert_shows_the_choices_of_to_naming_and_layout():
    text = _subparsers()["convert"].format_help()
    for shown in ("--to {merged,standard}", "--naming {seed,diffusers}", "--layout {blocked,interleaved}"):
        assert shown in text
    assert not re.search(r"--(to|naming|layout) (TO|NAMING|LAYOUT)\b", text)


# --- broken pipes ------------------------------------------------------------------------------------------------

def _noisy_lora(path: Path) -> Path:
    """One module of the tiny model and 3000 that match nothing: lora-audit prints a line for each (150 kB, more than
    a pipe holds)."""
    g = torch.Generator().manual_seed(0)
    tensors = {"transformer_blocks.0.attn.to_q.lora_down.weight": torch.randn(2, 64, generator=g),
               "transformer_blocks.0.attn.to_q.lora_up.weight": torch.randn(64, 2, generator=g)}
    for i in range(3000):
        tensors[f"transformer_blocks.{100 + i}.attn.to_q.lora_down.weight"] = torch.ones(1, 1)
        tensors[f"transformer_blocks.{100 + i}.attn.to_q.lora_up.weight"] = torch.ones(1, 1)
    save_file(tensors, str(path))
    return path


def test_audit_piped_into_head_exits_quietly(tmp_path):
    lora = _noisy_lora(tmp_path / "l.safetensors")
    script = (f"{sys.executable} -m verify.cli lora-audit {lora} --config tiny 2>{tmp_path / 'err'} | head -1; "
              "echo \"status ${PIPESTATUS[0]}\"")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.splitlines() == ["format          lightning (trained on a standard model; model is standard)",
                                          f"status {BROKEN_PIPE}"]
    assert (tmp_path / "err").read_text() == "", "no traceback, no 'Exception ignored' line"


@pytest.mark.parametrize("buffered", [False, True])
def test_closed_reader_exits_quietly_and_still_writes_json(tmp_path, buffered):
    """A reader gone before anything is written (a deterministic EPIPE), whether the output is written as it comes
    (PYTHONUNBUFFERED, as here) or only at the last flush: exit 141, nothing on stderr, and --json written."""
    lora = tmp_path / "l.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.lora_down.weight": torch.ones(2, 64),
               "transformer_blocks.0.attn.to_q.lora_up.weight": torch.ones(64, 2)}, str(lora))
    env = {k: v for k, v in os.environ.items() if not (buffered and k == "PYTHONUNBUFFERED")}
    env |= {} if buffered else {"PYTHONUNBUFFERED": "1"}
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-m", "verify.cli", "lora-audit", str(lora), "--config", "tiny",
                                 "--json", str(tmp_path / "audit.json")],
                                stdout=write, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    finally:
        os.close(write)
    assert result.returncode == BROKEN_PIPE and result.stderr == ""
    assert (tmp_path / "audit.json").exists()


# --- the other q/k/v layout --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    std = standard_checkpoint(root / "std")
    return {"std": std, "blocked": merged_checkpoint(std, root / "blocked"),
            "interleaved": merged_checkpoint(std, root / "interleaved", layout="interleaved"),
            "big": standard_checkpoint(root / "big", num_layers=3)}


@pytest.mark.parametrize("fused, flag", [("interleaved", []), ("blocked", ["--layout", "interleaved"])])
def test_convert_check_names_the_layout_the_weights_match(checkpoints, capsys, fused, flag):
    capsys.readouterr()
    assert main(["convert", "--check", str(checkpoints["std"]), str(checkpoints[fused]), *flag]) == 1
    out = capsys.readouterr().out
    assert f"match SRC bit for bit in the {fused} layout" in out and f"pass --layout {fused}" in out
    assert main(["convert", "--check", str(checkpoints["std"]), str(checkpoints[fused]), "--layout", fused]) == 0


def test_convert_check_of_standard_dst_names_srcs_layout(checkpoints, tmp_path, capsys):
    """SRC merged (interleaved), DST standard: read SRC as blocked and the split tensors differ; interleaved fits."""
    capsys.readouterr()
    assert main(["convert", "--check", str(checkpoints["interleaved"]), str(checkpoints["std"])]) == 1
    assert "pass --layout interleaved" in capsys.readouterr().out


def test_convert_check_gives_no_layout_hint_for_wrong_weights(checkpoints, tmp_path, capsys):
    def swap_kv(sd):
        key = "transformer_blocks.1.attn.to_qkv.weight"
        q, k, v = qkv.split(sd[key], qkv.QKVShape.equal(sd[key].shape[0], 16), "blocked")
        return sd | {key: torch.cat([q, v, k])}

    bad = merged_checkpoint(checkpoints["std"], tmp_path / "bad", mutate=swap_kv)
    capsys.readouterr()
    assert main(["convert", "--check", str(checkpoints["std"]), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "transformer_blocks.1.attn.to_qkv.weight differs" in out and "--layout" not in out


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_matching_layout_names_the_layout_of_merged_weights(layout):
    g = torch.Generator().manual_seed(0)
    std = {f"attn.{n}.{p}": torch.randn(64, 64, generator=g) if p == "weight" else torch.randn(64, generator=g)
           for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj") for p in ("weight", "bias")}
    merged = merge_state_dict(std, "seed", layout, 16)
    assert matching_layout(std, merged, "seed", 16) == layout
    wrong = dict(merged, **{"attn.to_qkv.weight": merged["attn.to_qkv.weight"].flip(0)})
    assert matching_layout(std, wrong, "seed", 16) is None


def test_report_weight_check_names_the_layout_the_weights_match(checkpoints, tmp_path):
    import json

    out = tmp_path / "out"
    assert main(["report", "--checkpoint", str(checkpoints["std"]), "--merged-checkpoint",
                 str(checkpoints["interleaved"]), "--out", str(out), "--dtypes", "fp64,fp32"]) == 1
    checks = json.loads((out / "summary.json").read_text())["checks"]
    weights = next(c for c in checks if c["name"].startswith("weights/split-"))
    assert not weights["passed"] and "pass --layout interleaved" in weights["message"]


# --- two checkpoints of different sizes --------------------------------------------------------------------------

def test_report_names_both_configs_and_the_fields_that_differ(checkpoints, tmp_path, capsys):
    merged = merged_checkpoint(checkpoints["big"], tmp_path / "merged3")
    capsys.readouterr()
    assert main(["report", "--checkpoint", str(checkpoints["std"]), "--merged-checkpoint", str(merged),
                 "--out", str(tmp_path / "out"), "--dtypes", "fp64,fp32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert f"{checkpoints['std'] / 'config.json'} and {merged / 'config.json'} describe different models" in err
    assert "num_layers 2 vs 3" in err


def test_report_blames_the_standard_config_for_a_merged_file_without_one(checkpoints, tmp_path, capsys):
    merged = merged_checkpoint(checkpoints["big"], tmp_path / "merged3")
    weights = merged / "diffusion_pytorch_model.safetensors"
    capsys.readouterr()
    assert main(["report", "--checkpoint", str(checkpoints["std"]), "--merged-checkpoint", str(weights),
                 "--out", str(tmp_path / "out"), "--dtypes", "fp64,fp32"]) == 2
    err = capsys.readouterr().err
    assert f"{weights}: does not fit the model of {checkpoints['std'] / 'config.json'}" in err
    assert "of its config" not in err


def test_convert_check_names_both_configs_and_the_fields_that_differ(checkpoints, tmp_path, capsys):
    merged = merged_checkpoint(checkpoints["big"], tmp_path / "merged3")
    capsys.readouterr()
    assert main(["convert", "--check", str(checkpoints["std"]), str(merged)]) == 1
    out = capsys.readouterr().out
    assert "DST holds transformer_blocks.2." in out and "0 missing, 24 extra" in out
    assert f"{checkpoints['std'] / 'config.json'} and {merged / 'config.json'} describe different models" in out
    assert "num_layers 2 vs 3" in out
