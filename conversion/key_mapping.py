"""Tensor names of the input formats, mapped onto the in-memory names of our models.

Targets are the names of `Llava*ForConditionalGeneration.state_dict()` in transformers 5.x:
`model.language_model.*`, `model.vision_tower.*` (CLIP vision transformer, no `vision_model.` level),
`model.multi_modal_projector.linear_{1,2}.*`, `lm_head.weight`, and for TRIM
`model.clip_text_model.{text_model.*,text_projection.weight}` and `model.visual_projection.weight`.
`save_pretrained` then writes them in transformers' own on-disk layout.

Each map function returns the target name, or None when it does not recognise the name (the converter then
reports it as unmapped). Buffers that models recompute (`position_ids`, rotary `inv_freq`) are not weights:
`is_recomputed_buffer` tells the converter to drop them, and it says so in its summary.
"""

import re


_RECOMPUTED_BUFFER = re.compile(r"(^|\.)(position_ids|inv_freq)$")

# (source prefix, target prefix), first match wins.
_STOCK_PREFIXES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("model.language_model.", "model.language_model."),
    ("lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("model.vision_tower.", "model.vision_tower."),
    ("vision_tower.", "model.vision_tower."),
    ("model.multi_modal_projector.", "model.multi_modal_projector."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)

# The LLaVA codebase (`LlavaLlamaForCausalLM`). The CLIP parts are those of the released TRIM code, whose
# vision tower is a `CLIPVisionModelWithProjection` (`vision_tower.vision_tower`) and whose text tower is a
# `CLIPTextModelWithProjection` (`vision_tower.text_tower`).
_ORIGINAL_PREFIXES = (
    ("lm_head.", "lm_head."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.vision_tower.vision_tower.visual_projection.", "model.visual_projection."),
    ("model.vision_tower.text_tower.text_model.", "model.clip_text_model.text_model."),
    ("model.vision_tower.text_tower.text_projection.", "model.clip_text_model.text_projection."),
)

# A transformers `CLIPModel` checkpoint (the donor of the CLIP parts). `logit_scale` has no place in LLaVA.
_CLIP_PREFIXES = (
    ("vision_model.", "model.vision_tower."),
    ("text_model.", "model.clip_text_model.text_model."),
    ("text_projection.", "model.clip_text_model.text_projection."),
    ("visual_projection.", "model.visual_projection."),
)
CLIP_UNUSED_KEYS = ("logit_scale",)

# Projector-only files: the LLaVA codebase's `mm_projector.bin` names or transformers' names.
_PROJECTOR_PREFIXES = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.multi_modal_projector.linear_1.", "model.multi_modal_projector.linear_1."),
    ("model.multi_modal_projector.linear_2.", "model.multi_modal_projector.linear_2."),
    ("multi_modal_projector.linear_1.", "model.multi_modal_projector.linear_1."),
    ("multi_modal_projector.linear_2.", "model.multi_modal_projector.linear_2."),
)
PROJECTOR_TARGETS = tuple(
    f"model.multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")
)

VISION_PREFIX = "model.vision_tower."
CLIP_TEXT_PREFIX = "model.clip_text_model."
VISUAL_PROJECTION = "model.visual_projection.weight"
EMBEDDINGS = "model.language_model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def is_recomputed_buffer(key: str) -> bool:
    return bool(_RECOMPUTED_BUFFER.search(key))


def _by_prefix(key: str, table) -> str | None:
    for source, target in table:
        if key.startswith(source):
            return target + key[len(source):]
    return None


def map_stock_key(key: str, family_prefixes=()) -> str | None:
    """A stock transformers LLaVA checkpoint name (legacy llava-hf layout or the 4.52+/5.x layout).
    `family_prefixes` are the family's own `(source, target)` prefixes (`families.ModelFamily.stock_key_prefixes`,
    e.g. LLaVA-NeXT's root `image_newline`), tried first."""
    return _by_prefix(key, (*family_prefixes, *_STOCK_PREFIXES))


def map_original_key(key: str) -> str | None:
    """An original LLaVA-codebase (`llava_llama`) checkpoint name, including the released TRIM CLIP parts."""
    return _by_prefix(key, _ORIGINAL_PREFIXES)


def map_clip_key(key: str) -> str | None:
    """A transformers `CLIPModel` (or `CLIPVisionModel`) checkpoint name."""
    return _by_prefix(key, _CLIP_PREFIXES)


def map_projector_key(key: str) -> str | None:
    return _by_prefix(key, _PROJECTOR_PREFIXES)


def is_original_layout(keys) -> bool:
    return any(k.startswith(("model.mm_projector.", "model.layers.", "model.embed_tokens.")) for k in keys)


def is_stock_layout(keys) -> bool:
    return any(k.startswith(("language_model.", "model.language_model.", "multi_modal_projector.")) for k in keys)


__all__ = [
    "map_stock_key", "map_original_key", "map_clip_key", "map_projector_key", "is_recomputed_buffer",
    "is_original_layout", "is_stock_layout", "PROJECTOR_TARGETS", "CLIP_UNUSED_KEYS", "VISION_PREFIX",
    "CLIP_TEXT_PREFIX", "VISUAL_PROJECTION", "EMBEDDINGS", "LM_HEAD",
]
