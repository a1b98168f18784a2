"""Test-session setup in one place: Hypothesis profiles, determinism, and the `device` fixture (cpu, cuda).

Profiles: `dev` (default), `ci` (chosen when CI=true; derandomized, no deadline, no database) and `thorough`;
HYPOTHESIS_PROFILE overrides both. `pytest --device cuda` runs only the cuda variant of device-parametrised tests.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# cuBLAS needs this before its first use to be deterministic; harmless on the CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

settings.register_profile("dev", max_examples=20, deadline=None)
settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, database=None, print_blob=True)
settings.register_profile("thorough", max_examples=1000, deadline=None)


def _profile() -> str:
    if os.environ.get("HYPOTHESIS_PROFILE"):
        return os.environ["HYPOTHESIS_PROFILE"]
    return "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev"


settings.load_profile(_profile())


def _deterministic() -> None:
    """Deterministic kernels, no TF32, one CPU thread: a result depends only on (seed, dtype, device)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    # One CPU thread unless OMP_NUM_THREADS says otherwise: the models are tiny, a reduction's order then does not
    # depend on the machine, and on a busy 2-core runner two spinning OpenMP threads made the suite 5-8x slower.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


_deterministic()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device", choices=("cpu", "cuda", "all"), default=None,
        help="device of device-parametrised tests: cpu, cuda, or all (default: every available device)",
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"hypothesis profile: {settings.get_current_profile_name()}; devices: {', '.join(_devices(config))}"


def _devices(config: pytest.Config) -> list[str]:
    choice = config.getoption("--device")
    if choice in ("cpu", "cuda"):
        return [choice]
    return ["cpu", "cuda"] if choice == "all" or torch.cuda.is_available() else ["cpu"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise every test that takes `device`; cuda variants are marked `gpu` (skipped without a CUDA device)."""
    if "device" not in metafunc.fixturenames:
        return
    params = []
    for device in _devices(metafunc.config):
        marks = []
        if device == "cuda":
            marks.append(pytest.mark.gpu)
            if not torch.cuda.is_available():
                marks.append(pytest.mark.skip(reason="no CUDA device on this machine"))
        params.append(pytest.param(device, marks=marks, id=device))
    # Session scope: Hypothesis rejects function-scoped fixtures, and a device name carries no state.
    metafunc.parametrize("device", params, scope="session")


_RECORDED: list[tuple[str, list[tuple[str, object]]]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" and report.passed and report.user_properties:
        _RECORDED.append((report.nodeid, list(report.user_properties)))


def pytest_terminal_summary(terminalreporter) -> None:
    """What tests recorded with record_property (the planted-bug kill rate, bf16 verdicts), one line per test."""
    if not _RECORDED:
        return
    terminalreporter.section("recorded properties")
    for nodeid, props in _RECORDED:
        terminalreporter.line(f"{nodeid}: " + ", ".join(f"{k}={_short(v)}" for k, v in props))


def _short(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
