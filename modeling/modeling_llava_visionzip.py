"""LLaVA with VisionZip: each image keeps the tokens its CLS token attends to most, plus a few merged ones.

    pixel_values [B, C, H, W]
      -> CLIP vision tower (sdpa/flash kept; its hidden states give layer ℓ's input and output)
      -> layer ℓ's keys and CLS query, recomputed from its input
      -> CLS attention row [B, N] and head-mean keys [B, N, d]        (token_reduction.cls_attention_scores)
      -> [CLS, dominant patches, contextual] [B, dominant + contextual, D_v]   (token_reduction.visionzip_reduce)
      -> projector -> one [dominant + contextual, text_hidden] tensor per image
"""

from transformers import LlavaModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils.generic import can_return_tuple

from ..configuration.configuration_llava_visionzip import LlavaVisionZipConfig
from .modeling_reduced_llava import (
    ReducedLlavaForConditionalGeneration,
    ReducedLlavaModelMixin,
    register_llava_weight_renames,
)
from .token_reduction import cls_attention_scores, visionzip_reduce
from .vision_inputs import as_pixel_batch, run_vision_tower, vision_tokens_of


class LlavaVisionZipModel(ReducedLlavaModelMixin, LlavaModel):
    """The inner LLaVA model (vision tower, projector, language model) with VisionZip in
    `get_image_features`. Weights and module names are stock LLaVA's."""

    config_class = LlavaVisionZipConfig
    config: LlavaVisionZipConfig

    def __init__(self, config: LlavaVisionZipConfig):
        # Load-time overrides bypass the config's own checks; the model re-checks the whole budget.
        config.validate_token_reduction()
        super().__init__(config)

    def _run_visionzip_layer(self, pixel_values, output_hidden_states=None, output_attentions=None, **kwargs):
        """`get_visionzip_layer_outputs` plus the vision tower's own output (for `get_image_features`)."""
        config = self.config
        pixel_values = as_pixel_batch(
            pixel_values, config.vision_config, interpolate_pos_encoding=bool(kwargs.get("interpolate_pos_encoding"))
        )
        config.validate_token_reduction(vision_tokens=vision_tokens_of(pixel_values, config.vision_config))
        kwargs.pop("image_sizes", None)  # generate bookkeeping of other LLaVA families, not a tower input
        layers = self.vision_tower.encoder.layers
        index = config.visionzip_layer % len(layers)
        # Hidden state `index` is the layer's input, `index + 1` its output (hidden state 0 is the encoder input).
        outputs, (layer_input, features) = run_vision_tower(
            self.vision_tower, pixel_values, [index, index + 1], output_hidden_states, output_attentions, **kwargs
        )
        # The layer's q/k projections, recomputed from its input rather than hooked: hooks on shared modules
        # would record every thread's forward. Costs one k_proj (queries for CLS only), ~0.2% of a CLIP-L/336 tower.
        layer = layers[index]
        normed = layer.layer_norm1(layer_input)
        queries = layer.self_attn.q_proj(normed[:, :1])
        keys = layer.self_attn.k_proj(normed)
        cls_attention, mean_keys = cls_attention_scores(queries, keys, config.vision_config.num_attention_heads)
        return outputs, features, cls_attention, mean_keys

    def get_visionzip_layer_outputs(self, pixel_values, **kwargs):
        """Run the vision tower once and return what VisionZip reads from layer `visionzip_layer`.

        The layer's input and output come from the tower's hidden states (sdpa/flash stays on); its keys and the
        CLS query are recomputed from the input, and only the CLS row of the attention is computed. The budget
        and the pixels are checked before the tower runs. Safe to call from several threads on one model.

        Returns:
            `features` `[B, N, D_v]` (the layer's output, CLS included), `cls_attention` `[B, N]` fp32 (CLS row
            summed over heads) and `mean_keys` `[B, N, d]` fp32 (keys averaged over heads).
        """
        for flag in ("output_hidden_states", "output_attentions", "return_dict"):
            kwargs.pop(flag, None)
        _, features, cls_attention, mean_keys = self._run_visionzip_layer(pixel_values, **kwargs)
        return features, cls_attention, mean_keys

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        output_hidden_states=None,
        output_attentions=None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Reduce and project each image.

        Args:
            pixel_values: `[B, C, H, W]` (or a list of `[C, H, W]`).
            vision_feature_layer, vision_feature_select_strategy: accepted for signature compatibility and
                ignored: VisionZip always uses `config.visionzip_layer` with CLS kept.
            output_hidden_states, output_attentions, return_dict: as stock `LlavaModel.get_image_features`: the
                vision tower's hidden states / attentions are returned when asked for (under sdpa the tower
                returns no attention weights, as stock); `return_dict=False` returns a tuple.

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` is a list of `B` tensors
            `[dominant_tokens + contextual_tokens, text_hidden]`, in image order, and whose
            `last_hidden_state` is the reduced, unprojected `[B, dominant + contextual, D_v]`.
        """
        config = self.config
        outputs, features, cls_attention, mean_keys = self._run_visionzip_layer(
            pixel_values, output_hidden_states, output_attentions, **kwargs
        )
        reduced = visionzip_reduce(features, cls_attention, mean_keys, config.dominant_tokens, config.contextual_tokens)
        projected = self.multi_modal_projector(reduced)
        return BaseModelOutputWithPooling(
            last_hidden_state=reduced,
            pooler_output=list(projected),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class LlavaVisionZipForConditionalGeneration(ReducedLlavaForConditionalGeneration):
    """LLaVA for generation with VisionZip. Loads stock LLaVA checkpoints (`from_pretrained(stock_dir,
    dominant_tokens=..., contextual_tokens=...)`) and saves self-contained remote-code checkpoints."""

    config_class = LlavaVisionZipConfig
    config: LlavaVisionZipConfig
    inner_model_class = LlavaVisionZipModel


register_llava_weight_renames("LlavaVisionZipForConditionalGeneration", "LlavaVisionZipModel")

__all__ = ["LlavaVisionZipModel", "LlavaVisionZipForConditionalGeneration"]
