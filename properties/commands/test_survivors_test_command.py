"""`qkv-verify test` in this process, with pytest's session stood in for by a recorder (the suite's own session is
what test_candidates and test_option_plumbing run, out of mutation runs' reach): the options it hands the packaged
suite, how pytest's exit status becomes its own, the SPECs it refuses before the suite runs, and what its --help and
usage errors say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from verify import pytest_plugin
from verify.checks.tolerance import DTYPES
from verify.cli import main
from verify.implementations.candidate import BUILTINS, resolve

HERE = __name__  # SPECs of the candidates below: f"{HERE}:name"


@pytest.fixture
def suite(monkeypatch):
    """pytest.main replaced: each call's arguments are recorded; `suite.code` is the status it returns."""

    class Suite:
        def __init__(self):
            self.calls: list[list[str]] = []
            self.code = 0

        def main(self, args, plugins=None):
            self.calls.append([str(a) for a in args])
            return self.code

    recorder = Suite()
    monkeypatch.setattr(pytest, "main", recorder.main)
    return recorder


def _qkv_options(args: list[str]) -> dict[str, str]:
    """The `--qkv-NAME VALUE` pairs handed to the suite."""
    return {a: args[i + 1] for i, a in enumerate(args) if a.startswith("--qkv-")}


def _attention_only(standard, component):
    return resolve("reference").make(standard, component) if component == "attention" else None


def _block_only(standard, component):
    return resolve("reference").make(standard, component) if component == "block" else None


def _provides_nothing(standard, component):
    return None


# --- what reaches the suite ---------------------------------------------------------------------------------------

def test_every_option_reaches_the_suite_as_the_plugins_option_and_pytests_arguments_follow(suite):
    """Each `--NAME VALUE` of `qkv-verify test` is handed on as the plugin's `--qkv-NAME VALUE` (the names with a
    dash included), and what follows `--` goes to pytest after them."""
    assert main(["test", "reference", "--reference", "reference", "--fused-modules", "none",
                 "--candidate-precision", "fp32", "--layout", "interleaved", "--device", "cpu",
                 "--", "-x", "-k", "block"]) == 0
    [args] = suite.calls
    handed = _qkv_options(args)
    given = {"--qkv-candidate": "reference", "--qkv-reference": "reference", "--qkv-fused-modules": "none",
             "--qkv-candidate-precision": "fp32", "--qkv-layout": "interleaved", "--qkv-device": "cpu"}
    assert given.items() <= handed.items()
    assert set(handed) == {"--qkv-candidate", *(f"--qkv-{name}" for name, _ in pytest_plugin.OPTIONS)}, \
        "every option: given, or its default"
    assert args[-3:] == ["-x", "-k", "block"]


def test_without_options_or_separator_the_suite_gets_the_defaults_and_its_own_config(suite):
    """`qkv-verify test SPEC` alone: the defaults (--layout blocked, --device cpu) reach the suite, the options
    with no default are left out, no pytest argument is added, and pytest reads the suite's own ini file (which
    exists)."""
    assert main(["test", "reference"]) == 0
    [args] = suite.calls
    handed = _qkv_options(args)
    assert (handed["--qkv-layout"], handed["--qkv-device"]) == ("blocked", "cpu")
    assert handed == {"--qkv-candidate": "reference",
                      **{f"--qkv-{name}": str(kwargs["default"]) for name, kwargs in pytest_plugin.OPTIONS
                         if kwargs.get("default")}}
    ini = Path(args[args.index("-c") + 1])
    rootdir = Path(args[args.index("--rootdir") + 1])
    assert ini.is_file() and ini.name == "pytest.ini" and ini.parent == rootdir
    assert (rootdir / "test_candidate.py").is_file()
    tail = args[args.index("--rootdir") + 2:]
    assert tail[0] == str(rootdir), "the suite's folder is what pytest collects"
    assert tail[1:] == [a for pair in _qkv_options(tail).items() for a in pair], "no pytest argument added"


