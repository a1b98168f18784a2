"""`qkv-verify bench --model qwen-image-2.1` on the CPU at a tiny width: the arguments of reports/gpu/bench-21.sh (the
real-width GPU run) with the sizes made tiny, every arm judged against the fp64 oracle before it is timed, the fused
projection counted, a planted processor bug stopping the run before any row, and the refusals."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from properties.bench import passing_bench
from verify.bench import blocks as bench_blocks
from verify.bench import options as bench_options
from verify.bench import run as bench_run
from verify.cli import main
from verify.commands import bench as bench_command
from verify.implementations import fused_21

SCRIPT = Path(__file__).parents[2] / "reports" / "gpu" / "bench-21.sh"
# The script's sizes made tiny (later flags win): 4 heads x 16, a 4 x 4 image after 8 text tokens, one timed call.
TINY = ["--device", "cpu", "--dim", "64", "--heads", "4", "--head-dim", "16", "--image-tokens", "16", "--text-tokens",
        "8", "--repeats", "1", "--warmup", "1"]
DIM, HEAD_DIM, TOKENS = 64, 16, 16 + 8
# Qwen-Image 2.1's attention targets, typed out here rather than read from the model module.
STANDARD_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MERGED_TARGETS = ["to_qkv", "to_out.0"]


def script_args() -> list[str]:
    """The bench arguments reports/gpu/bench-21.sh runs on the GPU (its ARGS line)."""
    line = re.search(r"^ARGS=\((.*)\)$", SCRIPT.read_text(), re.MULTILINE)
    assert line, "reports/gpu/bench-21.sh has no ARGS=(...) line"
    return shlex.split(line[1])


@pytest.fixture(scope="module")
def run21(tmp_path_factory) -> tuple[dict, str]:
    return passing_bench([*script_args(), *TINY], tmp_path_factory.mktemp("bench21") / "bench.json")


def test_the_gpu_script_runs_the_real_width_model():
    args = script_args()
    assert args[args.index("--model") + 1] == "qwen-image-2.1"
    assert not {"--dim", "--heads", "--head-dim", "--device"} & set(args)  # the real width: the model's defaults
    assert int(args[args.index("--lora-rank") + 1]) > 0  # all three phases


def test_every_phase_and_mode_is_timed_without_a_lean_arm(run21):
    """The script's run: a row per mode and phase (forward, train, lora-train), each with the standard and merged
    arms only, and the JSON and the table saying which model was measured and why there is no lean-unfused arm."""
    result, table = run21
    config = result["config"]
    assert (config["model"], config["dim"], config["heads"], config["head_dim"]) == ("qwen-image-2.1", DIM, 4, HEAD_DIM)
    assert config["processor"] == "reference" and config["lean_unfused"].startswith("not measured")
    rows = result["rows"]
    assert [(r["mode"], r["phase"]) for r in rows] == [(m, p) for m in bench_options.MODES
                                                       for p in bench_options.ALL_PHASES]
    for row in rows:
        assert (row["image_tokens"], row["text_tokens"]) == (16, 8)
        assert row["standard_ms"] > 0 and row["merged_ms"] > 0 and row["floor_ms"] > 0
        assert not [k for k in row if k.startswith(("lean", "fusion", "kernels_lean"))]
        if row["phase"] == "lora-train":
            assert row["lora_targets"] == {"standard": STANDARD_TARGETS, "merged": MERGED_TARGETS}
    assert result["skipped"] == []
    assert re.search(r"^qwen-image-2\.1  cpu", table, re.MULTILINE)
    assert "lean-unfused arm not measured" in table


def test_every_arm_is_judged_with_its_fused_projection_counted(run21):
    """Before timing, the merged arm and its LoRA counterpart, eager and compiled, outputs and gradients, pass the
    fp64 oracle's relative-to-base rule with one call of the fused to_qkv per step (compiled: in the captured graph);
    the gradients judged are the joint stream's and every weight's of the block."""
    checks = run21[0]["checks"]
    assert all(c["passed"] for c in checks), [c for c in checks if not c["passed"]]
    judged = {c["name"]: c for c in checks if c["rule"].startswith("relative_to_base")}
    assert set(judged) == {f"bench/{lora}{mode}/16+8/merged/{kind}" for lora in ("", "lora-")
                           for mode in bench_options.MODES for kind in ("outputs", "gradients")}
    # q, k, v, out (4 d^2), the SwiGLU MLP (3 x d x 3d), norm_q and norm_k (head_dim each); no biases
    weights = 4 * DIM * DIM + 9 * DIM * DIM + 2 * HEAD_DIM
    for name, c in judged.items():
        assert c["fused_calls"] == 1, name
        assert c["dtype"] == "bf16" and c["mismatched"] == 0
        if name.endswith("/gradients"):
            assert c["weight_gradients"] == "compared"
    assert judged["bench/eager/16+8/merged/gradients"]["numel"] == weights + TOKENS * DIM
    assert judged["bench/eager/16+8/merged/outputs"]["numel"] == TOKENS * DIM
    lora = {c["name"]: c for c in checks if c["rule"].startswith("lora")}
    assert set(lora) == {f"bench/lora-{mode}/{arm}" for mode in bench_options.MODES for arm in ("standard", "merged")}
    for name, c in lora.items():
        merged = name.endswith("/merged")
        assert c["lora_layers"] == (2 if merged else 4) and c["base_with_grad"] == [] and c["lora_without_grad"] == []
        assert c["qkv_lora_calls"] == (None if "compiled" in name else 1 if merged else 3)


def test_a_planted_processor_bug_exits_1_before_timing(tmp_path, monkeypatch, capsys):
    """Planted in the merged processor: text tokens see the text after them (the causal triangle dropped). The
    outputs and gradients fail in eager, the bench exits 1, and no row was timed."""
    monkeypatch.setattr(fused_21.FusedQwenImage21AttnProcessor, "segment_mask",
                        lambda self, start, end, is_text, device: None)
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "qwen-image-2.1", *TINY, "--phases", "forward", "--json", str(out)]) == 1
    result = json.loads(out.read_text())
    assert result["rows"] == []
    failed = {c["name"] for c in result["checks"] if not c["passed"]}
    assert failed == {"bench/eager/16+8/merged/outputs", "bench/eager/16+8/merged/gradients"}
    assert "the merged block disagrees with the standard one" in capsys.readouterr().err


def test_a_planted_merged_arm_that_skips_its_fused_projection_is_caught():
    """Planted (a SPEC given through the API): the merged processor multiplies by the fused weight itself, so the
    numbers are right but to_qkv never runs: only the call count (0 of 1) can fail it, and does."""
    import torch

    class Bypass(fused_21.FusedQwenImage21AttnProcessor):
        def project(self, attn, x):
            fused = torch.nn.functional.linear(x, attn.to_qkv.weight)
            return tuple(t.unflatten(-1, (-1, HEAD_DIM)) for t in fused.chunk(3, dim=-1))

    def build(module, component):
        return fused_21.fuse_model(module, "blocked", Bypass)

    opts = bench_options.Options(model="qwen-image-2.1", device="cpu", dim=DIM, heads=4, head_dim=HEAD_DIM,
                                 image_tokens=(16,), text_tokens=8, modes=("eager",), phases=("forward",),
                                 processor=build, repeats=1, warmup=1, log=lambda line: None)
    with pytest.raises(bench_run.BenchCheckFailed) as failed:
        bench_run.run_bench(opts)
    bad = [c for c in failed.value.result["checks"] if not c["passed"]]
    assert {c["name"] for c in bad} == {"bench/eager/16+8/merged/outputs", "bench/eager/16+8/merged/gradients"}
    assert all(c["fused_calls"] == 0 and c["mismatched"] == 0 for c in bad)
    assert failed.value.result["rows"] == []


def test_the_real_width_is_the_default(monkeypatch):
    """Without --dim/--heads/--head-dim the bench measures each model at its real width and with its processor."""
    seen = []
    monkeypatch.setattr(bench_command, "run_bench", lambda opts: seen.append(opts) or {"rows": []})
    monkeypatch.setattr(bench_command, "format_table", lambda result: "")
    for model in ("qwen-image-2.1", "qwen-image"):
        assert main(["bench", "--model", model, "--device", "cpu"]) == 0
    assert [(o.model, o.dim, o.heads, o.head_dim, o.processor) for o in seen] == [
        ("qwen-image-2.1", 4096, 32, 128, "reference"), ("qwen-image", 3072, 24, 128, "fast")]


def test_flops_at_the_real_width():
    """The real 2.1 block at 4096 image + 256 text tokens, worked out by hand: linear layers 26 S d^2 over the joint
    S = 4352 (q, k, v, out: 8; the MLP's three d x 3d: 18), attention 4 d (T^2 + N (T + N)): 2.19 TFLOP forward."""
    opts = bench_options.Options(model="qwen-image-2.1", device="cpu", dim=4096, heads=32, head_dim=128)
    d, n, t = 4096, 4096, 256
    linear, attention = 26 * (n + t) * d * d, 4 * d * (t * t + n * (t + n))
    assert bench_blocks.block_flops(opts, n, "forward") == pytest.approx(linear + attention)
    assert bench_blocks.block_flops(opts, n, "forward") / 1e12 == pytest.approx(2.19, abs=0.01)
    assert bench_blocks.block_flops(opts, n, "train") == pytest.approx(3 * linear + 3.5 * attention)


@pytest.mark.parametrize("extra,words", [(["--processor", "fast"], "Qwen-Image 2.1 has 'reference'"),
                                         (["--full-model", "--image-tokens", "6"], "come in multiples of 4")])
def test_what_2_1_cannot_bench_is_refused(extra, words, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "qwen-image-2.1", *TINY, "--modes", "eager", "--phases", "forward", *extra,
                 "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert words in err.strip().splitlines()[-1] and "Traceback" not in err
    assert not out.exists()
