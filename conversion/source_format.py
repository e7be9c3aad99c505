"""Which kind of LLaVA checkpoint SRC is, from its config and tensor names: transformers' `llava` ("stock") or
the LLaVA codebase's `llava_llama` ("original")."""

from __future__ import annotations

from ..methods import METHODS
from .errors import ConversionError
from .key_mapping import is_original_layout, is_stock_layout


def detect_format(config: dict, keys) -> str:
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    original_markers = ("mm_vision_tower" in config or "mm_hidden_size" in config or model_type == "llava_llama"
                        or any("LlavaLlama" in a for a in architectures))
    if original_markers or (is_original_layout(keys) and "text_config" not in config):
        original_architecture = any(a in ("LlavaLlamaForCausalLM", "LlavaLlamaModel") for a in architectures)
        if not original_architecture and model_type not in ("llava", "llava_llama"):
            raise ConversionError(
                f"SRC is a LLaVA-codebase checkpoint of architecture {architectures or model_type!r}; only the "
                "Llama-based LLaVA-1.5 (`llava_llama`, LlavaLlamaForCausalLM) is supported"
            )
        return "original"
    if model_type == "llava" and "text_config" in config:
        if architectures and "LlavaForConditionalGeneration" not in architectures:
            raise ConversionError(f"SRC architecture {architectures} is not LlavaForConditionalGeneration")
        if not is_stock_layout(keys):
            raise ConversionError("SRC config says transformers LLaVA but its tensor names are not LLaVA's")
        return "stock"
    hint = ""
    if model_type in (method.model_type for method in METHODS.values()):
        hint = (" (already converted: change the reduction settings at load time, e.g. "
                "from_pretrained(path, dominant_tokens=108, contextual_tokens=20))")
    raise ConversionError(
        f"SRC is a {model_type!r} checkpoint ({', '.join(architectures) or 'no architectures'}); expected a LLaVA "
        "checkpoint: transformers `llava` (LlavaForConditionalGeneration) or the LLaVA codebase's `llava_llama`"
        f"{hint}"
    )
