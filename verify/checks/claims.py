"""The claims ledger: each claim of the write-up (and each claim of a user's file) with a verdict measured in a run.

Verdicts: "confirmed", "refuted", or "not measurable in this run", each with the number it rests on. Built-in
write-up claims never change the report's exit status (they are facts about the write-up); a refuted user claim
does (see `refuted_user_claims`).

A user's claims file (JSON, or YAML) is a list of claims, or {"claims": [...]}; each claim:

    id: edit-fp32-error                       # required, unique
    text: edit output within 1e-5 in fp32     # optional (default: the metric, op and expected value)
    metric: checks[name=model/edit/outputs,dtype=fp32].max_abs_err    # a path into summary.json (checks.selector),
                                              # or len(PATH): the length of a list (lora.unmatched_keys)
    op: "<"                                   # <, <=, ==, >=, >, !=, approx
    expected: 1.0e-5
    rel: 1.0e-6                               # approx only: |measured - expected| <= max(rel * |expected|, abs)
    abs: 0                                    # approx only (defaults: rel 1e-6, abs 0, as pytest.approx)
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable
from pathlib import Path

from verify.checks.regress import Thresholds, noise
from verify.checks.selector import Absent, SelectError, parse, resolve
from verify.checks.summary_schema import check_path
from verify.errors import VerifyError

CONFIRMED, REFUTED, UNMEASURED = "confirmed", "refuted", "not measurable in this run"
OPS: dict[str, Callable] = {"<": operator.lt, "<=": operator.le, "==": operator.eq, ">=": operator.ge,
                            ">": operator.gt, "!=": operator.ne}
CLAIM_KEYS = {"id", "text", "metric", "op", "expected", "rel", "abs"}
STAT_FIELDS = ("mean", "std", "min", "max", "p1", "p5", "p50", "p95", "p99", "nan", "inf")

# Tests of the property suite (properties/) whose results back a claim when a results JSON is given.
PROPERTY_TESTS = {
    "merge-split-exact": ("test_qkv.py::test_split_inverts_merge", "test_qkv.py::test_merge_inverts_split"),
    "attention-block": ("test_equivalence.py::test_fused_attention_equals_standard",
                              "test_equivalence.py::test_fused_block_equals_standard"),
    "lossless-conversion": ("test_state_dict.py::test_state_dict_round_trip_is_byte_exact",
                            "test_qkv.py::test_layout_conversion_is_a_permutation"),
}


def row(id_: str, claim: str, verdict: str, measured, expected, detail: str, source: str = "write-up") -> dict:
    return {"id": id_, "claim": claim, "verdict": verdict, "measured": measured, "expected": expected,
            "detail": detail, "source": source}


def ledger(summary: dict, claims_file: Path | None, bench: dict | None, properties: dict | None = None) -> list[dict]:
    """The write-up's claims, then the user's (from `claims_file`), each judged on `summary` (and on `bench`, a
    benchmark JSON, and `properties`, a property-suite results JSON, when given)."""
    user = load_claims(claims_file) if claims_file else []
    rows = [
        merge_split(summary, properties), attention_block(summary, properties),
        attention_block_tolerance(summary, properties), lossless(summary, properties),
        base_output(summary), lora_tensors(summary), alpha(summary), *speed(bench),
    ]
    subjects = measured_on(summary, bench, properties)
    for r in rows:
        r["measured_on"] = subjects[r["id"]]
    return rows + [judge(c, summary) | {"measured_on": "this run's summary.json"} for c in user]


def measured_on(summary: dict, bench: dict | None, properties: dict | None) -> dict[str, str]:
    """What each write-up row was measured on: whose weights, which implementation, which LoRA file or bench, so a
    row about seeded weights and the tool's own processor is never read as a verdict on the user's files."""
    inputs = summary.get("inputs") or {}
    cand = (summary.get("candidate") or {}).get("spec", "the merged model")
    if inputs.get("merged_checkpoint"):
        weights = f"your merged weights {inputs['merged_checkpoint']} against {inputs.get('checkpoint')}"
    elif inputs.get("checkpoint"):
        weights = f"the checkpoint {inputs['checkpoint']} (merged here)"
    else:
        weights = f"seeded {inputs.get('config')} weights (seed {inputs.get('seed')}; not your files)"
    suite = f"; property-suite results of {properties.get('card', 'a run')}" if properties else ""
    components = (f"the registry's seeded attention and block cases at the model's width, candidate {cand}"
                  f"{suite}")
    lora = (summary.get("lora") or {}).get("file") or "no LoRA"
    if isinstance(bench, dict):
        processor = (bench.get("config") or {}).get("processor", "as recorded")
        where = f"bench rows on {bench.get('device', 'an unnamed device')}, processor {processor}"
    else:
        where = "bench rows given" if bench else "no bench"
    return {"merge-split-exact": f"weight round trips of {weights}{suite}",
            "lossless-conversion": f"weight round trips of {weights}{suite}",
            "attention-block-match": components, "attention-block-within-tolerance": components,
            "base-output-same": f"the full model over the fixtures, {weights}, candidate {cand}",
            "lora-480-tensors": f"LoRA: {lora}", "alpha-1": f"LoRA: {lora}",
            "faster-10-15pct": where, "kernels-67pct-fewer": where}


def refuted_user_claims(rows: list[dict]) -> list[dict]:
    """The user claims that failed: the report exits 1 if there is any (write-up claims never change the exit)."""
    return [r for r in rows if r["source"] == "user" and r["verdict"] == REFUTED]


# --- the write-up's claims -------------------------------------------------------------------------------------


def _checks(summary: dict, test: Callable[[dict], bool]) -> list[dict]:
    return [c for c in summary.get("checks", []) if test(c)]


def _properties(properties: dict | None, key: str) -> tuple[list[dict], list[dict]]:
    """(passed, failed) property-suite tests backing claim `key`."""
    tests = [t for t in (properties or {}).get("tests", [])
             if any(name in t.get("test", "") for name in PROPERTY_TESTS[key])]
    return [t for t in tests if t["outcome"] == "passed"], [t for t in tests if t["outcome"] == "failed"]


def _exact_claim(id_: str, claim: str, checks: list[dict], properties: dict | None, what: str) -> dict:
    passed, failed = _properties(properties, id_)
    bad = [c for c in checks if not (c["passed"] and c.get("bit_identical"))]
    if not checks and not passed and not failed:
        return row(id_, claim, UNMEASURED, None, 0.0, f"no {what} check in this run and no property-suite results "
                   f"(run with --merged-checkpoint, or pass the results JSON of {', '.join(PROPERTY_TESTS[id_])})")
    errs = [c["max_abs_err"] for c in checks if c.get("max_abs_err") is not None]
    measured = max(errs) if errs else (0.0 if passed and not failed else None)
    parts = [f"{len(checks) - len(bad)} of {len(checks)} {what} checks bit-identical"] if checks else []
    if bad:
        parts.append("first failure: " + bad[0]["name"] + ": " + bad[0]["message"])
    if passed or failed:
        parts.append(f"property suite: {len(passed)} passed, {len(failed)} failed "
                     f"({sum(t.get('examples') or 0 for t in passed + failed)} examples)")
    verdict = REFUTED if bad or failed or (measured or 0.0) != 0.0 else CONFIRMED
    return row(id_, claim, verdict, measured, 0.0, "; ".join(parts))


def merge_split(summary: dict, properties: dict | None = None) -> dict:
    weights = _checks(summary, lambda c: c.get("component") == "weights" or c["name"].startswith("weights/"))
    return _exact_claim("merge-split-exact", "merge/split difference 0.00", weights, properties, "weight")


def lossless(summary: dict, properties: dict | None = None) -> dict:
    trips = _checks(summary, lambda c: "round-trip" in c["name"] or "roundtrip" in c["name"])
    return _exact_claim("lossless-conversion", "lossless bidirectional weight conversion", trips, properties,
                        "round-trip")


def _attention_block_checks(summary: dict) -> list[dict]:
    return _checks(summary, lambda c: c.get("component") in ("attention", "block")
                   or c["name"].split("/")[0] in ("attention", "block"))


def _worst_ratio(checks: list[dict]) -> dict | None:
    """The check with the largest error ratio merged/standard (None when no check has one)."""
    return max((c for c in checks if c.get("ratio") is not None), key=lambda c: c["ratio"], default=None)


def _check_counts(checks: list[dict]) -> str:
    """'P of N checks passed, I bit-identical; worst error ratio merged/standard R (name dtype)'."""
    passed, identical = sum(bool(c["passed"]) for c in checks), sum(bool(c.get("bit_identical")) for c in checks)
    text = f"{passed} of {len(checks)} checks passed, {identical} bit-identical"
    worst = _worst_ratio(checks)
    return text + (f"; worst error ratio merged/standard {worst['ratio']:.3g} ({worst['name']} {worst['dtype']})"
                   if worst else "")


def attention_block(summary: dict, properties: dict | None = None) -> dict:
    """'Perfect match', taken literally: confirmed only when every attention and block check is bit-identical
    (merged equals standard bit for bit); the property suite judges within tolerance, so it can only refute."""
    id_, claim = "attention-block-match", "attention and block: perfect match"
    checks = _attention_block_checks(summary)
    _, failed = _properties(properties, "attention-block")
    suite = f"property suite: {len(failed)} failed (it judges within tolerance, so a failure refutes a perfect match)"
    if not checks:
        detail = "no attention or block check in this run to show bit-identity (the report runs the full model)"
        return row(id_, claim, REFUTED if failed else UNMEASURED, None, "bit-identical", detail
                   + ("; " + suite if failed else ""))
    identical = sum(bool(c.get("bit_identical")) for c in checks)
    parts = [_check_counts(checks), "measured = how many checks are bit-identical, expected = all of them"]
    if failed:
        parts.append(suite)
    perfect = all(c["passed"] and c.get("bit_identical") for c in checks) and not failed
    return row(id_, claim, CONFIRMED if perfect else REFUTED, identical, len(checks), "; ".join(parts))


def attention_block_tolerance(summary: dict, properties: dict | None = None) -> dict:
    """Within tolerance: every attention and block check passes its rule (and every backing property test)."""
    id_, claim = "attention-block-within-tolerance", "attention and block: within tolerance"
    checks = _attention_block_checks(summary)
    passed, failed = _properties(properties, "attention-block")
    if not checks and not passed and not failed:
        return row(id_, claim, UNMEASURED, None, "within tolerance", "the report runs the full model; no attention "
                   "or block check here and no property-suite results (test_fused_attention/block_equals_standard)")
    bad = [c for c in checks if not c["passed"]]
    parts = [_check_counts(checks)] if checks else []
    if bad:
        parts.append("first failure: " + bad[0]["name"] + f" [{bad[0]['dtype']}]: " + bad[0]["message"])
    if passed or failed:
        parts.append(f"property suite: {len(passed)} passed, {len(failed)} failed")
    worst = _worst_ratio(checks)
    if worst:
        parts.append("measured = worst error ratio merged/standard")
    return row(id_, claim, REFUTED if bad or failed else CONFIRMED, worst["ratio"] if worst else None,
               "within tolerance", "; ".join(parts))


def base_output(summary: dict) -> dict:
    """Same output: judged on every output element (checks), the full statistics and the samples, never the mean."""
    id_, claim = "base-output-same", "base model: same output (mean 203.98)"
    checks = _checks(summary, lambda c: c.get("component") == "model" and c["name"].startswith("model/"))
    if not checks:
        return row(id_, claim, UNMEASURED, None, "same output", "no model output check in this run")
    threshold = {d: Thresholds().rtol_scale * n for d, n in noise(summary).items()}
    stats = _pairs(summary.get("output_stats", []))
    samples = _pairs(summary.get("output_samples") or [])
    mean_gap = max((abs(m["mean"] - s["mean"]) for s, m in stats.values() if _both(s, m, "mean")), default=None)
    stat_moves = [f"{k[0]} {k[1]} {f} {s[f]:.6g} vs {m[f]:.6g}" for k, (s, m) in stats.items() for f in STAT_FIELDS
                  if _both(s, m, f) and abs(m[f] - s[f]) > threshold[k[1]]]
    sample_moves = [f"{k[0]} {k[1]} at flat index {s['indices'][i]}: {_g(a)} vs {_g(b)}"
                    for k, (s, m) in samples.items() for i, (a, b) in enumerate(zip(s["values"], m["values"]))
                    if a is None or b is None or abs(b - a) > threshold[k[1]]]
    bad = [c for c in checks if not c["passed"]]
    means = [f"{k[0]} {k[1]}: {m['mean']:.6g}" for k, (_, m) in stats.items() if k[1] == "fp32" and _both(m, m, "mean")]
    parts = [f"merged mean in this run {'; '.join(means) or 'n/a'} (203.98 was the write-up's real-model mean, not "
             f"comparable here); largest merged-vs-standard mean gap {_g(mean_gap)}",
             f"{len(checks) - len(bad)} of {len(checks)} element-wise output checks passed"]
    if bad:
        parts.append(f"first failure: {bad[0]['name']} [{bad[0]['dtype']}]: {bad[0]['message']}")
    if stat_moves:
        parts.append(f"{len(stat_moves)} statistics differ beyond dtype noise, e.g. {stat_moves[0]}")
    if sample_moves:
        parts.append(f"{len(sample_moves)} sampled values differ beyond dtype noise, e.g. {sample_moves[0]}")
    means_agree = all(abs(m["mean"] - s["mean"]) <= threshold[k[1]]
                      for k, (s, m) in stats.items() if _both(s, m, "mean"))
    if (bad or stat_moves or sample_moves) and mean_gap is not None and means_agree:
        parts.append("the means agree, yet the outputs differ: a mean alone cannot show two outputs are the same")
    elif not (bad or stat_moves or sample_moves):
        parts.append("judged element by element, never by the mean (outputs with equal means can differ)")
    gaps = [abs(b - a) for s, m in samples.values() for a, b in zip(s["values"], m["values"])
            if a is not None and b is not None]
    if gaps:
        same = sum(s["values"] == m["values"] for s, m in samples.values())
        parts.append(f"sampled outputs bit-identical in {same} of {len(samples)} fixture/dtype pairs; measured = "
                     "largest |merged - standard| over the sampled values")
        measured = max(gaps)
    else:
        measured = max((c["max_abs_err"] for c in checks if c.get("max_abs_err") is not None), default=None)
        parts.append("measured = largest |merged - oracle| over the output checks (no samples in this run)")
    verdict = REFUTED if bad or stat_moves or sample_moves else CONFIRMED
    return row(id_, claim, verdict, measured, "same output (every element within tolerance)", "; ".join(parts))


def _pairs(records: list[dict]) -> dict[tuple, tuple[dict, dict]]:
    """(fixture, dtype) -> (standard, merged) records."""
    by = {(r["fixture"], r["dtype"], r["implementation"]): r for r in records}
    return {(f, d): (s, by[(f, d, "merged")]) for (f, d, i), s in by.items()
            if i == "standard" and (f, d, "merged") in by}


def _both(a: dict, b: dict, field: str) -> bool:
    return isinstance(a.get(field), (int, float)) and isinstance(b.get(field), (int, float))


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def lora_tensors(summary: dict) -> dict:
    """480 weights updated on the 60-block model = 8 per block; judged per block on this run's model."""
    id_, claim = "lora-480-tensors", "LoRA loading: 480 tensors updated"
    blocks = ((summary.get("inputs") or {}).get("model_config") or {}).get("num_layers") or 60
    expected = 480 // 60 * blocks
    lora = summary.get("lora")
    if not lora:
        return row(id_, claim, UNMEASURED, None, expected, "no LoRA in this run (report --lora FILE)")
    changed, tensors = lora.get("weights_changed"), lora.get("tensors")
    unmatched = lora.get("unmatched_keys")
    n_unmatched = len(unmatched) if isinstance(unmatched, (list, dict)) else unmatched
    detail = (f"weight matrices changed: {changed}; LoRA file tensors: {tensors}; modules matched: "
              f"{lora.get('modules_matched')}; unmatched keys: {n_unmatched}; expected {expected} = 480 / 60 blocks x "
              f"{blocks} blocks. DiffSynth's 'N tensors are fused' counts weight matrices changed: 480 means 8 per "
              "block, while the write-up's merged list (to_qkv, add_qkv_proj, to_out.0, to_add_out) changes 4 per "
              "block (240 on 60 blocks) from 480 A/B tensors")
    if changed is None:
        return row(id_, claim, UNMEASURED, None, expected, "the LoRA section records no weights_changed; " + detail)
    return row(id_, claim, CONFIRMED if changed == expected else REFUTED, changed, expected, detail)


