"""Tiny stock llava-hf LLaVA-NeXT checkpoints shaped like the published ones, for the tools' tests (convert, demo,
show), written offline.

`save_published_shaped(directory, shape)` writes what `llava-hf/llava-v1.6-vicuna-7b-hf` holds, at tiny widths:
- config.json with the published keys (`llava_next_published.PUBLISHED_CONFIG`: `image_token_index`,
  `torch_dtype`, `use_image_newline_parameter`, the 4.39 `transformers_version`, ...); the widths the published
  text config leaves to Llama's defaults are written out, since they are not the defaults here;
- preprocessor_config.json / processor_config.json as published, the pinpoints and crop size scaled to the shape;
- the offline byte-level tokenizer's files (with `<image>`) and a chat_template.json (the tiny LLaVA template: the
  published one is Vicuna's, with the same `{"chat_template": ...}` file);
- model.safetensors in the published legacy key layout (`language_model.model.*`, `language_model.lm_head.weight`,
  `vision_tower.vision_model.*`, `multi_modal_projector.*`, `image_newline` at the root), in float16 as published.
"""

import copy
import json

import torch
from safetensors.torch import save_file
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from llava_next_published import (
    PUBLISHED_CONFIG,
    PUBLISHED_PREPROCESSOR_CONFIG,
    PUBLISHED_PROCESSOR_CONFIG,
    legacy_state_dict,
)
from llava_token_reduction.tiny import IMAGE_TOKEN, LLAVA_CHAT_TEMPLATE, TEST_SHAPE, build_llm_tokenizer
from llava_token_reduction.tiny_next import grid_pinpoints, llava_next_config_kwargs


def published_shaped_config(shape=TEST_SHAPE, tokenizer=None) -> dict:
    """The published config.json's keys with the widths of `shape`."""
    tokenizer = tokenizer or build_llm_tokenizer()
    tiny = LlavaNextConfig(**llava_next_config_kwargs(shape, tokenizer=tokenizer))
    config = copy.deepcopy(PUBLISHED_CONFIG)
    text, vision = tiny.text_config, tiny.vision_config
    config["image_grid_pinpoints"] = grid_pinpoints(shape)
    config["image_token_index"] = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config["vocab_size"] = len(tokenizer)
    config["text_config"].update(
        hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        initializer_range=text.initializer_range,
    )
    config["vision_config"].update(
        hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size, image_size=vision.image_size,
        num_attention_heads=vision.num_attention_heads, num_hidden_layers=vision.num_hidden_layers,
        patch_size=vision.patch_size, projection_dim=vision.projection_dim,
    )
    return config


def save_published_shaped(directory, shape=TEST_SHAPE, seed: int = 0, dtype=torch.float16):
    """Write a tiny stock LLaVA-NeXT checkpoint laid out as the published one into `directory`; returns the stock
    model it holds (float32, eval), whose tensors are those written (cast to `dtype`)."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_llm_tokenizer()
    config = published_shaped_config(shape, tokenizer)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    preprocessor = copy.deepcopy(PUBLISHED_PREPROCESSOR_CONFIG)
    preprocessor.update(image_grid_pinpoints=grid_pinpoints(shape), size={"shortest_edge": shape.image_size},
                        crop_size={"height": shape.image_size, "width": shape.image_size})
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    processor_config = dict(PUBLISHED_PROCESSOR_CONFIG, patch_size=shape.patch_size)
    (directory / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    tokenizer.save_pretrained(directory)
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_CHAT_TEMPLATE}, indent=2))
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(**llava_next_config_kwargs(shape, tokenizer))).eval()
    with torch.no_grad():  # a non-zero newline, so that a dropped or zeroed copy shows
        model.model.image_newline.normal_()
    state = {key: tensor.to(dtype) for key, tensor in legacy_state_dict(model).items()}
    assert "image_newline" in state and "language_model.lm_head.weight" in state
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return model
