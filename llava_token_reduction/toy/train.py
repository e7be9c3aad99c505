"""Training the toy models from nothing: a tiny CLIP (contrastive, on scene captions with hard negatives), then
a tiny LLaVA (that CLIP's vision tower frozen, a fresh projector and a small Llama, trained together on the QA
train split).

The LLaVA stage is LLaVA's stage 2 without a stage 1 (there is no pretrained language model to align to):
projector and language model learn from random initialisation on the answers alone (the prompt is masked
out of the loss), with the vision tower frozen. As the tower is frozen, its features of every training image
are computed once and reused for every step (`tower_features`, `llava_loss`), which is what makes thousands
of steps fit in minutes. Both stages are seeded and run on the CPU; a run is deterministic for a given torch
version and thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from tqdm.auto import tqdm
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from ..tiny import (
    IMAGE_TOKEN,
    LLAVA_CHAT_TEMPLATE,
    TinyShape,
    build_clip_tokenizer,
    build_image_processor,
    clip_text_config,
    llava_config_kwargs,
)
from .scenes import CELL, COLORS, IMAGE_SIZE, NUMBER_WORDS, SHAPES, Question, Split, contrastive_group, object_patches


# LLaVA-1.5 in miniature: 112-pixel images, 28-pixel patches (16 patches + CLS; every object inside one,
# `scenes.CELL`), a 4-layer ViT, a 3-layer Llama with 8 heads (with 4, the fifth pass's language model learned
# to find the object a question names later: docs/toy_model.md). Default initialiser range (0.02): these
# weights are trained, not drawn for tests.
TOY_SHAPE = TinyShape(
    image_size=IMAGE_SIZE, patch_size=CELL, vision_hidden=64, vision_layers=4, vision_heads=4, projection_dim=32,
    text_hidden=128, text_layers=3, text_heads=8, text_kv_heads=8, clip_text_hidden=64, clip_text_layers=2,
    text_initializer_range=0.02,
)
# LLaVA-1.5's template with the parts of a user turn swapped: its text, then its image(s)
# (`USER: QUESTION <image>\nASSISTANT:`). Under causal attention every image token then reads the question, so
# each can mark itself as the object the question names; with the image first a language model trained from
# nothing in minutes did not learn to find that object (docs/toy_model.md, "Fourth pass").
_IMAGE_PARTS = "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
_TEXT_PARTS = ("{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{{ ' ' }}"
               "{%- endfor -%}")
if _IMAGE_PARTS + _TEXT_PARTS not in LLAVA_CHAT_TEMPLATE:  # pragma: no cover - a guard for edits of tiny.py
    raise RuntimeError("LLAVA_CHAT_TEMPLATE no longer has the image-then-text user turn this swaps")
TOY_CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE.replace(_IMAGE_PARTS + _TEXT_PARTS, _TEXT_PARTS + _IMAGE_PARTS)
CLIP_DATA_SEED = 3  # scenes for contrastive training are drawn fresh from this seed, never from the splits
CLIP_CHECK_SEED = 4  # the held-out scene groups of `probe.retrieval_by_member`
QA_LENGTH = TOY_SHAPE.patches + 20  # image placeholders + the longest question and answer with the template (18 words)
# The toy language model's vocabulary: the chat template's words, the questions' and the answers'. One token
# per word, so an answer is one token and a question a handful (with bytes, the first pass's 2-layer model
# had to spell `What shape is the red object?` out of 29 tokens and learned shapes hardly at all).
TASK_WORDS = (
    "user", "assistant", ":", "?", "what", "color", "shape", "is", "the", "object", "there", "a", "how", "many",
    "shapes", "are", "on", "left", "or", "right", "yes", "no", *COLORS, *SHAPES, *NUMBER_WORDS.values(),
)


@dataclass(frozen=True)
class Recipe:
    """Sizes and optimiser settings of one `toy build` run (the defaults make the shipped weights)."""

    seed: int = 0
    train_images: int = 6000
    questions_per_image: int = 5  # every kind the scene answers (the tower's features are computed once per image)
    test_images: int = 250
    clip_steps: int = 700
    clip_batch: int = 64
    clip_lr: float = 3e-3
    llava_steps: int = 4000
    llava_batch: int = 32
    llava_lr: float = 1.5e-3
    background_drop: float = 0.5  # share of the LLaVA stage's examples shown with some background patches left out
    warmup_fraction: float = 0.05
    clip_check_groups: int = 100  # held-out groups for `probe.retrieval_by_member`


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `TASK_WORDS` (lower-cased; words split at spaces and punctuation) with
    Llama's special tokens and `<image>`; any other word is `<unk>`. Decoding joins words with spaces."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
    vocab = {token: index for index, token in enumerate([*specials, *TASK_WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="left",
    )


def build_toy_processor(shape: TinyShape = TOY_SHAPE) -> LlavaProcessor:
    """The toy's stock `LlavaProcessor`: CLIP image processing at 112 px, the word-level tokenizer and
    `TOY_CHAT_TEMPLATE` (the question before the image); one `<image>` expands to 16 placeholders (CLS dropped,
    as llava-hf)."""
    return LlavaProcessor(
        image_processor=build_image_processor(shape), tokenizer=build_toy_tokenizer(), patch_size=shape.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=TOY_CHAT_TEMPLATE,
    )


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
        first_seed = CLIP_DATA_SEED * 7_000_001 + step * recipe.clip_batch
        scenes = [scene for i in range(recipe.clip_batch // 4) for scene in contrastive_group(rng, first_seed + i)]
        loss = model(**_clip_inputs(processor, scenes), return_loss=True).loss
        _optimizer_step(loss, list(model.parameters()), optimizer, scheduler, losses, bar)
    return model.eval(), losses


def _clip_inputs(processor, scenes) -> dict:
    return processor(images=[scene.render() for scene in scenes], text=[scene.caption() for scene in scenes],
                     padding="max_length", max_length=77, return_tensors="pt")


def build_llava(clip: CLIPModel, shape: TinyShape = TOY_SHAPE) -> LlavaForConditionalGeneration:
    """A stock LLaVA whose vision tower is `clip`'s (copied, frozen); projector and Llama at random."""
    return llava_with_tower(clip.vision_model, shape)