def alpha(summary: dict) -> dict:
    id_, claim = "alpha-1", "alpha = 1.0 is correct (PEFT scales by lora_alpha / r = 32/32)"
    lora = summary.get("lora")
    scale = (lora or {}).get("scale") or {}
    if scale.get("value") is None:
        return row(id_, claim, UNMEASURED, None, 1.0, "no LoRA (or no audited scale) in this run")
    lo, hi = scale.get("min", scale["value"]), scale.get("max", scale["value"])
    ok = all(v is not None and math.isclose(v, 1.0, rel_tol=1e-6) for v in (scale["value"], lo, hi))
    detail = f"the file implies a multiplier of {scale['value']:g} (per module {_g(lo)}..{_g(hi)}; source: " \
             f"{scale.get('source')})"
    return row(id_, claim, CONFIRMED if ok else REFUTED, scale["value"], 1.0, detail)


def _bench_rows(bench: dict | list | None) -> list[dict]:
    """Rows of a `qkv-verify bench` result (block rows, then full-model rows), or of a plain list of rows."""
    if bench is None:
        return []
    if isinstance(bench, list):
        return [r for r in bench if isinstance(r, dict)]
    rows = [*(bench.get("rows") or []), *({**r, "full_model": True} for r in bench.get("full_model") or [])]
    return [r for r in rows if isinstance(r, dict)]


