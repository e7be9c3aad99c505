"""VisionZip's model side, for any family: it reads one vision layer's input and output from the tower's hidden
states, recomputes that layer's keys and CLS query, and reduces every crop to `dominant + contextual` tokens.

    states: layer ℓ's input and output [crops, N, D_v]   (hidden states ℓ and ℓ + 1; sdpa/flash kept)
      -> keys and CLS query of layer ℓ, recomputed from its input
      -> CLS attention row [crops, N], head-mean keys [crops, N, d]        (method_visionzip.cls_attention_scores)
      -> [CLS, dominant patches, contextual] [crops, dominant + contextual, D_v]   (method_visionzip.visionzip_reduce)

Shipped with VisionZip checkpoints (remote code): it imports only sibling modules.
"""

from .method_base import CropReduction, ReductionMethodMixin
from .method_visionzip import cls_attention_scores, dominant_keep_mask, visionzip_reduce
from .vision_inputs import run_vision_tower, vision_tokens_of


class VisionZipReduction(ReductionMethodMixin):
    """VisionZip between the vision tower and the projector (the config is a `LlavaVisionZipConfig`)."""

    def _layer_index(self) -> int:
        return self.config.visionzip_layer % len(self.vision_tower.encoder.layers)

    def check_reduction_inputs(self, crops, num_images, side_inputs) -> None:
        # Load-time overrides bypass the config's own checks; the budget is re-checked against these crops.
        self.config.validate_token_reduction(vision_tokens=vision_tokens_of(crops, self.config.vision_config))

    def vision_states_needed(self) -> list[int]:
        # Hidden state `index` is the layer's input, `index + 1` its output (hidden state 0 is the encoder input).
        index = self._layer_index()
        return [index, index + 1]

    def _visionzip_layer(self, states):
        """`(features, cls_attention, mean_keys)` from the layer's input and output states."""
        layer_input, features = states
        # The layer's q/k projections, recomputed from its input rather than hooked: hooks on shared modules
        # would record every thread's forward. Costs one k_proj (queries for CLS only), ~0.2% of a CLIP-L/336 tower.
        layer = self.vision_tower.encoder.layers[self._layer_index()]
        normed = layer.layer_norm1(layer_input)
        queries = layer.self_attn.q_proj(normed[:, :1])
        keys = layer.self_attn.k_proj(normed)
        cls_attention, mean_keys = cls_attention_scores(queries, keys, self.config.vision_config.num_attention_heads)
        return features, cls_attention, mean_keys

    def reduce_crops(self, states, image_of_crop, side_inputs) -> CropReduction:
        """`last_hidden_state` is the reduced, unprojected `[crops, dominant + contextual, D_v]`; `kept_patches`
        the dominant tokens' patch indices `[crops, dominant - 1]` (for families that place them on the image)."""
        features, cls_attention, mean_keys = self._visionzip_layer(states)
        config = self.config
        reduced = visionzip_reduce(features, cls_attention, mean_keys, config.dominant_tokens, config.contextual_tokens)
        # The same selection visionzip_reduce made (a top-k over [crops, N] scores: negligible next to the merge).
        keep_mask = dominant_keep_mask(cls_attention.to(features.device), config.dominant_tokens)
        kept_patches = keep_mask[:, 1:].nonzero()[:, 1].view(keep_mask.shape[0], -1)
        return CropReduction(tokens=reduced, last_hidden_state=reduced, kept_patches=kept_patches)

    def get_visionzip_layer_outputs(self, pixel_values, **kwargs):
        """Run the vision tower once and return what VisionZip reads from layer `visionzip_layer` (for pictures
        and measurements; `get_image_features` is the model's path).

        The layer's input and output come from the tower's hidden states (sdpa/flash stays on); its keys and the
        CLS query are recomputed from the input, and only the CLS row of the attention is computed. The budget
        and the pixels are checked before the tower runs. Safe to call from several threads on one model.

        Returns:
            `features` `[crops, N, D_v]` (the layer's output, CLS included), `cls_attention` `[crops, N]` fp32
            (CLS row summed over heads) and `mean_keys` `[crops, N, d]` fp32 (keys averaged over heads).
        """
        for flag in ("output_hidden_states", "output_attentions", "return_dict"):
            kwargs.pop(flag, None)
        crops, image_of_crop = self.vision_crops(pixel_values, kwargs)
        self.check_reduction_inputs(crops, int(image_of_crop.max()) + 1, {})
        _, states = run_vision_tower(self.vision_tower, crops, self.vision_states_needed(), **kwargs)
        return self._visionzip_layer(states)


__all__ = ["VisionZipReduction"]
