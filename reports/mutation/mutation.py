"""Mutation testing of every module that decides a verdict, a message or a write, with mutmut 3 (`tox -e mutation`):
a deterministic sample, run and reported.

    python reports/mutation/mutation.py run [--all] [--max-children N] [NAME ...]   # over the sample (or NAME ...)
    python reports/mutation/mutation.py report [--out reports/mutation/verdicts-messages-writes.txt]
    python reports/mutation/mutation.py sample                                      # the sample, one a line

Scope: SCOPE below, every module that decides a verdict, a message or a write. mutmut's [tool.mutmut] section in
pyproject.toml names the same files and the tests it may run; mutmut runs, for each mutant, only the tests that
called the mutated function, cheapest first (properties/_mutation_order.py).

Sample: every mutant in scope would take days on two cores (a surviving mutant of the report reruns every report
test), so each module's mutants are sampled at `rate` of its population: a mutant is in the sample when
sha256(name) falls below the rate, which is deterministic and keeps a mutant in or out of the sample however the
others change. --all runs every mutant in scope.

Survivors explained in reports/mutation/survivors.md (their names in backticks) count as equivalent: they are
listed in the report and left out of the adjusted kill rate's denominator.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Every module of verify/ that decides a verdict, a message or a write; file -> the functions in scope (mutmut's
# mangled names: x_name, xǁClassǁmethod), None for the whole file. Model building, processors and charts are judged
# by the checks these modules make, not mutated here.
SCOPE: dict[str, tuple[str, ...] | None] = dict.fromkeys([
    "verify/checks/tolerance.py", "verify/checks/compare.py", "verify/checks/equivalence.py",
    "verify/checks/divergence.py", "verify/checks/probes.py", "verify/checks/report.py", "verify/checks/claims.py",
    "verify/checks/regress.py", "verify/checks/selector.py", "verify/checks/summary_schema.py",
    "verify/checks/sharding.py", "verify/checks/streaming.py", "verify/checks/lora_audit.py",
    "verify/checks/lora_compare.py", "verify/checks/lora_checkpoint.py", "verify/implementations/candidate.py",
    "verify/files/destination.py", "verify/files/convert.py", "verify/files/bench_file.py",
    "verify/files/property_results.py", "verify/files/checkpoint.py", "verify/files/scan.py",
    "verify/files/lora_formats.py", "verify/files/lora_mapping.py", "verify/files/manifest.py",
    "verify/files/model_config.py", "verify/commands/report.py", "verify/commands/test.py",
    "verify/commands/convert.py", "verify/commands/lora.py", "verify/commands/regress.py", "verify/cli.py",
    "verify/present/render.py", "verify/testing.py", "verify/pytest_plugin.py", "verify/maths/qkv.py",
    "verify/maths/state_dict.py", "verify/maths/lora.py", "verify/bench/gate.py", "verify/bench/judge.py",
    "verify/errors.py", "verify/models/__init__.py", "verify/checks/runner.py", "verify/checks/sampling.py",
    "verify/checks/engines.py", "verify/commands/sample.py", "verify/commands/engines.py", "verify/files/saved.py",
    "verify/files/folder.py",
])
# Sampled share of a module's mutants: every mutant of a module with at most MIN_SAMPLE of them, else enough for
# MIN_SAMPLE, and never below MIN_RATE (14,282 mutants in scope at b732055; the sample is about 900).
MIN_SAMPLE, MIN_RATE = 20, 0.03


def rate(population: int) -> float:
    return max(MIN_RATE, min(1.0, MIN_SAMPLE / population)) if population else 1.0


SURVIVORS_MD = ROOT / "reports" / "mutation" / "survivors.md"
NAME = re.compile(r"`(verify\.[\w.ǁ]+__mutmut_\d+)`")


def _module(path: str) -> str:
    return path[: -len(".py")].replace("/", ".")


def in_scope() -> dict[str, list[str]]:
    """file -> every mutant name mutmut generates for it in scope, sorted."""
    from mutmut.mutation.file_mutation import mutate_file_contents

    out = {}
    for path, functions in SCOPE.items():
        names = mutate_file_contents(path, (ROOT / path).read_text(), None, None).mutant_names
        keep = [n for n in names if functions is None or n.rpartition("__mutmut_")[0] in functions]
        out[path] = sorted((f"{_module(path)}.{n}" for n in keep), key=_order)
    return out


def _order(name: str) -> tuple[str, int]:
    stem, _, number = name.rpartition("__mutmut_")
    return stem, int(number)


def _sampled(name: str, rate: float) -> bool:
    return rate >= 1.0 or int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) < rate * 16**8


def sample(everything: bool = False) -> dict[str, list[str]]:
    return {p: [n for n in names if everything or _sampled(n, rate(len(names)))] for p, names in in_scope().items()}


def run(args) -> int:
    names = args.names or [n for names in sample(args.all).values() for n in names]
    if args.only:  # e.g. re-run the survivors after adding tests: --only survived
        status = _statuses()
        names = [n for n in names if status.get(n, "not checked") in args.only]
    if not names:
        print("no mutant to run")
        return 0
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.setdefault("HYPOTHESIS_PROFILE", "dev")
    mutmut = Path(sys.executable).with_name("mutmut")
    cmd = [str(mutmut), "run", "--max-children", str(args.max_children), *names]
    print(f"mutmut run over {len(names)} mutants", flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env)
    return done.returncode


def _statuses() -> dict[str, str]:
    from mutmut.stats import status_by_exit_code

    out = {}
    for path in SCOPE:
        meta = ROOT / "mutants" / (path + ".meta")
        if meta.exists():
            for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
                out[name] = status_by_exit_code[code]
    return out


def _function_lines(path: str) -> dict[str, int]:
    """mangled function name -> first line (its first decorator's, if any) in the original source."""
    out = {}

    def visit(body, cls=None):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                key = f"xǁ{cls}ǁ{node.name}" if cls else f"x_{node.name}"
                out[key] = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            elif isinstance(node, ast.ClassDef):
                visit(node.body, node.name)

    visit(ast.parse((ROOT / path).read_text()).body)
    return out


def _line(diff: str, first: int) -> int:
    """Source line of a mutant's first changed line, from its diff of the function (which starts at `first`)."""
    line = None
    for text in diff.splitlines():
        m = re.match(r"@@ -(\d+)", text)
        if m:
            line = first + int(m.group(1)) - 1
        elif line is not None and not text.startswith(("---", "+++")):
            if text.startswith("-"):
                return line
            if not text.startswith("+"):
                line += 1
    return first


def report(args) -> int:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    os.chdir(ROOT)
    population = in_scope()
    chosen = {p: [n for n in names if args.all or _sampled(n, rate(len(names)))] for p, names in population.items()}
    status = _statuses()
    explained = set(NAME.findall(SURVIVORS_MD.read_text())) if SURVIVORS_MD.exists() else set()
    commit = args.commit or subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip() or "unknown"
    lines = [
        "Mutation testing of every module that decides a verdict, a message or a write (mutmut 3, tox -e mutation)",
        f"date: {datetime.date.today().isoformat()}",
        f"commit: {commit}",
        "command: tox -e mutation   (= python reports/mutation/mutation.py run, then its report)",
        "tests: mutmut's [tool.mutmut] pytest_add_cli_args_test_selection in pyproject.toml, "
        f"HYPOTHESIS_PROFILE={os.environ.get('HYPOTHESIS_PROFILE', 'dev')}",
        "sample: " + ("every mutant in scope" if args.all else
                      "deterministic, sha256(name) below each module's rate (reports/mutation/mutation.py rate)"),
        "equivalent: survivors explained in reports/mutation/survivors.md, left out of the adjusted denominator",
        "",
        f"{'module':<40}{'in scope':>9}{'rate':>6}{'tested':>8}{'killed':>8}{'survived':>9}{'timeout':>8}"
        f"{'other':>6}{'equiv':>6}{'kill rate':>10}{'adjusted':>9}",
    ]
    survivors, totals = [], Counter()
    for path, names in chosen.items():
        c = Counter(status.get(n, "not checked") for n in names)
        equiv = sum(1 for n in names if status.get(n) == "survived" and n in explained)
        tested = sum(v for k, v in c.items() if k != "not checked")
        other = tested - c["killed"] - c["survived"] - c["timeout"]
        killed = c["killed"] + c["timeout"]  # a mutant that hangs the tests is caught (mutmut's convention)
        row = {"scope": len(population[path]), "tested": tested, "killed": c["killed"], "survived": c["survived"],
               "timeout": c["timeout"], "other": other, "equiv": equiv, "caught": killed}
        totals.update(row)
        share = rate(len(population[path]))
        lines.append(_row(path, row, "all" if share >= 1 or args.all else f"{share:.2g}"))
        survivors += [(path, n) for n in names if status.get(n) == "survived"]
    lines.append(_row("total", totals, ""))
    lines += ["", "kill rate: (killed + timeout) / tested; adjusted: the same over tested - equivalent", ""]
    if "not checked" in Counter(status.get(n, "not checked") for names in chosen.values() for n in names):
        lines += ["WARNING: some sampled mutants were not checked (run did not finish)", ""]
    lines.append(f"Surviving mutants ({len(survivors)}; 'equivalent' = explained in survivors.md)")
    for path, name in survivors:
        diff = get_diff_for_mutant(name, path=path)
        func = name.rpartition(".")[2].rpartition("__mutmut_")[0]
        line = _line(diff, _function_lines(path).get(func, 1))
        mark = " [equivalent]" if name in explained else ""
        lines += ["", f"{path}:{line} {name}{mark}", *diff.splitlines()[2:]]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text if not args.out else "\n".join(lines[: 12 + len(chosen)]))
    return 0