def _label(r: dict) -> str:
    parts = ["full model" if r.get("full_model") else r.get("name")] + [r.get(k) for k in ("mode", "phase")]
    if r.get("image_tokens") is not None:
        parts.append(f"{r['image_tokens']}+{r.get('text_tokens', 0)} tokens")
    return " ".join(str(p) for p in parts if p) or "row"


def _number_field(r: dict, key: str) -> bool:
    return isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)


def speed(bench: dict | list | None) -> list[dict]:
    """'10-15% faster training' and '67% fewer kernel calls', from a `qkv-verify bench` result, each judged on its
    slowest row. The write-up's setting is a LoRA training step: where the bench has LoRA-training block rows, both
    claims are judged on them alone, on fusion's own share (lean-unfused time / merged time, and the kernels fusion
    saves against the lean-unfused arm); otherwise on the training rows' (or every row's) merged-vs-standard figures."""
    rows = _bench_rows(bench)
    where = f" on {bench['device']}" if isinstance(bench, dict) and bench.get("device") else ""
    lora = [r for r in rows if r.get("phase") == "lora-train" and not r.get("full_model")]
    fusion = bool(lora) and all(_number_field(r, "fusion_speedup") for r in lora)
    return [_faster(rows, lora, fusion, where), _fewer(rows, lora, where)]


