"""The LLaVA-NeXT (anyres) family's model side: stock `LlavaNextModel` / `LlavaNextForConditionalGeneration`
underneath, each image cut into crops, every crop reduced by the method it is combined with, the released layout
per image (docs/llava_next.md). It knows nothing about reduction methods: a public model class is
`class LlavaNextXModel(XReduction, ReducedLlavaNextModel)` (`method_base.py` is the seam); the pure pieces (grids,
placeholder counts, the budget check, the layout) are `family_llava_next.py`.

    pixel_values [I, max_crops, C, S_px, S_px] (or the crops concatenated, or one [1 + G_i, ...] tensor per image)
    image_sizes  [I, 2] original (height, width)
      -> grids and stock counts N_i from image_sizes; the per-crop budget checked per image  (before any compute)
      -> crops [sum(1 + G_i), C, S_px, S_px], padding crops dropped, image_of_crop
      -> method.check_reduction_inputs
      -> vision tower once on all crops, the states the method asks for       (vision_inputs.run_vision_tower)
      -> method.reduce_crops -> [crops, k, D_v] ([CLS, kept patches, merged] each) + kept patch indices
      -> projector per token -> released layout per image -> I tensors [(1 + G_i)·k, text_hidden]
         (no unpadding, no `image_newline`: what the released VisionZip code feeds LLaVA-NeXT)

Shipped with every LLaVA-NeXT checkpoint (remote code): it imports only torch, transformers and sibling modules.
"""

import torch
from torch import nn
from transformers import AutoModel, LlavaNextForConditionalGeneration, LlavaNextModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector, LlavaNextPreTrainedModel
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .family_llava_next import check_budget_fits, image_layouts, real_crops, released_layouts
from .reduced_generation import ReducedGenerationMixin
from .reduced_model import ReducedCheckpointMixin, ReducedLlavaModelMixin
from .vision_inputs import as_pixel_batch, run_vision_tower


# LLaVA-1.5 model types (stock and ours): their checkpoints have no image grids.
_LLAVA_15_TYPES = ("llava", "llava_visionzip", "llava_trim", "llava_prumerge")


def register_llava_next_weight_renames(outer_class_name: str, inner_class_name: str) -> None:
    """Let our classes load stock llava-hf LLaVA-NeXT checkpoints (legacy `language_model.model.*`,
    `language_model.lm_head.*`, root `image_newline` keys): transformers applies its own renames to custom-code
    classes only when their class names are registered (without them the LM and its head load random)."""
    register_checkpoint_conversion_mapping(
        outer_class_name, get_checkpoint_conversion_mapping("llava_next"), overwrite=True
    )
    register_checkpoint_conversion_mapping(
        inner_class_name, get_checkpoint_conversion_mapping("LlavaNextModel"), overwrite=True
    )


def _as_crop_batch(pixel_values):
    """One `[C, H, W]`-crops tensor per image (a list) -> the same crops concatenated; tensors pass through."""
    if isinstance(pixel_values, (list, tuple)):
        if not pixel_values or not all(torch.is_tensor(crops) and crops.ndim == 4 for crops in pixel_values):
            raise ValueError(
                "`pixel_values` given as a list must hold one [crops, channels, height, width] tensor per image"
            )
        return list(pixel_values)
    return pixel_values


