"""Regression checks: two summary.json files (a stored baseline, a new run) -> what moved beyond the dtype's noise.

Thresholds come from the numerical noise of each dtype, measured in the baseline itself:

    noise(d)     = max( max base_max_abs_err of d's model checks       (standard vs the fp64 oracle, in d),
                        max base_max_abs_err of fp32 * eps'(d)/eps(fp32) (that error scaled to d's precision),
                        eps'(d) * scale )                               (one rounding at the oracle's largest |value|)
    threshold(d) = rtol_scale * noise(d) + atol

eps'(d) is the precision d actually reaches: eps(d), except fp64, which reaches only fp32's, because diffusers
computes RoPE in complex64 even in an fp64 model. (Measured: the fp64 outputs of the default report on another
machine's CPU, and on an H200, differed from this machine's by 5.7e-7, as much as fp32 rounding moves them.)
An output value in d that moved by more than threshold(d) moved beyond what rounding (another BLAS, CPU, thread
count, summation order) does to it. The same threshold applies to mean, std, min, max and percentiles: each moves
by at most the largest element-wise change. Output samples are compared element by element; check metrics in
absolute terms (errors) or relative to the scale (rel_l2_err, cosine); counts and verdicts must be equal, and
bit-identity must not be lost (gaining it, as fp64 does on some machines, is a note).
Environment fields (versions, platform) are never compared; differing inputs are listed as notes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from verify.checks.selector import path_of
from verify.checks.tolerance import DTYPES
from verify.errors import VerifyError
from verify.files.json_file import read_json

EPS = {name: torch.finfo(dtype).eps for name, dtype in DTYPES.items()}
# The precision each dtype's outputs reach: an fp64 model's RoPE still runs in complex64 (diffusers' x.float()).
REACHED_EPS = {**EPS, "fp64": EPS["fp32"]}
STAT_KEY = ("fixture", "dtype", "implementation")
CHECK_KEY = ("name", "dtype")
CHECK_EXACT = ("passed", "bit_identical", "nonfinite", "fused_calls", "mismatched", "numel")
CHECK_ABSOLUTE = ("max_abs_err", "base_max_abs_err")  # errors in output units
CHECK_RELATIVE = ("rel_l2_err", "cosine")  # dimensionless: threshold / scale
# Not compared: ratio, tolerance, mismatched_fraction (derived from the metrics above), worst_index and message
# (which element is worst changes with rounding noise).
LORA_EXACT = ("modules_matched", "tensors", "weights_changed", "format", "layout")


@dataclass(frozen=True)
class Thresholds:
    """How far a value may move: rtol_scale times the dtype's noise, plus atol (both shown in the output)."""

    rtol_scale: float = 4.0
    atol: float = 0.0


def summary_file(path: Path) -> Path:
    """The summary.json that `path` names: itself, or the one a report folder holds."""
    path = Path(path)
    return path / "summary.json" if path.is_dir() else path


def load_summary(path: Path) -> dict:
    """A summary.json (or a report folder holding one), validated as a summary; VerifyError says what is wrong."""
    path = summary_file(path)
    data = read_json(path)
    problem = _summary_problem(data)
    if problem:
        raise VerifyError(f"{path}: not a qkv-verify summary: {problem}")
    return data


def _summary_problem(data) -> str | None:
    if not isinstance(data, dict):
        return f"top level is a {type(data).__name__}, not an object"
    missing = [k for k in ("verdict", "checks", "output_stats", "inputs") if k not in data]
    if missing:
        return f"missing {', '.join(missing)}"
    if not isinstance(data["checks"], list) or not isinstance(data["output_stats"], list):
        return "checks and output_stats must be lists"
    if not data["output_stats"] and not data["checks"]:
        return "checks and output_stats are both empty: nothing to compare"
    for section, key in (("checks", CHECK_KEY), ("output_stats", STAT_KEY), ("output_samples", STAT_KEY)):
        for i, rec in enumerate(data.get(section) or []):
            if not isinstance(rec, dict) or any(k not in rec for k in key):
                return f"{section}[{i}] lacks {', '.join(key)}"
    return None


def noise(summary: dict) -> dict[str, float]:
    """The numerical noise of each dtype of `summary`'s outputs (see the module docstring)."""
    scale = _scale(summary)
    base: dict[str, float] = {}
    model = [c for c in summary["checks"] if c.get("component") == "model"]  # the outputs that stats and samples hold
    for c in model or summary["checks"]:
        if c.get("base_max_abs_err") is not None and c["dtype"] in EPS:
            base[c["dtype"]] = max(base.get(c["dtype"], 0.0), c["base_max_abs_err"])
    dtypes = {s["dtype"] for s in summary["output_stats"]} | {c["dtype"] for c in summary["checks"]}
    return {d: max(base.get(d, 0.0), base.get("fp32", 0.0) * REACHED_EPS[d] / EPS["fp32"], REACHED_EPS[d] * scale)
            for d in DTYPES if d in dtypes}


