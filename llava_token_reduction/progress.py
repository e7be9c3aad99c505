"""transformers' own progress bars ("Loading weights", "Writing model shards", ...) under a command's control.

Our commands draw their bars with tqdm and honour `--no-progress`; transformers draws its bars whatever we do
unless they are switched off through its logging module, which is process-wide state. `transformers_bars`
switches them for the duration of a block and puts back what was there before, so a library caller's own
setting survives a call into us.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager


@contextmanager
def transformers_bars(enabled: bool):
    """Inside the block, transformers' progress bars are on if `enabled` was asked and they were on before,
    off otherwise (we never turn on bars a caller turned off); afterwards they are as before."""
    from transformers.utils import logging as transformers_logging

    were_enabled = transformers_logging.is_progress_bar_enabled()
    if not enabled:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if were_enabled:
            transformers_logging.enable_progress_bar()


def bars_wanted(args: argparse.Namespace) -> bool:
    """Whether a parsed command line asked for progress bars: False for `--no-progress` (stored as
    `no_progress=True` by most commands, as `progress=False` by `convert`), True otherwise."""
    return not getattr(args, "no_progress", False) and getattr(args, "progress", True) is not False