class ReducedLlavaNextModel(ReducedLlavaModelMixin, LlavaNextModel):
    """The inner LLaVA-NeXT model (vision tower, projector, `image_newline`, language model, plus the method's
    modules) whose `get_image_features` reduces every crop with the method it is combined with and lays each
    image's crops out as the released code does. Module names are stock LLaVA-NeXT's."""

    # Each image's original size decides its crops and its placeholders: it travels with the image.
    family_side_input_names = ("image_sizes",)

    def __init__(self, config):
        # Load-time overrides bypass the config's own checks; the model re-checks the whole reduction.
        config.validate_token_reduction()
        # LlavaNextModel.__init__ without its post_init(): the method's modules must exist before weights initialise.
        LlavaNextPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaNextMultiModalProjector(config)
        # Unused by the reduced layout (the released code builds it and never feeds it), kept so that stock
        # checkpoints load with an empty report and save back unchanged.
        self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size, dtype=self.dtype))
        self.vocab_size = config.text_config.vocab_size
        self.language_model = AutoModel.from_config(config.text_config)
        self.add_reduction_modules(config)
        self.post_init()

    def _image_layouts(self, image_sizes):
        if image_sizes is None:
            raise ValueError(
                "LLaVA-NeXT needs `image_sizes` (each image's original (height, width), as the LlavaNextProcessor "
                "returns it) with `pixel_values`: the crops and placeholders of an image depend on its size"
            )
        return image_layouts(image_sizes, self.config)

    def _check_budget(self, layouts) -> None:
        tokens_per_crop = getattr(self.config, "tokens_per_crop", None)
        if tokens_per_crop is None:
            raise TypeError(
                f"{type(self.config).__name__} has no `tokens_per_crop`: the LLaVA-NeXT family needs a method that "
                "keeps a fixed number of tokens per crop"
            )
        check_budget_fits(layouts, tokens_per_crop, getattr(self.config, "tokens_per_crop_fields", "tokens_per_crop"))

    def vision_crops(self, pixel_values, kwargs: dict):
        """`(crops, image_of_crop)`: every image's real crops (base, then its grid row-major; the batch's padding
        crops dropped) as one `[sum(1 + G_i), C, H, W]` tensor and the image of each crop. Takes `image_sizes`
        out of `kwargs`; checks the pixels, the sizes and the per-crop budget against every image's
        placeholders, before any compute."""
        layouts = self._image_layouts(kwargs.pop("image_sizes", None))
        self._check_budget(layouts)
        pixel_values = _as_crop_batch(pixel_values)
        if isinstance(pixel_values, list):
            if len(pixel_values) != len(layouts):
                raise ValueError(
                    f"`pixel_values` holds {len(pixel_values)} images but `image_sizes` has {len(layouts)}"
                )
            counts = [layout.crops for layout in layouts]
            if any(len(crops) < count for crops, count in zip(pixel_values, counts)):
                held = [len(c) for c in pixel_values]
                raise ValueError(f"`pixel_values` images hold {held} crops, they need {counts}")
            pixel_values = torch.cat([crops[:count] for crops, count in zip(pixel_values, counts)], dim=0)
        crops = real_crops(pixel_values, layouts)
        crops = as_pixel_batch(crops, self.config.vision_config)
        crops_per_image = torch.tensor([layout.crops for layout in layouts])
        image_of_crop = torch.repeat_interleave(torch.arange(len(layouts)), crops_per_image)
        return crops, image_of_crop

    def image_placeholder_counts(self, pixel_values, image_sizes=None, **side_inputs) -> list[int]:
        """Per image, the placeholders the stock `LlavaNextProcessor` emits for it (from its original size, the
        grid pinpoints and the vision config: `family_llava_next.stock_placeholder_count`)."""
        return [layout.placeholders for layout in self._image_layouts(image_sizes)]

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None,
                cache=None, inputs_embeds=None, vision_feature_layer=None, vision_feature_select_strategy=None,
                use_cache=None, mm_encoder_outputs=None, **kwargs):
        """`ReducedLlavaModelMixin.forward` with stock `LlavaNextModel.forward`'s parameter order (`image_sizes`
        third), so positional calls bind as they do on stock LLaVA-NeXT."""
        return super().forward(
            input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, attention_mask=attention_mask,
            position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
            use_cache=use_cache, mm_encoder_outputs=mm_encoder_outputs, **kwargs,
        )

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values,
        image_sizes=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        output_hidden_states=None,
        output_attentions=None,
        **kwargs,
    ):
        """Reduce every crop, project, and lay each image's tokens out as the released code does.

        Args:
            pixel_values: `[I, max_crops, C, H, W]` as the processor returns them (only the first `1 + G_i` crops
                of image `i` are real), the real crops concatenated `[sum(1 + G_i), C, H, W]`, or a list of one
                `[>= 1 + G_i, C, H, W]` tensor per image.
            image_sizes: `[I, 2]` each image's original (height, width).
            vision_feature_layer, vision_feature_select_strategy: accepted for signature compatibility and
                ignored: the method says which vision states it reads.
            output_hidden_states, output_attentions, return_dict: as stock; the tower's hidden states /
                attentions are over all crops.
            **kwargs: the method's per-image side inputs; the rest goes to the vision tower.

        Returns:
            The method's `image_features_output_class` whose `pooler_output` is a list of `I` tensors
            `[(1 + G_i)·k, text_hidden]` in image order (`k` tokens per crop, `docs/llava_next.md`'s layout), and
            whose `last_hidden_state` is the method's per crop (VisionZip: the reduced, unprojected
            `[sum(1 + G_i), k, D_v]`, crops in order).

        Raises:
            ValueError, TypeError: naming the input or config field that is wrong (a budget that does not fit an
                image's placeholders: the image, its size, its token count, the largest per-crop budget that
                fits), before any compute.
        """
        side_inputs = {name: kwargs.pop(name, None) for name in self.image_side_input_names if name != "image_sizes"}
        layouts = self._image_layouts(image_sizes)
        crops, image_of_crop = self.vision_crops(pixel_values, {**kwargs, "image_sizes": image_sizes})
        self.check_reduction_inputs(crops, len(layouts), side_inputs)
        outputs, states = run_vision_tower(
            self.vision_tower, crops, self.vision_states_needed(), output_hidden_states, output_attentions, **kwargs
        )
        reduction = self.reduce_crops(states, image_of_crop, side_inputs)
        if not torch.is_tensor(reduction.tokens) or reduction.kept_patches is None:
            raise TypeError(
                f"{type(self).__name__}: the LLaVA-NeXT layout needs `[crops, k, D_v]` tokens and `kept_patches` from "
                "the method's `reduce_crops`"
            )
        projected = self.multi_modal_projector(reduction.tokens)  # per token: exact before the reordering
        patches_per_side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return self.image_features_output_class(
            last_hidden_state=reduction.last_hidden_state,
            pooler_output=released_layouts(projected, reduction.kept_patches, layouts, patches_per_side),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **reduction.extras,
        )