def _faster(rows: list[dict], lora: list[dict], fusion: bool, where: str) -> dict:
    key = "fusion_speedup" if fusion else "speedup"
    timed = [r for r in (lora or rows) if _number_field(r, key)]
    training = timed if lora else [r for r in timed if str(r.get("phase", "")).startswith("train")]
    faster = row("faster-10-15pct", "10-15% faster training", UNMEASURED, None, 1.10,
                 "no benchmark rows with a speedup (qkv-verify bench --json; reports/gpu/bench-*.json)")
    if not timed:
        return faster
    judged = training or timed
    worst = min(judged, key=lambda r: r[key])
    if fusion:
        what = "LoRA-training rows, fusion's own share = lean-unfused time / merged time (the merged path's speedup " \
               "over the standard one beside it)"
        each = ", ".join(f"{_label(r)} {r[key]:.3f}x{_interval(r.get('fusion_speedup_ci'))} (merged vs standard "
                         f"{r['speedup']:.3f}x)" for r in judged)
    else:
        what = "speedup = standard time / merged time, " + (
            "LoRA-training rows (no lean-unfused arm in this bench)" if lora else
            "training rows" if training else "all rows (no training step measured)")
        each = ", ".join(f"{_label(r)} {r[key]:.3f}x" for r in judged)
    faster.update(verdict=CONFIRMED if worst[key] >= 1.10 else REFUTED, measured=worst[key],
                  detail=f"{what}{where}: {each}; confirmed when every row is at least 1.10x; measured = the slowest")
    return faster


