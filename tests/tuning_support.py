"""Builders shared by the projector-tuning tests: tiny VisionZip / TRIM checkpoints and a synthetic LLaVA
instruction dataset written to disk (PNG images + conversations)."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llava_token_reduction import (
    LlavaVisionZipConfig,
    LlavaVisionZipForConditionalGeneration,
)
from llava_token_reduction.tiny import (
    build_method_model,
    build_processor,
    build_trim_processor,
    llava_config_kwargs,
)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def build_checkpoint(kind: str, directory: Path, seed: int = 0) -> Path:
    """Save a tiny random `kind` ("visionzip" or "trim") model with its processor to `directory`."""
    torch.manual_seed(seed)
    if kind == "visionzip":
        processor = build_processor()
        config = LlavaVisionZipConfig(**llava_config_kwargs(tokenizer=processor.tokenizer), dominant_tokens=10,
                                      contextual_tokens=4)
        model = LlavaVisionZipForConditionalGeneration(config)
    else:
        processor = build_trim_processor()
        model = build_method_model("trim", processor=processor, trim_max_tokens=12)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def write_image(path: Path, colour, size=(48, 40), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype("uint8")).save(path)
    return path


def conversation(name: str, colour: str, second_turn: bool = False) -> dict:
    turns = [{"from": "human", "value": "<image>\nWhat colour is this picture?"},
             {"from": "gpt", "value": f"It is {colour}."}]
    if second_turn:
        turns += [{"from": "human", "value": "Are you sure?"}, {"from": "gpt", "value": f"Yes, {colour}."}]
    return {"id": name, "image": f"images/{name}.png", "conversations": turns}


def write_dataset(root: Path, count: int = 4, jsonl: bool = False, extra_records=()) -> tuple[Path, Path]:
    """`count` records (one image each, colours cycling, every other one with two rounds) plus `extra_records`;
    returns (data file, image folder)."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    names = list(COLOURS)
    for number in range(count):
        colour = names[number % len(names)]
        name = f"sample{number}"
        write_image(root / "images" / f"{name}.png", COLOURS[colour], seed=number)
        records.append(conversation(name, colour, second_turn=number % 2 == 1))
    records.extend(extra_records)
    path = root / ("data.jsonl" if jsonl else "data.json")
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records, indent=1))
    return path, root
