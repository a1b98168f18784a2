"""verify.errors.run_command, the path every subcommand's outcome takes to the console, in this process (the
console tests run it in subprocesses): bad input is one line on stderr and exit status 2, a handler's own status
passes through, and a reader that went away (`qkv-verify lora-audit F | head -1`) ends the command with 141 and
leaves stdout pointing at /dev/null, so that the interpreter's flush at exit does not fail again."""

from __future__ import annotations

import os
import sys

import pytest

from verify.errors import BROKEN_PIPE, VerifyError, run_command


@pytest.mark.parametrize("status", [0, 1])
def test_a_handlers_status_passes_through_and_it_gets_the_arguments(status, capsys):
    args = object()
    seen = []

    def handler(given):
        seen.append(given)
        print("done")
        return status

    assert run_command(handler, args) == status
    assert seen == [args]
    assert capsys.readouterr() == ("done\n", "")


def test_bad_input_is_one_line_on_stderr_and_exit_2(capsys):
    def handler(args):
        raise VerifyError("summary.json: not a JSON file")

    assert run_command(handler, None) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", "qkv-verify: error: summary.json: not a JSON file\n")


def test_other_errors_are_not_turned_into_usage_errors():
    def handler(args):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_command(handler, None)


def test_a_reader_that_went_away_ends_the_command_with_141_and_later_output_goes_nowhere(monkeypatch):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the output ends
    stdout = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        assert run_command(lambda args: print("line") or 0, None) == BROKEN_PIPE == 141
        # what the interpreter does at exit: flush stdout. Pointed at /dev/null, it no longer fails.
        print("more")
        stdout.flush()
        assert os.path.samestat(os.fstat(stdout.fileno()), os.stat(os.devnull))
    finally:
        stdout.close()