def _interval(ci) -> str:
    return f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


def _fewer(rows: list[dict], lora: list[dict], where: str) -> dict:
    against = "kernels_lean_unfused" if lora and all(_number_field(r, "kernels_lean_unfused") for r in lora) \
        else "kernels_standard"
    counted = [r for r in (lora or rows) if _number_field(r, against) and _number_field(r, "kernels_merged")
               and r[against] > 0]
    fewer = row("kernels-67pct-fewer", "67% fewer kernel calls", UNMEASURED, None, 0.67,
                "no benchmark rows with kernels_standard and kernels_merged")
    if not counted:
        return fewer
    cut = [1 - r["kernels_merged"] / r[against] for r in counted]
    arms = "standard / lean-unfused -> merged (fusion's own saving, against lean-unfused)" \
        if against != "kernels_standard" else "standard -> merged"
    each = ", ".join(f"{_label(r)} {_kernels(r, against)} -> {r['kernels_merged']:g} ({100 * c:.1f}% fewer)"
                     for r, c in zip(counted, cut))
    fewer.update(verdict=CONFIRMED if min(cut) >= 0.665 else REFUTED, measured=min(cut),
                 detail=f"kernels per call{where}, {'LoRA-training rows, ' if lora else ''}{arms}: {each}; "
                        "confirmed when every row has at least 66.5% fewer; measured = the smallest fraction saved")
    return fewer


