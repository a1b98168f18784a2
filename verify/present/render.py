"""Presentation: summary.json, report.md, CSV tables, PNG charts and a self-contained index.html (never recomputed)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from verify.bench.table import goals
from verify.files.folder import write_folder
from verify.present.charts import charts

CHECK_COLUMNS = ["name", "component", "dtype", "device", "passed", "max_abs_err", "base_max_abs_err", "ratio",
                 "tolerance", "rel_l2_err", "cosine", "mismatched_fraction", "bit_identical", "fused_calls",
                 "worst_index", "first_divergence", "weight_gradients"]
STAT_COLUMNS = ["fixture", "dtype", "implementation", "mean", "std", "min", "p1", "p50", "p99", "max", "nan", "inf"]
SWEEP_COLUMNS = ["factor", "multiplier", "oracle_rel_dev", "standard_rel_dev", "merged_rel_dev",
                 "merged_vs_standard_max_abs", "merged_mean", "merged_std"]
LORA_FIELDS = ["file", "format", "layout", "modules_matched", "tensors", "weights_changed", "ranks"]


def tables(summary: dict) -> dict[str, pd.DataFrame]:
    """The report's tables, named; the same frames feed CSV, markdown and HTML."""
    out = {
        "checks": pd.DataFrame(summary["checks"]).reindex(columns=CHECK_COLUMNS),
        "failures": pd.DataFrame([c for c in summary["checks"] if not c["passed"] and c.get("provided", True)]).reindex(
            columns=["name", "dtype", "first_divergence", "message"]),
        "output_stats": pd.DataFrame(summary["output_stats"]).reindex(columns=STAT_COLUMNS),
    }
    lora = summary.get("lora")
    if lora:
        scale = lora["scale"]
        facts = {k: lora[k] for k in LORA_FIELDS} | {
            "scale": scale["value"], "scale range": f"{scale['min']:g} .. {scale['max']:g}",
            "scale source": scale["source"], "unmatched keys": ", ".join(lora["unmatched_keys"]) or "none"}
        out["lora"] = pd.DataFrame({"field": list(facts), "value": [str(v) for v in facts.values()]})
        out["lora_sweep"] = pd.DataFrame(lora["sweep"]).reindex(columns=SWEEP_COLUMNS)
    if summary.get("claims"):
        out["claims"] = pd.DataFrame(summary["claims"])
    if summary.get("regression"):
        out["regression"] = pd.DataFrame(summary["regression"]["moved"])
    speed = summary.get("speed")
    if speed and (speed.get("rows") or speed.get("full_model")):
        out["speed"] = pd.DataFrame([_speed_row(r) for r in _timed_rows(speed)])
        if "config" in speed:
            out["speed_goals"] = pd.DataFrame([{"goal": goal, "met": met} for goal, met in goals(speed).items()])
    return out


def _timed_rows(bench: dict) -> list[dict]:
    """The block rows, then the full-model rows that were timed (their mode prefixed)."""
    full = [{**r, "mode": f"full model {r['mode']}"} for r in bench.get("full_model") or [] if "merged_ms" in r]
    return [*(bench.get("rows") or []), *full]


def _speed_row(r: dict) -> dict:
    """One bench row as the report shows it: times, speedup with its interval, clock, kernels, share of the floor."""
    ci, clocks = r.get("speedup_ci"), r.get("clocks") or {}
    sustained = r.get("floor_sustained_ms")
    return {"mode": r.get("mode"), "phase": r.get("phase"), "image tokens": r.get("image_tokens"),
            "text tokens": r.get("text_tokens"), "standard ms": r.get("standard_ms"), "merged ms": r.get("merged_ms"),
            "speedup": r.get("speedup"), "95% CI": f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else "",
            "SM MHz": clocks.get("sm_mhz"), "power-capped share": clocks.get("held_by", {}).get("power_cap"),
            "kernels": f"{r.get('kernels_standard')} -> {r.get('kernels_merged')}",
            "floor / merged": r["floor_ms"] / r["merged_ms"] if r.get("floor_ms") else None,
            "at the sustained peak": sustained / r["merged_ms"] if sustained else None}


def markdown(summary: dict) -> str:
    t = tables(summary)
    passed = sum(c["passed"] for c in summary["checks"])
    lines = [f"# qkv-verify report: **{summary['verdict'].upper()}**{_why(summary)}", "",
             f"Compared: {summary['compared']}.", "", f"{passed} of {len(summary['checks'])} checks passed.", ""]
    lines += [f"- {note}" for note in summary["notes"]] + ([""] if summary["notes"] else [])
    warnings = (summary.get("lora") or {}).get("warnings") or []
    lines += ["## LoRA audit warnings", "", *[f"- {w}" for w in warnings], ""] if warnings else []
    sections = [("Failures", "failures"), ("Claims ledger", "claims"), ("Regression against the baseline",
                 "regression"), ("Checks", "checks"), ("Output statistics", "output_stats"), ("LoRA", "lora"),
                ("LoRA alpha sweep", "lora_sweep"), ("Speed", "speed"), ("Speed goals", "speed_goals")]
    for title, name in sections:
        if name in t and len(t[name]):
            lines += [f"## {title}", "", t[name].to_markdown(index=False, floatfmt=".4g"), ""]
    lines += ["## Inputs", "", "```json", json.dumps(summary["inputs"], indent=2), "```", ""]
    lines += ["## Environment", "", "```json", json.dumps(summary["environment"], indent=2), "```", ""]
    return "\n".join(lines)


def _why(summary: dict) -> str:
    reasons = summary.get("verdict_reasons") or []
    return f" ({'; '.join(reasons)})" if reasons else ""


def html(summary: dict, pngs: dict[str, bytes]) -> str:
    env = Environment(loader=PackageLoader("verify", "present/templates"), autoescape=select_autoescape())
    frames = {name: df.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="", classes="table",
                               border=0) for name, df in tables(summary).items()}
    images = {name: "data:image/png;base64," + base64.b64encode(data).decode() for name, data in pngs.items()}
    return env.get_template("report.html.j2").render(
        summary=summary, tables=frames, images=images, passed=sum(c["passed"] for c in summary["checks"]),
        why=_why(summary), lora_warnings=(summary.get("lora") or {}).get("warnings") or [],
        total=len(summary["checks"]), inputs=json.dumps(summary["inputs"], indent=2),
        environment=json.dumps(summary["environment"], indent=2),
    )


def write_report(summary: dict, out: Path) -> None:
    """summary.json, report.md, index.html, the charts and the CSV tables into `out`, none half-written."""
    pngs = charts(summary)
    files = {"summary.json": json.dumps(summary, indent=2, allow_nan=False) + "\n", "report.md": markdown(summary),
             "index.html": html(summary, pngs), **pngs}
    files |= {f"{name}.csv": frame.to_csv(index=False) for name, frame in tables(summary).items()}
    write_folder(out, files)
