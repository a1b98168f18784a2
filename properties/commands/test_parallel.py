"""`qkv-verify report --parallel`: tp=N and ulysses=N make the merged model parallel over N CPU ranks
(verify.checks.sharding) and record its checks and layout in summary.json; every use that cannot run here (ring off
cuda, more ranks than GPUs) is refused with one line, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest

from verify.checks.summary_schema import check_path
from verify.cli import main
from verify.models.qwen_image import FIXTURES, model_config, model_inputs


@pytest.mark.parametrize("kind,plan", [("tp", "_tp_plan"), ("ulysses", "_cp_plan")])
def test_report_parallel_judges_the_parallel_merged_model(kind, plan, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", "--parallel", f"{kind}=2", "--dtypes", "fp64,fp32", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parallel"] == {"kind": kind, "degree": 2, "device": "cpu", "backend": "gloo", "dtype": "fp64",
                                   "processor": "reference", "plan": f"the merged model's {plan}",
                                   "weights": "seeded tiny config (seed 0)"}
    sharded = [c for c in summary["checks"] if c["name"].startswith(f"{kind}2/")]
    assert [c["name"] for c in sharded] == [f"{kind}2/merged/blocked/{name}" for name in FIXTURES]
    assert all(c["passed"] and c["fused_calls"] > 0 and c["dtype"] == "fp64" for c in sharded)
    assert summary["verdict"] == "pass"
    # and a claims file can name them: the parallel section and its checks are in summary.json's schema
    check_path("parallel.dtype", {})
    check_path(f"checks[name={sharded[0]['name']}].ratio", {})


@pytest.mark.parametrize("args,message", [
    (["--parallel", "tp=1"], "expected tp=N, ulysses=N or ring=N with N >= 2"),
    (["--parallel", "pp=2"], "expected tp=N, ulysses=N or ring=N with N >= 2"),
    (["--parallel", "tp"], "expected tp=N, ulysses=N or ring=N with N >= 2"),
    (["--parallel", "ring=2"], "ring attention needs an attention backend that returns the log-sum-exp"),
    (["--parallel", "ring=2", "--device", "cpu"], "ring=N runs with --device cuda"),
    (["--parallel", "tp=2", "--candidate", "fast-compiled"], "shards the product's processors reference or fast"),
    (["--parallel", "tp=2", "--config", "full"], "not a checkpoint or the full config"),
])
def test_a_parallel_run_that_cannot_run_here_exits_2_with_one_line(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_ulysses_refuses_a_degree_that_does_not_split_every_fixtures_sequences_evenly(tmp_path, capsys):
    config, degree = model_config("small"), 3  # 6 heads: 3 ranks share them, so only a sequence can refuse it
    lengths = {inputs[k].shape[1] for spec in FIXTURES.values() for inputs in [model_inputs(config, spec, 0)]
               for k in ("hidden_states", "encoder_hidden_states")}
    assert config["num_attention_heads"] % degree == 0 and any(n % degree for n in lengths)
    out = tmp_path / "out"
    assert main(["report", "--config", "small", "--parallel", f"ulysses={degree}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"ulysses splits each sequence into {degree} equal shards" in err[0], err
    assert f"pick a degree that divides all of {', '.join(map(str, sorted(lengths)))}" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("kind", ["tp", "ulysses", "ring"])
def test_parallel_on_cuda_needs_that_many_gpus(kind, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "out"
    assert main(["report", "--parallel", f"{kind}=2", "--device", "cuda", "--out", str(out)]) == 2
    assert "needs 2 CUDA devices, this machine has 1" in capsys.readouterr().err
    assert not out.exists()
