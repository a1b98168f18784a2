"""What a careful user of `qkv-verify report` relies on: the verdict is fail everywhere whenever the exit status is 1
(and says why), unmatched LoRA keys fail unless allowed, audit warnings reach report.md and index.html, --out never
scatters files into a folder that is not a report, and no progress bar reaches a log."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from verify.cli import main
from verify.models import qwen_image

FAST = ("--dtypes", "fp64,fp32")


def _run(out: Path, *args: str) -> tuple[int, dict]:
    code = main(["report", "--out", str(out), *FAST, *args])
    return code, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def default(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("default") / "out"
    code, summary = _run(out)
    assert code == 0
    return out, summary


def _headline(out: Path) -> str:
    return (out / "report.md").read_text().splitlines()[0]


def test_moved_against_the_baseline_is_a_fail_everywhere_and_says_why(default, tmp_path, capsys):
    _, summary = default
    moved = copy.deepcopy(summary)
    sample = next(s for s in moved["output_samples"] if s["implementation"] == "merged" and s["dtype"] == "fp32")
    sample["values"][0] += 1.0  # far beyond any dtype's noise
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(moved))
    capsys.readouterr()
    code, result = _run(tmp_path / "out", "--baseline", str(baseline))
    assert code == 1 and result["verdict"] == "fail"
    assert result["verdict_reasons"] == ["moved against the baseline: 1 values"]
    assert all(c["passed"] for c in result["checks"]), "every check passed: the baseline alone fails the run"
    assert _headline(tmp_path / "out") == "# qkv-verify report: **FAIL** (moved against the baseline: 1 values)"
    assert "FAIL (moved against the baseline: 1 values)" in (tmp_path / "out" / "index.html").read_text()
    assert "verdict: fail: moved against the baseline: 1 values" in capsys.readouterr().out


def test_an_unmoved_baseline_passes(default, tmp_path):
    out, _ = default
    code, result = _run(tmp_path / "out", "--baseline", str(out / "summary.json"))
    assert code == 0 and result["verdict"] == "pass" and result["verdict_reasons"] == []
    assert _headline(tmp_path / "out") == "# qkv-verify report: **PASS**"


def _lora_with_a_block_the_model_lacks(path: Path) -> Path:
    """The seeded LoRA plus one module on block 9 of a 2-block model."""
    config = qwen_image.model_config("tiny")
    tensors = qwen_image.seeded_lora(config, 0)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    tensors["transformer_blocks.9.attn.to_out.0.lora_down.weight"] = torch.ones(4, dim)
    tensors["transformer_blocks.9.attn.to_out.0.lora_up.weight"] = torch.ones(dim, 4)
    tensors["transformer_blocks.9.attn.to_out.0.alpha"] = torch.tensor(4.0)
    save_file(tensors, str(path))
    return path


def test_unmatched_lora_keys_fail_unless_allowed_and_every_warning_is_shown(tmp_path):
    lora = _lora_with_a_block_the_model_lacks(tmp_path / "lora.safetensors")
    code, summary = _run(tmp_path / "out", "--lora", str(lora))
    check = next(c for c in summary["checks"] if c["name"] == "lora/unmatched-keys")
    assert code == 1 and not check["passed"] and "transformer_blocks.9.attn.to_out.0" in check["message"]
    assert summary["verdict_reasons"] == ["1 check(s) failed"]
    warnings = summary["lora"]["warnings"]
    assert warnings, "the audit warns about the module that lands nowhere"
    for page in ("report.md", "index.html"):
        text = (tmp_path / "out" / page).read_text()
        assert "LoRA audit warnings" in text and all(w.split(":")[0] in text for w in warnings), page
    code, summary = _run(tmp_path / "allowed", "--lora", str(lora), "--allow-unmatched")
    check = next(c for c in summary["checks"] if c["name"] == "lora/unmatched-keys")
    assert code == 0 and check["passed"] and "allowed by --allow-unmatched" in check["message"]


def test_out_refuses_a_folder_that_is_not_a_report_unless_forced(default, tmp_path, capsys):
    foreign = tmp_path / "src"
    foreign.mkdir()
    (foreign / "module.py").write_text("x = 1\n")
    capsys.readouterr()
    assert main(["report", "--out", str(foreign), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an earlier qkv-verify report" in err[0] and "--force" in err[0]
    assert sorted(p.name for p in foreign.iterdir()) == ["module.py"], "nothing written"
    file_out = tmp_path / "file"
    file_out.write_text("mine")
    assert main(["report", "--out", str(file_out), *FAST]) == 2 and file_out.read_text() == "mine"
    out, _ = default
    assert main(["report", "--out", str(out), *FAST]) == 0, "an earlier report is reused"
    assert main(["report", "--out", str(foreign), "--force", *FAST]) == 0
    assert (foreign / "summary.json").exists() and (foreign / "module.py").read_text() == "x = 1\n"


def test_no_progress_bar_reaches_a_log(tmp_path):
    result = subprocess.run([sys.executable, "-m", "verify.cli", "report", "--out", str(tmp_path / "o"), *FAST],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "qkv-verify report:" not in result.stderr
