"""Configuration of LLaVA with VisionZip visual-token reduction, and the VisionZip fields every family's VisionZip
config declares (`VisionZipFields`)."""

from dataclasses import dataclass

from transformers import LlavaConfig

from .config_checks import (
    FieldCheckedConfig,
    check_int,
    check_layer_index,
    check_single_feature_layer,
    vision_token_count,
)


# Fields checked one at a time whenever they are set, including the load-time overrides that
# `from_pretrained(path, dominant_tokens=...)` applies with setattr after construction.
_SINGLE_FIELD_CHECKS = {
    "dominant_tokens": lambda value: check_int("dominant_tokens", value, minimum=1),
    "contextual_tokens": lambda value: check_int("contextual_tokens", value, minimum=0),
    "visionzip_layer": lambda value: check_int("visionzip_layer", value),
    "vision_feature_layer": lambda value: check_single_feature_layer(value, "VisionZip"),
}


@dataclass(repr=False, eq=False, kw_only=True)
class VisionZipFields:
    """The VisionZip budget and its single-field checks, declared once for the VisionZip config of every family.

    transformers makes each config class a dataclass, and a dataclass takes the fields of its dataclass bases in
    reverse MRO order: listed before `FieldCheckedConfig` and the family's config, these fields come right after
    the family's own, as when each config declared them itself (the saved config.json is the same)."""

    single_field_checks = _SINGLE_FIELD_CHECKS

    dominant_tokens: int = 54
    contextual_tokens: int = 10
    visionzip_layer: int = -2


class LlavaVisionZipConfig(VisionZipFields, FieldCheckedConfig, LlavaConfig):
    r"""
    A [`LlavaConfig`] with the VisionZip budget. Each image is reduced to
    `dominant_tokens + contextual_tokens` tokens before the projector.

    Args:
        dominant_tokens (`int`, defaults to 54):
            Tokens kept because the CLS token attends to them most, the CLS token itself included
            (54 = CLS + 53 patches). Must be >= 1.
        contextual_tokens (`int`, defaults to 10):
            Tokens made by merging the remaining ones around evenly spaced targets. Must be >= 0;
            0 keeps the dominant tokens only. Published budgets: 54+10 = 64, 108+20 = 128, 162+30 = 192.
        visionzip_layer (`int`, defaults to -2):
            Index into the vision tower's layers: the layer whose CLS attention row, keys and output
            are used. LLaVA's `vision_feature_layer` / `vision_feature_select_strategy` are ignored on
            this path, as in the released VisionZip code.

    Example:

    ```python
    >>> from llava_token_reduction import LlavaVisionZipConfig
    >>> config = LlavaVisionZipConfig(dominant_tokens=108, contextual_tokens=20)  # 128 tokens per image
    ```
    """

    model_type = "llava_visionzip"

    @property
    def tokens_per_image(self) -> int:
        """Image tokens the language model sees per image after reduction."""
        return self.dominant_tokens + self.contextual_tokens

    def validate_token_reduction(self, vision_tokens: int | None = None) -> None:
        """Check the budget against the vision tower (and against `vision_tokens`, the tokens an image
        actually yields, when given). Raises `ValueError` naming the field, value and allowed range."""
        self.check_fields()
        check_layer_index("visionzip_layer", self.visionzip_layer, self.vision_config.num_hidden_layers)
        available = vision_token_count(self.vision_config) if vision_tokens is None else vision_tokens
        if self.dominant_tokens > available:
            raise ValueError(
                f"`dominant_tokens` must be <= {available} (the image's patches + CLS), got {self.dominant_tokens}"
            )
        remaining = available - self.dominant_tokens
        if self.contextual_tokens > remaining:
            raise ValueError(
                f"`contextual_tokens` must be <= {remaining} (tokens left after {self.dominant_tokens} dominant "
                f"ones out of {available}), got {self.contextual_tokens}"
            )
        if self.tokens_per_image > self.image_seq_length:
            raise ValueError(
                f"`dominant_tokens + contextual_tokens` must be <= image_seq_length={self.image_seq_length} "
                f"(the placeholders per image), got {self.tokens_per_image}"
            )


__all__ = ["LlavaVisionZipConfig", "VisionZipFields"]
