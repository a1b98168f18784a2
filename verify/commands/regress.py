"""`qkv-verify regress BASELINE CANDIDATE`: which outputs, samples and check metrics moved (verify.checks.regress)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from verify.checks.regress import Thresholds, format_result, load_summary, regress, summary_file
from verify.errors import VerifyError
from verify.files.folder import refuse_output_file, write_file


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {text!r}")
    return value


def register_regress(subparsers) -> None:
    p = subparsers.add_parser(
        "regress", help="compare two summary.json files: which outputs, samples and check metrics moved",
        description="Exit status: 0 nothing moved beyond its threshold, 1 something moved, 2 bad input (a missing "
                    "or invalid file, not a summary, runs whose fixtures, dtypes or outputs do not line up).",
    )
    p.add_argument("baseline", type=Path, help="the stored summary.json (or a report folder holding one)")
    p.add_argument("candidate", type=Path, help="the new run's summary.json (or report folder)")
    add_threshold_arguments(p)
    p.add_argument("--json", type=Path, dest="json_out", help="also write the result as JSON to this file")
    p.add_argument("--force", action="store_true", help="replace an existing --json FILE")
    p.set_defaults(func=_regress_command)


def add_threshold_arguments(p) -> None:
    """--rtol-scale and --atol, for `regress` and for `report --baseline`; read back with thresholds_from(args)."""
    p.add_argument("--rtol-scale", type=_positive, default=Thresholds.rtol_scale,
                   help="threshold = RTOL_SCALE x the dtype's noise + ATOL (default %(default)g)")
    p.add_argument("--atol", type=_positive, default=Thresholds.atol,
                   help="absolute allowance added to every threshold (default %(default)g)")


def thresholds_from(args) -> Thresholds:
    return Thresholds(args.rtol_scale, args.atol)


def _regress_command(args) -> int:
    refuse_output_file("--json", args.json_out, {"BASELINE": summary_file(args.baseline),
                                                  "CANDIDATE": summary_file(args.candidate)}, args.force)
    baseline, candidate = load_summary(args.baseline), load_summary(args.candidate)
    result = regress(baseline, candidate, thresholds_from(args))
    if args.json_out:
        try:
            write_file(args.json_out, (json.dumps(result, indent=2, allow_nan=False) + "\n").encode())
        except OSError as e:
            raise VerifyError(f"--json {args.json_out}: cannot write: {e.strerror}") from None
    print(format_result(result, str(args.baseline), str(args.candidate)))
    return 0 if result["passed"] else 1
