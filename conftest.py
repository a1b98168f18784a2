"""Test-session setup: Hypothesis profiles and determinism (verify.suite.setup, shared with the packaged suite), and
the `device` fixture (cpu, cuda). `pytest --device cuda` runs only the cuda variant of device-parametrised tests.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings

from verify.suite.setup import deterministic, load_profile

load_profile()
deterministic()


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
