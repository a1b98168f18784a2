"""`qkv-verify regress`: identical runs never move, a 1% change in one block's weights (or another seed) does, in
fp64 and fp32; thresholds follow the dtype's noise; bad input exits 2; today's default run matches the committed
baseline, reports/baselines/default.json (pytest-regressions' `--force-regen` flag rewrites it and fails the test; a
missing baseline is written and the test fails)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from properties.checkpoint_files import standard_checkpoint
from verify.checks.regress import EPS, Thresholds, format_result, load_summary, regress
from verify.checks.selector import resolve
from verify.cli import main
from verify.errors import VerifyError

BASELINE = Path(__file__).resolve().parents[2] / "reports" / "baselines" / "default.json"
OBTAINED = BASELINE.with_name("default.obtained.json")
PERTURBED = "transformer_blocks.1.img_mlp.net.2.weight"


def _report(out: Path, *args: str) -> dict:
    code = main(["report", "--out", str(out), "--dtypes", "fp64,fp32", *args])
    assert code == 0, f"report {args} exited {code}"
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Report folders: the tiny checkpoint twice, the same with one block's weight x 1.01, and with seed 1."""
    root = tmp_path_factory.mktemp("regress")
    ckpt = standard_checkpoint(root / "ckpt", shard_size="10GB")
    perturbed = root / "perturbed-ckpt"  # the report goes to root / "perturbed": never into its input
    perturbed.mkdir()
    (perturbed / "config.json").write_text((ckpt / "config.json").read_text())
    sd = load_file(ckpt / "diffusion_pytorch_model.safetensors")
    sd[PERTURBED] = sd[PERTURBED] * 1.01
    save_file(sd, str(perturbed / "diffusion_pytorch_model.safetensors"))
    folders = {"first": ("--checkpoint", ckpt), "second": ("--checkpoint", ckpt),
               "perturbed": ("--checkpoint", perturbed), "seed1": ("--checkpoint", ckpt, "--seed", "1")}
    for name, args in folders.items():
        _report(root / name, *map(str, args))
    return {name: root / name / "summary.json" for name in folders}


