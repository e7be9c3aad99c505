"""Where a conversion writes, and how it replaces an existing output without losing anyone's files.

- `check_output(out, overwrite)` refuses, before any work, the OUT values that would destroy a user's data: an
  empty string (an unset shell variable), a symbolic link (`--overwrite` would replace what it points to), the
  working directory or one of its ancestors, the home directory, the file-system root, and, with `--overwrite`,
  any existing directory that is not a checkpoint this package wrote (`config.json` of one of the
  registry's model types, `llava_visionzip`, `llava_next_visionzip`, ...). Another tool that writes a
  directory (`toy lmms-task`) passes its own `OutputKind`: what it writes, and how it recognises a previous
  output of its own, the only thing its `--overwrite` replaces.
- `OutputPlacement` writes into a hidden staging directory next to OUT and moves it into place. With
  `--overwrite` the old OUT is renamed aside and the staging directory renamed onto OUT with Ctrl-C held back
  between the two renames, so OUT is never absent when control returns; the old copy is deleted afterwards.
  After an interrupt at any stage `interrupted_message()` says what is true: whether OUT was written, and which
  leftovers could not be removed.
"""

import contextlib
import json
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..methods import all_classes
from .errors import ConversionError


OUR_MODEL_TYPES = tuple(classes.model_type for classes in all_classes())


def _is_our_checkpoint(directory: Path) -> bool:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") in OUR_MODEL_TYPES


@dataclass(frozen=True)
class OutputKind:
    """What a tool writes into OUT, for the messages, and how it recognises its own earlier output."""

    noun: str                             # "a checkpoint": "refusing to write a checkpoint over it"
    is_ours: Callable[[Path], bool]       # an existing OUT that `--overwrite` may replace
    not_ours: str                         # completes "output OUT exists and ...": why it may not
    error: type = ConversionError


CHECKPOINT = OutputKind(
    "a checkpoint", _is_our_checkpoint,
    f"is not a VisionZip/TRIM checkpoint written by this tool (no config.json of model_type "
    f"{' or '.join(OUR_MODEL_TYPES)}); --overwrite only replaces those: remove it yourself or choose another OUT",
)


def resolve_output(out, kind: OutputKind = CHECKPOINT) -> Path:
    """The absolute OUT, refusing an empty value and a symbolic link (checked before links are resolved)."""
    text = str(out) if out is not None else ""
    if not text.strip():
        raise kind.error("OUT is empty (an unset shell variable?); name the output directory explicitly")
    given = Path(os.path.expanduser(text))
    if given.is_symlink():
        raise kind.error(
            f"output {text} is a symbolic link (to {os.readlink(given)}); refusing to write through it: name a "
            "real directory"
        )
    return Path(os.path.abspath(given)).resolve()


def check_output(out: Path, overwrite: bool, kind: OutputKind = CHECKPOINT) -> None:
    """Refuse an OUT whose replacement would delete files that are not a previous output of `kind`."""
    protected = {Path.cwd().resolve(): "the working directory", Path.home().resolve(): "your home directory"}
    for place, name in protected.items():
        if out == place or out in place.parents:
            what = name if out == place else f"an ancestor of {name}"
            raise kind.error(f"output {out} is {what}; refusing to write {kind.noun} over it: name a new directory")
    if out == Path(out.anchor):
        raise kind.error(f"output {out} is the file-system root; name a new directory")
    if not out.exists():
        return
    if not overwrite:
        raise kind.error(f"output {out} already exists; pass --overwrite to replace it")
    if not out.is_dir():
        raise kind.error(f"output {out} exists and is not a directory; refusing to replace it")
    if not kind.is_ours(out):
        raise kind.error(f"output {out} exists and {kind.not_ours}")


@contextlib.contextmanager
def _ctrl_c_held_back():
    """Run the block with SIGINT deferred (main thread only); a Ctrl-C that arrived is raised after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def _remove(directory: Path) -> bool:
    """Delete a directory tree; True when it is gone. A second Ctrl-C during the deletion stops it."""
    with contextlib.suppress(KeyboardInterrupt):
        shutil.rmtree(directory, ignore_errors=True)
    return not directory.exists()


class OutputPlacement:
    """A staging directory next to `out` and its move into place (see the module docstring)."""

    def __init__(self, out: Path, overwrite: bool, kind: OutputKind = CHECKPOINT):
        self.out, self.overwrite, self.kind = out, overwrite, kind
        self.staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
        self.retired: Path | None = None
        self.placed = False
        self.restored = False

    def create(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir()
        return self.staging

    def move_into_place(self) -> None:
        if self.out.is_symlink():
            raise self.kind.error(f"output {self.out} became a symbolic link while it was written; not replaced")
        if self.out.exists():
            if not self.overwrite:
                raise self.kind.error(
                    f"output {self.out} appeared while it was written; pass --overwrite to replace it"
                )
            check_output(self.out, self.overwrite, self.kind)  # it may have changed while we wrote
            retired = self.out.parent / f".{self.out.name}.replaced-{uuid.uuid4().hex[:8]}"
            with _ctrl_c_held_back():
                os.rename(self.out, retired)
                self.retired = retired
                os.rename(self.staging, self.out)
                self.placed = True
            shutil.rmtree(retired, ignore_errors=True)
            self.retired = None
        else:
            os.rename(self.staging, self.out)
            self.placed = True

    def clean_up(self) -> None:
        """After a failure or an interrupt: put a retired OUT back if the new one is not in place, and delete the
        staging directory and a retired copy. Never raises."""
        if self.retired is not None and self.retired.exists() and not self.placed and not self.out.exists():
            with contextlib.suppress(OSError, KeyboardInterrupt):
                os.rename(self.retired, self.out)
                self.retired, self.restored = None, True
        if self.staging.exists():
            _remove(self.staging)
        if self.retired is not None and self.placed and _remove(self.retired):
            self.retired = None

    def leftovers(self) -> list[Path]:
        return [p for p in (self.staging, self.retired) if p is not None and p.exists()]

    def interrupted_message(self) -> str:
        if self.placed:
            message = f"interrupted after {self.out} was written and verified (it is complete)"
        elif self.restored:
            message = f"interrupted; {self.out} was left as it was before (nothing was written to it)"
        else:
            message = f"interrupted; nothing was written to {self.out}"
        left = self.leftovers()
        if left:
            message += "; not yet removed, delete by hand: " + ", ".join(str(p) for p in left)
        return message


class ConversionInterrupted(Exception):
    """Ctrl-C during a conversion; the message says what was written and what is left over."""


__all__ = ["resolve_output", "check_output", "OutputKind", "CHECKPOINT", "OutputPlacement", "ConversionInterrupted",
           "OUR_MODEL_TYPES"]