def _row(label: str, r: dict, rate: str) -> str:
    rate_pct = f"{100 * r['caught'] / r['tested']:.1f}%" if r["tested"] else "-"
    denom = r["tested"] - r["equiv"]
    adjusted = f"{100 * r['caught'] / denom:.1f}%" if denom else "-"
    return (f"{label:<40}{r['scope']:>9}{rate:>6}{r['tested']:>8}{r['killed']:>8}{r['survived']:>9}{r['timeout']:>8}"
            f"{r['other']:>6}{r['equiv']:>6}{rate_pct:>10}{adjusted:>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("run")
    r.add_argument("--all", action="store_true", help="every mutant in scope, not the sample")
    r.add_argument("--max-children", type=int, default=2)
    r.add_argument("--only", action="append", metavar="STATUS",
                   help="only the sampled mutants of this status so far: survived, timeout, 'not checked' (repeatable)")
    r.add_argument("names", nargs="*", help="these mutants only (default: the sample)")
    p = sub.add_parser("report")
    p.add_argument("--all", action="store_true")
    p.add_argument("--out")
    p.add_argument("--commit", help="the commit the run was made on (default: git rev-parse HEAD)")
    s = sub.add_parser("sample")
    s.add_argument("--all", action="store_true")
    args = parser.parse_args(argv)
    if args.what == "sample":
        for names in sample(args.all).values():
            print("\n".join(names))
        return 0
    return run(args) if args.what == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
