"""A `qkv-verify bench` JSON as `report --bench` reads it: found, parsed and validated before any run, so that a
file the report cannot use is one line and exit 2, not a traceback after the run."""

from __future__ import annotations

import math
from pathlib import Path

from verify.errors import VerifyError
from verify.files.json_file import read_json

# What the report reads of every block row (the speed chart and table), and the fields that, where present, must
# be numbers: times, ratios, counts and sizes.
ROW_FIELDS = {"mode": str, "phase": str, "image_tokens": int, "speedup": float}
NUMBER_FIELDS = ("standard_ms", "merged_ms", "lean_unfused_ms", "speedup", "fusion_speedup", "lean_speedup",
                 "kernels_standard", "kernels_merged", "kernels_lean_unfused", "floor_ms", "floor_sustained_ms",
                 "merged_tflops", "image_tokens", "text_tokens", "lora_rank")
INTERVAL_FIELDS = ("speedup_ci", "fusion_speedup_ci")


def load_bench(path: Path) -> dict | None:
    """A benchmark JSON, or the one bench-*.json in a folder (None when the folder has none; several: an error, since
    which of them speaks for the merged path is the user's choice), validated."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("bench-*.json"))
        if not files:
            return None
        if len(files) > 1:
            raise VerifyError(f"{path}: several benchmark JSONs ({', '.join(f.name for f in files)}); pass one")
        path = files[0]
    data = read_json(path)
    bench = {"rows": data} if isinstance(data, list) else data
    problem = bench_problem(bench)
    if problem:
        raise VerifyError(f"{path}: not a qkv-verify bench result: {problem}")
    return bench


def bench_problem(bench) -> str | None:
    """What makes `bench` unusable by the report (None: usable): the first bad section, row or field, named."""
    if not isinstance(bench, dict):
        return f"expected an object or a list of rows, got {type(bench).__name__}"
    for section in ("rows", "full_model"):
        rows = bench.get(section)
        if rows is not None and not isinstance(rows, list):
            return f"{section}: expected a list of rows, got {type(rows).__name__}"
        for i, row in enumerate(rows or []):
            problem = _row_problem(row, required=section == "rows")
            if problem:
                return f"{section}[{i}]: {problem}"
    if not bench.get("rows") and not bench.get("full_model"):
        return "no rows (expected rows or full_model)"
    config = bench.get("config")
    if config is None:
        return None
    if not (isinstance(config, dict) and _is_number(config.get("dim"))) or not bench.get("rows"):
        return "config: expected an object with the block's width, dim, beside the block rows it configured"
    compiled = [r for r in bench["rows"] if (r["mode"], r["phase"]) == ("compiled", "forward")]
    if any(r.get("merged_ms") is None or (r.get("floor_sustained_ms") or r.get("floor_ms")) is None for r in compiled):
        return "a compiled forward row without merged_ms and its matmul floor (floor_ms), which its goal judges"
    return None


def _row_problem(row, required: bool) -> str | None:
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    for field, kind in ROW_FIELDS.items() if required else ():
        if field not in row:
            return f"no {field}"
        if not (_is_number(row[field]) if kind in (int, float) else isinstance(row[field], kind)):
            return f"{field} {row[field]!r} is not a {'number' if kind in (int, float) else 'string'}"
    for field in NUMBER_FIELDS:
        if row.get(field) is not None and not _is_number(row[field]):
            return f"{field} {row[field]!r} is not a finite number"
    for field in INTERVAL_FIELDS:
        ci = row.get(field)
        if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(map(_is_number, ci))):
            return f"{field} {ci!r} is not an interval [low, high]"
    if row.get("floor_ms") is not None and row.get("merged_ms") is None:
        return "floor_ms without merged_ms (the share of the floor needs both)"
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