def _kernels(r: dict, against: str) -> str:
    """The row's kernel count of the arm judged against, after the standard arm's where that is another."""
    standard = f"{r['kernels_standard']:g}" if _number_field(r, "kernels_standard") else "?"
    return standard if against == "kernels_standard" else f"{standard} / lean {r[against]:g}"


# --- user claims ------------------------------------------------------------------------------------------------


def load_claims(path: Path) -> list[dict]:
    """Read and validate a claims file (every claim, before any run); VerifyError names the claim at fault."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise VerifyError(f"claims file {path}: cannot read: {e}") from None
    data = _parse(path, text)
    claims = data.get("claims") if isinstance(data, dict) and set(data) == {"claims"} else data
    if not isinstance(claims, list) or not claims:
        raise VerifyError(f"claims file {path}: expected a non-empty list of claims (or {{claims: [...]}})")
    seen: set[str] = set()
    for i, claim in enumerate(claims, 1):
        _validate(path, i, claim, seen)
    return claims


def _parse(path: Path, text: str):
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise VerifyError(f"claims file {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise VerifyError(f"claims file {path}: not valid YAML ({str(e).splitlines()[0]})") from None


def _validate(path: Path, i: int, claim, seen: set[str]) -> None:
    where = f"claims file {path}: claim #{i}"
    if not isinstance(claim, dict):
        raise VerifyError(f"{where}: expected a mapping with id, metric, op, expected; got {type(claim).__name__}")
    if not isinstance(claim.get("id"), str) or not claim["id"].strip():
        raise VerifyError(f"{where}: needs an id (a non-empty string)")
    where = f"claims file {path}: claim {claim['id']!r} (#{i})"
    if claim["id"] in seen:
        raise VerifyError(f"{where}: duplicate id")
    seen.add(claim["id"])
    unknown = set(claim) - CLAIM_KEYS
    if unknown:
        raise VerifyError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(CLAIM_KEYS)}")
    missing = [k for k in ("metric", "op", "expected") if k not in claim]
    if missing:
        raise VerifyError(f"{where}: missing {', '.join(missing)}")
    if claim["op"] not in (*OPS, "approx"):
        raise VerifyError(f"{where}: op {claim['op']!r} is not one of {', '.join([*OPS, 'approx'])}")
    if "text" in claim and not isinstance(claim["text"], str):
        raise VerifyError(f"{where}: text must be a string")
    try:
        parse(metric_path(claim["metric"])[0])
    except SelectError as e:
        raise VerifyError(f"{where}: {e}") from None
    expected = _number(claim["expected"])
    if claim["op"] not in ("==", "!=") and not isinstance(expected, (int, float)):
        raise VerifyError(f"{where}: op {claim['op']} needs a number as expected, got {claim['expected']!r}")
    if claim["op"] != "approx" and ({"rel", "abs"} & set(claim)):
        raise VerifyError(f"{where}: rel and abs belong to op approx only")
    for k in ("rel", "abs"):
        v = _number(claim.get(k, 0))
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise VerifyError(f"{where}: {k} must be a number >= 0, got {claim[k]!r}")


def metric_path(metric) -> tuple[str, bool]:
    """(the path, whether the claim measures its length): 'len(lora.unmatched_keys)' -> ('lora.unmatched_keys',
    True)."""
    text = metric.strip() if isinstance(metric, str) else metric
    if isinstance(text, str) and text.startswith("len(") and text.endswith(")"):
        return text[4:-1].strip(), True
    return text, False


def check_claims(claims: list[dict], values: dict[str, set[str]]) -> None:
    """Every claim's metric path against summary.json's shape and this run's filter values, before anything runs;
    VerifyError naming the claim whose path would select nothing."""
    for claim in claims:
        try:
            check_path(metric_path(claim["metric"])[0], values)
        except SelectError as e:
            raise VerifyError(f"claim {claim['id']!r}: {e}") from None


def _number(x):
    """Numbers as numbers; a numeric string too (YAML 1.1 reads 1e-5 as a string), other values unchanged."""
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return x
    return x


def judge(claim: dict, summary: dict) -> dict:
    """One user claim measured on `summary`; VerifyError (naming the claim) when its metric selects nothing."""
    text = claim.get("text") or f"{claim['metric']} {claim['op']} {claim['expected']}"
    op, expected = claim["op"], _number(claim["expected"])
    path, length = metric_path(claim["metric"])
    try:
        measured = resolve(summary, path)
    except Absent as e:
        return row(claim["id"], text, UNMEASURED, None, claim["expected"], f"{claim['metric']}: {e}", "user")
    except SelectError as e:
        raise VerifyError(f"claim {claim['id']!r}: {e}") from None
    if measured is None:
        return row(claim["id"], text, UNMEASURED, None, claim["expected"], f"{claim['metric']} is null in this run",
                   "user")
    if length:
        if not isinstance(measured, (list, dict, str)):
            raise VerifyError(f"claim {claim['id']!r}: {path} is {measured!r}; len() takes a list")
        measured = len(measured)
    if isinstance(measured, (dict, list)) and not (op in ("==", "!=") and isinstance(expected, type(measured))):
        raise VerifyError(f"claim {claim['id']!r}: metric {claim['metric']!r} selects a {type(measured).__name__}; "
                          "select one field, compare it with == / != to a list, or measure len(...)")
    if isinstance(measured, (int, float)) and not isinstance(measured, bool):
        expected = _number(expected)
    if op in ("==", "!=") and type(measured) is not type(expected) and not (
            _is_num(measured) and _is_num(expected)):
        raise VerifyError(f"claim {claim['id']!r}: measured {measured!r} ({type(measured).__name__}) cannot be "
                          f"compared with expected {expected!r} ({type(expected).__name__})")
    if op != "approx" and op not in ("==", "!=") and not _is_num(measured):
        raise VerifyError(f"claim {claim['id']!r}: metric {claim['metric']!r} is {measured!r}, not a number")
    if op == "approx":
        if not _is_num(measured):
            raise VerifyError(f"claim {claim['id']!r}: metric {claim['metric']!r} is {measured!r}, not a number")
        rel, abs_ = float(_number(claim.get("rel", 1e-6))), float(_number(claim.get("abs", 0.0)))
        allowed = max(rel * abs(expected), abs_)
        ok = abs(measured - expected) <= allowed
        detail = f"|{measured:.6g} - {expected:.6g}| = {abs(measured - expected):.3g} vs allowed {allowed:.3g}"
    else:
        ok = OPS[op](measured, expected)
        detail = f"{_show(measured)} {op} {_show(expected)} is {'true' if ok else 'false'}"
    return row(claim["id"], text, CONFIRMED if ok else REFUTED, measured, claim["expected"],
               f"{claim['metric']}: {detail}", "user")


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _show(x) -> str:
    return f"{x:.6g}" if isinstance(x, float) else json.dumps(x)
