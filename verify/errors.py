"""The project's own error type: bad input the user can fix, reported as one line with exit status 2."""


class VerifyError(Exception):
    """A problem with the user's input (a path, a file, a shape, a name), stated in one line."""


def run_command(func, args) -> int:
    """Run a subcommand's handler; bad input becomes one line on stderr and exit status 2, never a traceback."""
    import sys

    try:
        return func(args)
    except VerifyError as e:
        print(f"qkv-verify: error: {e}", file=sys.stderr)
        return 2
