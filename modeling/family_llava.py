"""The LLaVA-1.5 family: one crop per image, `patch grid (+ CLS)` placeholders per image, stock `LlavaModel` /
`LlavaForConditionalGeneration` underneath, llava-hf's weight renames. It knows nothing about reduction methods:
a public model class is `class LlavaXModel(XReduction, ReducedLlavaModel)` (`method_base.py` is the seam).

    pixel_values [B, C, H, W]
      -> crops [B, C, H, W], image_of_crop = [0 .. B-1]                     (vision_crops: one crop per image)
      -> method.check_reduction_inputs                                       (before any compute)
      -> vision tower once, the states the method asks for                   (vision_inputs.run_vision_tower)
      -> method.reduce_crops -> [B, k, D_v] or B tensors [k_i, D_v]
      -> projector -> one [k_i, text_hidden] tensor per image                (nothing to pack: one crop each)

Shipped with every LLaVA-1.5 checkpoint (remote code): it imports only torch, transformers and sibling modules.
"""

import torch
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector, LlavaPreTrainedModel
from transformers.utils.generic import can_return_tuple

from .reduced_generation import ReducedGenerationMixin
from .reduced_model import ReducedCheckpointMixin, ReducedLlavaModelMixin
from .vision_inputs import as_pixel_batch, run_vision_tower, vision_tokens_of


def register_llava_weight_renames(outer_class_name: str, inner_class_name: str) -> None:
    """Let our classes load stock llava-hf checkpoints (legacy `language_model.model.*` keys).

    transformers skips its own LLaVA renames for custom-code classes unless the class name is registered;
    without this the language model, LM head and projector would load randomly initialised. Registered by
    class name, not model type, because the inner model shares the model type and would be renamed twice.
    """
    register_checkpoint_conversion_mapping(outer_class_name, get_checkpoint_conversion_mapping("llava"), overwrite=True)
    register_checkpoint_conversion_mapping(
        inner_class_name, get_checkpoint_conversion_mapping("LlavaModel"), overwrite=True
    )


def project_per_image(projector: nn.Module, tokens) -> list[torch.Tensor]:
    """One projector call for all images, split back per image: `[B, k, D_v]` -> B tensors `[k, text_hidden]`;
    a list of `[k_i, D_v]` is concatenated in the projector's dtype (a method may hand back fp32 tokens)."""
    if torch.is_tensor(tokens):
        return list(projector(tokens))
    projector_dtype = next(projector.parameters()).dtype
    projected = projector(torch.cat(tokens, dim=0).to(projector_dtype))
    return list(projected.split([len(t) for t in tokens], dim=0))


