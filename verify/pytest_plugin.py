"""pytest plugin (entry point `pytest11: qkv_verify`): `--qkv-candidate SPEC` and fixtures that give a user's own
test suite the implementation to judge, as `qkv-verify test` gives the packaged suite.

    def test_my_block(qkv_candidate):
        verify.testing.assert_candidate(qkv_candidate, components=("block",))

The fixtures skip, with the reason, when no `--qkv-candidate` was given. torch loads only when a fixture is used.
"""

from __future__ import annotations

import pytest

from verify.models import DEFAULT_MODEL, MODELS

# The candidate's options: `--qkv-NAME` here, `--NAME` of `qkv-verify test` (which passes them on as these).
OPTIONS: tuple[tuple[str, dict], ...] = (
    ("model", dict(choices=list(MODELS), default=DEFAULT_MODEL,
                   help=f"the model whose components are judged: {' or '.join(MODELS)} (default {DEFAULT_MODEL})")),
    ("reference", dict(metavar="SPEC", help="what the candidate must match (default: diffusers)")),
    ("fused-modules", dict(metavar="NAMES", help="module names whose calls prove the fused path ran (default "
                                                 "to_qkv,add_qkv_proj,to_added_qkv), or none for an unfused one")),
    ("candidate-precision", dict(choices=("fp64", "fp32"),
                                 help="the finest arithmetic the candidate computes at: fp32 for one that computes "
                                      "in fp32 at best, as GPU kernels do (fp64 runs judged at fp32's floor)")),
    ("layout", dict(choices=("blocked", "interleaved"), default="blocked",
                    help="layout of the candidate's fused parameters, to map its weight gradients (default blocked)")),
    ("device", dict(choices=("cpu", "cuda"), default="cpu", help="device of the checks (default cpu)")),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qkv-verify", "merged-QKV candidate under test (qkv-verify)")
    group.addoption("--qkv-candidate", metavar="SPEC",
                    help="implementation to judge: package.module:attr, path/to/file.py:attr or a built-in name")
    for name, kwargs in OPTIONS:
        group.addoption(f"--qkv-{name}", **kwargs)


@pytest.fixture(scope="session")
def qkv_candidate(request: pytest.FixtureRequest):
    """The verify.implementations.candidate.Implementation named by --qkv-candidate."""
    from verify.implementations.candidate import resolve

    spec = request.config.getoption("--qkv-candidate")
    if not spec:
        pytest.skip("no --qkv-candidate SPEC given")
    return resolve(spec, request.config.getoption("--qkv-fused-modules"),
                   request.config.getoption("--qkv-candidate-precision"))


@pytest.fixture(scope="session")
def qkv_reference(request: pytest.FixtureRequest):
    """The reference named by --qkv-reference (diffusers when none)."""
    from verify.implementations.candidate import resolve

    return resolve(request.config.getoption("--qkv-reference") or "diffusers")


@pytest.fixture(scope="session")
def qkv_model(request: pytest.FixtureRequest) -> str:
    """The model named by --qkv-model (verify.models), qwen-image by default."""
    return request.config.getoption("--qkv-model")


@pytest.fixture(scope="session")
def qkv_layout(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--qkv-layout")


@pytest.fixture(scope="session")
def qkv_device(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--qkv-device")
