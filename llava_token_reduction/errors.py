"""The one user-error type of the tools, and the one place that prints a failed command.

`UserError` is a failure the user can act on (a bad option, a wrong checkpoint, bad data, a failed
verification); its message is one line meant for them. The older names are kept: `cli.CommandError` is this
class, and `ConversionError`, `TuningError` and `DataError` are subclasses (`DataError` is also a
`ValueError`, as before). A plain `ValueError` (e.g. from a config's field checks) is treated as a user error
too.
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A failure the user can act on: printed as one line on stderr, without a traceback."""


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, (UserError, ValueError))


def print_failure(prog: str, error: BaseException, file=None) -> int:
    """Print `error` as `PROG: error: REASON` (one line; an unexpected error also names its type and how to see
    the traceback) and return the exit status 1."""
    file = file or sys.stderr
    reason = " ".join(str(error).split()) or type(error).__name__
    if is_user_error(error):
        print(f"{prog}: error: {reason}", file=file)
    else:
        print(f"{prog}: error: {type(error).__name__}: {reason}", file=file)
        print("(run with --traceback for the full traceback)", file=file)
    return 1


__all__ = ["UserError", "is_user_error", "print_failure"]
