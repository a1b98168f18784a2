"""check_parallel requires every rank's merged outputs to equal rank 0's, whatever the number of ranks, 2 included
(the degree `report --parallel tp=2` runs). The ranks are stood in for: spawning them is replaced by writing each
rank's results as `_rank` writes them (rank<r>.pt in the folder check_parallel reads), so that one rank can be made
to disagree. Real ranks are run by test_sharding.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing

from verify.checks.sharding import check_parallel

FIXTURE = "text-to-image"


def _outputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """One fixture's outputs as a rank saves them: oracle, parallel standard and parallel merged, all equal here."""
    ref = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return {"ref": ref, "base": ref.clone(), "cand": ref.clone()}


def _stand_in_ranks(monkeypatch, per_rank: list[dict[str, torch.Tensor]]) -> list[int]:
    """Replace the spawn of the ranks by writing `per_rank`'s results; returns the nprocs check_parallel asked for."""
    asked = []

    def spawn(fn, args=(), nprocs=1, join=True, **_):
        ranks, folder = args[0], args[2]
        asked.append(nprocs)
        assert ranks == nprocs == len(per_rank)
        for r, outs in enumerate(per_rank):
            torch.save({FIXTURE: {**outs, "fused_calls": 4}}, Path(folder) / f"rank{r}.pt")

    monkeypatch.setattr(torch.multiprocessing, "spawn", spawn)
    return asked


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_ranks_that_agree_pass(monkeypatch, ranks):
    asked = _stand_in_ranks(monkeypatch, [_outputs() for _ in range(ranks)])
    [record] = check_parallel("tp", ranks=ranks)
    assert asked == [ranks]
    assert record.passed, record.message
    assert record.name == f"tp{ranks}/merged/blocked/{FIXTURE}" and record.fused_calls == 4 * ranks


@pytest.mark.parametrize("ranks, odd", [(2, 1), (3, 1), (3, 2), (4, 3)])
def test_a_rank_whose_outputs_differ_from_rank_0s_fails_the_check(monkeypatch, ranks, odd):
    """Rank 0 matches the oracle exactly (alone, it would pass); rank `odd` computed other outputs."""
    per_rank = [_outputs() for _ in range(ranks)]
    per_rank[odd]["cand"][0, 3, 1] += 1e-3
    _stand_in_ranks(monkeypatch, per_rank)
    [record] = check_parallel("tp", ranks=ranks)
    assert not record.passed
    assert record.message == f"ranks [{odd}] computed other outputs than rank 0"


def test_a_last_bit_difference_between_two_ranks_is_a_disagreement(monkeypatch):
    """Ranks run the same program on the same inputs: any difference, a rounding one included, is reported."""
    per_rank = [_outputs(), _outputs()]
    cand = per_rank[1]["cand"]
    cand[0, 0, 0] = torch.nextafter(cand[0, 0, 0], torch.tensor(torch.inf, dtype=cand.dtype))
    _stand_in_ranks(monkeypatch, per_rank)
    [record] = check_parallel("ulysses", ranks=2)
    assert not record.passed and "ranks [1]" in record.message
