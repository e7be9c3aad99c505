"""LLaVA instruction records for projector tuning: reading (JSON list or JSON Lines), checking, subsetting and
the data fingerprint. The record format is described in `tuning/data.py`."""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .common import DataError


if TYPE_CHECKING:  # the encoder module imports this one
    from .encoding import ConversationEncoder


class UnreadableImage(DataError):
    """An image that passed the start-up check but does not decode."""


IGNORE_INDEX = -100
IMAGE_MARKER = "<image>"
LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_ID_PATTERN = re.compile(r'"id"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)')


@dataclass
class BadRecord:
    index: int  # 0-based position of the record in the data file
    record_id: str
    reason: str
    line: int | None = None  # 1-based line in the file, when known

    def describe(self) -> str:
        where = f"record {self.index}" + (f" (line {self.line})" if self.line is not None else "")
        return f"{where}, id {self.record_id}: {self.reason}"


@dataclass
class Sample:
    """One checked record, ready to encode."""

    index: int
    record_id: str
    turns: list[tuple[str, str]]  # (role "user"/"assistant", text without <image>), alternating, user first
    images: list[Path] = field(default_factory=list)  # in order of appearance
    images_per_turn: list[int] = field(default_factory=list)  # how many images each turn brings

    @property
    def questions(self) -> list[str]:
        """TRIM's question for each image: the text of the turn that brings it."""
        return [text for (_, text), count in zip(self.turns, self.images_per_turn) for _ in range(count)]


# Reading -------------------------------------------------------------------------------------------------------


def _id_near(text: str) -> str:
    match = _ID_PATTERN.search(text)
    if not match:
        return "?"
    value = match.group(1)
    return value.strip('"') if value.startswith('"') else value


def _locate_json_error(text: str, path: Path) -> str:
    """Which element of a top-level JSON list is malformed, with its line, column and (best effort) id."""
    decoder = json.JSONDecoder()
    position = 0

    def skip_space(pos):
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    position = skip_space(position)
    if position >= len(text) or text[position] != "[":
        return f"{path}: malformed JSON: the file must hold a list of records (or be JSON Lines)"
    position = skip_space(position + 1)
    index = 0
    while True:
        start = position
        try:
            _, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            end = text.find("\n{", start + 1)
            record_id = _id_near(text[start : end if end > 0 else start + 4000])
            return (
                f"{path}: malformed JSON in record {index} (id {record_id}) at line {error.lineno} column "
                f"{error.colno}: {error.msg}"
            )
        position = skip_space(position)
        if position < len(text) and text[position] == ",":
            position = skip_space(position + 1)
            index += 1
            continue
        if position < len(text) and text[position] == "]":
            line = text.count("\n", 0, position) + 1
            return f"{path}: malformed JSON after record {index} at line {line}: unexpected trailing content"
        line = text.count("\n", 0, position) + 1
        return (
            f"{path}: malformed JSON after record {index} (id {_id_near(text[start:position])}) at line {line}: "
            "expected ',' or ']'"
        )


def read_records(path: str | os.PathLike) -> tuple[list, list[BadRecord], list[int | None]]:
    """Parse a JSON list or a JSON Lines file.

    Returns the records (a malformed JSON Lines record becomes None), the malformed ones as `BadRecord`s and
    each record's line number (JSON Lines) or None. A malformed JSON list is fatal: its records cannot be
    told apart after the error, so `DataError` names the record and position (use JSON Lines to skip it).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the data file is empty")
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            raise DataError(_locate_json_error(text, path)) from None
        return records, [], [None] * len(records)
    records, bad, lines = [], [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            bad.append(BadRecord(len(records), _id_near(line), f"malformed JSON (column {error.colno}: {error.msg})",
                                 line_number))
            records.append(None)
        lines.append(line_number)
    if not records:
        raise DataError(f"{path}: the data file holds no records")
    return records, bad, lines


# Subsetting ----------------------------------------------------------------------------------------------------


def select_subset(total: int, fraction: float | None, max_samples: int | None, seed: int) -> list[int]:
    """Record indices of a reproducible random subset, in file order.

    `fraction` of the records (rounded, at least one), then at most `max_samples` of them; the same seed and
    file always give the same subset (a seeded permutation, so a smaller `max_samples` is a prefix of it).
    """
    if fraction is not None and not 0 < fraction <= 1:
        raise DataError(f"--fraction must be in (0, 1], got {fraction}")
    if max_samples is not None and max_samples < 1:
        raise DataError(f"--max-samples must be >= 1, got {max_samples}")
    count = total if fraction is None else max(1, round(fraction * total))
    if max_samples is not None:
        count = min(count, max_samples)
    if count == total:
        return list(range(total))
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[:count])


# Checking ------------------------------------------------------------------------------------------------------


def _check_image(path: Path, decode: bool) -> str | None:
    if not path.is_file():
        return f"image file not found: {path}"
    try:
        with Image.open(path) as image:
            if decode:
                image.convert("RGB")
            else:
                image.verify()
    except Exception as error:  # noqa: BLE001 - PIL raises many types for broken files
        return f"unreadable image {path}: {' '.join(str(error).split()) or type(error).__name__}"
    return None


def parse_record(record, index: int, image_folder: Path | None) -> Sample:
    """Check one record's structure and return it as a `Sample`; raises `DataError` with the reason (the
    caller adds the record's index and id)."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DataError("empty conversation (`conversations` must be a non-empty list of turns)")
    turns = []
    for number, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"turn {number} must be an object with a string `value`")
        role = _ROLES.get(turn.get("from"))
        if role is None:
            raise DataError(f"turn {number} has `from` {turn.get('from')!r}; expected 'human' or 'gpt'")
        expected = "user" if number % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(f"turn {number} is from {turn.get('from')!r}; turns must alternate human, gpt, ...")
        turns.append((role, turn["value"]))
    if len(turns) < 2:
        raise DataError("the conversation has no gpt turn to learn from")
    if len(turns) % 2:
        turns = turns[:-1]  # a trailing question without an answer teaches nothing
    images = record.get("image")
    counts = [text.count(IMAGE_MARKER) for _, text in turns]
    if any(count and role == "assistant" for (role, _), count in zip(turns, counts)):
        raise DataError(f"a gpt turn contains {IMAGE_MARKER}; images belong to human turns")
    if images is None:
        if sum(counts):
            raise DataError(f"the conversation has {IMAGE_MARKER} but the record has no `image`")
        paths = []
    else:
        names = [images] if isinstance(images, str) else images
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise DataError("`image` must be a file name or a non-empty list of file names")
        if counts[0] == 0:
            raise DataError(f"no {IMAGE_MARKER} in the first human turn")
        if sum(counts) != len(names):
            raise DataError(f"{sum(counts)} {IMAGE_MARKER} marker(s) in the conversation but {len(names)} image(s)")
        if image_folder is None:
            raise DataError("the record has an image but no --image-folder was given")
        paths = [image_folder / name for name in names]
    cleaned = [(role, clean_text(text)) for role, text in turns]
    record_id = record.get("id")
    return Sample(index=index, record_id="?" if record_id is None else str(record_id), turns=cleaned, images=paths,
                  images_per_turn=counts)


