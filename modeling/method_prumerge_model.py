"""PruMerge's model side, for any family: it reads the input of the vision tower's last layer (hidden state -2,
which is also LLaVA's feature layer), recomputes that layer's keys and CLS query, and reduces every crop to its
merged outliers (PruMerge+: plus a sample of the grid) and one extra token.

    states: hidden state -2 [crops, N, D_v] (the last layer's input)   (and `vision_feature_layer` if it differs)
      -> layer_norm1 -> q_proj (CLS only), k_proj of the last layer [crops, N, D_v], heads not split
      -> CLS attention over the patches [crops, N_p]                      (method_prumerge.prumerge_cls_attention)
      -> IQR outlier count per crop (or per batch) -> bounds -> kept, merged, extra token   (prumerge_reduce)
      -> [k_i, D_v] per crop

Shipped with PruMerge checkpoints (remote code): it imports only torch, transformers and sibling modules.
"""

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .method_base import CropReduction, ReductionMethodMixin
from .method_prumerge import prumerge_cls_attention, prumerge_reduce
from .vision_inputs import vision_tokens_of


@dataclass
class PruMergeImageFeaturesOutput(BaseModelOutputWithPooling):
    r"""
    Output of `LlavaPruMergeModel.get_image_features`.

    last_hidden_state (`torch.FloatTensor` of shape `(images, patches, vision_hidden)`):
        The patch features PruMerge merges (the feature layer's output, CLS dropped), before reduction.
    pooler_output (`list[torch.FloatTensor]`):
        Per image, in order, the reduced and projected features `[k_i, text_hidden]`: the merged kept patches
        in `kept_indices` order, then the extra token (absent when every patch is kept).
    kept_indices (`list[torch.LongTensor]`):
        Per image, the kept patch indices in output order: the outliers by descending attention, then
        PruMerge+'s sampled patches (ascending).
    outlier_counts (`list[int]`):
        Per image, how many of `kept_indices` are outliers (after the bounds); the rest are PruMerge+'s samples.
    scores (`torch.FloatTensor` of shape `(images, patches)`):
        The fp32 CLS attention over the patches (last layer, CLS column dropped after the softmax).
    """

    kept_indices: list[torch.LongTensor] | None = None
    outlier_counts: list[int] | None = None
    scores: torch.FloatTensor | None = None


class PruMergeReduction(ReductionMethodMixin):
    """PruMerge between the vision tower and the projector (the config is a `LlavaPruMergeConfig`)."""

    image_features_output_class = PruMergeImageFeaturesOutput

    def _num_states(self) -> int:
        return len(self.vision_tower.encoder.layers) + 1

    def _feature_state_index(self) -> int:
        layer = self.config.vision_feature_layer
        num_states = self._num_states()
        if isinstance(layer, bool) or not isinstance(layer, int) or not -num_states <= layer < num_states:
            raise ValueError(
                f"`vision_feature_layer` must index one of the {num_states} hidden states "
                f"(from {-num_states} to {num_states - 1}) for PruMerge, got {layer!r}"
            )
        return layer % num_states

    def check_reduction_inputs(self, crops, num_images, side_inputs) -> None:
        # Load-time overrides bypass the config's own checks; the bounds are re-checked against these crops.
        self.config.validate_token_reduction(num_patches=vision_tokens_of(crops, self.config.vision_config) - 1)
        self._feature_state_index()

    def vision_states_needed(self) -> list[int]:
        # The last layer's input (hidden state -2) for the scores and keys, then the features.
        return [self._num_states() - 2, self._feature_state_index()]

    def reduce_crops(self, states, image_of_crop, side_inputs) -> CropReduction:
        """`last_hidden_state` is the patch features `[crops, N_p, D_v]` PruMerge merges."""
        last_input, features = states
        # The last layer's projections, recomputed from its input rather than hooked (hooks on shared modules would
        # record every thread's forward); queries for CLS only, so no N x N map is built.
        layer = self.vision_tower.encoder.layers[-1]
        normed = layer.layer_norm1(last_input)
        keys = layer.self_attn.k_proj(normed)
        cls_attention = prumerge_cls_attention(layer.self_attn.q_proj(normed[:, :1]), keys)
        patch_features = features[:, 1:]
        config = self.config
        tokens, kept, counts = prumerge_reduce(
            patch_features, keys[:, 1:], cls_attention, plus=config.prumerge_plus,
            iqr_multiplier=config.prumerge_iqr_multiplier, batch_coupled=config.prumerge_batch_coupled,
            min_tokens=config.prumerge_min_tokens, max_tokens=config.prumerge_max_tokens,
        )
        return CropReduction(tokens=tokens, last_hidden_state=patch_features,
                             extras={"kept_indices": kept, "outlier_counts": counts, "scores": cls_attention})


__all__ = ["PruMergeImageFeaturesOutput", "PruMergeReduction"]