def llava_with_tower(vision_tower: torch.nn.Module, shape: TinyShape = TOY_SHAPE) -> LlavaForConditionalGeneration:
    """A stock LLaVA with `vision_tower`'s weights copied into its (frozen) tower; projector and Llama at random.
    `vision_tower`: a CLIP vision transformer of `shape`, a CLIP's `vision_model` or a toy LLaVA's tower."""
    model = LlavaForConditionalGeneration(LlavaConfig(**llava_config_kwargs(shape, build_toy_tokenizer())))
    model.model.vision_tower.load_state_dict(vision_tower.state_dict(), strict=True)
    model.model.vision_tower.requires_grad_(False)
    return model


def prompt_text(processor, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def qa_batch(processor, questions: list[Question], images=None, image_tokens: list[int] | None = None) -> dict:
    """Prompt + ' answer</s>' per question, left-padded, with the loss on the answer and `</s>` only.
    `images` (indexed by `Question.image_index`): add their `pixel_values`; None: text only, for
    `llava_loss` on cached tower features, with `image_tokens[i]` placeholders for question i (default: all
    the patches)."""
    tokenizer = processor.tokenizer
    answers = [" " + q.answer for q in questions]
    texts = [prompt_text(processor, q.text) + answer + tokenizer.eos_token for q, answer in zip(questions, answers)]
    # One fixed length: every step then reuses the same kernels (varying shapes make CPU steps several times slower).
    if images is None:
        counts = image_tokens or [TOY_SHAPE.patches] * len(questions)
        texts = [text.replace(IMAGE_TOKEN, IMAGE_TOKEN * count) for text, count in zip(texts, counts)]
        batch = tokenizer(texts, padding="max_length", max_length=QA_LENGTH, return_tensors="pt")
    else:
        batch = processor(images=[images[q.image_index] for q in questions], text=texts, padding="max_length",
                          max_length=QA_LENGTH, return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    for row, answer in enumerate(answers):
        tail = len(tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1  # + </s>
        labels[row, -tail:] = batch["input_ids"][row, -tail:]
    batch["labels"] = labels
    return batch


def tower_features(model: LlavaForConditionalGeneration, processor, scenes, batch_size: int = 100,
                   progress: bool = True) -> torch.Tensor:
    """The frozen vision tower's output for each scene, as LLaVA selects it before the projector (the
    config's `vision_feature_layer`, CLS dropped for the "default" strategy): (scenes, patches, vision width)."""
    config = model.config
    if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
        raise ValueError("tower_features expects one vision_feature_layer and the 'default' select strategy")
    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, len(scenes), batch_size), desc="vision tower (frozen, once)", disable=not progress):
            images = [scene.render() for scene in scenes[start:start + batch_size]]
            pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
            chunks.append(hidden[config.vision_feature_layer][:, 1:])
    return torch.cat(chunks)


def llava_loss(model: LlavaForConditionalGeneration, batch: dict, features: torch.Tensor) -> torch.Tensor:
    """LLaVA's training loss with the vision tower's output given (`features`: one row per image, in
    placeholder order): the projector and the placeholder scatter `LlavaModel.forward` does after the tower,
    then the language model on `inputs_embeds`. Equal to `model(**batch_with_pixels).loss` (tested)."""
    return llava_forward(model, batch, features, labels=batch["labels"]).loss


def llava_forward(model: LlavaForConditionalGeneration, batch: dict, features: torch.Tensor, labels=None):
    """`model`'s forward pass on `batch` with the tower's output (`features`) given, as `llava_loss` describes:
    (images, patches, width), or (tokens, width) for the placeholders of the whole batch in order."""
    embeds = model.get_input_embeddings()(batch["input_ids"])
    image_embeds = model.model.multi_modal_projector(features).to(embeds.dtype)
    mask = (batch["input_ids"] == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, image_embeds)
    return model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=labels)


