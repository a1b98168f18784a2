"""`qkv-verify bench` on the CPU with tiny dims: the JSON contract, and the merged block it times is the standard one.

The bench's sizes all come from its arguments, so this smoke test runs the same code as the GPU measurement. The
merged block it times (bench.merged_block) is proven equivalent to the standard block by the property machinery
(run_case: fp64 oracle, relative-to-base rule, fused calls counted) in all four dtypes, with gradients.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from verify import bench
from verify.cases import CASES
from verify.cli import main
from verify.compare import assert_passed
from verify.equivalence import run_case
from verify.tolerance import DTYPES

ROW_FIELDS = {"mode", "phase", "image_tokens", "text_tokens", "standard_ms", "merged_ms", "speedup",
              "kernels_standard", "kernels_merged", "floor_ms", "merged_tflops"}
TINY = ["--device", "cpu", "--dim", "64", "--heads", "4", "--head-dim", "16", "--image-tokens", "16",
        "--text-tokens", "8"]


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    assert main(["bench", *TINY, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_json_contract(result):
    assert {"device", "torch", "diffusers", "matmul_peak_tflops", "rows"} <= set(result)
    assert result["torch"] == torch.__version__
    assert result["matmul_peak_tflops"] > 0 and result["matmul_sustained_tflops"] > 0
    assert result["matmul_peak_clocks"] is None and result["matmul_sustained_clocks"] is None  # the CPU has none
    rows = result["rows"]
    assert {(r["mode"], r["phase"]) for r in rows} == {(m, p) for m in bench.MODES for p in bench.PHASES}
    for row in rows:
        extra = {"speedup_ci", "clocks", "standard_calls_ms", "merged_calls_ms", "floor_sustained_ms"}
        assert set(row) == ROW_FIELDS | extra, set(row) ^ ROW_FIELDS
        assert len(row["standard_calls_ms"]) == len(row["merged_calls_ms"]) == 3  # the CPU default --repeats
        low, high = row["speedup_ci"]
        assert 0 < low <= row["speedup"] <= high and math.isfinite(high)
        assert row["clocks"] is None  # no GPU clock on the CPU
        assert (row["image_tokens"], row["text_tokens"]) == (16, 8)
        assert all(row[k] > 0 and math.isfinite(row[k]) for k in ("standard_ms", "merged_ms", "floor_ms",
                                                                     "merged_tflops"))
        assert row["speedup"] == pytest.approx(row["standard_ms"] / row["merged_ms"])
        assert row["floor_sustained_ms"] == pytest.approx(row["floor_ms"] * result["matmul_peak_tflops"]
                                                          / result["matmul_sustained_tflops"])
        assert isinstance(row["kernels_standard"], int) and row["kernels_standard"] > 0
        assert isinstance(row["kernels_merged"], int) and row["kernels_merged"] > 0
    forward, train = (next(r for r in rows if r["mode"] == "eager" and r["phase"] == p) for p in bench.PHASES)
    assert train["floor_ms"] > forward["floor_ms"]  # the backward's products are counted
    profile = next(p for p in result["profiles"] if (p["mode"], p["phase"]) == ("eager", "forward"))
    matmuls = {impl: sum(n for name, _, n in profile[impl]["top"] if name == "aten::addmm") for impl in profile
               if impl in ("standard", "merged")}
    # The profiler sees the fused projections: 6 q/k/v products per attention become 2. (All ops are not fewer on
    # the CPU, where the fp32 RoPE coefficients of bf16 inputs cost cast copies that a GPU kernel does in-loop.)
    assert matmuls["merged"] == matmuls["standard"] - 4, matmuls


def test_profiles_split_the_time(result):
    """Each row's profiles: time per call in matmul, attention and other kernels, and the longest kernels."""
    assert len(result["profiles"]) == len(result["rows"])
    for profile, row in zip(result["profiles"], result["rows"]):
        assert (profile["mode"], profile["phase"]) == (row["mode"], row["phase"])
        for impl, kernels in (("standard", row["kernels_standard"]), ("merged", row["kernels_merged"])):
            p = profile[impl]
            assert p["kernels"] == kernels
            assert p["matmul_ms"] > 0 and p["attention_ms"] >= 0 and p["other_ms"] > 0
            assert p["top"] and all(len(t) == 3 for t in p["top"])