class ReducedLlavaNextForConditionalGeneration(
    ReducedCheckpointMixin, ReducedGenerationMixin, LlavaNextForConditionalGeneration
):
    """LLaVA-NeXT for generation whose inner model reduces each crop's tokens; the base of the public NeXT classes.

    Subclasses set `config_class` and `inner_model_class`. `generate` and `forward` take prompts expanded by the
    stock `LlavaNextProcessor` (each image's placeholder count from its size) with `pixel_values` and
    `image_sizes`.
    """

    stock_model_type = "llava_next"
    family_label = "LLaVA-NeXT"
    family_hint = ("LLaVA-1.5 checkpoints (one 336-px crop per image) have their own classes, e.g. "
                   "LlavaVisionZipForConditionalGeneration; this class is for LLaVA-NeXT (anyres) checkpoints")

    @classmethod
    def other_family_refusal(cls, config_dict: dict) -> str | None:
        """What the checkpoint is when it belongs to another family (`"a LLaVA-1.5 checkpoint"`), else None."""
        if config_dict.get("model_type") in _LLAVA_15_TYPES:
            return "a LLaVA-1.5 checkpoint (no image_grid_pinpoints)"
        return None

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None,
                cache=None, inputs_embeds=None, vision_feature_layer=None, vision_feature_select_strategy=None,
                labels=None, use_cache=None, logits_to_keep=0, mm_encoder_outputs=None, **kwargs):
        """`ReducedGenerationMixin.forward` (compaction of stock-processor prompts, labels included) with stock
        `LlavaNextForConditionalGeneration.forward`'s parameter order (`image_sizes` third); the full signature
        that generate inspects."""
        return super().forward(
            input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, attention_mask=attention_mask,
            position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels, use_cache=use_cache, logits_to_keep=logits_to_keep, mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )

    def __init__(self, config):
        self._build_outer(config, LlavaNextPreTrainedModel)


__all__ = [
    "ReducedLlavaNextForConditionalGeneration", "ReducedLlavaNextModel", "register_llava_next_weight_renames",
]
