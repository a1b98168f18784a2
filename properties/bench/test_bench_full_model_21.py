"""`qkv-verify bench --model qwen-image-2.1 --full-model` on the CPU at a tiny width: the whole 2.1 transformer timed
standard then fused in place, its check passed, no lean-unfused arm (None, with the reason), a planted bug caught as
Qwen-Image's full-model path catches one, its FLOPs against a count by hand, and the refusals."""

from __future__ import annotations

import json

import pytest

from properties.bench import passing_bench
from verify import planted
from verify.bench import full_model as bench_full_model
from verify.bench import options as bench_options
from verify.bench import run as bench_run
from verify.cli import main
from verify.implementations import loading
from verify.models import qwen_image_21

# 4 heads x 16, a 4 x 4 target image after 8 text tokens, one timed call; the whole model of 2 blocks.
TINY = ["--model", "qwen-image-2.1", "--device", "cpu", "--dim", "64", "--heads", "4", "--head-dim", "16",
        "--image-tokens", "16", "--text-tokens", "8", "--repeats", "1", "--warmup", "1", "--phases", "forward"]
FULL = ["--full-model", "--layers", "2"]
LEAN_FIELDS = ("lean_unfused_ms", "lean_speedup", "fusion_speedup", "kernels_lean_unfused", "lean_check")


def bench(tmp_path, *extra: str) -> tuple[int, dict]:
    """The bench's exit status and its JSON (empty where it wrote none)."""
    out = tmp_path / "bench.json"
    status = main(["bench", *TINY, *extra, "--json", str(out)])
    return status, json.loads(out.read_text()) if out.exists() else {}


@pytest.fixture(scope="module")
def run21(tmp_path_factory) -> tuple[dict, str]:
    return passing_bench([*TINY, *FULL], tmp_path_factory.mktemp("bench21full") / "bench.json")


def test_the_whole_2_1_model_is_timed_standard_then_fused(run21):
    """A full-model row per mode, both arms timed; the fused model passes its check and runs fewer kernels (one
    to_qkv for to_q, to_k and to_v in each of the 2 blocks: fusing did happen)."""
    result, table = run21
    rows = result["full_model"]
    assert [(r["mode"], r["phase"], r["layers"], r["image_tokens"], r["text_tokens"]) for r in rows] == [
        (mode, "forward", 2, 16, 8) for mode in bench_options.MODES]
    for row in rows:
        assert row["standard_ms"] > 0 and row["merged_ms"] > 0 and row["floor_ms"] > 0
        assert row["speedup"] == pytest.approx(row["standard_ms"] / row["merged_ms"])
        assert row["check"]["passed"] and row["check"]["cosine"] > 0.999
        assert row["kernels_merged"] <= row["kernels_standard"] - 2 * 2
    assert result["config"]["model"] == "qwen-image-2.1" and result["config"]["layers"] == 2
    assert "full model (2 blocks):" in table


def test_2_1_has_no_lean_unfused_arm_and_says_why(run21):
    """The lean-unfused arm is Qwen-Image's: each 2.1 row holds None for it, and the result's skipped list names the
    arm and the reason at every size, the reason the block rows give (config.lean_unfused)."""
    result, _ = run21
    for row in result["full_model"]:
        assert {field: row[field] for field in LEAN_FIELDS} == dict.fromkeys(LEAN_FIELDS)
    assert result["skipped"] == [dict(mode="full-model", image_tokens=16, arm="lean_unfused",
                                      reason=result["config"]["lean_unfused"])]
    assert result["config"]["lean_unfused"].startswith("not measured: Qwen-Image 2.1's merged processor")


def test_a_bug_planted_in_the_fused_model_fails_its_check(tmp_path, monkeypatch):
    """PLANTED_21's full_attention_21 (the block-causal mask replaced by full attention) fuses the whole model: its
    check fails; as Qwen-Image's, the full-model check is informational (the block's fp64-oracle gate passed, so the
    run exits 0)."""
    monkeypatch.setattr(loading, "fuse_any", lambda model, naming, layout, processor=None:
                        planted.full_attention_21(model, "model"))
    status, result = bench(tmp_path, *FULL, "--modes", "eager", "--layers", "1")
    assert status == 0
    assert all(c["passed"] for c in result["checks"])
    [row] = result["full_model"]
    assert not row["check"]["passed"] and row["check"]["rel_l2_err"] > 2e-2


