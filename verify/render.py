"""Presentation: summary.json, report.md and a self-contained index.html from a summary dict (never recomputed)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

CHECK_COLUMNS = ["name", "component", "dtype", "device", "passed", "max_abs_err", "base_max_abs_err", "ratio",
                 "tolerance", "rel_l2_err", "cosine", "mismatched_fraction", "bit_identical", "fused_calls",
                 "worst_index"]
STAT_COLUMNS = ["fixture", "dtype", "implementation", "mean", "std", "min", "max", "nan", "inf"]


def tables(summary: dict) -> dict[str, pd.DataFrame]:
    """The report's tables, named; the same frames feed markdown and HTML."""
    checks = pd.DataFrame(summary["checks"]).reindex(columns=CHECK_COLUMNS)
    return {
        "checks": checks,
        "failures": pd.DataFrame([c for c in summary["checks"] if not c["passed"]]).reindex(
            columns=["name", "dtype", "message"]),
        "output_stats": pd.DataFrame(summary["output_stats"]).reindex(columns=STAT_COLUMNS),
    }


def markdown(summary: dict) -> str:
    t = tables(summary)
    lines = [f"# qkv-verify report: **{summary['verdict'].upper()}**", ""]
    passed = sum(c["passed"] for c in summary["checks"])
    lines += [f"{passed} of {len(summary['checks'])} checks passed.", ""]
    lines += [f"- {note}" for note in summary["notes"]] + [""] if summary["notes"] else []
    if len(t["failures"]):
        lines += ["## Failures", "", t["failures"].to_markdown(index=False), ""]
    lines += ["## Checks", "", "Each merged output is judged against the fp64 oracle: its error may be at most k times "
              "the standard model's own error in that dtype plus a floor (`relative_to_base`).", "",
              t["checks"].to_markdown(index=False, floatfmt=".3g"), ""]
    lines += ["## Output statistics", "", t["output_stats"].to_markdown(index=False, floatfmt=".6g"), ""]
    lines += ["## Inputs", "", "```json", json.dumps(summary["inputs"], indent=2), "```", ""]
    lines += ["## Environment", "", "```json", json.dumps(summary["environment"], indent=2), "```", ""]
    return "\n".join(lines)


def html(summary: dict) -> str:
    env = Environment(loader=PackageLoader("verify", "templates"), autoescape=select_autoescape())
    frames = {name: df.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="", classes="table",
                               border=0) for name, df in tables(summary).items()}
    passed = sum(c["passed"] for c in summary["checks"])
    return env.get_template("report.html.j2").render(
        summary=summary, tables=frames, passed=passed, total=len(summary["checks"]),
        inputs=json.dumps(summary["inputs"], indent=2), environment=json.dumps(summary["environment"], indent=2),
    )


def write_report(summary: dict, out: Path) -> None:
    """Write all files into a temporary folder beside `out`, then move them in: no half-written report."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        (tmp / "report.md").write_text(markdown(summary))
        (tmp / "index.html").write_text(html(summary))
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
