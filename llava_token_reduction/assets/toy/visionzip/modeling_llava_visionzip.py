"""LLaVA with VisionZip: each image keeps the tokens its CLS token attends to most, plus a few merged ones.

    pixel_values [B, C, H, W]
      -> CLIP vision tower (sdpa/flash kept; hooks record layer ℓ's q/k projections and output)
      -> CLS attention row [B, N] and head-mean keys [B, N, d]        (token_reduction.cls_attention_scores)
      -> [CLS, dominant patches, contextual] [B, dominant + contextual, D_v]   (token_reduction.visionzip_reduce)
      -> projector -> one [dominant + contextual, text_hidden] tensor per image
"""

from transformers import LlavaModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_llava_visionzip import LlavaVisionZipConfig
from .modeling_reduced_llava import (
    ReducedLlavaForConditionalGeneration,
    as_pixel_batch,
    capture_outputs_of,
    register_llava_weight_renames,
    vision_tokens_of,
)
from .token_reduction import cls_attention_scores, visionzip_reduce


class LlavaVisionZipModel(LlavaModel):
    """The inner LLaVA model (vision tower, projector, language model) with VisionZip in
    `get_image_features`. Weights and module names are stock LLaVA's."""

    config_class = LlavaVisionZipConfig
    config: LlavaVisionZipConfig

    def __init__(self, config: LlavaVisionZipConfig):
        # Load-time overrides bypass the config's own checks; the model re-checks the whole budget.
        config.validate_token_reduction()
        super().__init__(config)

    def get_visionzip_layer_outputs(self, pixel_values, **kwargs):
        """Run the vision tower once and return what VisionZip reads from layer `visionzip_layer`.

        Hooks on the layer's `q_proj`/`k_proj` and output record them while sdpa/flash stays on; only the CLS
        row of the attention is then computed. The budget and the pixels are checked before the tower runs.

        Returns:
            `features` `[B, N, D_v]` (the layer's output, CLS included), `cls_attention` `[B, N]` fp32 (CLS row
            summed over heads) and `mean_keys` `[B, N, d]` fp32 (keys averaged over heads).
        """
        config = self.config
        pixel_values = as_pixel_batch(pixel_values, config.vision_config)
        config.validate_token_reduction(vision_tokens=vision_tokens_of(pixel_values, config.vision_config))
        kwargs = {k: v for k, v in kwargs.items() if k not in ("output_hidden_states", "output_attentions", "return_dict")}
        layer = self.vision_tower.encoder.layers[config.visionzip_layer]
        watched = {"queries": layer.self_attn.q_proj, "keys": layer.self_attn.k_proj, "features": layer}
        with capture_outputs_of(watched) as captured:
            self.vision_tower(pixel_values, return_dict=True, **kwargs)
        cls_attention, mean_keys = cls_attention_scores(
            captured["queries"], captured["keys"], config.vision_config.num_attention_heads
        )
        return captured["features"], cls_attention, mean_keys

    def get_image_features(
        self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """Reduce and project each image.

        Args:
            pixel_values: `[B, C, H, W]` (or a list of `[C, H, W]`).
            vision_feature_layer, vision_feature_select_strategy: accepted for signature compatibility and
                ignored: VisionZip always uses `config.visionzip_layer` with CLS kept.

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` is a list of `B` tensors
            `[dominant_tokens + contextual_tokens, text_hidden]`, in image order, and whose
            `last_hidden_state` is the reduced, unprojected `[B, dominant + contextual, D_v]`.
        """
        config = self.config
        features, cls_attention, mean_keys = self.get_visionzip_layer_outputs(pixel_values, **kwargs)
        reduced = visionzip_reduce(features, cls_attention, mean_keys, config.dominant_tokens, config.contextual_tokens)
        projected = self.multi_modal_projector(reduced)
        return BaseModelOutputWithPooling(last_hidden_state=reduced, pooler_output=list(projected))


class LlavaVisionZipForConditionalGeneration(ReducedLlavaForConditionalGeneration):
    """LLaVA for generation with VisionZip. Loads stock LLaVA checkpoints (`from_pretrained(stock_dir,
    dominant_tokens=..., contextual_tokens=...)`) and saves self-contained remote-code checkpoints."""

    config_class = LlavaVisionZipConfig
    config: LlavaVisionZipConfig
    inner_model_class = LlavaVisionZipModel


register_llava_weight_renames("LlavaVisionZipForConditionalGeneration", "LlavaVisionZipModel")

__all__ = ["LlavaVisionZipModel", "LlavaVisionZipForConditionalGeneration"]