def test_a_planted_processor_stops_the_run_before_the_whole_model():
    """The same planted processor as the bench's own (a SPEC given through the API): the block gate fails it and
    nothing of the whole model runs (the command exits 1 on this)."""
    opts = bench_options.Options(model="qwen-image-2.1", device="cpu", dim=64, heads=4, head_dim=16,
                                 image_tokens=(16,), text_tokens=8, modes=("eager",), phases=("forward",),
                                 processor=planted.full_attention_21, repeats=1, warmup=1, full_model=True,
                                 layers=1, log=lambda line: None)
    with pytest.raises(bench_run.BenchCheckFailed) as failed:
        bench_run.run_bench(opts)
    assert "full_model" not in failed.value.result
    assert {c["name"] for c in failed.value.result["checks"] if not c["passed"]} == {
        "bench/eager/16+8/merged/outputs", "bench/eager/16+8/merged/gradients"}


def flops_by_hand(layers: int, d: int, n: int, t: int) -> int:
    """One sample's forward matmul FLOPs of the 2.1 model (2 per multiply-add), counted from diffusers'
    transformer_qwenimage21.py: per block over the joint sequence S = T + N, to_q, to_k, to_v and to_out.0 (d x d
    each), img_mlp's gate_layer and proj (d x 3d) and out (3d x d); attention's two products, Q K^T and P V, for the
    text segment's T queries over its T keys and the target's N queries over all S; then img_in (64 -> d), txt_in's
    in_layer (4096 -> d) and out_layer (d x d) over the text, proj_out (d -> 64) over all S tokens."""
    s = t + n
    block = 2 * s * (4 * d * d + 3 * d * 3 * d) + 2 * 2 * d * (t * t + n * s)
    return layers * block + 2 * n * 64 * d + 2 * t * (4096 * d + d * d) + 2 * s * d * 64


def test_full_model_flops_by_hand(run21):
    """The tiny run's and the real model's (32 blocks of 4096 at 4096 image + 256 text tokens: 70.15 TFLOP) whole-model
    FLOPs, batch scaling them."""
    tiny = bench_options.Options(model="qwen-image-2.1", device="cpu", dim=64, heads=4, head_dim=16, text_tokens=8,
                                 layers=2)
    assert bench_full_model.full_model_flops(tiny, 16) == flops_by_hand(2, 64, 16, 8)
    row = run21[0]["full_model"][0]
    assert row["merged_tflops"] * row["merged_ms"] * 1e9 == pytest.approx(flops_by_hand(2, 64, 16, 8))
    real = bench_options.Options(model="qwen-image-2.1", device="cpu", dim=4096, heads=32, head_dim=128, layers=32)
    assert bench_full_model.full_model_flops(real, 4096) == flops_by_hand(32, 4096, 4096, 256)
    assert flops_by_hand(32, 4096, 4096, 256) / 1e12 == pytest.approx(70.15, abs=0.005)
    two = bench_options.Options(model="qwen-image-2.1", device="cpu", dim=64, heads=4, head_dim=16, text_tokens=8,
                                layers=2, batch=2)
    assert bench_full_model.full_model_flops(two, 16) == 2 * flops_by_hand(2, 64, 16, 8)


def test_what_the_whole_2_1_model_cannot_bench_is_refused(tmp_path, monkeypatch, capsys):
    """Image tokens that fill no whole 2 x 2 image slots, and a model whose module has no whole-model bench: one
    line, exit 2, no JSON."""
    assert bench(tmp_path, *FULL, "--image-tokens", "18") == (2, {})
    assert "--full-model: qwen-image-2.1's image tokens come in multiples of 4" in capsys.readouterr().err
    monkeypatch.delattr(qwen_image_21, "bench_full_model")
    assert bench(tmp_path, *FULL) == (2, {})
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("qkv-verify: error: --full-model: qwen-image-2.1 has no whole-model "
                                            "bench (its block rows are timed without --full-model)")
    assert "Traceback" not in err
