"""The bench's gate records on a tiny block, for the survivors of the second mutation run
(reports/mutation/verdicts-messages-writes.txt) in verify/bench/judge.py: the component each record names, an arm
with a module it must not have, and an arm whose fused weights do not split in its layout."""

from __future__ import annotations

import copy

import pytest
from torch import nn

from verify.bench import blocks as bench_blocks
from verify.bench import gate
from verify.bench import judge as bench_judge
from verify.bench import options as bench_options
from verify.models import qwen_image

OPTS = bench_options.Options(device="cpu", dim=64, heads=4, head_dim=16, text_tokens=8)


@pytest.fixture(scope="module")
def block():
    """The standard tiny bf16 block, its merged ("fast") copy, seeded inputs, the fp64 oracle's and the standard's
    training steps."""
    std = bench_blocks.build_block(OPTS)
    inputs = bench_blocks.block_inputs(OPTS, 16)
    outputs = qwen_image.BENCH_OUTPUTS
    ref = bench_judge.oracle(std, inputs, OPTS.seed, outputs)
    base = bench_judge.train_step(std, std, inputs, OPTS.seed, outputs)
    return std, bench_blocks.merged_block(std, "fast"), inputs, ref, base


def _judge(block, arm: bench_judge.Arm, head_dim: int = OPTS.head_dim) -> dict[str, dict]:
    std, _, inputs, ref, base = block
    records = bench_judge.judge("bench/eager/16+8/merged", arm, arm.module, ref, base, inputs, OPTS.seed, head_dim)
    return {r["name"].rsplit("/", 1)[1]: r for r in records}


def test_a_good_merged_arm_passes_with_both_records_of_the_block_component(block):
    """Kills x_judge__mutmut_96 (the gradients record's component "BLOCK"): the bench's JSON names the component of
    both its records "block", as every other record of a block."""
    merged = block[1]
    arm = gate.judged_arms({"merged": merged}, "fast", qwen_image.BENCH_OUTPUTS)["merged"]
    records = _judge(block, arm)
    assert set(records) == {"outputs", "gradients"}
    assert [r["component"] for r in records.values()] == ["block", "block"]
    assert all(r["passed"] for r in records.values()), records
    assert records["gradients"]["weight_gradients"] == "compared"


def test_an_arm_holding_a_module_it_must_not_have_fails_both_records_saying_so(block):
    """Kills x_judge__mutmut_111 (the forbidden-module check dropped): a merged block that also holds a separate to_q
    (never called, so its fused projections are still called once each) fails outputs and gradients alike."""
    merged = copy.deepcopy(block[1])
    merged.add_module("to_q", nn.Linear(2, 2))
    arm = gate.judged_arms({"merged": merged}, "fast", qwen_image.BENCH_OUTPUTS)["merged"]
    records = _judge(block, arm)
    for record in records.values():
        assert record["passed"] is False
        assert record["message"] == "the merged arm has modules it must not have: ['to_q']"


def test_fused_weights_that_do_not_split_leave_the_input_gradients_judged_and_say_why(block):
    """Kills x_judge__mutmut_44 (the candidate's gradients dropped when its weights do not map: the bench crashes):
    an interleaved arm judged with a head size of 5, which 64 rows per projection are not a multiple of, has its
    weight gradients not compared, with the reason, and its input gradients compared (and passing)."""
    merged = block[1]
    fast = gate.judged_arms({"merged": merged}, "fast", qwen_image.BENCH_OUTPUTS)["merged"]
    arm = bench_judge.Arm("merged", merged, fast.names, qwen_image.BENCH_OUTPUTS, bench_judge.SEPARATE,
                          "interleaved")
    records = _judge(block, arm, head_dim=5)
    gradients = records["gradients"]
    assert gradients["weight_gradients"].startswith("not compared: its fused parameters do not split as interleaved")
    assert gradients["passed"], gradients
    inputs = block[2]
    assert gradients["numel"] == sum(inputs[k].numel() for k in qwen_image.BENCH_OUTPUTS.values()), \
        "the elements judged are those of the input gradients alone"
