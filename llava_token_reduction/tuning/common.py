"""Names the command line needs before any heavy import (torch, PIL): kept here so `--help` stays quick."""

from ..errors import UserError


PROMPT_FORMATS = ("auto", "chat-template", "llava-v1")


class DataError(UserError, ValueError):
    """The data cannot be used as given; the message names the file and the record(s)."""


class TuningError(UserError):
    """A failure the user can act on (bad data, wrong checkpoint, incompatible resume, failed verification)."""
