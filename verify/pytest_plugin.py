"""pytest plugin (entry point `pytest11: qkv_verify`): `--qkv-candidate SPEC` and fixtures that give a user's own
test suite the implementation to judge, as `qkv-verify test` gives the packaged suite.

    def test_my_block(qkv_candidate):
        verify.testing.assert_candidate(qkv_candidate, components=("block",))

The fixtures skip, with the reason, when no `--qkv-candidate` was given. torch loads only when a fixture is used.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qkv-verify", "merged-QKV candidate under test (qkv-verify)")
    group.addoption("--qkv-candidate", metavar="SPEC",
                    help="implementation to judge: package.module:attr, path/to/file.py:attr or a built-in name")
    group.addoption("--qkv-reference", metavar="SPEC", help="what it must match (default: diffusers)")
    group.addoption("--qkv-fused-modules", metavar="NAMES",
                    help="module names whose calls prove the fused path ran (default to_qkv,add_qkv_proj,"
                         "to_added_qkv), or none")
    group.addoption("--qkv-layout", choices=("blocked", "interleaved"), default="blocked",
                    help="layout of the candidate's fused parameters, to map its weight gradients (default blocked)")
    group.addoption("--qkv-device", choices=("cpu", "cuda"), default="cpu", help="device of the checks")


@pytest.fixture(scope="session")
def qkv_candidate(request: pytest.FixtureRequest):
    """The verify.implementations.candidate.Implementation named by --qkv-candidate."""
    from verify.implementations.candidate import resolve

    spec = request.config.getoption("--qkv-candidate")
    if not spec:
        pytest.skip("no --qkv-candidate SPEC given")
    return resolve(spec, request.config.getoption("--qkv-fused-modules"))


@pytest.fixture(scope="session")
def qkv_reference(request: pytest.FixtureRequest):
    """The reference named by --qkv-reference (diffusers when none)."""
    from verify.implementations.candidate import resolve

    return resolve(request.config.getoption("--qkv-reference") or "diffusers")


@pytest.fixture(scope="session")
def qkv_layout(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--qkv-layout")


@pytest.fixture(scope="session")
def qkv_device(request: pytest.FixtureRequest) -> str:
    return request.config.getoption("--qkv-device")
