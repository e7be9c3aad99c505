"""Training the toy models from nothing: a tiny CLIP (contrastive, on scene captions), then a tiny LLaVA
(that CLIP's vision tower frozen, a fresh projector and a small Llama, trained together on the QA train split).

The LLaVA stage is LLaVA's stage 2 without a stage 1 (there is no pretrained language model to align to):
projector and language model learn from random initialisation on the answers alone (the prompt is masked
out of the loss), with the vision tower frozen. Both stages are seeded and run on the CPU; a run is
deterministic for a given torch version and thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, LlavaConfig, LlavaForConditionalGeneration

from ..tiny import TinyShape, build_clip_tokenizer, build_image_processor, build_llm_tokenizer, build_processor
from ..tiny import clip_text_config, llava_config_kwargs
from .scenes import Question, Split, make_scene


# LLaVA-1.5 in miniature: 112-pixel images, 14-pixel patches (64 patches + CLS), a 4-layer ViT, a 2-layer
# Llama. Default initialiser range (0.02): these weights are trained, not drawn for tests.
TOY_SHAPE = TinyShape(
    image_size=112, patch_size=14, vision_hidden=64, vision_layers=4, vision_heads=4, projection_dim=32,
    text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=4, clip_text_hidden=64, clip_text_layers=2,
    text_initializer_range=0.02,
)
CLIP_DATA_SEED = 3  # scenes for contrastive training are drawn fresh from this seed, never from the splits
QA_LENGTH = 64 + 80  # image placeholders + the longest question and answer with the template, in bytes


@dataclass(frozen=True)
class Recipe:
    """Sizes and optimiser settings of one `toy build` run (the defaults make the shipped weights)."""

    seed: int = 0
    train_images: int = 6000
    test_images: int = 250
    clip_steps: int = 500
    clip_batch: int = 64
    clip_lr: float = 2e-3
    llava_steps: int = 1000
    llava_batch: int = 32
    llava_lr: float = 1.5e-3
    warmup_fraction: float = 0.05


def build_toy_processor(shape: TinyShape = TOY_SHAPE):
    """The toy's stock `LlavaProcessor`: CLIP image processing at 112 px, the project's byte-level tokenizer
    (one token per byte, `tiny.build_llm_tokenizer`) and LLaVA-1.5's chat template."""
    return build_processor(shape)


def lr_factor(step: int, steps: int, warmup_fraction: float) -> float:
    """Linear warm-up, then cosine decay to zero."""
    warmup = max(1, int(steps * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def _optimizer(parameters, lr: float, steps: int, warmup_fraction: float):
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, warmup_fraction))
    return optimizer, scheduler


def _optimizer_step(loss, parameters, optimizer, scheduler, losses: list, bar) -> None:
    """Backward, clip to norm 1, step, record the loss (the bar shows the mean of the last 20)."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    losses.append(loss.item())
    if len(losses) % 20 == 1:
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")


def build_clip_processor(shape: TinyShape = TOY_SHAPE) -> CLIPProcessor:
    return CLIPProcessor(image_processor=build_image_processor(shape), tokenizer=build_clip_tokenizer())


def build_clip(shape: TinyShape = TOY_SHAPE) -> CLIPModel:
    vision_config = llava_config_kwargs(shape)["vision_config"]
    config = CLIPConfig(
        text_config=clip_text_config(shape).to_dict(), vision_config=vision_config.to_dict(),
        projection_dim=shape.projection_dim,
    )
    return CLIPModel(config)


def train_clip(recipe: Recipe, shape: TinyShape = TOY_SHAPE, progress: bool = True) -> tuple[CLIPModel, list[float]]:
    """Contrastive training on (scene, caption) pairs, each batch freshly drawn; returns the model and losses."""
    torch.manual_seed(recipe.seed)
    model = build_clip(shape).train()
    processor = build_clip_processor(shape)
    optimizer, scheduler = _optimizer(model.parameters(), recipe.clip_lr, recipe.clip_steps, recipe.warmup_fraction)
    rng = np.random.default_rng(CLIP_DATA_SEED + recipe.seed)
    losses = []
    bar = tqdm(range(recipe.clip_steps), desc="CLIP (contrastive)", disable=not progress)
    for step in bar:
        scenes = [make_scene(rng, noise_seed=CLIP_DATA_SEED * 7_000_001 + step * recipe.clip_batch + i)
                  for i in range(recipe.clip_batch)]
        batch = processor(
            images=[scene.render() for scene in scenes], text=[scene.caption() for scene in scenes],
            padding="max_length", max_length=77, return_tensors="pt",
        )
        loss = model(**batch, return_loss=True).loss
        _optimizer_step(loss, list(model.parameters()), optimizer, scheduler, losses, bar)
    return model.eval(), losses


def build_llava(clip: CLIPModel, shape: TinyShape = TOY_SHAPE) -> LlavaForConditionalGeneration:
    """A stock LLaVA whose vision tower is `clip`'s (copied, frozen); projector and Llama at random."""
    model = LlavaForConditionalGeneration(LlavaConfig(**llava_config_kwargs(shape, build_llm_tokenizer())))
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict(), strict=True)
    model.model.vision_tower.requires_grad_(False)
    return model


def prompt_text(processor, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def qa_batch(processor, questions: list[Question], images) -> dict:
    """Prompt + ' answer</s>' per question, left-padded, with the loss on the answer and `</s>` only."""
    tokenizer = processor.tokenizer
    answers = [" " + q.answer for q in questions]
    texts = [prompt_text(processor, q.text) + answer + tokenizer.eos_token for q, answer in zip(questions, answers)]
    # One fixed length: every step then reuses the same kernels (varying shapes make CPU steps several times slower).
    batch = processor(
        images=[images[q.image_index] for q in questions], text=texts, padding="max_length", max_length=QA_LENGTH,
        return_tensors="pt",
    )
    labels = torch.full_like(batch["input_ids"], -100)
    for row, answer in enumerate(answers):
        tail = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1  # + </s>
        labels[row, -tail:] = batch["input_ids"][row, -tail:]
    batch["labels"] = labels
    return batch


def train_llava(clip: CLIPModel, train: Split, recipe: Recipe, shape: TinyShape = TOY_SHAPE,
                progress: bool = True) -> tuple[LlavaForConditionalGeneration, list[float]]:
    torch.manual_seed(recipe.seed)
    model = build_llava(clip, shape).train()
    processor = build_toy_processor(shape)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer(trainable, recipe.llava_lr, recipe.llava_steps, recipe.warmup_fraction)
    generator = torch.Generator().manual_seed(recipe.seed)
    order: list[int] = []
    losses = []
    images: dict[int, object] = {}
    bar = tqdm(range(recipe.llava_steps), desc="LLaVA (projector + LM)", disable=not progress)
    for step in bar:
        if len(order) < recipe.llava_batch:
            order += torch.randperm(len(train.questions), generator=generator).tolist()
        picked, order = order[: recipe.llava_batch], order[recipe.llava_batch:]
        questions = [train.questions[i] for i in picked]
        needed = {q.image_index for q in questions}
        images = {i: images[i] if i in images else train.scenes[i].render() for i in needed}
        loss = model(**qa_batch(processor, questions, images)).loss
        _optimizer_step(loss, trainable, optimizer, scheduler, losses, bar)
    return model.eval(), losses
