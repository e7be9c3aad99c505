"""Held-out accuracy of the toy models: exact-match one-word answers from greedy `generate()`, per question
kind, with the image tokens the language model saw.

A *setting* is a checkpoint kind (`llava`, `visionzip`, `trim`) plus load-time config overrides, e.g.
`("visionzip", {"dominant_tokens": 13, "contextual_tokens": 3})`. Every setting loads its checkpoint the way
users do (`AutoModelForImageTextToText` / `AutoProcessor`, overrides as `from_pretrained` keywords).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..progress import transformers_bars
from . import ASSETS
from .scenes import QUESTION_KINDS, TEST_SEED, Question, Split, chance_accuracy, make_split
from .train import prompt_text


TEST_IMAGES = 250  # the held-out split: 250 scenes, 2 questions each
MAX_ANSWER_TOKENS = 4  # one word + </s>, with room to see a model that rambles


@dataclass(frozen=True)
class Setting:
    label: str
    kind: str  # checkpoint folder: llava, visionzip, trim or prumerge
    overrides: dict = field(default_factory=dict)


def visionzip_setting(dominant: int, contextual: int) -> Setting:
    return Setting(f"VisionZip {dominant}+{contextual}", "visionzip",
                   {"dominant_tokens": dominant, "contextual_tokens": contextual})


STOCK = Setting("stock LLaVA", "llava")
# From all 16 tokens (CLS + 15 patches) down to 2; 13+3 is the published budgets' 54:10 ratio at 16 tokens.
VISIONZIP_BUDGETS = ((16, 0), (13, 3), (6, 2), (3, 1), (2, 1), (1, 1))
TRIM_SETTINGS = (
    Setting("TRIM adaptive", "trim", {}),
    Setting("TRIM adaptive, sign False", "trim", {"trim_negate_similarity": False}),
    Setting("TRIM bounded 2-4", "trim", {"trim_min_tokens": 2, "trim_max_tokens": 4}),
    Setting("TRIM bounded 2-4, sign False", "trim",
            {"trim_min_tokens": 2, "trim_max_tokens": 4, "trim_negate_similarity": False}),
)
PRUMERGE_SETTINGS = (
    Setting("PruMerge", "prumerge", {}),
    Setting("PruMerge+", "prumerge", {"prumerge_plus": True}),
)
DEFAULT_SETTINGS = (STOCK, *(visionzip_setting(d, c) for d, c in VISIONZIP_BUDGETS), *TRIM_SETTINGS,
                    *PRUMERGE_SETTINGS)


def test_split(images: int = TEST_IMAGES) -> Split:
    return make_split(TEST_SEED, images)


def load(directory, **overrides):
    """A toy checkpoint and its processor, loaded as users load them, in float32 (the shipped weights are
    float32; an explicit dtype keeps it so whatever transformers' default)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import llava_token_reduction  # noqa: F401 - registers the model types with the Auto classes

    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32, **overrides).eval()
    return model, AutoProcessor.from_pretrained(directory)


@dataclass
class Result:
    setting: Setting
    answers: list[str]
    correct: list[bool]
    tokens: list[int]  # image tokens per question (per its image)
    kinds: list[str]

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct))

    @property
    def mean_tokens(self) -> float:
        return float(np.mean(self.tokens))

    def by_kind(self) -> dict[str, float]:
        return {kind: float(np.mean([c for c, k in zip(self.correct, self.kinds) if k == kind]))
                for kind in QUESTION_KINDS if kind in self.kinds}


def image_token_counts(model, inputs) -> list[int]:
    """Tokens per image that the language model sees: the reduced models' `get_image_features` lengths, or
    the placeholder count for stock LLaVA."""
    if model.config.model_type == "llava":
        per_row = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1)
        return per_row.tolist()
    extra = {k: inputs[k] for k in ("clip_input_ids", "clip_attention_mask") if k in inputs}
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], **extra).pooler_output
    return [len(f) for f in features]


def answer_questions(model, processor, questions: list[Question], images, batch_size: int = 50,
                     progress: bool = False, desc: str = "") -> tuple[list[str], list[int]]:
    """Greedy one-word answers and image-token counts, batch by batch."""
    answers, tokens = [], []
    batches = range(0, len(questions), batch_size)
    for start in tqdm(batches, desc=desc, disable=not progress, leave=False):
        chunk = questions[start:start + batch_size]
        inputs = processor(
            images=[images[q.image_index] for q in chunk], text=[prompt_text(processor, q.text) for q in chunk],
            padding=True, return_tensors="pt",
        )
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False)
        new = output[:, inputs["input_ids"].shape[1]:]
        answers += [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)]
        tokens += image_token_counts(model, inputs)
    return answers, tokens


def evaluate(settings=DEFAULT_SETTINGS, root=ASSETS, split: Split | None = None, limit: int | None = None,
             progress: bool = True) -> list[Result]:
    split = split or test_split()
    questions = list(split.questions[:limit] if limit else split.questions)
    images = split.images()
    results = []
    with transformers_bars(False):  # one "Loading weights" bar per setting would drown the table
        for setting in tqdm(settings, desc="settings", disable=not progress):
            model, processor = load(Path(root) / setting.kind, **setting.overrides)
            answers, tokens = answer_questions(model, processor, questions, images, progress=progress,
                                               desc=setting.label)
            correct = [a == q.answer for a, q in zip(answers, questions)]
            results.append(Result(setting, answers, correct, tokens, [q.kind for q in questions]))
    return results


def table(results: list[Result], questions=None) -> str:
    """A markdown table: accuracy overall and per kind, mean image tokens (min-max when they vary)."""
    kinds = [k for k in QUESTION_KINDS if k in results[0].kinds]
    head = ["setting", "image tokens", "accuracy", *kinds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for result in results:
        low, high = min(result.tokens), max(result.tokens)
        tokens = f"{low}" if low == high else f"{result.mean_tokens:.1f} ({low}-{high})"
        by_kind = result.by_kind()
        cells = [result.setting.label, tokens, f"{100 * result.accuracy:.1f}%",
                 *(f"{100 * by_kind[k]:.0f}%" for k in kinds)]
        lines.append("| " + " | ".join(cells) + " |")
    if questions is not None:
        lines.append(f"\n{len(questions)} held-out questions; chance (knowing each kind's answer set): "
                     f"{100 * chance_accuracy(questions):.1f}%")
    return "\n".join(lines)