def _scale(summary: dict) -> float:
    """The oracle's largest |output| (of any implementation when no oracle is recorded); 1 when unknown."""
    oracle = [s for s in summary["output_stats"] if s["implementation"] == "oracle"] or summary["output_stats"]
    return max((abs(s[k]) for s in oracle for k in ("min", "max") if s.get(k) is not None), default=1.0) or 1.0


def regress(baseline: dict, candidate: dict, thresholds: Thresholds | dict | None = None) -> dict:
    """Compare `candidate` with `baseline`: {moved, compared, thresholds, passed, notes}; VerifyError if they don't
    line up (other fixtures, dtypes, output sizes or sample indices)."""
    t = Thresholds(**thresholds) if isinstance(thresholds, dict) else thresholds or Thresholds()
    baseline, candidate = _as_json(baseline), _as_json(candidate)  # an in-memory summary holds tuples, not lists
    for name, summary in (("baseline", baseline), ("candidate", candidate)):
        problem = _summary_problem(summary)
        if problem:
            raise VerifyError(f"{name}: not a qkv-verify summary: {problem}")
    _line_up(baseline, candidate)
    per_dtype = {d: t.rtol_scale * n + t.atol for d, n in noise(baseline).items()}
    scale = _scale(baseline)
    moved: list[dict] = []
    compared = _checks(baseline, candidate, per_dtype, scale, moved)
    compared += _samples(baseline, candidate, per_dtype, moved)
    compared += _stats(baseline, candidate, per_dtype, moved)
    compared += _lora(baseline.get("lora"), candidate.get("lora"), per_dtype, scale, moved)
    notes = _context(baseline, candidate)
    b, c = _keyed(baseline["checks"], CHECK_KEY), _keyed(candidate["checks"], CHECK_KEY)
    new = sorted(set(c) - set(b), key=str)
    if new:
        notes.append(f"{len(new)} check(s) only in the candidate, not compared (e.g. "
                     f"{path_of('checks', dict(zip(CHECK_KEY, new[0])))}); regenerate the baseline to cover them")
    notes += [f"{path_of('checks', dict(zip(CHECK_KEY, k)), 'bit_identical')} became true (not a regression)"
              for k in sorted(set(b) & set(c), key=str) if b[k].get("bit_identical") is False
              and c[k].get("bit_identical") is True]
    if not baseline.get("output_samples"):
        notes.append("no output_samples in these summaries: only statistics and check metrics compared, which can "
                     "miss outputs that changed while their statistics did not")
    return {
        "passed": not moved, "compared": compared, "moved": moved,
        "thresholds": {**asdict(t), "noise": noise(baseline), "per_dtype": per_dtype, "scale": scale,
                       "rule": "threshold(d) = rtol_scale * noise(d) + atol; noise(d) = max(base error in d, "
                               "fp32 base error * eps(d)/eps(fp32), eps(d) * scale), where fp64 counts with fp32's "
                               "eps (diffusers' RoPE runs in complex64)"},
        "notes": notes,
    }


def _as_json(data):
    try:
        return json.loads(json.dumps(data))
    except (TypeError, ValueError):
        return data  # not JSON-ready: _summary_problem or the comparison will say what is wrong


def _keyed(records: list[dict], key: tuple[str, ...]) -> dict[tuple, dict]:
    return {tuple(r[k] for k in key): r for r in records}


