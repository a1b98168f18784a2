"""The parallel checks' records, for the survivor of the second mutation run
(reports/mutation/verdicts-messages-writes.txt) in verify/checks/sharding.py: each names its component, the model.
The ranks are stood in for (mp.spawn replaced by a writer of the per-rank results files), so no process is spawned."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp

from verify.checks.sharding import check_parallel


def test_each_parallel_record_is_of_the_model_component(monkeypatch):
    """Kills x_check_parallel__mutmut_66 (component None): summary.json's parallel records say component "model",
    which a claim's checks[component=model] filter selects, and they pass when every rank computed the same
    outputs as the oracle."""
    sample = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(1, 4, 6)

    def ranks(fn, args, nprocs, join):
        assert join
        for rank in range(nprocs):
            torch.save({"text-to-image": {"ref": sample, "base": sample.clone(), "cand": sample.clone(),
                                          "fused_calls": 2}}, Path(args[2]) / f"rank{rank}.pt")

    monkeypatch.setattr(mp, "spawn", ranks)
    [record] = check_parallel("tp", ranks=2)
    assert record.name == "tp2/merged/blocked/text-to-image"
    assert record.component == "model"
    assert record.passed and record.to_dict()["component"] == "model"