def train_llava(clip: CLIPModel, train: Split, recipe: Recipe, shape: TinyShape = TOY_SHAPE,
                progress: bool = True) -> tuple[LlavaForConditionalGeneration, list[float]]:
    torch.manual_seed(recipe.seed)
    model = build_llava(clip, shape).train()
    processor = build_toy_processor(shape)
    features = tower_features(model, processor, train.scenes, progress=progress)
    losses = fit_llava(model, processor, train.questions, features, recipe.llava_steps, recipe.llava_lr,
                       recipe.llava_batch, recipe.seed, recipe.warmup_fraction, progress=progress,
                       background_drop=recipe.background_drop, object_patches_of=scene_object_patches(train.scenes))
    return model.eval(), losses


def scene_object_patches(scenes, patch_size: int = CELL) -> list[set[int]]:
    """Per scene, the patches its objects lie in (`scenes.object_patches`)."""
    return [{p for item in scene.objects for p in object_patches(item, patch_size)} for scene in scenes]


def kept_patches(generator: torch.Generator, objects: set[int], patches: int, background_drop: float) -> list[int]:
    """The patches one training example shows, in raster order: all of them, or with probability
    `background_drop` every object patch and a uniformly drawn number (0 to all) of the background ones, a
    uniformly drawn subset. A LLaVA trained only on whole images answers from how many tokens there are
    (e.g. counts as a share of them) and falls apart when a reduction hands it fewer; this keeps it honest about
    what it was asked (docs/toy_model.md, "Fifth pass")."""
    if float(torch.rand((), generator=generator)) >= background_drop:
        return list(range(patches))
    background = [p for p in range(patches) if p not in objects]
    keep = int(torch.randint(len(background) + 1, (), generator=generator))
    chosen = torch.randperm(len(background), generator=generator)[:keep].tolist()
    return sorted(objects | {background[i] for i in chosen})


def fit_llava(model: LlavaForConditionalGeneration, processor, questions, features: torch.Tensor, steps: int,
              lr: float, batch_size: int, seed: int, warmup_fraction: float, progress: bool = True,
              every: int = 0, on_every=None, background_drop: float = 0.0,
              object_patches_of: list[set[int]] | None = None) -> list[float]:
    """Train `model`'s trainable parameters for `steps` steps on `questions` (in epochs, shuffled with `seed`),
    their images' tower output given as `features` (one row per image, see `llava_loss`); returns the losses.
    `background_drop` > 0: that share of the examples shows only some background patches (`kept_patches`;
    `object_patches_of[image_index]` are the patches never dropped).
    `on_every(step, losses)` is called every `every` steps and after the last one (the model in train mode)."""
    if background_drop and object_patches_of is None:
        raise ValueError("background_drop needs object_patches_of (the patches of each image's objects)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = _optimizer(trainable, lr, steps, warmup_fraction)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    bar = tqdm(range(steps), desc="LLaVA (projector + LM)", disable=not progress)
    for step in bar:
        if len(order) < batch_size:
            order += torch.randperm(len(questions), generator=generator).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        chosen = [questions[i] for i in picked]
        if background_drop:
            shown = [kept_patches(generator, object_patches_of[q.image_index], features.shape[1], background_drop)
                     for q in chosen]
            batch = qa_batch(processor, chosen, image_tokens=[len(kept) for kept in shown])
            tokens = torch.cat([features[q.image_index, kept] for q, kept in zip(chosen, shown)])
            loss = llava_loss(model, batch, tokens)
        else:
            batch = qa_batch(processor, chosen)
            loss = llava_loss(model, batch, features[[q.image_index for q in chosen]])
        _optimizer_step(loss, trainable, optimizer, scheduler, losses, bar)
        if on_every and every and ((step + 1) % every == 0 or step + 1 == steps):
            on_every(step + 1, losses)
    return losses
