"""`qkv-verify test`, for the survivors of the second mutation run (reports/mutation/verdicts-messages-writes.txt) in
verify/commands/test.py: the plugin it hands pytest when plugin autoloading is off, and its --help description
in full."""

from __future__ import annotations

import pytest

from properties.commands import help_paragraphs
from verify import pytest_plugin
from verify.cli import main


@pytest.fixture
def suite(monkeypatch):
    """pytest.main replaced: each call's plugins are recorded; it returns 0 (every property holds)."""
    calls: list[list] = []

    def record(args, plugins=None):
        calls.append(list(plugins or []))
        return 0

    monkeypatch.setattr(pytest, "main", record)
    return calls


def test_with_plugin_autoloading_off_the_suite_is_handed_the_plugin_itself(suite, monkeypatch):
    """Kills x__installed_plugin__mutmut_10 (another variable read): with PYTEST_DISABLE_PLUGIN_AUTOLOAD set pytest
    does not load the installed plugin, so `qkv-verify test` must hand it over, or the suite's --qkv-* options are
    unknown to pytest (a usage error, exit 2)."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert main(["test", "reference"]) == 0
    assert suite == [[pytest_plugin]]


def test_with_plugin_autoloading_on_the_installed_plugin_is_not_handed_over_twice(suite, monkeypatch):
    """The package is installed in this venv (its pytest11 entry point): pytest loads the plugin itself, and handing
    it over as well would register it twice (an error)."""
    from importlib.metadata import entry_points

    assert any(ep.value == "verify.pytest_plugin" for ep in entry_points(group="pytest11"))
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    assert main(["test", "reference"]) == 0
    assert suite == [[]]


def test_the_help_description_is_the_documented_paragraph_word_for_word(capsys, monkeypatch):
    """Kills x_register_test__mutmut_28, _30 and _40 (the sentence on Qwen-Image 2.1's inputs and the one on pytest's
    arguments garbled or shouted): `qkv-verify test --help` shows the whole description as written."""
    paragraphs = help_paragraphs("test", capsys, monkeypatch)
    assert paragraphs[1] == (
        "Runs the Hypothesis property suite that ships with qkv-verify against SPEC: random head counts, head dims, "
        "sequence lengths, batch sizes and padded text masks, with zero_cond_t (Qwen-Image) or condition images, "
        "their adjacency, causal_condition and the KV cache (Qwen-Image 2.1, --model qwen-image-2.1); attention and "
        "block; outputs and gradients; fp64, fp32, bf16, fp16. CI=true selects the derandomised `ci` profile, "
        "HYPOTHESIS_PROFILE any other. Exit status: 0 all properties hold, 1 one failed (with the reproducing "
        "example), 2 bad SPEC or usage. After --, arguments go to pytest (e.g. -x, -k block, "
        "--hypothesis-seed=1).")
