"""`qkv-verify report --model qwen-image-2.1 --parallel tp=N`: the merged 2.1 model made tensor parallel over N CPU
ranks (gloo) by its merged _tp_plan, judged in fp64 on every fixture's forward (the block-causal SDPA prefill) and on
the prefix KV cache's decode; 2.1 has no _cp_plan in diffusers, so context parallelism is refused with one line,
exit 2, nothing written. (The planted wrong plans on 2.1 are in properties/checks/test_sharding.py.)"""

from __future__ import annotations

import json

import pytest

from verify.cli import main
from verify.models import qwen_image_21

V21 = "qwen-image-2.1"


def test_report_tp_judges_the_parallel_merged_21_model_prefill_and_cached_decode(tmp_path):
    out = tmp_path / "out"
    assert main(["report", "--model", V21, "--parallel", "tp=2", "--dtypes", "fp64,fp32", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parallel"] == {"kind": "tp", "degree": 2, "device": "cpu", "backend": "gloo", "dtype": "fp64",
                                   "processor": "reference", "plan": "the merged model's _tp_plan",
                                   "weights": "seeded tiny config (seed 0)"}
    sharded = {c["name"]: c for c in summary["checks"] if c["name"].startswith("tp2/")}
    forward = [f"tp2/merged/blocked/{name}" for name in qwen_image_21.FIXTURES]
    cached = ["tp2/merged/blocked/model-cache/prefill", "tp2/merged/blocked/model-cache/cached"]
    assert list(sharded) == forward + cached
    # one fused projection a block (one stream), run by each of the 2 ranks: once a forward, three times for the
    # cache (the full prefill of the next step, the extract prefill, the cached decode)
    layers = qwen_image_21.model_config("tiny")["num_layers"]
    assert [sharded[n]["fused_calls"] for n in forward + cached] == [layers * 2] * 3 + [3 * layers * 2] * 2
    for check in sharded.values():
        assert check["passed"] and check["dtype"] == "fp64", check
        # sharding only reorders fp64 sums: the outputs (order 0.1-1) agree with the oracle to fp64 rounding
        assert check["max_abs_err"] < 1e-12, check
    assert summary["verdict"] == "pass"


@pytest.mark.parametrize("kind", ["ulysses", "ring"])
def test_context_parallel_of_21_is_refused_with_one_line_writing_nothing(kind, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", "--model", V21, "--parallel", f"{kind}=2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"--parallel {kind}=2: {V21} has no context-parallel plan in diffusers" in err[0], err
    assert "QwenImage21Transformer2DModel._cp_plan is absent" in err[0], err
    assert not out.exists()


def test_a_degree_that_does_not_divide_the_heads_is_refused_writing_nothing(tmp_path, capsys):
    heads = qwen_image_21.model_config("tiny")["num_attention_heads"]
    ranks = heads - 1  # 3 of 4: each rank must hold whole heads, the same number of them
    out = tmp_path / "out"
    assert main(["report", "--model", V21, "--parallel", f"tp={ranks}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"{ranks} ranks cannot share them evenly; pick a degree that divides {heads}" in err[0], err
    assert not out.exists()


def test_a_processor_21_does_not_have_is_refused_writing_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", "--model", V21, "--parallel", "tp=2", "--candidate", "fast", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"shards the product's processors reference of {V21}" in err[0], err
    assert not out.exists()
