"""Configuration of LLaVA-NeXT (anyres) with VisionZip visual-token reduction, the budget given per crop."""

from types import SimpleNamespace

from transformers import LlavaNextConfig

from .config_checks import FieldCheckedConfig, check_int, vision_token_count
from .configuration_llava_visionzip import LlavaVisionZipConfig, VisionZipFields


def check_grid_pinpoints(pinpoints, crop_size: int) -> None:
    """`image_grid_pinpoints` as the LLaVA-NeXT model reads them: a non-empty list of `[height, width]` pairs of
    positive multiples of the crop size (the vision tower's `image_size`), since each canvas is cut into whole
    crops."""
    if not isinstance(pinpoints, (list, tuple)) or not pinpoints:
        raise ValueError(f"`image_grid_pinpoints` must be a non-empty list of [height, width] pairs, got {pinpoints!r}")
    for pair in pinpoints:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"`image_grid_pinpoints` entries must be [height, width] pairs, got {pair!r}")
        for side in pair:
            check_int("image_grid_pinpoints", side, minimum=crop_size)
            if side % crop_size:
                raise ValueError(
                    f"`image_grid_pinpoints` sides must be multiples of the vision tower's image_size={crop_size} "
                    f"(each canvas is cut into whole crops), got {list(pair)}"
                )


class LlavaNextVisionZipConfig(VisionZipFields, FieldCheckedConfig, LlavaNextConfig):
    r"""
    A [`LlavaNextConfig`] with the VisionZip budget, given **per crop**: the base image and every grid crop of an
    image are each reduced to `dominant_tokens + contextual_tokens` tokens, so an image whose grid has `G` crops
    gets `(1 + G) * (dominant_tokens + contextual_tokens)` tokens (docs/llava_next.md lists them per grid).

    Args:
        dominant_tokens (`int`, defaults to 54):
            Tokens kept per crop because the crop's CLS token attends to them most, CLS included. Must be >= 1.
        contextual_tokens (`int`, defaults to 10):
            Merged tokens per crop. Must be >= 0. Published budgets: 108+20 / 54+10 / 27+5 per crop, i.e.
            640 / 320 / 160 tokens for an image with a 2x2 grid (5 crops).
        visionzip_layer (`int`, defaults to -2):
            Index into the vision tower's layers whose CLS attention row, keys and output are used;
            `vision_feature_layer` / `vision_feature_select_strategy` are ignored on this path, as in the released
            VisionZip code.

    Example:

    ```python
    >>> from llava_token_reduction.configuration.configuration_llava_next_visionzip import LlavaNextVisionZipConfig
    >>> config = LlavaNextVisionZipConfig(dominant_tokens=27, contextual_tokens=5)  # 160 tokens on a 2x2 grid
    ```
    """

    # The fields and their single-field checks are LLaVA-1.5's VisionZip config's (`VisionZipFields`).
    model_type = "llava_next_visionzip"

    # What `tokens_per_crop` is made of, for the family's messages.
    tokens_per_crop_fields = "dominant_tokens + contextual_tokens"

    # No `tokens_per_image`: the count depends on each image's grid (docs/llava_next.md).
    @property
    def tokens_per_crop(self) -> int:
        """Tokens the language model sees per crop (base image or grid crop) after reduction."""
        return self.dominant_tokens + self.contextual_tokens

    def validate_token_reduction(self, vision_tokens: int | None = None) -> None:
        """Check the per-crop budget against one crop's vision tokens (`vision_tokens`, CLS included, when the
        crops are at hand; else the vision config's) and the pinpoints against the crop size. Whether the budget
        fits each image's placeholders depends on its size: `family_llava_next` checks that before the vision
        tower runs. Raises `ValueError` naming the field, value and allowed range."""
        self.check_fields()
        check_grid_pinpoints(self.image_grid_pinpoints, self.vision_config.image_size)
        # A crop is reduced exactly like a LLaVA-1.5 image, so its budget obeys the same rules: run LLaVA-1.5's
        # checks on a view of this config in which one crop is the image (its tokens also bound its placeholders).
        crop_tokens = vision_tokens if vision_tokens is not None else vision_token_count(self.vision_config)
        one_crop = SimpleNamespace(
            check_fields=self.check_fields, vision_config=self.vision_config, visionzip_layer=self.visionzip_layer,
            dominant_tokens=self.dominant_tokens, contextual_tokens=self.contextual_tokens,
            tokens_per_image=self.tokens_per_crop, image_seq_length=crop_tokens,
        )
        LlavaVisionZipConfig.validate_token_reduction(one_crop, vision_tokens=crop_tokens)


__all__ = ["LlavaNextVisionZipConfig", "check_grid_pinpoints"]
