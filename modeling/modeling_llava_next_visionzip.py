"""LLaVA-NeXT (anyres) with VisionZip: every crop (the base image and each grid crop) keeps the tokens its CLS token
attends to most, plus a few merged ones; the budget is per crop (docs/llava_next.md).

The LLaVA-NeXT family (`family_llava_next_model.py`: crops, placeholder counts, the released layout, stock classes,
weight renames) combined with the VisionZip method (`method_visionzip_model.py`, the same code as LLaVA-1.5's).
"""

from ..configuration.configuration_llava_next_visionzip import LlavaNextVisionZipConfig
from .family_llava_next_model import (
    ReducedLlavaNextForConditionalGeneration,
    ReducedLlavaNextModel,
    register_llava_next_weight_renames,
)
from .method_visionzip_model import VisionZipReduction


class LlavaNextVisionZipModel(VisionZipReduction, ReducedLlavaNextModel):
    """The inner LLaVA-NeXT model with VisionZip in `get_image_features`: `pooler_output` holds one tensor
    `[(1 + G_i)·(dominant_tokens + contextual_tokens), text_hidden]` per image in the released layout,
    `last_hidden_state` the reduced, unprojected crops `[sum(1 + G_i), dominant + contextual, D_v]`. Weights and
    module names are stock LLaVA-NeXT's."""

    config_class = LlavaNextVisionZipConfig
    config: LlavaNextVisionZipConfig


class LlavaNextVisionZipForConditionalGeneration(ReducedLlavaNextForConditionalGeneration):
    """LLaVA-NeXT for generation with VisionZip. Loads stock llava-hf LLaVA-NeXT checkpoints
    (`from_pretrained("llava-hf/llava-v1.6-vicuna-7b-hf", dominant_tokens=54, contextual_tokens=10)`: 54+10 per
    crop, 320 tokens for a 2x2-grid image) and saves self-contained remote-code checkpoints."""

    config_class = LlavaNextVisionZipConfig
    config: LlavaNextVisionZipConfig
    inner_model_class = LlavaNextVisionZipModel


register_llava_next_weight_renames("LlavaNextVisionZipForConditionalGeneration", "LlavaNextVisionZipModel")

__all__ = ["LlavaNextVisionZipModel", "LlavaNextVisionZipForConditionalGeneration"]
