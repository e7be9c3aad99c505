"""LLaVA with PruMerge / PruMerge+: each image keeps the patches its CLS token attends to as outliers, each merged
with the patches most like it, plus one attention-weighted sum of the rest.

The LLaVA-1.5 family (`family_llava.py`: crops, placeholder counts, stock classes, weight renames) combined with
the PruMerge method (`method_prumerge_model.py`; its tensor functions are `method_prumerge.py`).
"""

from ..configuration.configuration_llava_prumerge import LlavaPruMergeConfig
from .family_llava import ReducedLlavaForConditionalGeneration, ReducedLlavaModel, register_llava_weight_renames
from .method_prumerge_model import PruMergeImageFeaturesOutput, PruMergeReduction


class LlavaPruMergeModel(PruMergeReduction, ReducedLlavaModel):
    """The inner LLaVA model (vision tower, projector, language model) with PruMerge in `get_image_features`, which
    returns a `PruMergeImageFeaturesOutput`: `B` tensors `[k_i, text_hidden]` in the projector's dtype, the kept
    indices, outlier counts and CLS attention scores. Weights and module names are stock LLaVA's."""

    config_class = LlavaPruMergeConfig
    config: LlavaPruMergeConfig


class LlavaPruMergeForConditionalGeneration(ReducedLlavaForConditionalGeneration):
    """LLaVA for generation with PruMerge. Loads stock LLaVA checkpoints (`from_pretrained(stock_dir,
    prumerge_plus=True)`) and saves self-contained remote-code checkpoints."""

    config_class = LlavaPruMergeConfig
    config: LlavaPruMergeConfig
    inner_model_class = LlavaPruMergeModel


register_llava_weight_renames("LlavaPruMergeForConditionalGeneration", "LlavaPruMergeModel")

__all__ = ["LlavaPruMergeModel", "LlavaPruMergeForConditionalGeneration", "PruMergeImageFeaturesOutput"]
