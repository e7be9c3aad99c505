"""The tuning dataset (images loaded, padded to square as LLaVA-1.5 does, processed; the method's per-image side
inputs, made by its processor, when it takes any), the padding collator and the resumable epoch sampler."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image

from .common import DataError
from .encoding import ConversationEncoder
from .records import IGNORE_INDEX, Sample, UnreadableImage


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
    """Encoded samples: `input_ids`, `labels` ([L] long), `pixel_values` ([n, C, H, W]) and the method's
    `side_inputs` (its registry entry's; TRIM: `clip_input_ids` / `clip_attention_mask`, [n, 77]), one row per
    image; n = the sample's images (may be 0).

    The side inputs come from the method's processor, called on the images with each image's question as
    `clip_text` (the processor's keyword for per-image questions). `trim=True` is the old spelling of TRIM's
    side inputs."""

    def __init__(self, samples: list[Sample], encoder: ConversationEncoder, processor, *,
                 side_inputs: tuple[str, ...] = (), trim: bool = False, image_aspect_ratio: str = "pad",
                 skip_unreadable: bool = False, unreadable_log: Path | None = None, known_unreadable=()):
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
        self.processor = processor
        self.image_processor = processor.image_processor
        if trim:
            from ..methods import get

            side_inputs = get("trim").side_inputs
        self.side_inputs = tuple(side_inputs)
        made = set(getattr(processor, "model_input_names", ()))
        if not set(self.side_inputs) <= made:
            raise ValueError(
                f"the model takes {', '.join(self.side_inputs)} per image, but its processor "
                f"{type(processor).__name__} does not make them (it makes {', '.join(sorted(made)) or 'nothing'}); "
                "load the checkpoint's own processor"
            )
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
        item = {"input_ids": torch.tensor(input_ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long)}
        if sample.images:
            images = [self._load_image(sample, path) for path in sample.images]
            if self.side_inputs:  # the method's processor makes the pixels and its per-image rows together
                encoded = self.processor(images=images, clip_text=list(sample.questions), return_tensors="pt")
            else:
                encoded = self.image_processor(images, return_tensors="pt")
            item["pixel_values"] = encoded["pixel_values"]
            item.update({name: encoded[name] for name in self.side_inputs})
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


__all__ = ['EpochSampler', 'InstructionCollator', 'InstructionDataset', 'expand_to_square', 'read_unreadable_log']