def _line_up(baseline: dict, candidate: dict) -> None:
    """Both runs must cover the same fixtures and dtypes with outputs of the same size; else say what differs."""
    b, c = _keyed(baseline["output_stats"], STAT_KEY), _keyed(candidate["output_stats"], STAT_KEY)
    for field in ("fixture", "dtype"):
        bs, cs = {k[STAT_KEY.index(field)] for k in b}, {k[STAT_KEY.index(field)] for k in c}
        if bs != cs:
            raise VerifyError(f"the runs do not line up: {field}s {sorted(bs)} in the baseline, {sorted(cs)} in the "
                              f"candidate (only in baseline: {sorted(bs - cs)}; only in candidate: {sorted(cs - bs)})")
    if set(b) != set(c):
        raise VerifyError(f"the runs do not line up: output_stats only in baseline {sorted(set(b) - set(c))}, "
                          f"only in candidate {sorted(set(c) - set(b))}")
    for k, rec in b.items():
        if rec.get("numel") != c[k].get("numel"):
            raise VerifyError(f"the runs do not line up: {path_of('output_stats', dict(zip(STAT_KEY, k)), 'numel')} "
                              f"is {rec.get('numel')} in the baseline, {c[k].get('numel')} in the candidate")
    bs, cs = baseline.get("output_samples"), candidate.get("output_samples")
    if bool(bs) != bool(cs):
        which = "baseline" if not bs else "candidate"
        raise VerifyError(f"the runs do not line up: the {which} has no output_samples (written by an older "
                          "qkv-verify?); regenerate it so outputs can be compared element-wise")
    bk, ck = _keyed(bs or [], STAT_KEY), _keyed(cs or [], STAT_KEY)
    if set(bk) != set(ck):
        raise VerifyError(f"the runs do not line up: output_samples only in baseline {sorted(set(bk) - set(ck))}, "
                          f"only in candidate {sorted(set(ck) - set(bk))}")
    for k, rec in bk.items():
        if rec.get("indices") != ck[k].get("indices") or len(rec.get("values") or []) != len(rec.get("indices") or []):
            raise VerifyError(f"the runs do not line up: {path_of('output_samples', dict(zip(STAT_KEY, k)))} has "
                              "other sample indices (or values of another length) in the two runs")


def _item(name: str, base, cand, threshold: float | None, detail: str = "") -> dict:
    delta = cand - base if _number(base) and _number(cand) else None
    return {"name": name, "baseline": base, "candidate": cand, "delta": delta, "threshold": threshold,
            "detail": detail}


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _beyond(base, cand, threshold: float) -> bool:
    """Moved: one side null, a non-finite difference, or |cand - base| > threshold."""
    if base is None or cand is None:
        return base is not cand
    delta = abs(cand - base)
    return not math.isfinite(delta) or delta > threshold


def _checks(baseline: dict, candidate: dict, per_dtype: dict, scale: float, moved: list) -> int:
    b, c = _keyed(baseline["checks"], CHECK_KEY), _keyed(candidate["checks"], CHECK_KEY)
    compared = 0
    for k in sorted(set(b) | set(c), key=str):
        sel = dict(zip(CHECK_KEY, k))
        if k not in b:
            continue  # a new check: nothing to compare it with (listed in the notes)
        if k not in c:
            moved.append(_item(path_of("checks", sel), "present", "absent", None, "check absent from the candidate"))
            compared += 1
            continue
        threshold = per_dtype.get(k[1], max(per_dtype.values()))
        for field in CHECK_EXACT + CHECK_ABSOLUTE + CHECK_RELATIVE:
            if field not in b[k] and field not in c[k]:
                continue
            bv, cv = b[k].get(field), c[k].get(field)
            compared += 1
            if field == "bit_identical":
                if bv is True and cv is not True:
                    moved.append(_item(path_of("checks", sel, field), bv, cv, 0, "bit-identity lost"))
            elif field in CHECK_EXACT:
                if bv != cv:
                    moved.append(_item(path_of("checks", sel, field), bv, cv, 0, "must be equal"))
            else:
                limit = threshold if field in CHECK_ABSOLUTE else threshold / scale
                if _beyond(bv, cv, limit):
                    moved.append(_item(path_of("checks", sel, field), bv, cv, limit))
    return compared


def _stats(baseline: dict, candidate: dict, per_dtype: dict, moved: list) -> int:
    b, c = _keyed(baseline["output_stats"], STAT_KEY), _keyed(candidate["output_stats"], STAT_KEY)
    compared = 0
    for k in sorted(b):
        sel = dict(zip(STAT_KEY, k))
        threshold = per_dtype[k[1]]
        for field in sorted((set(b[k]) | set(c[k])) - set(STAT_KEY)):
            bv, cv = b[k].get(field), c[k].get(field)
            compared += 1
            if isinstance(bv, int) and isinstance(cv, int) or not (_number(bv) or _number(cv)):
                if bv != cv:  # counts (nan, inf, numel) and non-numbers must be equal
                    moved.append(_item(path_of("output_stats", sel, field), bv, cv, 0, "must be equal"))
            elif _beyond(bv, cv, threshold):
                moved.append(_item(path_of("output_stats", sel, field), bv, cv, threshold))
    return compared


