"""The exception type the converters raise for problems a user can fix (a `UserError`, printed as one line)."""

from ..errors import UserError


class ConversionError(UserError):
    """A conversion that cannot go on: missing files, a wrong architecture, keys that do not map, shapes or
    weights that do not match, an output that already exists. The message is one line, meant for the user."""


__all__ = ["ConversionError"]
