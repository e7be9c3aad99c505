"""TRIM's model side, for any family: CLIP's text tower embeds each image's question, CLIP's vision head embeds
the patches of one vision state, and every crop keeps the patches scoring as outliers plus the mean of the rest.

    states: hidden state `vision_feature_layer` [crops, N, D_v]     clip_input_ids / clip_attention_mask [images, T]
      -> patches P [crops, N_p, D_v] (CLS dropped)                    -> clip_text_model -> text_embeds [images, E]
      -> Z = visual_projection(post_layernorm(P)) [crops, N_p, E]        (fp32; each crop reads its image's row)
      -> softmax(±<Z, t>) -> IQR outlier count per crop (or per batch) -> bounds            (method_trim.trim_reduce)
      -> [kept patches in raster order ; mean of the others] [k_i (+1), D_v] per crop

The CLIP text tower and `visual_projection` are not part of stock LLaVA checkpoints: loading one of those
reports exactly those keys (`model.clip_text_model.*`, `model.visual_projection.weight`) as missing and
randomly initialised; `model.model.load_clip_text_weights(clip_model.state_dict())` (used by
`convert trim SRC OUT --clip CLIP_SRC`) fills them from the CLIP checkpoint of the vision tower, whose
`text_model.*`, `text_projection.weight` and `visual_projection.weight` map one to one onto
`clip_text_model.text_model.*`, `clip_text_model.text_projection.weight` and `visual_projection.weight`.

Shipped with TRIM checkpoints (remote code): it imports only torch, transformers and sibling modules.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPTextModelWithProjection
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .method_base import CropReduction, ReductionMethodMixin
from .method_trim import trim_reduce
from .vision_inputs import vision_tokens_of


_HALF_DTYPES = (torch.float16, torch.bfloat16)


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



class TrimReduction(ReductionMethodMixin):
    """TRIM between the vision tower and the projector (the config is a `LlavaTrimConfig`), with CLIP's text tower
    (`clip_text_model`) and vision head (`visual_projection`) as modules of the inner model."""

    image_side_input_names = ("clip_input_ids", "clip_attention_mask")
    image_features_output_class = TrimImageFeaturesOutput
    stock_checkpoint_refusal = (
        "it has no CLIP text tower, which TRIM needs (its weights would be initialised randomly). Convert it first: "
        "`llava-token-reduction convert trim SRC OUT --clip openai/clip-vit-large-patch14-336` (the CLIP of its "
        "vision tower), then load OUT"
    )
    # Scores need fp32 (docs/trim.md §6); these stay fp32 under fp16/bf16 loads. The tower's own pooled
    # output still works: layer_norm accepts half input with fp32 parameters.
    _keep_in_fp32_modules_strict = ["clip_text_model", "visual_projection", "vision_tower.post_layernorm"]

    def add_reduction_modules(self, config) -> None:
        self.clip_text_model = CLIPTextModelWithProjection._from_config(config.clip_text_config)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        # `_from_config(dtype=...)` builds every module in that dtype (from_pretrained applies the fp32 list
        # itself): the scoring modules are made fp32 here, before their weights are initialised.
        for module in self._fp32_scoring_modules():
            module.float()

    def _fp32_scoring_modules(self) -> list[nn.Module]:
        """The modules of `_keep_in_fp32_modules_strict`, in the same order."""
        return [self.clip_text_model, self.visual_projection, self.vision_tower.post_layernorm]

    def _apply(self, fn, recurse=True):
        """`model.to(torch.bfloat16)`, `.half()` and the like convert every parameter; the scoring modules keep
        their fp32 weights (device moves still apply), as under `from_pretrained(dtype=...)`. To cast them
        anyway, call `.to(dtype)` on the modules themselves."""
        # By owner and name: `_apply` may replace a Parameter object instead of changing it in place.
        kept = [(module, name, parameter.data) for owner in self._fp32_scoring_modules()
                for module in owner.modules() for name, parameter in module._parameters.items()
                if parameter is not None and parameter.dtype == torch.float32]
        result = super()._apply(fn, recurse)
        for module, name, original in kept:
            parameter = module._parameters[name]
            if parameter.dtype != torch.float32:  # cast by `fn`: take the original fp32 values to the new device
                parameter.data = original.to(parameter.device)
                if parameter.grad is not None:
                    parameter.grad.data = parameter.grad.data.float()
        return result

    # Inputs -----------------------------------------------------------------------------------------

    def _feature_state_index(self) -> int:
        """The index of `vision_feature_layer` into the vision tower's `L + 1` hidden states."""
        layer = self.config.vision_feature_layer
        num_states = len(self.vision_tower.encoder.layers) + 1
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"TRIM needs one integer `vision_feature_layer` (default -2), got {layer!r}")
        if not -num_states <= layer < num_states:
            raise ValueError(
                f"`vision_feature_layer` must index one of the {num_states} hidden states "
                f"(from {-num_states} to {num_states - 1}), got {layer}"
            )
        return layer % num_states

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
        dtype = clip_input_ids.dtype
        if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
            raise TypeError(
                f"`clip_input_ids` must hold integer token ids (torch.long), got {clip_input_ids.dtype}: cast the "
                "processor outputs with `.to(device, dtype)` on the BatchFeature, which leaves integer tensors alone"
            )
        if clip_input_ids.shape[1] == 0:
            raise ValueError(
                "`clip_input_ids` rows are empty (shape "
                f"{tuple(clip_input_ids.shape)}): each needs at least CLIP's BOS and EOS tokens, as "
                "`LlavaTrimProcessor` writes them (an image without a question gets the empty question)"
            )
        vocab_size = self.config.clip_text_config.vocab_size
        if num_images and (int(clip_input_ids.min()) < 0 or int(clip_input_ids.max()) >= vocab_size):
            raise ValueError(
                f"`clip_input_ids` must be CLIP token ids in [0, {vocab_size - 1}] (the CLIP text tower's vocabulary), "
                f"got values from {int(clip_input_ids.min())} to {int(clip_input_ids.max())}: were they made by the "
                "LLaVA tokenizer instead of `processor.clip_tokenizer`?"
            )
        if clip_attention_mask is not None:
            if tuple(clip_attention_mask.shape) != tuple(clip_input_ids.shape):
                raise ValueError(
                    f"`clip_attention_mask` must have the shape of `clip_input_ids` {tuple(clip_input_ids.shape)}, "
                    f"got {tuple(clip_attention_mask.shape)}"
                )
            empty_rows = (clip_attention_mask == 0).all(dim=1).nonzero().flatten().tolist()
            if empty_rows:
                raise ValueError(
                    f"`clip_attention_mask` rows {empty_rows} attend no token: every row needs at least CLIP's BOS and "
                    "EOS (1 where `clip_input_ids` holds a real token, 0 on padding)"
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

    # The seam ---------------------------------------------------------------------------------------

    def check_reduction_inputs(self, crops, num_images, side_inputs) -> None:
        """The question rows (one per image), the bounds against the crops' patches (load-time overrides bypass
        the config's own checks) and `vision_feature_layer`, before any compute."""
        self._check_clip_inputs(side_inputs.get("clip_input_ids"), side_inputs.get("clip_attention_mask"), num_images)
        self.config.validate_token_reduction(num_patches=vision_tokens_of(crops, self.config.vision_config) - 1)
        self._feature_state_index()

    def vision_states_needed(self) -> list[int]:
        return [self._feature_state_index()]

    def reduce_crops(self, states, image_of_crop, side_inputs) -> CropReduction:
        """`last_hidden_state` is the patch features `P` `[crops, N_p, D_v]` TRIM selects from."""
        config = self.config
        text_embeds = self.get_question_embeds(side_inputs["clip_input_ids"], side_inputs.get("clip_attention_mask"))
        patch_features = states[0][:, 1:]
        patch_embeds = self.get_patch_embeds(patch_features)
        tokens, kept_indices, scores = trim_reduce(
            patch_features,
            patch_embeds,
            text_embeds[image_of_crop.to(text_embeds.device)],
            negate_similarity=config.trim_negate_similarity,
            iqr_multiplier=config.trim_iqr_multiplier,
            batch_coupled=config.trim_batch_coupled,
            min_tokens=config.trim_min_tokens,
            max_tokens=config.trim_max_tokens,
            append_mean_token=config.trim_append_mean_token,
        )
        return CropReduction(tokens=tokens, last_hidden_state=patch_features,
                             extras={"kept_indices": kept_indices, "scores": scores})


__all__ = ["TrimImageFeaturesOutput", "TrimReduction"]
