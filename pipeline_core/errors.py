"""User-facing errors.

Every problem caused by bad input (a file, a parameter, a row, an illegal state
transition) is raised as :class:`EmloopError` with a one-line message that names
the offending file/row/parameter.  The CLI prints exactly that line and exits
non-zero; it never prints a traceback for these.
"""


class EmloopError(Exception):
    """A user-facing error with a one-line message."""

    exit_code = 2

    def __init__(self, message: str):
        message = " ".join(str(message).split())  # always one line
        super().__init__(message)


class GateError(EmloopError):
    """A stage gate or state-machine transition was refused."""


class InputError(EmloopError):
    """Input data (file, row, parameter) is invalid."""
