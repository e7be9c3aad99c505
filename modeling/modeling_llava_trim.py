"""LLaVA with TRIM: each image keeps the patches CLIP singles out for the question, plus the mean of the rest.

The LLaVA-1.5 family (`family_llava.py`: crops, placeholder counts, stock classes, weight renames) combined with
the TRIM method (`method_trim_model.py`: CLIP text tower, input checks; its tensor functions are `method_trim.py`).
Stock LLaVA checkpoints lack the CLIP text tower; `method_trim_model.py` says how `convert trim` adds it.
"""

from ..configuration.configuration_llava_trim import LlavaTrimConfig
from .family_llava import ReducedLlavaForConditionalGeneration, ReducedLlavaModel, register_llava_weight_renames
from .method_trim_model import TrimImageFeaturesOutput, TrimReduction


class LlavaTrimModel(TrimReduction, ReducedLlavaModel):
    """The inner LLaVA model (vision tower, projector, language model) plus CLIP's text tower
    (`clip_text_model`) and vision head (`visual_projection`), with TRIM in `get_image_features`, which takes
    `clip_input_ids` `[B, T]` (`T <= 77`, required) and `clip_attention_mask` (one row per image, image order) and
    returns a `TrimImageFeaturesOutput`: `B` tensors `[k_i (+1), text_hidden]` in the projector's dtype, the kept
    indices and scores; `vision_feature_layer` is `config.vision_feature_layer`, CLS dropped. LLaVA's weights and
    module names are stock."""

    config_class = LlavaTrimConfig
    config: LlavaTrimConfig


class LlavaTrimForConditionalGeneration(ReducedLlavaForConditionalGeneration):
    """LLaVA for generation with TRIM. Loads stock LLaVA checkpoints (the CLIP text tower and
    `visual_projection` then load as missing, see `method_trim_model.py`) and TRIM checkpoints, and saves
    self-contained remote-code checkpoints. `generate`/`forward` take the processor's `clip_input_ids` and
    `clip_attention_mask` (one row per image, placeholder order)."""

    config_class = LlavaTrimConfig
    config: LlavaTrimConfig
    inner_model_class = LlavaTrimModel


register_llava_weight_renames("LlavaTrimForConditionalGeneration", "LlavaTrimModel")

__all__ = ["LlavaTrimModel", "LlavaTrimForConditionalGeneration", "TrimImageFeaturesOutput"]
