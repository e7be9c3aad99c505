"""Projector tuning for VisionZip and TRIM checkpoints (`llava-token-reduction tune`, docs/tuning.md).

`data` reads, checks and encodes LLaVA instruction data; `train` is the accelerate training loop and its
command line. Heavy imports (torch, transformers, accelerate) happen when a command runs, not on import.
"""

from .common import DataError


__all__ = ["DataError"]
