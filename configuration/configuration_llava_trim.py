"""Configuration of LLaVA with TRIM (question-aware, adaptive-count) visual-token reduction."""

from transformers import CLIPTextConfig, LlavaConfig
from transformers.configuration_utils import SubConfigSpec

from .config_checks import (
    FieldCheckedConfig,
    check_bool,
    check_count_fits,
    check_finite_float,
    check_int,
    check_optional_int,
    check_single_feature_layer,
    vision_token_count,
)


# The text tower of openai/clip-vit-large-patch14-336, the vision tower of LLaVA-1.5.
_CLIP_L14_TEXT_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
}

# Fields checked one at a time whenever they are set, including the load-time overrides that
# `from_pretrained(path, trim_max_tokens=...)` applies with setattr after construction.
_SINGLE_FIELD_CHECKS = {
    "projection_dim": lambda value: check_int("projection_dim", value, minimum=1),
    "trim_negate_similarity": lambda value: check_bool("trim_negate_similarity", value),
    "trim_iqr_multiplier": lambda value: check_finite_float("trim_iqr_multiplier", value, minimum=0),
    "trim_batch_coupled": lambda value: check_bool("trim_batch_coupled", value),
    "trim_min_tokens": lambda value: check_optional_int("trim_min_tokens", value, minimum=0),
    "trim_max_tokens": lambda value: check_optional_int("trim_max_tokens", value, minimum=1),
    "trim_append_mean_token": lambda value: check_bool("trim_append_mean_token", value),
    "vision_feature_layer": lambda value: check_single_feature_layer(value, "TRIM"),
}


class LlavaTrimConfig(FieldCheckedConfig, LlavaConfig):
    r"""
    A [`LlavaConfig`] with TRIM: each image keeps the patches selected by their CLIP similarity to the
    question (an IQR outlier count, so the number varies per image), plus the mean of the others.

    Args:
        clip_text_config (`CLIPTextConfig` or `dict`, *optional*):
            The CLIP text tower (with projection) of the same CLIP checkpoint as the vision tower. Defaults to
            the text tower of `openai/clip-vit-large-patch14-336` with `projection_dim` taken from this config.
        projection_dim (`int`, defaults to 768):
            CLIP's joint embedding size; `clip_text_config.projection_dim` must equal it.
        trim_negate_similarity (`bool`, defaults to `True`):
            Score patches by the softmax of the *negated* dot product with the question, as the released
            TRIM code and checkpoints do. `False` scores by plain similarity (experimental).
        trim_iqr_multiplier (`float`, defaults to 1.5):
            Patches scoring above `Q3 + m * (Q3 - Q1)` are kept. Finite and >= 0.
        trim_batch_coupled (`bool`, defaults to `False`):
            `True` pools the quartiles over all images of a call (one shared count, like the released code);
            `False` decides per image, so a batch gives the same answer as each image alone.
        trim_min_tokens (`int`, *optional*), trim_max_tokens (`int`, *optional*):
            Bounds on the kept patch count (the mean token not counted). `min >= 0`, `max >= 1`,
            `min <= max`, both `<=` the patches per image.
        trim_append_mean_token (`bool`, defaults to `True`):
            Append the mean of the unselected patches as one extra token.

    Example:

    ```python
    >>> from llava_token_reduction import LlavaTrimConfig
    >>> config = LlavaTrimConfig(trim_max_tokens=128)
    ```
    """

    single_field_checks = _SINGLE_FIELD_CHECKS
    model_type = "llava_trim"

    sub_configs_defaults = {
        **LlavaConfig.sub_configs_defaults,
        "clip_text_config": SubConfigSpec(config_class=CLIPTextConfig, init_kwargs=_CLIP_L14_TEXT_DEFAULTS),
    }

    clip_text_config: dict | CLIPTextConfig | None = None
    projection_dim: int = 768
    trim_negate_similarity: bool = True
    trim_iqr_multiplier: float = 1.5
    trim_batch_coupled: bool = False
    trim_min_tokens: int | None = None
    trim_max_tokens: int | None = None
    trim_append_mean_token: bool = True

    def __post_init__(self, **kwargs):
        if self.clip_text_config is None:
            # The default text tower follows this config's joint size instead of CLIP-L's 768.
            self.clip_text_config = {**_CLIP_L14_TEXT_DEFAULTS, "projection_dim": self.projection_dim}
        super().__post_init__(**kwargs)  # then `validate_token_reduction` (FieldCheckedConfig)

    @property
    def num_patches(self) -> int:
        """Patch tokens per image of the configured vision tower (CLS excluded)."""
        return vision_token_count(self.vision_config) - 1

    def validate_token_reduction(self, num_patches: int | None = None) -> None:
        """Check every TRIM field and their combinations (against `num_patches`, the patches an image actually
        yields, when given). Raises `ValueError` naming the field, value and allowed range."""
        self.check_fields()
        text_projection = getattr(self.clip_text_config, "projection_dim", None)
        if text_projection != self.projection_dim:
            raise ValueError(
                f"`clip_text_config.projection_dim` must equal `projection_dim`={self.projection_dim} (CLIP's joint "
                f"embedding size, also the output of `visual_projection`), got {text_projection}"
            )
        # Worst case an image yields all its patches (the mean token is dropped then), or `max` plus the mean.
        check_count_fits(
            "trim", self.trim_min_tokens, self.trim_max_tokens,
            self.num_patches if num_patches is None else num_patches, extra=int(self.trim_append_mean_token),
            image_seq_length=self.image_seq_length,
        )


__all__ = ["LlavaTrimConfig"]
