"""LLaVA with VisionZip: each image keeps the tokens its CLS token attends to most, plus a few merged ones.

The LLaVA-1.5 family (`family_llava.py`: crops, placeholder counts, stock classes, weight renames) combined with
the VisionZip method (`method_visionzip_model.py`; its tensor functions are `method_visionzip.py`).
"""

from ..configuration.configuration_llava_visionzip import LlavaVisionZipConfig
from .family_llava import ReducedLlavaForConditionalGeneration, ReducedLlavaModel, register_llava_weight_renames
from .method_visionzip_model import VisionZipReduction


class LlavaVisionZipModel(VisionZipReduction, ReducedLlavaModel):
    """The inner LLaVA model (vision tower, projector, language model) with VisionZip in `get_image_features`:
    `pooler_output` holds `B` tensors `[dominant_tokens + contextual_tokens, text_hidden]`, `last_hidden_state` is
    the reduced, unprojected `[B, dominant + contextual, D_v]`; `vision_feature_layer` is not used (VisionZip reads
    `config.visionzip_layer` with CLS kept). Weights and module names are stock LLaVA's."""

    config_class = LlavaVisionZipConfig
    config: LlavaVisionZipConfig


class LlavaVisionZipForConditionalGeneration(ReducedLlavaForConditionalGeneration):
    """LLaVA for generation with VisionZip. Loads stock LLaVA checkpoints (`from_pretrained(stock_dir,
    dominant_tokens=..., contextual_tokens=...)`) and saves self-contained remote-code checkpoints."""

    config_class = LlavaVisionZipConfig
    config: LlavaVisionZipConfig
    inner_model_class = LlavaVisionZipModel


register_llava_weight_renames("LlavaVisionZipForConditionalGeneration", "LlavaVisionZipModel")

__all__ = ["LlavaVisionZipModel", "LlavaVisionZipForConditionalGeneration"]