def clean_text(text: str) -> str:
    """A turn's text without `<image>` markers and the whitespace around them (as LLaVA moves the marker)."""
    if IMAGE_MARKER not in text:
        return text.strip()
    return " ".join(part.strip() for part in text.split(IMAGE_MARKER) if part.strip())


def load_samples(
    data_path,
    image_folder=None,
    *,
    fraction: float | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    skip_bad_records: bool = False,
    skip_text_only: bool = False,
    decode_images: bool = False,
    encoder: "ConversationEncoder | None" = None,
    workers: int = 8,
) -> tuple[list[Sample], list[BadRecord]]:
    """Read the data file, take the subset, and check every selected record (structure, image files, and with
    `encoder` that the encoded prompt fits). Raises `DataError` listing the bad records unless
    `skip_bad_records`, in which case they are returned beside the good samples."""
    records, malformed, lines = read_records(data_path)
    image_folder = None if image_folder is None else Path(image_folder)
    if image_folder is not None and not image_folder.is_dir():
        raise DataError(f"--image-folder is not a directory: {image_folder}")
    selected = select_subset(len(records), fraction, max_samples, seed)
    malformed_by_index = {bad.index: bad for bad in malformed}
    bad: list[BadRecord] = []
    samples: list[Sample] = []

    def fail(index, reason):
        record = records[index]
        record_id = record.get("id", "?") if isinstance(record, dict) else "?"
        bad.append(BadRecord(index, str(record_id), reason, lines[index]))

    for index in selected:
        if index in malformed_by_index:
            bad.append(malformed_by_index[index])
            continue
        try:
            sample = parse_record(records[index], index, image_folder)
        except DataError as error:
            fail(index, str(error))
            continue
        if skip_text_only and not sample.images:
            continue
        samples.append(sample)

    image_problems = {}
    paths = sorted({path for sample in samples for path in sample.images})
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for path, problem in zip(paths, pool.map(lambda p: _check_image(p, decode_images), paths)):
            if problem:
                image_problems[path] = problem
    good = []
    for sample in samples:
        problem = next((image_problems[p] for p in sample.images if p in image_problems), None)
        if problem is None and encoder is not None:
            problem = encoder.check(sample)
        if problem is not None:
            fail(sample.index, problem)
        else:
            good.append(sample)
    bad.sort(key=lambda item: item.index)
    if bad and not skip_bad_records:
        shown = "; ".join(item.describe() for item in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise DataError(
            f"{data_path}: {len(bad)} bad record(s): {shown}{more}. Fix them or pass --skip-bad-records."
        )
    if not good:
        raise DataError(f"{data_path}: no usable records (of {len(selected)} selected)")
    return good, bad


def fingerprint(samples: list[Sample]) -> str:
    """A short digest of which records are trained on, in which order (checked when resuming)."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(f"{sample.index}:{sample.record_id}\n".encode())
    return digest.hexdigest()[:16]


__all__ = [
    "BadRecord", "IGNORE_INDEX", "IMAGE_MARKER", "LLAVA_V1_SYSTEM", "Sample", "UnreadableImage", "_ID_PATTERN",
    "_ROLES", "_check_image", "_id_near", "_locate_json_error", "clean_text", "fingerprint", "load_samples",
    "parse_record", "read_records", "select_subset",
]
