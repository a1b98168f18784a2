"""`qkv-verify test SPEC`: the packaged Hypothesis property suite (verify/suite) run against a candidate.

Exit status: 0 every property holds, 1 one failed (pytest prints the reproducing example), 2 bad SPEC or usage.
"""

from __future__ import annotations

from pathlib import Path

from verify import pytest_plugin
from verify.implementations.spec_names import BUILTINS

SUITE = Path(__file__).parents[1] / "suite"


def register_test(subparsers) -> None:
    p = subparsers.add_parser(
        "test", help="run the packaged property suite against your implementation (SPEC)",
        usage="qkv-verify test SPEC [--model qwen-image|qwen-image-2.1] [--reference SPEC] [--fused-modules NAMES] "
              "[--candidate-precision fp64|fp32] [--layout blocked|interleaved] [--device cpu|cuda] "
              "[-- PYTEST_ARGS]",
        description="Runs the Hypothesis property suite that ships with qkv-verify against SPEC: random head counts, "
                    "head dims, sequence lengths, batch sizes and padded text masks, with zero_cond_t (Qwen-Image) "
                    "or condition images, their adjacency, causal_condition and the KV cache (Qwen-Image 2.1, "
                    "--model qwen-image-2.1); attention and block; outputs and gradients; fp64, fp32, bf16, fp16. "
                    "CI=true selects the derandomised `ci` profile, HYPOTHESIS_PROFILE any other. Exit status: 0 all "
                    "properties hold, 1 one failed (with the reproducing example), 2 bad SPEC or usage. After --, "
                    "arguments go to pytest (e.g. -x, -k block, --hypothesis-seed=1).",
    )
    p.add_argument("spec", metavar="SPEC", help="package.module:attr, path/to/file.py:attr, or a built-in name "
                                                 f"({', '.join(BUILTINS)})")
    for name, kwargs in pytest_plugin.OPTIONS:
        p.add_argument(f"--{name}", **kwargs)
    p.set_defaults(func=_test, pytest_args=[])  # verify.cli passes what follows `--` (pytest's own arguments)


def _test(args) -> int:
    import pytest

    _validate(args)
    options = ["--qkv-candidate", args.spec]
    for name, _ in pytest_plugin.OPTIONS:
        value = getattr(args, name.replace("-", "_"))
        options += [f"--qkv-{name}", value] if value else []
    plugins = [] if _installed_plugin(pytest_plugin.__name__) else [pytest_plugin]
    code = pytest.main(["-c", str(SUITE / "pytest.ini"), "--rootdir", str(SUITE), str(SUITE), *options,
                        *args.pytest_args], plugins=plugins)
    return {0: 0, 1: 1}.get(int(code), 2)


def _installed_plugin(module: str) -> bool:
    """Whether pytest loads `module` itself: the package installed (its pytest11 entry point) and plugin autoloading
    on. From a source tree on PYTHONPATH, or with PYTEST_DISABLE_PLUGIN_AUTOLOAD, it does not: the suite hands it over
    (handing over a plugin pytest also loads is an error)."""
    import os
    from importlib.metadata import entry_points

    registered = any(ep.value == module for ep in entry_points(group="pytest11"))
    return registered and not os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD")


def _validate(args) -> None:
    """Bad SPECs (unresolvable, failing to build, wrong outputs or shapes, providing nothing) are exit 2 before the
    suite runs: one small attention and block, each run once."""
    import torch

    from verify.checks.equivalence import run_case
    from verify.errors import VerifyError
    from verify.implementations.candidate import resolve
    from verify.models import load

    if args.device == "cuda" and not torch.cuda.is_available():
        raise VerifyError("--device cuda: no CUDA device is available")
    candidate = resolve(args.spec, args.fused_modules, args.candidate_precision)
    reference = resolve(args.reference or "diffusers")
    cases = load(args.model).CASES
    records = [r for name in ("attention", "block") for r in run_case(
        cases[name], [torch.float64], args.device, candidate=candidate, reference=reference, layout=args.layout)]
    if not any(r.provided for r in records):
        raise VerifyError(f"candidate {args.spec}: provides neither 'attention' nor 'block' (build returned None)")