def _regress_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["regress", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_identical_runs_are_never_flagged(runs, capsys, tmp_path):
    code, out, _ = _regress_cli(capsys, runs["first"], runs["second"], "--json", tmp_path / "r.json")
    result = json.loads((tmp_path / "r.json").read_text())
    assert code == 0 and result["passed"] and result["moved"] == [], out
    samples = load_summary(runs["first"])["output_samples"]
    assert samples, "the report must store output samples for element-wise comparison"
    assert result["compared"] > sum(len(s["values"]) for s in samples), "samples, stats and checks all compared"
    assert "nothing moved" in out and "fp64" in out and "fp32" in out, "thresholds are shown"


@pytest.mark.parametrize("variant", ["perturbed", "seed1"])
def test_one_percent_in_one_block_or_another_seed_is_flagged_in_fp64_and_fp32(runs, capsys, tmp_path, variant):
    code, out, _ = _regress_cli(capsys, runs["first"], runs[variant], "--json", tmp_path / "r.json")
    result = json.loads((tmp_path / "r.json").read_text())
    assert code == 1 and not result["passed"]
    moved = result["moved"]
    for dtype in ("fp64", "fp32"):
        for fixture in ("text-to-image", "edit"):
            for section in ("output_samples", "output_stats"):
                prefix = f"{section}[fixture={fixture},dtype={dtype},implementation=merged]"
                assert any(m["name"].startswith(prefix) for m in moved), f"{prefix} not flagged"
    assert all(m["name"] in out for m in moved), "every moved item is named in the console table"
    candidate = load_summary(runs[variant])
    for m in moved:  # every name is a metric path that selects the candidate's value
        assert resolve(candidate, m["name"]) == m["candidate"]


def test_another_cpu_kernel_path_is_rounding_noise_not_a_regression(runs, tmp_path):
    """Another machine, simulated: the same run with ATen's scalar kernels (no AVX2/AVX512) sums in another order."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    args = [sys.executable, "-m", "verify.cli", "report", "--out", str(tmp_path / "o"), "--dtypes", "fp64,fp32",
            "--checkpoint", str(runs["first"].parent.parent / "ckpt")]
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    base, other = load_summary(runs["first"]), load_summary(tmp_path / "o")
    result = regress(base, other)
    assert result["passed"], format_result(result, "vectorised", "scalar kernels")
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":  # else both runs took the same path
        assert base["output_samples"] != other["output_samples"], "the kernel path should change the rounding"


def test_an_in_memory_summary_compares_like_its_json(runs):
    base = load_summary(runs["first"])
    cand = copy.deepcopy(base)
    cand["inputs"]["fixtures"] = {k: {f: tuple(v) if isinstance(v, list) else v for f, v in spec.items()}
                                  for k, spec in cand["inputs"]["fixtures"].items()}
    result = regress(base, cand)
    assert result["passed"] and not any("inputs" in note for note in result["notes"])


def test_seed_change_is_stated_as_a_note(runs):
    result = regress(load_summary(runs["first"]), load_summary(runs["seed1"]))
    assert any("inputs.seed" in note for note in result["notes"])


def test_thresholds_follow_the_dtype_noise_of_the_baseline(runs):
    base = load_summary(runs["first"])
    t = regress(base, base, Thresholds(rtol_scale=3.0, atol=1e-9))["thresholds"]["per_dtype"]
    fp32_err = max(c["base_max_abs_err"] for c in base["checks"] if c["dtype"] == "fp32" and c["component"] == "model")
    scale = max(abs(s[k]) for s in base["output_stats"] if s["implementation"] == "oracle" for k in ("min", "max"))
    assert t["fp32"] == pytest.approx(3.0 * max(fp32_err, EPS["fp32"] * scale) + 1e-9)
    assert t["fp64"] == t["fp32"], "fp64 outputs reach fp32 precision only: diffusers' RoPE runs in complex64"
    default = regress(base, base)["thresholds"]["per_dtype"]
    assert 0 < default["fp64"] < 1e-4 and 0 < default["fp32"] < 1e-4, "never bit-exact; far below 1% changes"


def _nudge(summary: dict, dtype: str, factor: float) -> tuple[dict, str]:
    """A copy whose first merged sample value of `dtype` moved by factor x that dtype's threshold."""
    threshold = regress(summary, summary)["thresholds"]["per_dtype"][dtype]
    cand = copy.deepcopy(summary)
    rec = next(s for s in cand["output_samples"] if s["dtype"] == dtype and s["implementation"] == "merged")
    rec["values"][0] += factor * threshold
    return cand, f"output_samples[fixture={rec['fixture']},dtype={dtype},implementation=merged].values[0]"


@pytest.mark.parametrize("dtype", ["fp64", "fp32"])
def test_one_sample_just_beyond_its_threshold_is_flagged_and_just_within_is_not(runs, dtype):
    base = load_summary(runs["first"])
    beyond, name = _nudge(base, dtype, 1.5)
    moved = regress(base, beyond)["moved"]
    assert [m["name"] for m in moved] == [name], "only the nudged sample moved; its statistics stay within noise"
    within, _ = _nudge(base, dtype, 0.5)
    assert regress(base, within)["passed"]


def test_default_thresholds_are_the_documented_four_times_the_noise(runs, capsys, tmp_path):
    """README: defaults --rtol-scale 4, --atol 0. The noise is worked out here from the baseline (module docstring:
    max(fp32 base error, eps(fp32) x the oracle's largest |output|)); a sample moved by 10 x that noise (between 4x and
    40x) is flagged by default, one moved by 3 x is not."""
    assert (Thresholds().rtol_scale, Thresholds().atol) == (4.0, 0.0)
    base = load_summary(runs["first"])
    fp32_err = max(c["base_max_abs_err"] for c in base["checks"] if c["dtype"] == "fp32" and c["component"] == "model")
    scale = max(abs(s[k]) for s in base["output_stats"] if s["implementation"] == "oracle" for k in ("min", "max"))
    fp32_noise = max(fp32_err, EPS["fp32"] * scale)
    for factor, flagged in ((10.0, True), (3.0, False)):
        cand = copy.deepcopy(base)
        rec = next(s for s in cand["output_samples"] if s["dtype"] == "fp32" and s["implementation"] == "merged")
        rec["values"][0] += factor * fp32_noise
        assert (not regress(base, cand)["passed"]) == flagged, factor
        path = tmp_path / f"moved-{factor:g}.json"
        path.write_text(json.dumps(cand))
        code, out, _ = _regress_cli(capsys, runs["first"], path)
        assert code == int(flagged) and "rtol_scale 4 x noise" in out, "the command line has the same default"


def test_fp64_moved_as_far_as_another_machine_moves_it_is_not_flagged(runs):
    """Measured: the default report's fp64 outputs on an H200 host (its CPU, and cuda) differed from this machine's
    by up to 5.7e-7, about the fp32 error of the standard model (diffusers' RoPE is complex64 in an fp64 model)."""
    base = load_summary(runs["first"])
    fp32_err = max(c["base_max_abs_err"] for c in base["checks"] if c["dtype"] == "fp32" and c["component"] == "model")
    cand = copy.deepcopy(base)
    for rec in cand["output_samples"]:
        if rec["dtype"] == "fp64":
            rec["values"] = [v + (-1) ** i * 1.5 * fp32_err for i, v in enumerate(rec["values"])]
    for rec in cand["checks"]:
        rec["bit_identical"] = True  # gained on the other machine: a note, not a regression
    result = regress(base, cand)
    assert cand != base and result["passed"], result["moved"][:3]
    assert any("became true" in note for note in result["notes"]) or all(c["bit_identical"] for c in base["checks"])


def test_same_statistics_with_different_outputs_is_caught_by_the_samples(runs):
    base = load_summary(runs["first"])
    cand = copy.deepcopy(base)
    rec = next(s for s in cand["output_samples"] if s["dtype"] == "fp32" and s["implementation"] == "merged")
    rec["values"] = rec["values"][::-1]  # the same values elsewhere: mean, std, percentiles unchanged
    moved = regress(base, cand)["moved"]
    assert moved and all(m["name"].startswith("output_samples[") for m in moved)


@pytest.mark.parametrize("field, move", [("passed", lambda v: not v), ("bit_identical", lambda v: not v),
                                         ("fused_calls", lambda v: 0 if v else 1), ("nonfinite", lambda v: v + 3),
                                         ("max_abs_err", lambda v: v + 1e-3)])
def test_a_moved_check_metric_is_named(runs, field, move):
    """Each field moved away from whatever this machine's run recorded (bit_identical, for one, depends on the CPU)."""
    base = load_summary(runs["first"])
    cand = copy.deepcopy(base)
    check = next(c for c in cand["checks"] if c["dtype"] == "fp32")
    recorded = check[field]
    check[field] = move(recorded)
    assert check[field] != recorded
    moved = regress(base, cand)["moved"]
    assert [m["name"] for m in moved] == [f"checks[name={check['name']},dtype=fp32].{field}"]


def test_nan_count_and_a_missing_check_are_changes(runs):
    base = load_summary(runs["first"])
    cand = copy.deepcopy(base)
    cand["output_stats"][0]["nan"] = 1
    dropped = cand["checks"].pop()
    names = [m["name"] for m in regress(base, cand)["moved"]]
    assert names[0] == f"checks[name={dropped['name']},dtype={dropped['dtype']}]"
    assert any(n.endswith("].nan") for n in names)


def _with_lora(summary: dict) -> dict:
    """The summary with a LoRA section shaped as the report writes it (counts, scale, an fp32 multiplier sweep)."""
    stats = {s["implementation"]: s for s in summary["output_stats"]
             if s["fixture"] == "text-to-image" and s["dtype"] in ("fp64", "fp32")}
    sweep = [{"fixture": "text-to-image", "factor": f, "multiplier": 0.5 * f, "merged_vs_standard_max_abs": 0.0,
              **{f"{i}_{k}": stats[i][k] * (1 + f) for i in ("oracle", "standard", "merged") for k in ("mean", "std")},
              **{f"{i}_rel_dev": 0.1 * f for i in ("oracle", "standard", "merged")}} for f in (0.0, 1.0, 2.0)]
    return {**summary, "lora": {"format": "lightning", "layout": "standard", "modules_matched": 8, "tensors": 24,
                                "weights_changed": 8, "scale": {"value": 0.5, "min": 0.5, "max": 0.5}, "sweep": sweep}}


@pytest.mark.parametrize("change, name", [
    (lambda lora: lora.update(weights_changed=6), "lora.weights_changed"),
    (lambda lora: lora["scale"].update(value=1.0), "lora.scale.value"),
    (lambda lora: lora["sweep"][2].update(merged_mean=lora["sweep"][2]["merged_mean"] + 1e-4),
     "lora.sweep[fixture=text-to-image,factor=2.0].merged_mean"),
    (lambda lora: lora["sweep"][1].update(standard_rel_dev=lora["sweep"][1]["standard_rel_dev"] * 1.01),
     "lora.sweep[fixture=text-to-image,factor=1.0].standard_rel_dev"),
])
def test_a_moved_lora_count_scale_or_sweep_value_is_named(runs, change, name):
    base = _with_lora(load_summary(runs["first"]))
    assert regress(base, copy.deepcopy(base))["passed"]
    cand = copy.deepcopy(base)
    change(cand["lora"])
    moved = regress(base, cand)["moved"]
    assert [m["name"] for m in moved] == [name]
    assert resolve(cand, name) == moved[0]["candidate"]
    assert not regress(load_summary(runs["first"]), cand)["passed"], "a LoRA section in one run only is a change"


def test_thresholds_are_adjustable_by_flag(runs, capsys):
    code, out, _ = _regress_cli(capsys, runs["first"], runs["perturbed"], "--atol", "1")
    assert code == 0 and "atol 1" in out
    code, out, _ = _regress_cli(capsys, runs["first"], runs["second"], "--rtol-scale", "0")
    assert code == 0, "identical runs stay identical even with no allowance at all"


def _bad(kind: str, good: dict, tmp_path: Path) -> Path:
    path = tmp_path / "cand.json"
    cand = copy.deepcopy(good)
    if kind == "missing":
        return tmp_path / "nowhere.json"
    if kind == "invalid":
        path.write_text("{not json")
        return path
    if kind == "list":
        cand = [cand]
    elif kind == "no_stats":
        del cand["output_stats"]
    elif kind == "dtype_missing":
        cand["output_stats"] = [s for s in cand["output_stats"] if s["dtype"] != "fp32"]
    elif kind == "fixture_renamed":
        for s in cand["output_stats"] + cand["output_samples"]:
            s["fixture"] = s["fixture"].replace("edit", "inpaint")
    elif kind == "other_indices":
        cand["output_samples"][0]["indices"] = cand["output_samples"][0]["indices"][::-1]
    elif kind == "no_samples":
        del cand["output_samples"]
    elif kind == "other_size":
        cand["output_stats"][0]["numel"] += 1
    path.write_text(json.dumps(cand))
    return path


@pytest.mark.parametrize("kind", ["missing", "invalid", "list", "no_stats", "dtype_missing", "fixture_renamed",
                                  "other_indices", "no_samples", "other_size"])
def test_bad_input_exits_2_with_one_line(runs, capsys, tmp_path, kind):
    bad = _bad(kind, load_summary(runs["first"]), tmp_path)
    code, _, err = _regress_cli(capsys, runs["first"], bad, "--json", tmp_path / "r.json")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("qkv-verify: error:"), err
    assert not (tmp_path / "r.json").exists()
    code, _, _ = _regress_cli(capsys, bad, runs["first"])
    assert code == 2, "bad input as the baseline too"


def test_what_does_not_line_up_is_said(runs):
    good = load_summary(runs["first"])
    cand = copy.deepcopy(good)
    cand["output_stats"] = [s for s in cand["output_stats"] if s["dtype"] != "fp32"]
    with pytest.raises(VerifyError, match=r"dtypes.*only in baseline: \['fp32'\]"):
        regress(good, cand)


# --- the committed baseline of `qkv-verify report` with no arguments --------------------------------------------


def test_default_report_matches_the_committed_baseline(tmp_path, capsys, request):
    code = main(["report", "--out", str(tmp_path / "out")])
    assert code == 0
    obtained = json.loads((tmp_path / "out" / "summary.json").read_text())
    text = json.dumps(obtained, indent=2, allow_nan=False) + "\n"
    if request.config.getoption("force_regen") or not BASELINE.exists():
        existed = BASELINE.exists()
        BASELINE.parent.mkdir(parents=True, exist_ok=True)
        BASELINE.write_text(text)
        pytest.fail(f"{'regenerated' if existed else 'wrote the missing'} baseline {BASELINE}; review and commit it "
                    "(this run fails so that a baseline is never written silently)")
    result = regress(load_summary(BASELINE), obtained)
    if not result["passed"]:
        OBTAINED.write_text(text)
        pytest.fail(f"the default report moved against {BASELINE} (obtained run in {OBTAINED}; if the change is "
                    "intended, rerun with --force-regen):\n"
                    + format_result(result, str(BASELINE), "this run"))
    assert result["compared"] > 0 and result["thresholds"]["per_dtype"].keys() == {"fp64", "fp32", "bf16", "fp16"}
    OBTAINED.unlink(missing_ok=True)


# --- regress on a small summary made here: every moved item, count and text pinned (mutation testing) -------------


def _tiny() -> dict:
    """A minimal summary: one fp32 model check, oracle/standard/merged statistics and three merged samples. Its fp32
    noise is the check's base error, 1e-6 (the scale, 2, times fp32's eps is smaller): the threshold is 4e-6."""
    def stats(impl: str) -> dict:
        return {"fixture": "t2i", "dtype": "fp32", "implementation": impl, "numel": 4, "mean": 0.0, "std": 1.0,
                "min": -2.0, "max": 2.0, "nan": 0}

    check = {"name": "model/t2i/outputs", "dtype": "fp32", "component": "model", "passed": True,
             "bit_identical": True, "nonfinite": 0, "max_abs_err": 1e-6, "base_max_abs_err": 1e-6,
             "rel_l2_err": 1e-7, "cosine": 1.0}
    return {"verdict": "pass", "checks": [check], "output_stats": [stats(i) for i in ("oracle", "standard", "merged")],
            "output_samples": [{"fixture": "t2i", "dtype": "fp32", "implementation": "merged", "indices": [0, 5, 9],
                                "values": [0.5, -1.0, 1.5]}],
            "inputs": {"seed": 0}, "environment": {"torch": "2.13"}}


TINY_CHECK = "checks[name=model/t2i/outputs,dtype=fp32]"
TINY_THRESHOLD = 4e-6


def _moved(cand: dict, base: dict | None = None) -> list[dict]:
    return regress(base or _tiny(), cand)["moved"]


def test_tiny_summary_thresholds_and_count_of_compared_values():
    result = regress(_tiny(), _tiny())
    assert result["passed"] and result["moved"] == [] and result["notes"] == []
    assert result["thresholds"]["noise"] == {"fp32": pytest.approx(1e-6)}
    assert result["thresholds"]["per_dtype"] == {"fp32": pytest.approx(TINY_THRESHOLD)}
    assert result["thresholds"]["scale"] == 2.0
    assert result["compared"] == 7 + 3 + 3 * 6, "7 check fields, 3 samples, 6 fields of 3 statistics records"


def test_each_kind_of_moved_check_field_is_one_item_with_its_threshold_and_detail():
    cand = _tiny()
    cand["checks"][0].update(bit_identical=False, passed=False, max_abs_err=1e-6 + 2 * TINY_THRESHOLD,
                             rel_l2_err=1e-7 + TINY_THRESHOLD)  # relative fields: threshold / scale = 2e-6
    moved = {m["name"].rpartition(".")[2]: m for m in _moved(cand)}
    assert set(moved) == {"passed", "bit_identical", "max_abs_err", "rel_l2_err"}
    assert moved["bit_identical"] == {"name": f"{TINY_CHECK}.bit_identical", "baseline": True, "candidate": False,
                                      "delta": None, "threshold": 0, "detail": "bit-identity lost"}
    assert moved["passed"] == {"name": f"{TINY_CHECK}.passed", "baseline": True, "candidate": False,
                               "delta": None, "threshold": 0, "detail": "must be equal"}
    assert moved["max_abs_err"]["baseline"] == 1e-6 and moved["max_abs_err"]["detail"] == ""
    assert moved["max_abs_err"]["threshold"] == pytest.approx(TINY_THRESHOLD)
    assert moved["max_abs_err"]["delta"] == pytest.approx(2 * TINY_THRESHOLD)
    assert moved["rel_l2_err"]["threshold"] == pytest.approx(TINY_THRESHOLD / 2)
    within = _tiny()
    within["checks"][0].update(max_abs_err=1e-6 + 0.9 * TINY_THRESHOLD, rel_l2_err=1e-7 + 0.4 * TINY_THRESHOLD,
                               nonfinite=0)
    assert _moved(within) == []


def test_moved_samples_are_one_item_named_after_the_largest_change():
    cand = _tiny()
    cand["output_samples"][0]["values"] = [0.5, -1.0 + 100 * TINY_THRESHOLD, 1.5 + 2 * TINY_THRESHOLD]
    (item,) = _moved(cand)
    sel = "output_samples[fixture=t2i,dtype=fp32,implementation=merged]"
    assert item["name"] == f"{sel}.values[1]", "the largest |change| (not the largest |value|)"
    assert (item["baseline"], item["threshold"]) == (-1.0, pytest.approx(TINY_THRESHOLD))
    assert item["detail"] == "2 of 3 sampled values moved; worst at flat index 5"


def test_moved_statistics_counts_and_notes():
    cand = _tiny()
    cand["output_stats"][2].update(mean=2 * TINY_THRESHOLD, nan=1)
    cand["inputs"]["seed"] = 1
    cand["environment"]["torch"] = "x" * 59  # 61 characters as JSON: shortened
    cand["checks"].append({**cand["checks"][0], "name": "model/new/outputs"})
    result = regress(_tiny(), cand)
    by_field = {m["name"].rpartition(".")[2]: m for m in result["moved"]}
    assert set(by_field) == {"mean", "nan"}
    assert by_field["nan"]["detail"] == "must be equal" and by_field["nan"]["threshold"] == 0
    assert by_field["mean"]["threshold"] == pytest.approx(TINY_THRESHOLD)
    assert result["notes"] == [
        "inputs.seed differs: 0 (baseline) vs 1 (candidate)",
        f"environment.torch differs: \"2.13\" (baseline) vs \"{'x' * 56}... (candidate)",
        "1 check(s) only in the candidate, not compared (e.g. checks[name=model/new/outputs,dtype=fp32]); "
        "regenerate the baseline to cover them",
    ]
    cand["environment"]["torch"] = "x" * 58  # 60 characters: kept whole
    assert f"\"{'x' * 58}\" (candidate)" in regress(_tiny(), cand)["notes"][1]


def _tiny_lora() -> dict:
    sweep = [{"fixture": "t2i", "factor": f, "multiplier": 0.5 * f, "merged_mean": 0.1 * f, "merged_rel_dev": 0.01}
             for f in (1.0, 2.0)]
    return {**_tiny(), "lora": {"format": "lightning", "layout": "standard", "modules_matched": 8, "tensors": 24,
                                "weights_changed": 8, "scale": {"value": 0.5}, "sweep": sweep}}


def test_lora_section_counts_items_and_sweep_limits():
    assert regress(_tiny_lora(), _tiny_lora())["compared"] == 28 + 5 + 1 + 2 * 3, "5 counts, the scale, the sweep"
    cand = _tiny_lora()
    cand["lora"]["modules_matched"] = 7
    cand["lora"]["sweep"][1]["multiplier"] = 1.0 * (1 + 1e-13)  # within 1e-12 relative
    cand["lora"]["sweep"][1]["merged_mean"] = 0.2 + 0.9 * TINY_THRESHOLD  # within the fp32 threshold
    cand["lora"]["sweep"][0]["merged_rel_dev"] = 0.01 + 0.9 * TINY_THRESHOLD  # beyond threshold / scale
    moved = _moved(cand, _tiny_lora())
    assert [m["name"] for m in moved] == ["lora.modules_matched", "lora.sweep[fixture=t2i,factor=1.0].merged_rel_dev"]
    assert moved[0] == {"name": "lora.modules_matched", "baseline": 8, "candidate": 7, "delta": -1, "threshold": 0,
                        "detail": "must be equal"}
    assert moved[1]["baseline"] == 0.01 and moved[1]["threshold"] == pytest.approx(TINY_THRESHOLD / 2)
    cand = _tiny_lora()
    cand["lora"]["sweep"][1]["multiplier"] = 1.0 * (1 + 1e-11)
    (item,) = _moved(cand, _tiny_lora())
    assert item["name"].endswith("factor=2.0].multiplier") and item["threshold"] == pytest.approx(1e-12)
    assert _moved(_tiny_lora()) == [{"name": "lora", "baseline": None, "candidate": "present", "delta": None,
                                     "threshold": None, "detail": "LoRA section in one run only"}]


def test_format_result_lays_out_the_moved_items_as_a_table():
    cand = _tiny()
    cand["checks"][0]["passed"] = False
    text = format_result(regress(_tiny(), cand), "a.json", "b.json")
    lines = text.splitlines()
    assert lines[0] == "regress: 1 item(s) moved beyond the thresholds (28 values compared); baseline a.json, " \
                       "candidate b.json"
    assert lines[1] == "thresholds: rtol_scale 4 x noise(dtype) + atol 0: fp32 4e-06"
    assert lines[-3].split() == ["name", "baseline", "candidate", "delta", "threshold", "detail"]
    assert lines[-1].split() == [f"{TINY_CHECK}.passed", "True", "False", "null", "0", "must", "be", "equal"]
    assert format_result(regress(_tiny(), _tiny()), "a", "b").startswith("regress: nothing moved beyond")


def test_outputs_of_another_size_are_refused_with_both_sizes():
    cand = _tiny()
    cand["output_stats"][2]["numel"] = 5
    with pytest.raises(VerifyError) as caught:
        regress(_tiny(), cand)
    assert str(caught.value) == ("the runs do not line up: output_stats[fixture=t2i,dtype=fp32,implementation=merged]"
                                 ".numel is 4 in the baseline, 5 in the candidate")
