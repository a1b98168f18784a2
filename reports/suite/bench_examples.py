"""Time each property's example loop for a fixed number of examples; print a table of examples per second.

Usage: python reports/suite/bench_examples.py [--examples N] [--device cpu|cuda] [-k TEXT]

Every Hypothesis property in properties/**/test_*.py runs for N examples (derandomized, generate phase only, no
database); pytest parameters (a planted bug, ...) give one row each. Prints property, examples run, seconds and
examples per second. Fixtures supplied: `device` and a temporary `tmp_path_factory`; a property that needs another
is listed as skipped. Exit status 1 if any property failed. Not a test: pytest does not collect this file.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hypothesis import Phase, settings  # noqa: E402

import conftest  # noqa: E402,F401  (profiles and determinism, exactly as under pytest)


class _TempPathFactory:
    """The part of pytest's tmp_path_factory the properties use: fresh folders under one temporary root."""

    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, basename: str, numbered: bool = True) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{basename}-", dir=self.root))

    def getbasetemp(self) -> Path:
        return self.root


def _parametrizations(test) -> list[dict]:
    """Every combination of the test's @pytest.mark.parametrize values, as keyword arguments."""
    axes = []
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize":
            names = [n.strip() for n in mark.args[0].split(",")] if isinstance(mark.args[0], str) else mark.args[0]
            values = [v.values if hasattr(v, "values") else (v if len(names) > 1 else (v,)) for v in mark.args[1]]
            axes.append([dict(zip(names, v)) for v in values])
    return [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*axes)]


def _properties(pattern: str):
    """(module name, function name, test) for every Hypothesis test in properties/**/test_*.py."""
    for path in sorted((ROOT / "properties").rglob("test_*.py")):
        module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for name, test in inspect.getmembers(module, inspect.isfunction):
            label = f"{path.stem}::{name}"
            if name.startswith("test_") and getattr(test, "is_hypothesis_test", False) and pattern in label:
                yield path.stem, name, test


def _run(test, kwargs: dict, examples: int) -> tuple[int, float, str]:
    """Examples run, seconds, and '' or the failure."""
    inner = test.hypothesis.inner_test
    count = 0

    def counted(*args, **kw):
        nonlocal count
        count += 1
        return inner(*args, **kw)

    parent = getattr(test, "_hypothesis_internal_use_settings", settings.default)
    test._hypothesis_internal_use_settings = settings(  # the loop's length, whatever the test's own @settings says
        parent, max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
    )
    test.hypothesis.inner_test = counted
    start = time.perf_counter()
    try:
        test(**kwargs)
        problem = ""
    except Exception as exc:  # a failing property is reported in the table, not raised
        problem = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
    finally:
        test.hypothesis.inner_test = inner
        test._hypothesis_internal_use_settings = parent
    return count, time.perf_counter() - start, problem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20, help="examples per property (default 20)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("-k", default="", help="only properties whose module::name contains this text")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device on this machine")
    rows, failed = [], 0
    scratch = tempfile.TemporaryDirectory(prefix="bench-examples-")
    fixtures = {"device": args.device, "tmp_path_factory": _TempPathFactory(Path(scratch.name))}
    for module, name, test in _properties(args.k):
        wanted = set(inspect.signature(test).parameters)  # pytest's view: parameters and fixtures
        for params in _parametrizations(test) or [{}]:
            label = f"{module}::{name}" + (f"[{'-'.join(map(str, params.values()))}]" if params else "")
            kwargs = {**params, **{k: v for k, v in fixtures.items() if k in wanted}}
            missing = sorted(wanted - set(kwargs))  # @given's arguments are not in the wrapper's signature
            if missing:
                rows.append((label, "-", "-", f"skipped: needs fixture {', '.join(missing)}"))
                continue
            count, seconds, problem = _run(test, kwargs, args.examples)
            failed += bool(problem)
            rate = f"{count / seconds:.1f}" if seconds else "-"
            rows.append((label, str(count), f"{seconds:.2f}", problem and f"FAILED {problem}" or rate))
    scratch.cleanup()
    _print(rows, args)
    return 1 if failed else 0


def _print(rows: list[tuple[str, str, str, str]], args) -> None:
    header = ("property", "examples", "seconds", "examples/s")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    print(f"# {args.examples} examples per property, device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    for row in [header, *rows]:
        print(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}")


if __name__ == "__main__":
    sys.exit(main())
