"""The pytest plugin's options as `pytest --help` shows them and as pytest parses them: its group's title, each
option's name, metavar, choices, default and help, and that it leaves the help order of later plugins' groups alone.

The options are added to a fresh parser of pytest's own (the one `pytest --help` prints, helpconfig.showhelp), in
this process: the pytester tests of test_option_plumbing run a pytest session of their own, out of mutation runs'
reach."""

from __future__ import annotations

import re

import pytest
from _pytest.config.argparsing import Parser

from verify import pytest_plugin

TITLE = "merged-QKV candidate under test (qkv-verify)"


@pytest.fixture
def parser(monkeypatch) -> Parser:
    monkeypatch.setenv("COLUMNS", "400")  # one line an option: argparse wraps at the terminal's width
    parser = Parser(prog="pytest", _ispytest=True)
    pytest_plugin.pytest_addoption(parser)
    return parser


def _section(parser: Parser) -> list[str]:
    """The plugin's section of `pytest --help`: its title, then one entry an option (an option and its help, which
    argparse puts on the next line after a long option), whitespace runs made single spaces."""
    text = parser.optparser.format_help()
    start = text.index(f"\n{TITLE}:\n") + 1
    title, *lines = text[start:].split("\n\n")[0].splitlines()
    entries: list[str] = []
    for line in lines:
        if line.lstrip().startswith("--"):
            entries.append(line)
        else:
            entries[-1] += " " + line
    return [title] + [" ".join(entry.split()) for entry in entries]


def test_the_help_section_is_titled_and_lists_every_option_with_its_values_and_help(parser):
    lines = _section(parser)
    assert lines[0] == f"{TITLE}:"
    assert lines[1] == ("--qkv-candidate=SPEC implementation to judge: package.module:attr, path/to/file.py:attr or "
                        "a built-in name")
    assert len(lines) == 2 + len(pytest_plugin.OPTIONS)
    for line, (name, kwargs) in zip(lines[2:], pytest_plugin.OPTIONS):
        value = kwargs.get("metavar") or "{" + ",".join(kwargs["choices"]) + "}"
        assert line == " ".join(f"--qkv-{name}={value} {kwargs['help']}".split()), line


def test_later_plugins_groups_keep_their_order_in_the_help(parser):
    """Groups added after the plugin's (by plugins pytest loads later) appear in the order they were added."""
    parser.getgroup("later-one", "a later plugin's options").addoption("--later-one")
    parser.getgroup("later-two", "another later plugin's options").addoption("--later-two")
    titles = re.findall(r"^(\S.*):$", parser.optparser.format_help(), re.M)
    assert titles.index(f"{TITLE}") < titles.index("a later plugin's options") < \
        titles.index("another later plugin's options")


def test_defaults_when_no_option_is_given(parser):
    """A user's suite run without the options: no candidate (its fixture skips), layout blocked, device cpu."""
    given = parser.parse([])
    assert (given.qkv_candidate, given.qkv_reference, given.qkv_fused_modules, given.qkv_candidate_precision) == \
        (None, None, None, None)
    assert (given.qkv_layout, given.qkv_device) == ("blocked", "cpu")


def test_each_option_is_parsed_under_its_name(parser):
    given = parser.parse(["--qkv-candidate", "my_pkg.fused:build", "--qkv-reference", "fast",
                          "--qkv-fused-modules", "none", "--qkv-candidate-precision", "fp32",
                          "--qkv-layout", "interleaved", "--qkv-device", "cuda"])
    assert (given.qkv_candidate, given.qkv_reference, given.qkv_fused_modules, given.qkv_candidate_precision,
            given.qkv_layout, given.qkv_device) == ("my_pkg.fused:build", "fast", "none", "fp32", "interleaved", "cuda")


@pytest.mark.parametrize("option, value", [("--qkv-layout", "diagonal"), ("--qkv-device", "tpu"),
                                           ("--qkv-candidate-precision", "fp16")])
def test_a_value_outside_an_options_choices_is_a_usage_error(parser, option, value):
    with pytest.raises(pytest.UsageError, match=f"invalid choice: '{value}'"):
        parser.parse([option, value])
