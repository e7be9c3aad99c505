"""LLaVA instruction data for projector tuning: reading, checking, subsetting, encoding and batching.

Record format (LLaVA-1.5's `llava_v1_5_mix665k.json`), as a JSON list or as JSON Lines (one record a line):

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

- `image` is a path relative to `--image-folder` (or a list of paths, one per `<image>`); records without
  `image` are text-only (LLaVA-665K has ~40k of them) and must not contain `<image>`.
- Turns alternate `human` / `gpt`, starting with `human`. With an image, the first human turn holds `<image>`.

Encoding. The prompt is rendered turn by turn, either with the processor's chat template or with LLaVA-1.5's
own conversation format (`llava-v1`: system prompt, `USER: ... ASSISTANT: ...</s>`). Every assistant answer
plus one end-of-sequence token (the template's own when it writes one) is a target; everything else (system
prompt, user turns, role markers, image placeholders, padding) is labelled -100. Each `<image>` becomes the processor's full placeholder run; the
model reduces the image and compacts the placeholders and labels itself.

TRIM's question (the text the CLIP tower scores patches against) follows evaluation semantics: for each image,
the text of the human turn that brings it, without `<image>` (for LLaVA data: the first human turn).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .common import PROMPT_FORMATS, DataError


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


# Encoding ------------------------------------------------------------------------------------------------------


class ConversationEncoder:
    """Turns a `Sample` into `input_ids` and `labels` (lists of ints) with full image placeholder runs.

    Args:
        processor: the checkpoint's processor (its tokenizer and, for `chat-template`, its chat template).
        image_seq_length: placeholders per image (`config.image_seq_length`, as the stock processor expands).
        image_token_id: the placeholder id (`config.image_token_id`).
        prompt_format: `chat-template`, `llava-v1`, or `auto` (the chat template when the processor has one).
        max_length: the longest sequence in tokens (with full placeholder runs); longer ones are cut at the end.
    """

    def __init__(self, processor, image_seq_length: int, image_token_id: int, prompt_format: str = "auto",
                 max_length: int = 2048, system_prompt: str | None = None):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        self.tokenizer = processor.tokenizer
        self.chat_template = getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if prompt_format == "auto":
            prompt_format = "chat-template" if self.chat_template else "llava-v1"
        if prompt_format == "chat-template" and not self.chat_template:
            raise ValueError("--prompt-format chat-template: the processor has no chat template; use llava-v1")
        self.processor = processor
        self.prompt_format = prompt_format
        self.image_seq_length = image_seq_length
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.system_prompt = LLAVA_V1_SYSTEM if system_prompt is None else system_prompt
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no EOS token; answers need one to end")
        self.eos_id = eos
        bos = self.tokenizer.bos_token_id
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos_id = bos if bos is not None and probe and probe[0] == bos else None

    # segments: (text, is_target) -------------------------------------------------------------------------
    def segments(self, sample: Sample) -> list[tuple[str, bool]]:
        if self.prompt_format == "llava-v1":
            return self._llava_v1_segments(sample)
        return self._template_segments(sample)

    def _llava_v1_segments(self, sample: Sample) -> list[tuple[str, bool]]:
        segments = []
        context = self.system_prompt + " " if self.system_prompt else ""
        for (role, text), count in zip(sample.turns, sample.images_per_turn):
            if role == "user":
                context += "USER: " + (IMAGE_MARKER + "\n") * count + text + " ASSISTANT:"
            else:
                segments.append((context, False))
                segments.append((" " + text, True))
                context = ""  # the EOS that follows each answer is the separator
        return segments

    def _messages(self, sample: Sample) -> list[dict]:
        messages = []
        for (role, text), count in zip(sample.turns, sample.images_per_turn):
            content = [{"type": "image"} for _ in range(count)] + [{"type": "text", "text": text}]
            messages.append({"role": role, "content": content})
        return messages

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _template_segments(self, sample: Sample) -> list[tuple[str, bool]]:
        """Render growing prefixes; what a turn's answer adds to the prompt-with-generation-prompt is the target.
        Whitespace a template puts after an answer goes to the next context, so targets end with the answer."""
        messages = self._messages(sample)
        segments, rendered = [], ""
        for end in range(1, len(messages), 2):
            prompt = self._render(messages[:end], add_generation_prompt=True)
            full = self._render(messages[: end + 1], add_generation_prompt=False)
            if not prompt.startswith(rendered) or not full.startswith(prompt):
                raise DataError(
                    "the chat template does not render conversations prefix by prefix; use --prompt-format llava-v1"
                )
            answer = full[len(prompt):]
            trimmed = answer.rstrip()
            segments.append((prompt[len(rendered):], False))
            segments.append((trimmed, True))
            rendered = prompt + trimmed
        return segments

    # tokens ---------------------------------------------------------------------------------------------
    def _tokens(self, text: str) -> list[int]:
        ids = []
        for number, piece in enumerate(text.split(IMAGE_MARKER)):
            if number:
                ids.extend([self.image_token_id] * self.image_seq_length)
            if piece:
                ids.extend(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
        return ids

    def encode_full(self, sample: Sample) -> tuple[list[int], list[int]]:
        """Untruncated `input_ids` and `labels`."""
        input_ids = [] if self.bos_id is None else [self.bos_id]
        labels = [IGNORE_INDEX] * len(input_ids)
        for number, (text, is_target) in enumerate(self.segments(sample)):
            bos_text = self.tokenizer.bos_token
            if number == 0 and self.bos_id is not None and bos_text and text.startswith(bos_text):
                text = text[len(bos_text):]  # the template wrote BOS itself
            ids = self._tokens(text)
            if is_target and (not ids or ids[-1] != self.eos_id):  # a chat template may write the EOS itself
                ids = ids + [self.eos_id]
            input_ids.extend(ids)
            labels.extend(ids if is_target else [IGNORE_INDEX] * len(ids))
        return input_ids, labels

    def encode(self, sample: Sample) -> tuple[list[int], list[int]]:
        """`input_ids` and `labels`, cut to `max_length` (never inside an image's placeholders: `check` refuses
        such records)."""
        input_ids, labels = self.encode_full(sample)
        return input_ids[: self.max_length], labels[: self.max_length]

    def check(self, sample: Sample) -> str | None:
        """Why the sample cannot be trained on at `max_length`, or None."""
        try:
            input_ids, labels = self.encode_full(sample)
        except DataError as error:
            return str(error)
        placeholders = [i for i, token in enumerate(input_ids) if token == self.image_token_id]
        if len(placeholders) != self.image_seq_length * len(sample.images):
            return f"the text itself contains the image token; found {len(placeholders)} placeholders"
        if placeholders and placeholders[-1] >= self.max_length:
            return (f"too long: its image placeholders end at token {placeholders[-1] + 1}, beyond "
                    f"--max-length {self.max_length}")
        if all(label == IGNORE_INDEX for label in labels[: self.max_length]):
            return f"no answer token within --max-length {self.max_length}"
        return None


# Dataset and batching ------------------------------------------------------------------------------------------


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's `image_aspect_ratio=pad`: centre the image on a square of the background colour."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class InstructionDataset(torch.utils.data.Dataset):
    """Encoded samples: `input_ids`, `labels` ([L] long), `pixel_values` ([n, C, H, W]) and, for TRIM,
    `clip_input_ids` / `clip_attention_mask` ([n, 77]); n = the sample's images (may be 0)."""

    def __init__(self, samples: list[Sample], encoder: ConversationEncoder, processor, *, trim: bool = False,
                 image_aspect_ratio: str = "pad", skip_unreadable: bool = False, unreadable_log: Path | None = None,
                 known_unreadable=()):
        # With `skip_unreadable`, a record whose image passed the start-up check but does not decode is replaced
        # by the next readable record (positions wrap around) and appended to `unreadable_log`. The replacement
        # depends only on which files are broken, so a resumed run sees the same stream; records listed in
        # `known_unreadable` (sample indices, e.g. from an earlier run's log) are not opened again.
        self.skip_unreadable = skip_unreadable
        self.unreadable_log = unreadable_log
        self.known_unreadable = set(known_unreadable)
        if image_aspect_ratio not in ("pad", "crop"):
            raise ValueError(f"image aspect ratio must be 'pad' or 'crop', got {image_aspect_ratio!r}")
        self.samples = samples
        self.encoder = encoder
        self.image_processor = processor.image_processor
        self.clip_tokenizer = getattr(processor, "clip_tokenizer", None) if trim else None
        if trim and self.clip_tokenizer is None:
            raise ValueError("a TRIM model needs a processor with a CLIP tokenizer (LlavaTrimProcessor)")
        self.trim = trim
        self.image_aspect_ratio = image_aspect_ratio
        mean = getattr(self.image_processor, "image_mean", None) or [0.5, 0.5, 0.5]
        self.background = tuple(int(round(value * 255)) for value in mean)

    def __len__(self):
        return len(self.samples)

    def _load_image(self, sample: Sample, path: Path) -> Image.Image:
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as error:  # noqa: BLE001
            raise UnreadableImage(f"record {sample.index}, id {sample.record_id}: unreadable image {path}: "
                                  f"{' '.join(str(error).split()) or type(error).__name__}") from None
        return expand_to_square(image, self.background) if self.image_aspect_ratio == "pad" else image

    def __getitem__(self, position: int) -> dict:
        if not self.skip_unreadable:
            return self._item(position)
        for offset in range(len(self.samples)):
            candidate = (position + offset) % len(self.samples)
            sample = self.samples[candidate]
            if sample.index in self.known_unreadable:
                continue
            try:
                return self._item(candidate)
            except UnreadableImage as error:
                self.known_unreadable.add(sample.index)
                self._log_unreadable(sample, str(error))
        raise DataError("no record left with a readable image (see the unreadable-image log)")

    def _log_unreadable(self, sample: Sample, reason: str) -> None:
        print(f"warning: skipping {reason} (--skip-bad-records)", file=sys.stderr)
        if self.unreadable_log is not None:
            with open(self.unreadable_log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"index": sample.index, "id": sample.record_id, "reason": reason}) + "\n")

    def _item(self, position: int) -> dict:
        sample = self.samples[position]
        input_ids, labels = self.encoder.encode(sample)
        item = {"input_ids": torch.tensor(input_ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
        if sample.images:
            images = [self._load_image(sample, path) for path in sample.images]
            item["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
            if self.trim:
                from ..modeling.processing_llava_trim import CLIP_MAX_LENGTH

                encoded = self.clip_tokenizer(sample.questions, padding="max_length", truncation=True,
                                              max_length=CLIP_MAX_LENGTH, return_tensors="pt")
                item["clip_input_ids"] = encoded["input_ids"]
                item["clip_attention_mask"] = encoded["attention_mask"]
        return item


def read_unreadable_log(path: Path) -> set[int]:
    """Sample indices an earlier run of the same output directory found undecodable (see InstructionDataset)."""
    if not Path(path).is_file():
        return set()
    found = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            found.add(int(json.loads(line)["index"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
    return found


class InstructionCollator:
    """Right-pads `input_ids` (pad id), `attention_mask` (0) and `labels` (-100) and concatenates the images of
    all rows, in row order. A batch without images carries no `pixel_values`."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        length = max(len(item["input_ids"]) for item in items)
        batch = {
            "input_ids": torch.full((len(items), length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(items), length), dtype=torch.long),
            "labels": torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long),
        }
        for row, item in enumerate(items):
            size = len(item["input_ids"])
            batch["input_ids"][row, :size] = item["input_ids"]
            batch["attention_mask"][row, :size] = 1
            batch["labels"][row, :size] = item["labels"]
        for name in ("pixel_values", "clip_input_ids", "clip_attention_mask"):
            parts = [item[name] for item in items if name in item]
            if parts:
                batch[name] = torch.cat(parts, dim=0)
        return batch


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, identical on every process (set `epoch` before iterating): the data
    order depends only on the seed and the epoch, so a resumed run sees the batches an uninterrupted one would."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size = size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self):
        return self.size