def test_checks_before_timing(result):
    """The bench judged the merged block against the fp64 oracle (fused calls counted) in each mode, and passed."""
    oracle = [c for c in result["checks"] if c["rule"].startswith("relative_to_base")]
    assert {c["name"] for c in oracle} == {"bench/block-eager/outputs", "bench/block-compiled/outputs"}
    assert all(c["passed"] for c in result["checks"]), [c for c in result["checks"] if not c["passed"]]
    assert next(c for c in oracle if "eager" in c["name"])["fused_calls"] == 2


@pytest.mark.parametrize("processor", ["fast", "reference"])
def test_timed_block_is_equivalent(device, processor):
    """The block bench.merged_block builds computes the standard function in fp64, fp32, bf16 and fp16."""
    records = run_case(CASES["block"], dtypes=tuple(DTYPES.values()), device=device,
                       candidate=lambda module, component: bench.merged_block(module, processor))
    assert len(records) == 2 * len(DTYPES)
    for record in records:
        assert_passed(record)
        assert record.fused_calls == 2


def test_bad_sizes_exit_2(capsys):
    assert main(["bench", "--device", "cpu", "--dim", "60", "--heads", "4", "--head-dim", "16"]) == 2
    assert "is not --heads 4 x --head-dim 16" in capsys.readouterr().err


def test_flops_and_grid():
    """The real block at 8192 + 256 tokens: 2.79 TFLOP forward (DESIGN section 7: 3.53 ms at 790 TFLOP/s)."""
    opts = bench.Options(device="cpu")
    assert bench.block_flops(opts, 8192, "forward") / 1e12 == pytest.approx(2.79, abs=0.01)
    assert bench.rope_axes(128) == (16, 56, 56) and sum(bench.rope_axes(16)) == 16
    assert bench.image_grid(8192) == (64, 128) and bench.image_grid(16) == (4, 4)


