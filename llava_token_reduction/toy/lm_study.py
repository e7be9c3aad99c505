"""`toy lm-study`: can the toy's language model learn the task, and from which inputs?

Up to the fourth pass the toy's 3-layer Llama, trained from nothing, learned the answer sets and counting but not
to find the object a question names (docs/toy_model.md). This command trains the LLaVA stage alone (fresh projector and
Llama, the frozen tower of a toy checkpoint) in one of two prompt orders and on one of two kinds of image
features, and prints training and held-out accuracy by question kind as it goes, so that a change of recipe is
judged in minutes instead of by a whole `toy build`:

- `--order question-first` is the shipped chat template (`train.TOY_CHAT_TEMPLATE`:
  `USER: {question} <image>\\nASSISTANT:`), under which every image token can read the question (causal
  attention); `--order image-first` is LLaVA-1.5's (`USER: <image>\\n{question} ASSISTANT:`).
- `--features tower` trains on the checkpoint's frozen tower output (as `toy build` does);
  `--features symbolic` on `symbolic.symbolic_features`, the scene written as symbols on the patch grid: what
  a perfect vision tower could give. If the language model does not learn from those, the tower is not what
  stops it.

Accuracy here is teacher-forced: the most likely first answer token after the prompt, against the answer's (one
word, one token). Greedy generation starts with the same token (tested), so this is `toy eval`'s accuracy up to
what comes after the first word.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..tiny import LLAVA_CHAT_TEMPLATE
from .scenes import QUESTION_KINDS, TRAIN_SEED, Question, make_split
from .symbolic import symbolic_features
from .train import (
    TOY_CHAT_TEMPLATE,
    TOY_SHAPE,
    Recipe,
    build_toy_processor,
    fit_llava,
    llava_forward,
    llava_with_tower,
    qa_batch,
    scene_object_patches,
    tower_features,
)


ORDERS = {"question-first": TOY_CHAT_TEMPLATE, "image-first": LLAVA_CHAT_TEMPLATE}  # the toy's, LLaVA-1.5's
FEATURES = ("tower", "symbolic")
TRAIN_CHECK = 500  # training questions scored at every evaluation (the first ones of the split)


@dataclass(frozen=True)
class StudyRow:
    step: int
    loss: float  # mean of the last 50 steps
    train: dict  # accuracy overall ("all") and by question kind, on the first TRAIN_CHECK training questions
    held_out: dict  # the same on the 500 held-out questions


def first_answer_hits(model, processor, questions: list[Question], features: torch.Tensor,
                      batch_size: int = 100) -> list[bool]:
    """Per question: is the most likely token after its prompt the first token of its answer (teacher-forced,
    the tower's output given as `features`, one row per image of the questions' split)?"""
    hits = []
    with torch.no_grad():
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            batch = qa_batch(processor, chunk)
            logits = llava_forward(model, batch, features[[q.image_index for q in chunk]]).logits
            for row in range(len(chunk)):
                position = int((batch["labels"][row] != -100).nonzero()[0])  # the answer's first token
                hits.append(int(logits[row, position - 1].argmax()) == int(batch["labels"][row, position]))
    return hits


def answer_accuracy(model, processor, questions: list[Question], features: torch.Tensor) -> dict[str, float]:
    """`first_answer_hits` as accuracy overall ("all") and by question kind."""
    hits = first_answer_hits(model, processor, questions, features)
    by_kind = {kind: [hit for hit, q in zip(hits, questions) if q.kind == kind] for kind in QUESTION_KINDS}
    return {"all": float(np.mean(hits)), **{kind: float(np.mean(h)) for kind, h in by_kind.items() if h}}


def standardize_projector(model, features: torch.Tensor) -> None:
    """Fold the features' per-channel mean and standard deviation into the projector's first layer, so that it
    starts on standardised input (the tower's output has a shared offset of norm 14-29 and channels of very
    different scales; the symbols are 0/1)."""
    flat = features.reshape(-1, features.shape[-1])
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    first = model.model.multi_modal_projector.linear_1
    with torch.no_grad():
        first.weight.div_(std)
        first.bias.sub_(first.weight @ mean)


def study(models: Path, order: str = "question-first", features: str = "tower", steps: int = Recipe.llava_steps,
          lr: float = Recipe.llava_lr, batch_size: int = 32, seed: int = 0, every: int = 500, train_images: int = 6000,
          standardize: bool = False, background_drop: float = Recipe.background_drop, progress: bool = True,
          on_row=None) -> list[StudyRow]:
    """Train a fresh projector and Llama on the frozen tower of `models`/llava (see the module docstring) and
    score them every `every` steps; `on_row(row)` sees each row as it comes."""
    from transformers import LlavaForConditionalGeneration

    from .evaluate import test_split

    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if features not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")
    if not 0 <= background_drop <= 1:
        raise ValueError(f"background_drop must be between 0 and 1, got {background_drop}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("every", every), ("train_images", train_images)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    checkpoint = Path(models) / "llava"
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"no toy LLaVA checkpoint in {checkpoint} (a `toy build` output or the shipped assets)")
    train = make_split(TRAIN_SEED, train_images, Recipe.questions_per_image)
    held_out = test_split()
    processor = build_toy_processor()
    processor.chat_template = ORDERS[order]
    trained = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    torch.manual_seed(seed)
    model = llava_with_tower(trained.model.vision_tower, TOY_SHAPE).train()
    if features == "tower":
        train_features = tower_features(model, processor, train.scenes, progress=progress)
        held_out_features = tower_features(model, processor, held_out.scenes, progress=progress)
    else:
        width = TOY_SHAPE.vision_hidden
        train_features = symbolic_features(train.scenes, width, TOY_SHAPE.patch_size)
        held_out_features = symbolic_features(held_out.scenes, width, TOY_SHAPE.patch_size)
    if standardize:
        standardize_projector(model, train_features)
    rows: list[StudyRow] = []

    def score(step: int, losses: list[float]) -> None:
        model.eval()
        row = StudyRow(step, float(np.mean(losses[-50:])),
                       answer_accuracy(model, processor, list(train.questions[:TRAIN_CHECK]), train_features),
                       answer_accuracy(model, processor, list(held_out.questions), held_out_features))
        model.train()
        rows.append(row)
        if on_row:
            on_row(row)

    fit_llava(model, processor, train.questions, train_features, steps, lr, batch_size, seed,
              Recipe.warmup_fraction, progress=progress, every=every, on_every=score,
              background_drop=background_drop, object_patches_of=scene_object_patches(train.scenes))
    return rows


def row_text(row: StudyRow) -> str:
    """One evaluation as a markdown table row (see `HEADER`)."""
    def cells(scores: dict) -> str:
        return " | ".join(f"{100 * scores[kind]:.0f}%" if kind in scores else "" for kind in QUESTION_KINDS)

    return (f"| {row.step} | {row.loss:.3f} | {100 * row.train['all']:.1f}% | {100 * row.held_out['all']:.1f}% | "
            f"{cells(row.held_out)} |")


HEADER = ("| step | loss | train (first 500) | held-out (500) | " + " | ".join(QUESTION_KINDS) + " |\n"
          + "|---" * (4 + len(QUESTION_KINDS)) + "|")
