"""The shape of summary.json, so that a claim's metric path is checked before any model runs: every key, every filter
field and, where the run fixes them, the filter values (dtypes, fixtures, implementations, check names)."""

from __future__ import annotations

import dataclasses

from verify import models
from verify.checks.compare import Record
from verify.checks.selector import SelectError, Step, parse
from verify.checks.sharding import KINDS

ANY = "any"  # a section whose inside is not fixed here (environment details, speed rows, the regression)

_RECORD = [f.name for f in dataclasses.fields(Record)]
_IMPLEMENTATION = ["spec", "resolved", "source", "version", "fused_modules", "layout", "precision", "default"]
SCHEMA: dict = {
    "verdict": None, "verdict_reasons": [None], "compared": None, "notes": [None],
    "candidate": dict.fromkeys(_IMPLEMENTATION), "reference": dict.fromkeys(_IMPLEMENTATION),
    "checks": [dict.fromkeys([*_RECORD, "mismatched_fraction"])],
    "output_stats": [dict.fromkeys(["fixture", "dtype", "implementation", "mean", "std", "min", "max", "p1", "p5",
                                    "p50", "p95", "p99", "nan", "inf", "numel"])],
    "output_samples": [dict.fromkeys(["fixture", "dtype", "implementation", "indices", "values"])],
    "lora": {**dict.fromkeys(["file", "format", "layout", "modules_matched", "tensors", "weights_changed",
                              "unmatched_keys", "ranks", "capacity", "warnings", "modules", "sweep",
                              "applied_to_candidate"]),
             "scale": dict.fromkeys(["value", "min", "max", "source"])},
    "parallel": dict.fromkeys(["kind", "degree", "device", "backend", "dtype", "processor", "plan", "weights"]),
    "environment": ANY, "inputs": ANY, "claims": ANY, "speed": ANY, "regression": ANY,
}
# a check is named after its case (every model's), or weights/, inputs/, the streamed model/, lora/, or a parallel
# check's <kind><degree>/
CHECK_PREFIXES = ("weights/", "inputs/", "model/", "lora/",
                  *sorted({f"{case}/" for name in models.MODELS for case in models.load(name).CASES}), *KINDS)


def check_path(path: str, values: dict[str, set[str]]) -> None:
    """SelectError when `path` cannot select anything in a summary of this shape; `values` gives, per filter field,
    the values this run will have (a filter on another value selects nothing)."""
    node = SCHEMA
    for step in parse(path):
        if node is ANY:
            return
        if not isinstance(node, dict) or step.key not in node:
            have = ", ".join(sorted(node)) if isinstance(node, dict) else "a value"
            raise SelectError(f"metric path {path!r}: no key {step.key!r} in summary.json here (has: {have})")
        node = node[step.key]
        if step.filters is not None:
            node = _filtered(path, step, node, values)
        if step.index is not None:
            if not isinstance(node, list):
                raise SelectError(f"metric path {path!r}: {step.key} is not a list; it takes no [N]")
            node = node[0]


def _filtered(path: str, step: Step, node, values: dict[str, set[str]]):
    if node is ANY:
        return ANY
    if not (isinstance(node, list) and isinstance(node[0], dict)):
        raise SelectError(f"metric path {path!r}: {step.key} is not a list of records; it cannot take a filter")
    fields = node[0]
    for name, value in step.filters:
        if name not in fields:
            raise SelectError(f"metric path {path!r}: records of {step.key} have no field {name!r} "
                              f"(fields: {', '.join(fields)})")
        known = values.get(name)
        if known is not None and value not in known:
            raise SelectError(f"metric path {path!r}: {name}={value} selects nothing in this run "
                              f"({name} takes {', '.join(sorted(known))})")
        if step.key == "checks" and name == "name" and not value.startswith(CHECK_PREFIXES):
            raise SelectError(f"metric path {path!r}: no check is named {value!r} (names start with "
                              f"{', '.join(CHECK_PREFIXES)})")
    return fields
