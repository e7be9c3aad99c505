"""llava-hf/llava-v1.6-vicuna-7b-hf's configuration files as published (config.json, preprocessor_config.json,
processor_config.json), for tests that load LLaVA-NeXT the way users do, offline."""

import json
import os

from safetensors.torch import save_file
from transformers import LlavaNextConfig

from llava_token_reduction.tiny import build_llm_tokenizer
from llava_token_reduction.tiny_next import llava_next_config_kwargs


# The fields of llava-hf/llava-v1.6-vicuna-7b-hf's config.json (its Vicuna text config as llava-hf writes it).
PUBLISHED_CONFIG = {
    "architectures": ["LlavaNextForConditionalGeneration"],
    "ignore_index": -100,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_token_index": 32000,
    "model_type": "llava_next",
    "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096,
        "model_type": "llama",
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.39.0.dev0",
    "use_image_newline_parameter": True,
    "vision_config": {
        "hidden_size": 1024,
        "image_size": 336,
        "intermediate_size": 4096,
        "model_type": "clip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "patch_size": 14,
        "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
}
PUBLISHED_PREPROCESSOR_CONFIG = {
    "aspect_ratio_setting": "anyres",
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "LlavaNextImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaNextProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
PUBLISHED_PROCESSOR_CONFIG = {
    "image_token": "<image>",
    "num_additional_image_tokens": 1,
    "patch_size": 14,
    "processor_class": "LlavaNextProcessor",
    "vision_feature_select_strategy": "default",
}


def save_published_files(directory, with_tokenizer: bool = True):
    """Write the three files (and the offline byte-level tokenizer) into `directory`; returns it."""
    files = {"config.json": PUBLISHED_CONFIG, "preprocessor_config.json": PUBLISHED_PREPROCESSOR_CONFIG,
             "processor_config.json": PUBLISHED_PROCESSOR_CONFIG}
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content, indent=2))
    if with_tokenizer:
        build_llm_tokenizer().save_pretrained(directory)
    return directory


def legacy_state_dict(model) -> dict:
    """`model`'s tensors under the published (pre-4.52) llava-hf LLaVA-NeXT names."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.language_model."):
            key = "language_model.model." + name[len("model.language_model."):]
        elif name == "lm_head.weight":
            key = "language_model.lm_head.weight"
        elif name.startswith("model.vision_tower."):
            key = "vision_tower.vision_model." + name[len("model.vision_tower."):]
        else:
            key = name[len("model."):]
        state[key] = tensor.contiguous()
    return state


def published_stock_checkpoint(model, processor, directory, shape=None):
    """A tiny stock llava-hf LLaVA-NeXT checkpoint in the published key layout (`language_model.model.*`,
    `language_model.lm_head.*`, `vision_tower.vision_model.*`, `image_newline` at the root) and its processor."""
    state = legacy_state_dict(model)
    # As written by transformers 4.x: the CLIP vision model's own `vision_model` level under `vision_tower`.
    assert "image_newline" in state and "vision_tower.vision_model.embeddings.patch_embedding.weight" in state
    save_file(state, os.fspath(directory / "model.safetensors"), metadata={"format": "pt"})
    kwargs = llava_next_config_kwargs(*(() if shape is None else (shape,)), tokenizer=processor.tokenizer)
    config = LlavaNextConfig(**kwargs)
    config.architectures = ["LlavaNextForConditionalGeneration"]
    config.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
