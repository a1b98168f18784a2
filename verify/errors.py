"""The project's own error type: bad input the user can fix, reported as one line with exit status 2."""

BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away mid-output


class VerifyError(Exception):
    """A problem with the user's input (a path, a file, a shape, a name), stated in one line."""


def run_command(func, args) -> int:
    """Run a subcommand's handler; bad input becomes one line on stderr and exit status 2, never a traceback.

    A reader that goes away before the output ends (`qkv-verify lora-audit F | head -1`) ends the command quietly,
    with BROKEN_PIPE (141) as a command killed by SIGPIPE exits: no traceback, no "Exception ignored" at exit.
    """
    import sys

    try:
        status = func(args)
        sys.stdout.flush()  # the last of the output fails here, not in the interpreter's own flush at exit
    except VerifyError as e:
        print(f"qkv-verify: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _quiet_stdout()
        return BROKEN_PIPE
    return status


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's own flush at exit does not fail again and print."""
    import os
    import sys

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured by a test): nothing to redirect
        pass
