"""The project's own error type: bad input the user can fix, reported as one line with exit status 2."""


class VerifyError(Exception):
    """A problem with the user's input (a path, a file, a shape, a name), stated in one line."""