@pytest.mark.parametrize("pytest_status, status", [
    (pytest.ExitCode.OK, 0),
    (pytest.ExitCode.TESTS_FAILED, 1),
    (pytest.ExitCode.INTERRUPTED, 2),
    (pytest.ExitCode.INTERNAL_ERROR, 2),
    (pytest.ExitCode.USAGE_ERROR, 2),
    (pytest.ExitCode.NO_TESTS_COLLECTED, 2),
])
def test_pytests_exit_status_becomes_0_all_hold_1_one_failed_2_anything_else(suite, monkeypatch, pytest_status,
                                                                            status):
    """The documented exit status: 0 every property holds, 1 one failed, 2 bad SPEC or usage (a filter that selects
    nothing, a misspelt pytest flag, an interrupted run). (The SPEC check, tested below, is skipped here.)"""
    from verify.commands import test as command

    monkeypatch.setattr(command, "_validate", lambda args: None)
    suite.code = pytest_status
    assert main(["test", "reference"]) == status
    assert len(suite.calls) == 1


# --- SPECs refused before the suite runs, and those that are not --------------------------------------------------

@pytest.mark.parametrize("builder", ["_attention_only", "_block_only"])
def test_a_candidate_of_attention_only_or_block_only_is_handed_to_the_suite(suite, builder):
    assert main(["test", f"{HERE}:{builder}"]) == 0
    assert len(suite.calls) == 1 and _qkv_options(suite.calls[0])["--qkv-candidate"] == f"{HERE}:{builder}"


def test_a_candidate_providing_neither_attention_nor_block_exits_2_before_the_suite(suite, capsys):
    spec = f"{HERE}:_provides_nothing"
    assert main(["test", spec]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"qkv-verify: error: candidate {spec}: provides neither 'attention' nor 'block' "
                   "(build returned None)"]
    assert suite.calls == [], "the suite did not run"


# --- --help and usage errors --------------------------------------------------------------------------------------

def _help(capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at the terminal's width, between words and at dashes
    with pytest.raises(SystemExit) as done:
        main(["test", "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_the_usage_line_names_spec_and_every_option_with_its_values(capsys, monkeypatch):
    """The hand-written usage agrees with the parser: SPEC, then each option as [--NAME METAVAR] or [--NAME a|b]
    with its choices, then [-- PYTEST_ARGS], and nothing else."""
    usage = _flat(_help(capsys, monkeypatch).split("\n\n")[0])
    options = [f"[--{name} {kwargs.get('metavar') or '|'.join(kwargs['choices'])}]"
               for name, kwargs in pytest_plugin.OPTIONS]
    assert usage == " ".join(["usage: qkv-verify test SPEC", *options, "[-- PYTEST_ARGS]"])


def test_the_description_says_what_runs_against_spec_its_dtypes_profiles_and_exit_status(capsys, monkeypatch):
    text = _flat(_help(capsys, monkeypatch))
    assert "Runs the Hypothesis property suite that ships with qkv-verify against SPEC:" in text
    assert f"{', '.join(DTYPES)}." in text  # the dtypes the suite parametrises over
    assert "CI=true selects the derandomised `ci` profile, HYPOTHESIS_PROFILE any other." in text
    assert ("Exit status: 0 all properties hold, 1 one failed (with the reproducing example), 2 bad SPEC or usage."
            in text)


def test_the_positional_is_spec_with_its_forms_and_built_in_names(capsys, monkeypatch):
    text = _help(capsys, monkeypatch)
    section = _flat(re.search(r"positional arguments:\n(.*?)\n\n", text, re.S).group(1))
    names = "reference, fast, fast-compiled, diffusers, diffusers-flex, diffsynth"
    assert section == f"SPEC package.module:attr, path/to/file.py:attr, or a built-in name ({names})"
    assert set(names.split(", ")) == set(BUILTINS)  # every built-in listed, diffusers' own processors included


def test_a_missing_spec_is_a_usage_error_naming_spec(capsys):
    with pytest.raises(SystemExit) as done:
        main(["test"])
    assert done.value.code == 2
    assert "the following arguments are required: SPEC" in capsys.readouterr().err
