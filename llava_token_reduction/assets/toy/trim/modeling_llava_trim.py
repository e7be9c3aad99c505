"""LLaVA with TRIM: each image keeps the patches CLIP singles out for the question, plus the mean of the rest.

    pixel_values [B, C, H, W]                       clip_input_ids / clip_attention_mask [B, 77]
      -> CLIP vision tower (a hook records the       -> clip_text_model (CLIPTextModelWithProjection)
         feature layer's output, default hs[-2])     -> text_embeds t [B, E]                   (fp32)
      -> patches P [B, N_p, D_v] (CLS dropped)
      -> Z = visual_projection(post_layernorm(P)) [B, N_p, E]                                  (fp32)
      -> softmax(±<Z, t>) -> IQR outlier count per image (or per batch) -> bounds            (fp32)
      -> [kept patches in raster order ; mean of the others] [k_i (+1), D_v] per image
      -> projector -> one [k_i (+1), text_hidden] tensor per image

The CLIP text tower and `visual_projection` are not part of stock LLaVA checkpoints: loading one of those
reports exactly those keys (`model.clip_text_model.*`, `model.visual_projection.weight`) as missing and
randomly initialised; `model.model.load_clip_text_weights(clip_model.state_dict())` (used by
`convert trim SRC OUT --clip CLIP_SRC`) fills them from the CLIP checkpoint of the vision tower, whose `text_model.*`, `text_projection.weight` and `visual_projection.weight`
map one to one onto `clip_text_model.text_model.*`, `clip_text_model.text_projection.weight` and
`visual_projection.weight`.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, CLIPTextModelWithProjection, LlavaModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector, LlavaPreTrainedModel

from .configuration_llava_trim import LlavaTrimConfig
from .modeling_reduced_llava import (
    ReducedLlavaForConditionalGeneration,
    as_pixel_batch,
    capture_outputs_of,
    register_llava_weight_renames,
    vision_tokens_of,
)
from .token_reduction import trim_reduce


_HALF_DTYPES = (torch.float16, torch.bfloat16)
# Inputs of the stock signature (or generate bookkeeping) that the vision tower must not receive.
_NOT_FOR_THE_TOWER = ("output_hidden_states", "output_attentions", "return_dict", "image_sizes")


@dataclass
class TrimImageFeaturesOutput(BaseModelOutputWithPooling):
    r"""
    Output of `LlavaTrimModel.get_image_features`.

    last_hidden_state (`torch.FloatTensor` of shape `(images, patches, vision_hidden)`):
        The patch features `P` TRIM selects from (the feature layer's output, CLS dropped), before reduction.
    pooler_output (`list[torch.FloatTensor]`):
        Per image, in order, the reduced and projected features `[k_i (+1 mean token), text_hidden]`.
    kept_indices (`list[torch.LongTensor]`):
        Per image, the ascending (raster-order) indices of the kept patches, `[k_i]`.
    scores (`torch.FloatTensor` of shape `(images, patches)`):
        The fp32 selection scores (softmax over the patches of each image).
    """

    kept_indices: list[torch.LongTensor] | None = None
    scores: torch.FloatTensor | None = None


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype to feed `module`: fp32, unless its parameters were cast to half precision (a layer norm with
    half parameters rejects fp32 input). Reads only the dtype, which meta (offloaded) parameters keep."""
    dtype = next(module.parameters()).dtype
    return dtype if dtype in _HALF_DTYPES else torch.float32


def _placement_device(module: nn.Module) -> torch.device | None:
    """Where to put inputs of `module`, or None when its weights are offloaded (on meta: accelerate's hooks
    move the inputs to the execution device themselves)."""
    device = next(module.parameters()).device
    return None if device.type == "meta" else device


class LlavaTrimModel(LlavaModel):
    """The inner LLaVA model (vision tower, projector, language model) plus CLIP's text tower
    (`clip_text_model`) and vision head (`visual_projection`), with TRIM in `get_image_features`.
    LLaVA's weights and module names are stock."""

    config_class = LlavaTrimConfig
    config: LlavaTrimConfig
    # Scores need fp32 (docs/trim.md §6); these stay fp32 under fp16/bf16 loads. The tower's own pooled
    # output still works: layer_norm accepts half input with fp32 parameters.
    _keep_in_fp32_modules_strict = ["clip_text_model", "visual_projection", "vision_tower.post_layernorm"]

    def __init__(self, config: LlavaTrimConfig):
        # Load-time overrides bypass the config's own checks; the model re-checks everything.
        config.validate_token_reduction()
        # Not LlavaModel.__init__: it calls post_init() before the CLIP modules would exist.
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.clip_text_model = CLIPTextModelWithProjection._from_config(config.clip_text_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    # Inputs -----------------------------------------------------------------------------------------

    def _feature_layer_module(self) -> nn.Module:
        """The module whose output is `hidden_states[vision_feature_layer]` of the vision tower."""
        layer = self.config.vision_feature_layer
        layers = self.vision_tower.encoder.layers
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"TRIM needs one integer `vision_feature_layer` (default -2), got {layer!r}")
        position = layer + len(layers) + 1 if layer < 0 else layer  # index into the L + 1 hidden states
        if not 0 <= position <= len(layers):
            raise ValueError(
                f"`vision_feature_layer` must index one of the {len(layers) + 1} hidden states "
                f"(from {-len(layers) - 1} to {len(layers)}), got {layer}"
            )
        return self.vision_tower.pre_layrnorm if position == 0 else layers[position - 1]

    def _check_clip_inputs(self, clip_input_ids, clip_attention_mask, num_images: int):
        max_length = self.config.clip_text_config.max_position_embeddings
        if clip_input_ids is None:
            raise ValueError(
                "TRIM needs the question as `clip_input_ids` (and `clip_attention_mask`): one row of CLIP token ids "
                f"per image, {num_images} here. `LlavaTrimProcessor` returns them; pass all processor outputs "
                "to the model, e.g. `model.generate(**inputs)`."
            )
        if not torch.is_tensor(clip_input_ids) or clip_input_ids.ndim != 2:
            shape = tuple(clip_input_ids.shape) if torch.is_tensor(clip_input_ids) else type(clip_input_ids).__name__
            raise ValueError(f"`clip_input_ids` must be a 2-D tensor [images, tokens], got {shape}")
        if clip_input_ids.shape[0] != num_images:
            raise ValueError(
                f"`clip_input_ids` must have one row per image: {num_images} images but "
                f"{clip_input_ids.shape[0]} rows (shape {tuple(clip_input_ids.shape)})"
            )
        if clip_input_ids.shape[1] > max_length:
            raise ValueError(
                f"`clip_input_ids` rows must be at most {max_length} tokens (CLIP's limit; truncate them), "
                f"got {clip_input_ids.shape[1]}"
            )
        if clip_attention_mask is not None and tuple(clip_attention_mask.shape) != tuple(clip_input_ids.shape):
            raise ValueError(
                f"`clip_attention_mask` must have the shape of `clip_input_ids` {tuple(clip_input_ids.shape)}, "
                f"got {tuple(clip_attention_mask.shape)}"
            )

    def load_clip_text_weights(self, clip_state_dict: dict[str, torch.Tensor]) -> None:
        """Fill `clip_text_model` and `visual_projection` from the state dict of a transformers `CLIPModel`
        (keys `text_model.*`, `text_projection.weight`, `visual_projection.weight`; `vision_model.*`, `logit_scale`
        and anything else are ignored) — the modules a stock LLaVA checkpoint lacks. Raises `ValueError` naming
        the keys that are missing or do not fit."""
        text = {k: v for k, v in clip_state_dict.items() if k.startswith(("text_model.", "text_projection."))}
        projection = {k[len("visual_projection.") :]: v for k, v in clip_state_dict.items()
                      if k.startswith("visual_projection.")}
        problems = []
        for module, weights, prefix in ((self.clip_text_model, text, ""), (self.visual_projection, projection,
                                                                           "visual_projection.")):
            expected = module.state_dict()
            missing = sorted(prefix + k for k in expected if k not in weights)
            wrong = sorted(prefix + k for k in expected if k in weights and weights[k].shape != expected[k].shape)
            problems += [f"missing {missing}"] if missing else []
            problems += [f"shape mismatch {wrong}"] if wrong else []
        if problems:
            raise ValueError(f"the CLIP state dict does not fit this model's CLIP text tower: {'; '.join(problems)}")
        with torch.no_grad():
            self.clip_text_model.load_state_dict(
                {k: v for k, v in text.items() if k in self.clip_text_model.state_dict()}, strict=True
            )
            self.visual_projection.load_state_dict(projection, strict=True)

    # Features ---------------------------------------------------------------------------------------

    def get_question_embeds(self, clip_input_ids: torch.Tensor, clip_attention_mask=None) -> torch.Tensor:
        """The question's CLIP `text_embeds` `[images, projection_dim]`, fp32 (not normalised).

        Columns that are padding in every row are dropped first: CLIP's text attention is causal and its
        positions absolute, so the embedding at each row's EOS is the same, and the processor's 77-token
        padding would otherwise multiply the text tower's cost several times."""
        if clip_attention_mask is not None and clip_input_ids.shape[1] > 1:
            attended = int(clip_attention_mask.sum(dim=1).max())
            # Only trailing padding can go (left padding would shift the absolute positions).
            if attended < clip_input_ids.shape[1] and not bool(clip_attention_mask[:, attended:].any()):
                clip_input_ids, clip_attention_mask = clip_input_ids[:, :attended], clip_attention_mask[:, :attended]
        device = _placement_device(self.clip_text_model)
        if device is not None:
            clip_input_ids = clip_input_ids.to(device)
            clip_attention_mask = None if clip_attention_mask is None else clip_attention_mask.to(device)
        output = self.clip_text_model(input_ids=clip_input_ids, attention_mask=clip_attention_mask, return_dict=True)
        return output.text_embeds.float()

    def get_patch_embeds(self, patch_features: torch.Tensor) -> torch.Tensor:
        """CLIP's vision head on the patch features: `visual_projection(post_layernorm(P))` `[B, N_p, E]`, fp32
        (computed in the modules' dtype if they were cast to half precision)."""
        norm = self.vision_tower.post_layernorm
        normed = norm(patch_features.to(_compute_dtype(norm)))
        return self.visual_projection(normed.to(_compute_dtype(self.visual_projection))).float()

    def get_image_features(
        self,
        pixel_values,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        clip_input_ids: torch.LongTensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> TrimImageFeaturesOutput:
        """Reduce and project each image with TRIM.

        Args:
            pixel_values: `[B, C, H, W]` (or a list of `[C, H, W]`).
            vision_feature_layer, vision_feature_select_strategy: accepted for signature compatibility and
                ignored: the patch features are `hidden_states[config.vision_feature_layer]` without CLS.
            clip_input_ids: `[B, T]` CLIP token ids of each image's question (`T <= 77`), one row per image in
                image order. Required.
            clip_attention_mask: `[B, T]`, optional.

        Returns:
            `TrimImageFeaturesOutput` whose `pooler_output` is a list of `B` tensors
            `[k_i (+1), text_hidden]` in the projector's dtype, image order; also the kept indices and scores.

        Raises:
            ValueError: naming `clip_input_ids` when it is missing or its rows do not match the images, or
                naming the config field when a bound exceeds the image's patches; before any compute.
        """
        config = self.config
        pixel_values = as_pixel_batch(pixel_values, config.vision_config)
        num_images = pixel_values.shape[0]
        self._check_clip_inputs(clip_input_ids, clip_attention_mask, num_images)
        config.validate_token_reduction(num_patches=vision_tokens_of(pixel_values, config.vision_config) - 1)
        feature_module = self._feature_layer_module()
        kwargs = {key: value for key, value in kwargs.items() if key not in _NOT_FOR_THE_TOWER}

        text_embeds = self.get_question_embeds(clip_input_ids, clip_attention_mask)
        with capture_outputs_of({"features": feature_module}) as captured:
            self.vision_tower(pixel_values, return_dict=True, **kwargs)
        patch_features = captured["features"][:, 1:]
        patch_embeds = self.get_patch_embeds(patch_features)

        tokens, kept_indices, scores = trim_reduce(
            patch_features,
            patch_embeds,
            text_embeds,
            negate_similarity=config.trim_negate_similarity,
            iqr_multiplier=config.trim_iqr_multiplier,
            batch_coupled=config.trim_batch_coupled,
            min_tokens=config.trim_min_tokens,
            max_tokens=config.trim_max_tokens,
            append_mean_token=config.trim_append_mean_token,
        )
        # One projector call for all images, split back per image.
        projector_dtype = next(self.multi_modal_projector.parameters()).dtype
        projected = self.multi_modal_projector(torch.cat(tokens, dim=0).to(projector_dtype))
        per_image = list(projected.split([len(t) for t in tokens], dim=0))
        return TrimImageFeaturesOutput(
            last_hidden_state=patch_features, pooler_output=per_image, kept_indices=kept_indices, scores=scores
        )


class LlavaTrimForConditionalGeneration(ReducedLlavaForConditionalGeneration):
    """LLaVA for generation with TRIM. Loads stock LLaVA checkpoints (the CLIP text tower and
    `visual_projection` then load as missing, see the module docstring) and TRIM checkpoints, and saves
    self-contained remote-code checkpoints. `generate`/`forward` take the processor's `clip_input_ids` and
    `clip_attention_mask` (one row per image, placeholder order)."""

    config_class = LlavaTrimConfig
    config: LlavaTrimConfig
    inner_model_class = LlavaTrimModel
    image_side_input_names = ("clip_input_ids", "clip_attention_mask")


register_llava_weight_renames("LlavaTrimForConditionalGeneration", "LlavaTrimModel")

__all__ = ["LlavaTrimModel", "LlavaTrimForConditionalGeneration", "TrimImageFeaturesOutput"]
