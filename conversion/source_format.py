"""Which kind of LLaVA checkpoint SRC is, from its config and tensor names: a stock transformers checkpoint of one
of the registry's families (`llava`, `llava_next`: "stock") or the LLaVA codebase's `llava_llama` ("original")."""

from __future__ import annotations

from ..families import FAMILIES, family_of_stock_type
from ..methods import find_model_type
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
    family = family_of_stock_type(model_type)
    if family is not None and "text_config" in config:
        if architectures and family.stock_architecture not in architectures:
            raise ConversionError(f"SRC architecture {architectures} is not {family.stock_architecture}")
        if not is_stock_layout(keys):
            raise ConversionError(f"SRC config says transformers {family.label} but its tensor names are not "
                                  f"{family.label}'s")
        return "stock"
    hint = ""
    if find_model_type(model_type) is not None:
        hint = (" (already converted: change the reduction settings at load time, e.g. "
                "from_pretrained(path, dominant_tokens=108, contextual_tokens=20))")
    stock = " or ".join(f"`{name}` ({family.stock_architecture})" for name, family in FAMILIES.items())
    raise ConversionError(
        f"SRC is a {model_type!r} checkpoint ({', '.join(architectures) or 'no architectures'}); expected a LLaVA "
        f"checkpoint: transformers {stock}, or the LLaVA codebase's `llava_llama`{hint}"
    )
