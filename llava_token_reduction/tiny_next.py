"""Small LLaVA-NeXT (anyres) models and processors built offline, with random weights, for tests.

The LLaVA-1.5 builders of `tiny.py` with LLaVA-NeXT's pieces: the published grid pinpoints scaled from 336-px
crops to the tiny crop size, a stock `LlavaNextProcessor` (with the offline byte-level tokenizer) and a stock
`LlavaNextForConditionalGeneration`. Nothing here touches the network.
"""

import torch
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)

from .tiny import LLAVA_CHAT_TEMPLATE, TEST_SHAPE, TinyShape, build_llm_tokenizer, llava_config_kwargs


# llava-hf/llava-v1.6-*'s pinpoints, (height, width) in units of one 336-px crop: 1x2, 2x1, 2x2, 3x1, 1x3 grids.
PUBLISHED_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
PUBLISHED_PINPOINTS = [[336 * rows, 336 * cols] for rows, cols in PUBLISHED_GRIDS]
# CLIP's normalisation, as in the published preprocessor_config.json.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def grid_pinpoints(shape: TinyShape = TEST_SHAPE) -> list[list[int]]:
    """The published pinpoints with the crop size of `shape`."""
    return [[shape.image_size * rows, shape.image_size * cols] for rows, cols in PUBLISHED_GRIDS]


def build_next_image_processor(shape: TinyShape = TEST_SHAPE) -> LlavaNextImageProcessorPil:
    """The llava-hf LLaVA-NeXT image processor settings (anyres, CLIP normalisation) at the crop size of `shape`.
    The PIL backend: transformers' default one needs torchvision, which this project does not install."""
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": shape.image_size}, crop_size={"height": shape.image_size, "width": shape.image_size},
        image_grid_pinpoints=grid_pinpoints(shape), image_mean=CLIP_MEAN, image_std=CLIP_STD, do_pad=True,
    )


def build_next_processor(shape: TinyShape = TEST_SHAPE) -> LlavaNextProcessor:
    """A stock `LlavaNextProcessor` whose `<image>` expands to each image's anyres count (CLS dropped, as
    llava-hf's processor_config.json: patch size, "default" strategy, one additional token)."""
    return LlavaNextProcessor(
        image_processor=build_next_image_processor(shape), tokenizer=build_llm_tokenizer(),
        patch_size=shape.patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def llava_next_config_kwargs(shape: TinyShape = TEST_SHAPE, tokenizer=None) -> dict:
    """Keyword arguments of a `LlavaNextConfig` (or one of ours) for a small model of `shape`."""
    return dict(**llava_config_kwargs(shape, tokenizer=tokenizer), image_grid_pinpoints=grid_pinpoints(shape))


def stock_next_config(shape: TinyShape = TEST_SHAPE, tokenizer=None) -> LlavaNextConfig:
    return LlavaNextConfig(**llava_next_config_kwargs(shape, tokenizer=tokenizer))


def stock_next_model(shape: TinyShape = TEST_SHAPE, seed: int = 0) -> LlavaNextForConditionalGeneration:
    """A stock LLaVA-NeXT with random weights (seeded), in eval mode."""
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(stock_next_config(shape)).eval()