def test_full_model_rows(tmp_path):
    """--full-model: the whole transformer (here 1 block, tiny width) standard then fused in place, same row fields."""
    out = tmp_path / "bench.json"
    assert main(["bench", *TINY, "--modes", "eager", "--phases", "forward", "--full-model", "--layers", "1",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["full_model"]
    assert [(r["mode"], r["phase"], r["layers"]) for r in rows] == [("eager", "forward", 1)]
    assert ROW_FIELDS <= set(rows[0])
    assert rows[0]["check"]["passed"] and rows[0]["check"]["cosine"] > 0.999


def test_append_keeps_earlier_rows(result, tmp_path):
    """--append: a second run (here: compiled forward again) keeps the first run's rows it did not measure again."""
    first, out = tmp_path / "first.json", tmp_path / "both.json"
    first.write_text(json.dumps(result))
    assert main(["bench", *TINY, "--modes", "compiled", "--phases", "forward", "--append", str(first),
                 "--json", str(out)]) == 0
    both = json.loads(out.read_text())
    keys = [(r["mode"], r["phase"]) for r in both["rows"]]
    assert sorted(keys) == sorted((m, p) for m in bench.MODES for p in bench.PHASES)
    again = next(r for r in both["rows"] if (r["mode"], r["phase"]) == ("compiled", "forward"))
    assert again != next(r for r in result["rows"] if (r["mode"], r["phase"]) == ("compiled", "forward"))
    assert both["appended_from"]["matmul_peak_tflops"] == result["matmul_peak_tflops"]


def test_a_slower_row_is_named_and_judged_by_its_interval(result):
    """A ratio below 1.0 is named with its interval: resolved when the 95% CI lies below 1.0, which alone fails the
    "never slower" goal; a CI reaching 1.0 is noise and does not."""
    result = json.loads(json.dumps(result))
    goal = "merged never slower (no row's 95% CI below 1.0)"
    noisy, slower = result["rows"][:2]
    noisy.update(speedup=0.99, speedup_ci=[0.97, 1.01])
    for row in result["rows"][1:]:
        row.update(speedup=1.1, speedup_ci=[1.05, 1.15])
    assert bench.goals(result)[goal]
    slower.update(speedup=0.96, speedup_ci=[0.95, 0.97])
    assert not bench.goals(result)[goal]
    lines = [line for line in bench.format_table(result).splitlines() if line.startswith("  slower:")]
    assert len(lines) == 2
    assert lines[0].endswith("not resolved (95% CI reaches 1.0)") and lines[1].endswith("resolved (95% CI below 1.0)")
    assert lines[1].startswith(f"  slower: {slower['mode']} {slower['phase']}")


def test_speedup_interval_covers_the_true_ratio_under_drift():
    """Simulated pairs whose clock drifts (shared within a pair, 5% between pairs) around a true ratio of 1.02: the
    95% interval holds 1.02 in most draws, holds the point ratio of medians, and is far narrower than the drift."""
    g = torch.Generator().manual_seed(0)
    covered, widths = 0, []
    for _ in range(200):
        drift = (0.05 * torch.randn(40, generator=g)).exp()
        a = 1.02 * drift * (0.01 * torch.randn(40, generator=g)).exp()
        b = drift * (0.01 * torch.randn(40, generator=g)).exp()
        low, high = bench.speedup_interval(a.tolist(), b.tolist())
        point = a.quantile(0.5).item() / b.quantile(0.5).item()
        assert low <= point <= high
        covered += low <= 1.02 <= high
        widths.append(high - low)
    assert covered >= 0.9 * 200, covered
    assert max(widths) < 0.05  # unpaired, the 5% drift alone would spread each median by about 1%


def test_speedup_interval_resolves_a_planted_loss():
    """A merged path 3% slower in every pair, under the same drift, gives an interval wholly below 1.0."""
    g = torch.Generator().manual_seed(1)
    drift = (0.05 * torch.randn(40, generator=g)).exp()
    low, high = bench.speedup_interval(drift.tolist(), (1.03 * drift).tolist())
    assert high < 1.0 and low == pytest.approx(1 / 1.03, rel=1e-6)  # every pair at exactly 1/1.03
    assert bench.speedup_interval(drift.tolist(), (1.03 * drift).tolist()) == (low, high)  # seeded


def test_pairs_alternate_call_by_call():
    """Standard and merged calls are interleaved a b, b a, ...: drift between calls hits both alike."""
    calls = []
    opts = bench.Options(device="cpu", repeats=4, warmup=1)
    a_times, b_times = bench.paired_times(lambda: calls.append("a"), lambda: calls.append("b"), opts)
    assert "".join(calls) == "ab" + "abbaabba"  # warm-up, then the pairs
    assert len(a_times) == len(b_times) == 4


def test_trace_writes_each_rows_timelines(tmp_path):
    """--trace DIR: a Chrome-trace timeline per row and implementation, holding the profiled ops."""
    assert main(["bench", *TINY, "--modes", "eager", "--phases", "forward", "--trace", str(tmp_path / "t")]) == 0
    written = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert written == ["eager-forward-16-merged.json", "eager-forward-16-standard.json"]
    for name in written:
        events = json.loads((tmp_path / "t" / name).read_text())["traceEvents"]
        assert any(e.get("name", "").startswith("aten::") for e in events)


def test_speed_chart_draws_each_rows_interval(result):
    """The report's speed chart: one bar per row at its speedup, its error bar spanning the row's 95% CI."""
    from verify.charts import speed_chart

    fig = speed_chart(result)
    bars = [c for c in fig.axes[0].containers if hasattr(c, "errorbar")]
    assert len(bars) == len(result["rows"])  # one series per (mode, phase), one size here
    drawn = {}
    for container in bars:
        (rect,), (segments,) = container.patches, container.errorbar.lines[2]
        drawn[container.get_label()] = (rect.get_height(), *sorted(segments.get_segments()[0][:, 1]))
    for row in result["rows"]:
        height, low, high = drawn[f"{row['mode']} {row['phase']}"]
        assert height == pytest.approx(row["speedup"])
        assert (low, high) == pytest.approx(tuple(row["speedup_ci"]))


def test_report_speed_section(result):
    """report --bench: a speed table row per timed row (interval shown), and the bench's own goals; a bare list of
    rows (no config) gets the table without goals."""
    from verify.render import tables

    frames = tables({"checks": [], "output_stats": [], "speed": result})
    speed = frames["speed"]
    assert len(speed) == len(result["rows"])
    assert list(speed["speedup"]) == [r["speedup"] for r in result["rows"]]
    assert list(speed["95% CI"]) == [f"{r['speedup_ci'][0]:.3f}-{r['speedup_ci'][1]:.3f}" for r in result["rows"]]
    assert dict(zip(frames["speed_goals"]["goal"], frames["speed_goals"]["met"])) == bench.goals(result)
    bare = tables({"checks": [], "output_stats": [], "speed": {"rows": result["rows"]}})
    assert len(bare["speed"]) == len(result["rows"]) and "speed_goals" not in bare
