"""The registry of model families: what the tools (convert, demo, show, the Auto registrations) ask about a family
of LLaVA checkpoints instead of branching on `"llava"` / `"llava_next"`.

A family is one `ModelFamily` entry in `FAMILIES`, named by the stock transformers model type of its checkpoints.
It says which stock classes read them, which per-image inputs its processor adds besides the pixels, how an image
is cut into crops (a fixed budget is then per crop), and how `convert` renames a stock checkpoint's tensors.
Families know nothing about reduction methods and methods nothing about families: a method's registry entry
(`methods.ReductionMethod`) lists its classes per family, and a method without classes for a family is refused
there (`ReductionMethod.classes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .methods import _resolve, resolved


@dataclass(frozen=True)
class ModelFamily:
    """Everything the tools need to know about one family of LLaVA checkpoints."""

    name: str  # the stock transformers model type of its checkpoints: "llava", "llava_next"
    label: str  # how people write it: "LLaVA-1.5"
    stock_label: str  # the stock model in the tools' tables: "stock LLaVA"
    stock_config_class_name: str  # "module:name", resolved by `methods._resolve`
    stock_generation_class_name: str
    stock_processor_class_name: str
    stock_architecture: str  # `architectures` of a stock checkpoint's config.json
    # Per-image inputs the family's processor returns besides the pixels, which travel with them to the model
    # (LLaVA-NeXT's original image sizes, from which its crops and placeholders follow).
    side_inputs: tuple[str, ...]
    # Tensor-name prefixes of the family's stock checkpoints beyond LLaVA-1.5's (`conversion.key_mapping`), as
    # (source prefix, target prefix); LLaVA-NeXT's legacy root `image_newline`.
    stock_key_prefixes: tuple[tuple[str, str], ...] = ()
    # "module:name" of `(image_sizes, config) -> one layout per image` (`.size`, `.grid` (rows, cols), `.crops`,
    # `.placeholders`), for a family whose images are cut into crops (a method's fixed budget is then per crop);
    # None when every image is one crop.
    crop_layouts_reference: str | None = None

    def crop_layouts(self, image_sizes, config) -> list | None:
        """Each image's crops (`crop_layouts_reference`), or None for a family of one crop per image."""
        if self.crop_layouts_reference is None:
            return None
        return _resolve(self.crop_layouts_reference)(image_sizes, config)

    stock_config_class = resolved("stock_config_class_name")
    stock_generation_class = resolved("stock_generation_class_name")
    stock_processor_class = resolved("stock_processor_class_name")


LLAVA = ModelFamily(
    name="llava",
    label="LLaVA-1.5",
    stock_label="stock LLaVA",
    stock_config_class_name="transformers:LlavaConfig",
    stock_generation_class_name="transformers:LlavaForConditionalGeneration",
    stock_processor_class_name="transformers:LlavaProcessor",
    stock_architecture="LlavaForConditionalGeneration",
    side_inputs=(),
)

LLAVA_NEXT = ModelFamily(
    name="llava_next",
    label="LLaVA-NeXT",
    stock_label="stock LLaVA-NeXT",
    stock_config_class_name="transformers:LlavaNextConfig",
    stock_generation_class_name="transformers:LlavaNextForConditionalGeneration",
    stock_processor_class_name="transformers:LlavaNextProcessor",
    stock_architecture="LlavaNextForConditionalGeneration",
    side_inputs=("image_sizes",),
    stock_key_prefixes=(("image_newline", "model.image_newline"), ("model.image_newline", "model.image_newline")),
    crop_layouts_reference="llava_token_reduction.modeling.family_llava_next:image_layouts",
)

# In the order the tools list them; LLaVA-1.5 first (the family of every method).
FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (LLAVA, LLAVA_NEXT)}


def get_family(name: str) -> ModelFamily:
    """The family whose stock model type is `name`; `ValueError` naming the choices otherwise."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model family {name!r}; choose from {', '.join(FAMILIES)}") from None


def family_of_stock_type(model_type) -> ModelFamily | None:
    """The family whose stock checkpoints have `model_type` ("llava", "llava_next"), or None."""
    return FAMILIES.get(model_type) if isinstance(model_type, str) else None


def family_of_model_type(model_type) -> ModelFamily | None:
    """The family of a stock model type or of one of the registry's reduced ones ("llava_next_visionzip" ->
    LLaVA-NeXT), or None."""
    from .methods import find_model_type

    found = find_model_type(model_type)
    return FAMILIES[found[1].family] if found else family_of_stock_type(model_type)


__all__ = ["FAMILIES", "LLAVA", "LLAVA_NEXT", "ModelFamily", "family_of_model_type", "family_of_stock_type",
           "get_family"]