class ReducedLlavaModel(ReducedLlavaModelMixin, LlavaModel):
    """The inner LLaVA-1.5 model (vision tower, projector, language model, plus the method's own modules) whose
    `get_image_features` reduces each image with the method it is combined with. Module names are stock LLaVA's."""

    def __init__(self, config):
        # Load-time overrides bypass the config's own checks; the model re-checks the whole reduction.
        config.validate_token_reduction()
        # LlavaModel.__init__ without its post_init(): the method's modules must exist before weights initialise.
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.add_reduction_modules(config)
        self.post_init()

    def vision_crops(self, pixel_values, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked pixels as crops `[B, C, H, W]` and the image of each crop (`[B]`, here `0 .. B-1`). Takes the
        family's bookkeeping out of `kwargs` (`image_sizes`, which generate passes for every LLaVA family, is not a
        tower input here); what stays in `kwargs` goes to the vision tower."""
        kwargs.pop("image_sizes", None)
        interpolate = bool(kwargs.get("interpolate_pos_encoding"))
        crops = as_pixel_batch(pixel_values, self.config.vision_config, interpolate_pos_encoding=interpolate)
        return crops, torch.arange(crops.shape[0])

    def image_placeholder_counts(self, pixel_values, **side_inputs) -> list[int]:
        """Per image, the placeholders the stock LLaVA processor emits for it: the patch grid of its pixels
        plus the tower's extra (CLS) token, minus one for strategy `"default"` (`LlavaProcessor`'s
        `num_additional_image_tokens` is the tower's CLS). A family whose count depends on more than the
        pixels (LLaVA-NeXT's `image_sizes`) has its own; the side inputs arrive as keyword arguments."""
        pixel_values = as_pixel_batch(pixel_values, self.config.vision_config)
        count = vision_tokens_of(pixel_values, self.config.vision_config)
        if self.config.vision_feature_select_strategy == "default":
            count -= 1
        return [count] * pixel_values.shape[0]

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        output_hidden_states=None,
        output_attentions=None,
        **kwargs,
    ):
        """Reduce and project each image.

        Args:
            pixel_values: `[B, C, H, W]` (or a list of `[C, H, W]`).
            vision_feature_layer, vision_feature_select_strategy: accepted for signature compatibility and
                ignored: the method says which vision states it reads (its config fields).
            output_hidden_states, output_attentions, return_dict: as stock `LlavaModel.get_image_features`: the
                vision tower's hidden states / attentions are returned when asked for (under sdpa the tower
                returns no attention weights, as stock); `return_dict=False` returns a tuple.
            **kwargs: the method's per-image side inputs (`image_side_input_names`, one row per image); the rest
                goes to the vision tower (`interpolate_pos_encoding`).

        Returns:
            The method's `image_features_output_class` (a `BaseModelOutputWithPooling`) whose `pooler_output` is a
            list of `B` tensors `[k_i, text_hidden]`, in image order; `last_hidden_state` and any further fields
            are the method's (see its `reduce_crops`).

        Raises:
            ValueError, TypeError: naming the input or config field that is wrong, before any compute.
        """
        side_inputs = {name: kwargs.pop(name, None) for name in self.image_side_input_names}
        crops, image_of_crop = self.vision_crops(pixel_values, kwargs)
        self.check_reduction_inputs(crops, len(image_of_crop), side_inputs)
        outputs, states = run_vision_tower(
            self.vision_tower, crops, self.vision_states_needed(), output_hidden_states, output_attentions, **kwargs
        )
        reduction = self.reduce_crops(states, image_of_crop, side_inputs)
        return self.image_features_output_class(
            last_hidden_state=reduction.last_hidden_state,
            pooler_output=project_per_image(self.multi_modal_projector, reduction.tokens),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **reduction.extras,
        )


class ReducedLlavaForConditionalGeneration(
    ReducedCheckpointMixin, ReducedGenerationMixin, LlavaForConditionalGeneration
):
    """LLaVA-1.5 for generation whose inner model reduces each image's tokens; the base of the public model classes.

    Subclasses set `config_class` and `inner_model_class`. The inner model's `get_image_features`
    returns one `[k_i, text_hidden]` tensor per image; `ReducedGenerationMixin` makes `generate` and
    `forward` accept prompts expanded by the stock processor.
    """

    # Which checkpoints the classes refuse (`checkpoint_source.refuse_unfit_checkpoint`): the family's stock ones
    # load unless the method says otherwise; another family's never do.
    stock_model_type = "llava"
    family_label = "LLaVA"
    family_hint = ("LLaVA-NeXT (anyres) checkpoints have their own classes and image grids; this class is for "
                   "LLaVA-1.5-style checkpoints")

    @classmethod
    def other_family_refusal(cls, config_dict: dict) -> str | None:
        """What the checkpoint is when it belongs to another family (`"a LLaVA-NeXT checkpoint"`), else None."""
        if config_dict.get("model_type") == "llava_next" or "image_grid_pinpoints" in config_dict:
            return "a LLaVA-NeXT checkpoint"
        return None

    def __init__(self, config):
        self._build_outer(config, LlavaPreTrainedModel)


__all__ = [
    "ReducedLlavaForConditionalGeneration", "ReducedLlavaModel", "project_per_image", "register_llava_weight_renames",
]
