"""Configuration of LLaVA with PruMerge / PruMerge+ (adaptive-count, text-agnostic) visual-token reduction."""

from transformers import LlavaConfig

from .config_checks import (
    FieldCheckedConfig,
    check_bool,
    check_count_fits,
    check_finite_float,
    check_optional_int,
    check_single_feature_layer,
    vision_token_count,
)


# Fields checked one at a time whenever they are set, including the load-time overrides that
# `from_pretrained(path, prumerge_max_tokens=...)` applies with setattr after construction.
_SINGLE_FIELD_CHECKS = {
    "prumerge_plus": lambda value: check_bool("prumerge_plus", value),
    "prumerge_iqr_multiplier": lambda value: check_finite_float("prumerge_iqr_multiplier", value, minimum=0),
    "prumerge_batch_coupled": lambda value: check_bool("prumerge_batch_coupled", value),
    "prumerge_min_tokens": lambda value: check_optional_int("prumerge_min_tokens", value, minimum=0),
    "prumerge_max_tokens": lambda value: check_optional_int("prumerge_max_tokens", value, minimum=1),
    "vision_feature_layer": lambda value: check_single_feature_layer(value, "PruMerge"),
}


class LlavaPruMergeConfig(FieldCheckedConfig, LlavaConfig):
    r"""
    A [`LlavaConfig`] with PruMerge: each image keeps the patches whose CLS attention (last vision layer) is an
    IQR outlier, each merged with its most key-similar patches, plus one attention-weighted sum of the others
    (docs/prumerge.md). The number of tokens varies per image.

    Args:
        prumerge_plus (`bool`, defaults to `False`):
            PruMerge+: also keep an evenly spaced sample of the patch grid (a stride that follows the kept ratio).
        prumerge_iqr_multiplier (`float`, defaults to 1.5):
            Patches whose CLS attention is above `Q3 + m * (Q3 - Q1)` are kept. Finite and >= 0.
        prumerge_batch_coupled (`bool`, defaults to `False`):
            `True` pools the quartiles over all images of a call (one shared count, like the released code);
            `False` decides per image, so a batch gives the same answer as each image alone.
        prumerge_min_tokens (`int`, *optional*), prumerge_max_tokens (`int`, *optional*):
            Bounds on the outlier count (PruMerge+'s sampled patches and the extra token not counted).
            `min >= 0`, `max >= 1`, `min <= max`, both `<=` the patches per image.

    Example:

    ```python
    >>> from llava_token_reduction import LlavaPruMergeConfig
    >>> config = LlavaPruMergeConfig(prumerge_plus=True)
    ```
    """

    single_field_checks = _SINGLE_FIELD_CHECKS
    model_type = "llava_prumerge"

    prumerge_plus: bool = False
    prumerge_iqr_multiplier: float = 1.5
    prumerge_batch_coupled: bool = False
    prumerge_min_tokens: int | None = None
    prumerge_max_tokens: int | None = None

    @property
    def num_patches(self) -> int:
        """Patch tokens per image of the configured vision tower (CLS excluded)."""
        return vision_token_count(self.vision_config) - 1

    def validate_token_reduction(self, num_patches: int | None = None) -> None:
        """Check every PruMerge field and their combinations (against `num_patches`, the patches an image actually
        yields, when given). Raises `ValueError` naming the field, value and allowed range."""
        self.check_fields()
        # An image yields at most all its patches (no extra token then), or `max` merged tokens plus the extra one;
        # PruMerge+'s sampled patches are not bounded, so its worst case is all the patches.
        check_count_fits(
            "prumerge", self.prumerge_min_tokens, self.prumerge_max_tokens,
            self.num_patches if num_patches is None else num_patches, extra=1,
            image_seq_length=self.image_seq_length, unbounded=self.prumerge_plus, also=" (and `prumerge_plus=False`)",
        )


__all__ = ["LlavaPruMergeConfig"]
