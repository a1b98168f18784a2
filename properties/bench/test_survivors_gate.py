"""The bench's gate in pieces, on a tiny block: a LoRA arm's weight gradients compared under the fused names, the
arms' forbidden modules and default layout, the lean check's message, the sanity check's bit-identity, the compile
mode's options reaching inductor. Written for mutants that survived the mutation run over the verdict, message and
write modules."""

from __future__ import annotations

import torch
from torch import nn

from properties.bench.test_bench import _tiny_lora_arms
from verify.bench import gate
from verify.bench import judge as bench_judge
from verify.bench import options as bench_options
from verify.models import qwen_image


def test_lora_arms_compare_their_weight_gradients_under_the_fused_names():
    """A merged LoRA arm's gradients are those of its fused adapters: compared against the standard's mapped onto
    the fused names, not split onto the standard's (which fails, leaving only the input gradients compared)."""
    arms, inputs = _tiny_lora_arms()
    opts = bench_options.Options(device="cpu", dim=64, heads=4, head_dim=16, text_tokens=8, lora_rank=4)
    judged = gate.judged_arms(arms, "fast", qwen_image.BENCH_OUTPUTS)
    records = gate.judge_arms("bench/lora-eager/16+8", arms["standard"], judged, arms, inputs, opts, lora=True)
    gradients = {r["name"]: r for r in records if r["name"].endswith("/gradients")}
    assert set(gradients) == {"bench/lora-eager/16+8/merged/gradients", "bench/lora-eager/16+8/lean-unfused/gradients"}
    for record in gradients.values():
        assert record["weight_gradients"] == "compared" and record["passed"], record


class _Blocks(nn.Module):
    def __init__(self, *names: str):
        super().__init__()
        for name in names:
            self.add_module(name, nn.Linear(2, 2))


def test_the_lean_arm_forbids_the_fused_modules_and_the_merged_arm_the_separate_ones():
    arms = gate.judged_arms({"merged": _Blocks("to_qkv", "to_q"), "lean_unfused": _Blocks("to_q", "add_qkv_proj")},
                            "fast", qwen_image.BENCH_OUTPUTS)
    assert arms["merged"].extra == ["to_q"]
    assert arms["lean_unfused"].extra == ["add_qkv_proj"]
    assert all(name in arms["lean_unfused"].names for name in ("to_q", "add_v_proj"))
    assert all(name in arms["merged"].names for name in ("to_qkv", "add_qkv_proj"))


def test_a_merged_arm_of_a_processor_without_a_declared_layout_is_judged_as_blocked():
    arms = gate.judged_arms({"merged": _Blocks("to_qkv"), "lean_unfused": _Blocks("to_q")}, "diffsynth",
                            qwen_image.BENCH_OUTPUTS)
    assert arms["merged"].layout == "blocked" and arms["lean_unfused"].layout is None


def test_the_lean_check_says_why_a_block_is_not_lean():
    arms, inputs = _tiny_lora_arms()
    record = gate.lean_check("bench/lean-unfused", arms["standard"], inputs)
    assert record["passed"] is False
    assert record["message"].startswith("the lean-unfused block runs [") and \
        record["message"].endswith("], not a lean-unfused processor")


def test_the_sanity_check_says_whether_the_outputs_are_bit_identical():
    b = (torch.linspace(-1, 1, 50), torch.linspace(0, 2, 30))
    same = gate.sanity_check("x", b, tuple(t.clone() for t in b))
    assert same["passed"] and same["bit_identical"] is True
    close = gate.sanity_check("x", b, (b[0] * (1 + 1e-6), b[1]))
    assert close["passed"] and close["bit_identical"] is False


def test_the_compile_mode_options_reach_inductor(monkeypatch):
    from torch._inductor import compile_fx as inductor
    from torch._inductor import list_mode_options

    seen = []
    monkeypatch.setattr(inductor, "compile_fx", lambda graph, inputs, config_patches: seen.append(config_patches))
    bench_judge.capturing("inductor", "max-autotune-no-cudagraphs")("graph", [])
    bench_judge.capturing("inductor", None)("graph", [])
    assert seen == [list_mode_options("max-autotune-no-cudagraphs"), {}]
    assert seen[0], "the mode has options"
