"""`qkv-verify report` through its command line: the contract fields, exit codes, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from properties.checkpoint_files import merged_checkpoint, standard_checkpoint
from verify.cli import main
from verify.maths import qkv

CHECK_FIELDS = {"name", "component", "dtype", "device", "passed", "max_abs_err", "rel_l2_err", "cosine", "ratio",
                "tolerance"}


def report(tmp_path, *args: str) -> tuple[int, dict | None]:
    out = tmp_path / "out"
    code = main(["report", "--out", str(out), *args])
    summary = out / "summary.json"
    return code, json.loads(summary.read_text()) if summary.exists() else None


def test_default_report_passes_with_contract_fields(tmp_path):
    code, summary = report(tmp_path)
    assert code == 0 and summary["verdict"] == "pass"
    assert {"verdict", "checks", "output_stats", "environment", "inputs"} <= set(summary)
    assert all(CHECK_FIELDS <= set(c) for c in summary["checks"])
    assert {c["dtype"] for c in summary["checks"]} == {"fp64", "fp32", "bf16", "fp16"}
    ran = [c for c in summary["checks"] if c["component"] in ("attention", "block", "model")]
    assert ran and all(c["fused_calls"] > 0 for c in ran), "every check of outputs must have run the fused path"
    assert summary["lora"]["file"].startswith("embedded: seeded rank-32 LoRA"), "the default runs the LoRA stage"
    assert any(c["name"].startswith("lora/text-to-image/") for c in ran)
    trips = [c for c in summary["checks"] if c["name"].startswith("weights/round-trip-")]
    assert len(trips) == 4 and all(c["passed"] and c["bit_identical"] for c in trips)
    stats = summary["output_stats"][0]
    assert {"mean", "std", "min", "max", "nan", "inf"} <= set(stats)
    assert (tmp_path / "out" / "index.html").read_text().count("<table") >= 2
    assert "PASS" in (tmp_path / "out" / "report.md").read_text()


def test_console_script_runs_and_exits_zero(tmp_path):
    result = subprocess.run([sys.executable, "-m", "verify.cli", "report", "--out", str(tmp_path / "o"),
                             "--dtypes", "fp64,fp32"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "verdict: pass" in result.stdout


def test_bf16_only_request_still_runs_fp64_and_fp32(tmp_path):
    code, summary = report(tmp_path, "--dtypes", "bf16")
    assert code == 0
    assert {c["dtype"] for c in summary["checks"]} == {"fp64", "fp32", "bf16"}
    assert summary["notes"], "the added dtypes must be stated"


def test_sharded_checkpoint_report_passes(tmp_path):
    ckpt = standard_checkpoint(tmp_path / "std")
    assert len(list(ckpt.glob("*.safetensors"))) > 1 and list(ckpt.glob("*.index.json")), "fixture must be sharded"
    code, summary = report(tmp_path, "--checkpoint", str(ckpt), "--dtypes", "fp64,fp32")
    assert code == 0 and summary["inputs"]["checkpoint"] == str(ckpt)


@pytest.mark.parametrize("naming", ["seed", "diffusers"])
@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_users_merged_checkpoint_passes_in_its_layout(tmp_path, naming, layout):
    std = standard_checkpoint(tmp_path / "std")
    merged = merged_checkpoint(std, tmp_path / "merged", naming, layout)
    code, summary = report(tmp_path, "--checkpoint", str(std), "--merged-checkpoint", str(merged),
                           "--layout", layout, "--dtypes", "fp64,fp32")
    assert code == 0, [c["message"] for c in summary["checks"] if not c["passed"]]
    weights = [c for c in summary["checks"] if c["name"].startswith("weights/split-")]
    assert len(weights) == 1 and weights[0]["passed"] and weights[0]["bit_identical"]


def test_wrong_layout_flag_fails_weight_and_output_checks(tmp_path):
    std = standard_checkpoint(tmp_path / "std")
    merged = merged_checkpoint(std, tmp_path / "merged", "seed", "interleaved")
    code, summary = report(tmp_path, "--checkpoint", str(std), "--merged-checkpoint", str(merged),
                           "--dtypes", "fp64,fp32")
    assert code == 1 and summary["verdict"] == "fail"
    failed = {c["name"].split("/")[0] for c in summary["checks"] if not c["passed"]}
    assert failed == {"weights", "model"}
    assert all(c["passed"] for c in summary["checks"] if c["name"].startswith("weights/round-trip-"))


def test_planted_kv_swap_in_merged_checkpoint_is_named(tmp_path, capsys):
    std = standard_checkpoint(tmp_path / "std")

    def swap_kv(sd):
        key = "transformer_blocks.1.attn.to_qkv.weight"
        q, k, v = qkv.split(sd[key], qkv.QKVShape.equal(sd[key].shape[0], 16), "blocked")
        return sd | {key: torch.cat([q, v, k])}

    merged = merged_checkpoint(std, tmp_path / "merged", mutate=swap_kv)
    code, summary = report(tmp_path, "--checkpoint", str(std), "--merged-checkpoint", str(merged),
                           "--dtypes", "fp64,fp32")
    assert code == 1
    weights = next(c for c in summary["checks"] if c["name"].startswith("weights/split-"))
    assert "transformer_blocks.1.attn.to_" in weights["message"]
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("make_bad", ["missing", "empty", "truncated", "absurd_header", "pickle", "no_config",
                                      "missing_shard"])
def test_bad_checkpoint_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, make_bad):
    ckpt = standard_checkpoint(tmp_path / "std")
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    if make_bad == "missing":
        ckpt = tmp_path / "nowhere"
    elif make_bad == "empty":
        shard.write_bytes(b"")
    elif make_bad == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif make_bad == "absurd_header":
        shard.write_bytes((10**15).to_bytes(8, "little") + b"{}")
    elif make_bad == "pickle":
        for f in ckpt.glob("*.safetensors*"):
            f.unlink()
        (ckpt / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    elif make_bad == "no_config":
        (ckpt / "config.json").unlink()
    elif make_bad == "missing_shard":
        shard.unlink()
    capsys.readouterr()
    code = main(["report", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("qkv-verify: error:"), lines
    assert not (tmp_path / "out").exists()


def test_bad_input_through_the_console_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "verify.cli", "report", "--checkpoint", str(tmp_path / "none"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("qkv-verify: error:") and str(tmp_path / "none") in result.stderr


@pytest.mark.parametrize("args", [["--dtypes", "fp8"], ["--config", "huge"], ["--layout", "zigzag"],
                                  ["--merged-checkpoint", "x"]])
def test_bad_usage_exits_2(tmp_path, args):
    try:
        code = main(["report", "--out", str(tmp_path / "out"), *args])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    assert code == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no CUDA device exists")
def test_cuda_without_a_gpu_exits_2(tmp_path):
    code, _ = report(tmp_path, "--device", "cuda")
    assert code == 2