def _samples(baseline: dict, candidate: dict, per_dtype: dict, moved: list) -> int:
    b = _keyed(baseline.get("output_samples") or [], STAT_KEY)
    c = _keyed(candidate.get("output_samples") or [], STAT_KEY)
    compared = 0
    for k in sorted(b):
        threshold = per_dtype[k[1]]
        bv, cv, idx = b[k]["values"], c[k]["values"], b[k]["indices"]
        beyond = [i for i, (x, y) in enumerate(zip(bv, cv)) if _beyond(x, y, threshold)]
        compared += len(bv)
        if beyond:
            worst = max(beyond, key=lambda i: math.inf if bv[i] is None or cv[i] is None else abs(cv[i] - bv[i]))
            name = path_of("output_samples", dict(zip(STAT_KEY, k)), f"values[{worst}]")
            moved.append(_item(name, bv[worst], cv[worst], threshold,
                               f"{len(beyond)} of {len(bv)} sampled values moved; worst at flat index {idx[worst]}"))
    return compared


def _lora(b: dict | None, c: dict | None, per_dtype: dict, scale: float, moved: list) -> int:
    """LoRA counts and scale must be equal, the multiplier sweep (fp32) stay within noise; a LoRA section on one
    side only is a change."""
    if b is None and c is None:
        return 0
    if b is None or c is None:
        moved.append(_item("lora", "present" if b else None, "present" if c else None, None,
                           "LoRA section in one run only"))
        return 1
    compared = 0
    for field in LORA_EXACT:
        if field in b or field in c:
            compared += 1
            if b.get(field) != c.get(field):
                moved.append(_item(f"lora.{field}", b.get(field), c.get(field), 0, "must be equal"))
    bs, cs = (b.get("scale") or {}).get("value"), (c.get("scale") or {}).get("value")
    compared += 1
    if bs != cs and not (_number(bs) and _number(cs) and math.isclose(bs, cs, rel_tol=1e-12)):
        moved.append(_item("lora.scale.value", bs, cs, 0, "must be equal"))
    return compared + _sweep(b.get("sweep") or [], c.get("sweep") or [], per_dtype.get("fp32", 0.0), scale, moved)


def _sweep(b: list[dict], c: list[dict], threshold: float, scale: float, moved: list) -> int:
    """The multiplier sweep runs in fp32: means, stds and max differences within the fp32 threshold, relative
    deviations within threshold / scale."""
    key = ("fixture", "factor")
    bk, ck = _keyed(b, key), _keyed(c, key)
    if set(bk) != set(ck):
        moved.append(_item("lora.sweep", sorted(bk, key=str), sorted(ck, key=str), None,
                           "the sweeps ran other fixtures or factors"))
        return 1
    compared = 0
    for k in sorted(bk, key=str):
        for field in sorted((set(bk[k]) | set(ck[k])) - set(key)):
            bv, cv = bk[k].get(field), ck[k].get(field)
            limit = 1e-12 * abs(bv or 0) if field == "multiplier" else (
                threshold / scale if field.endswith("_rel_dev") else threshold)
            compared += 1
            numeric = _number(bv) or _number(cv)
            if _beyond(bv, cv, limit) if numeric else bv != cv:
                moved.append(_item(path_of("lora.sweep", dict(zip(key, k)), field), bv, cv, limit))
    return compared


def _context(baseline: dict, candidate: dict) -> list[str]:
    """What differs between the runs' inputs and environments (never a verdict, always worth saying)."""
    notes = []
    for section in ("inputs", "environment"):
        b, c = baseline.get(section) or {}, candidate.get(section) or {}
        for k in sorted(set(b) | set(c)):
            if b.get(k) != c.get(k):
                notes.append(f"{section}.{k} differs: {_short(b.get(k))} (baseline) vs {_short(c.get(k))} (candidate)")
    return notes


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _fmt(x) -> str:
    if _number(x):
        return f"{x:.6g}" if isinstance(x, float) else str(x)
    return "null" if x is None else str(x)


def format_result(result: dict, baseline: str, candidate: str) -> str:
    """The console text: verdict, thresholds, then one row per moved item."""
    t = result["thresholds"]
    n = len(result["moved"])
    lines = [f"regress: {'nothing moved' if not n else f'{n} item(s) moved'} beyond the thresholds "
             f"({result['compared']} values compared); baseline {baseline}, candidate {candidate}",
             f"thresholds: rtol_scale {t['rtol_scale']:g} x noise(dtype) + atol {t['atol']:g}: "
             + ", ".join(f"{d} {v:.3g}" for d, v in t["per_dtype"].items()),
             f"  {t['rule']}; scale {t['scale']:.6g}"]
    lines += [f"note: {note}" for note in result["notes"]]
    if n:
        rows = [(m["name"], _fmt(m["baseline"]), _fmt(m["candidate"]), _fmt(m["delta"]), _fmt(m["threshold"]),
                 m["detail"]) for m in result["moved"]]
        header = ("name", "baseline", "candidate", "delta", "threshold", "detail")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, tuple("-" * w for w in widths), *rows]:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return "\n".join(lines)
