"""The seam between reduction *methods* and model *families*: what a family's `get_image_features` asks of the
method it is combined with.

A model class is `class LlavaXModel(XReduction, <family base>)`. The family (`family_llava.py` for LLaVA-1.5)
turns the pixels into crops, runs the vision tower once through `run_vision_tower`, packs the reduced crops back
per image, projects them and counts each image's placeholders. The method (`method_<name>_model.py`, a subclass
of `ReductionMethodMixin`) says, in this order:

    check_reduction_inputs(crops, num_images, side_inputs)   everything that can be wrong, before any compute
    vision_states_needed()                                    which of the tower's L + 1 hidden states it reads
    reduce_crops(states, image_of_crop, side_inputs)          those states -> tokens per crop (`CropReduction`)

and may build modules of its own (`add_reduction_modules`, TRIM's CLIP text tower). It knows nothing about
families: crops are `[crops, channels, H, W]` whatever made them, and `image_of_crop` says which image each crop
belongs to, so a method whose side inputs come one row per image (TRIM's question) can spread them over crops.

Shipped with every checkpoint (remote code): it imports only torch and transformers.
"""

from dataclasses import dataclass, field

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling


@dataclass
class CropReduction:
    """What a method makes of the vision tower's states.

    Attributes:
        tokens: the reduced, unprojected tokens: `[crops, k, D_v]` when every crop keeps `k` tokens, else a list of
            `crops` tensors `[k_i, D_v]`.
        last_hidden_state: what `get_image_features` returns as `last_hidden_state` (the method's docstring says
            which tensor: VisionZip's reduced tokens, TRIM's patch features before selection).
        extras: further fields of the method's `image_features_output_class` (TRIM's `kept_indices`, `scores`).
        kept_patches: `[crops, p]` long, for a method whose crop tokens are `[CLS, p patches kept as they are,
            merged tokens]` (VisionZip): the patch index (`0..S²-1`, raster, CLS not counted) of tokens `1..p`.
            A family that lays tokens out on the image (LLaVA-NeXT's canvas) needs it; None otherwise.
    """

    tokens: torch.Tensor | list[torch.Tensor]
    last_hidden_state: torch.Tensor | None = None
    extras: dict = field(default_factory=dict)
    kept_patches: torch.Tensor | None = None


class ReductionMethodMixin:
    """Base of a method's model side; put it before the family base in the class bases (its hooks win)."""

    # Inputs with one row per image that travel with `pixel_values` into `get_image_features` (TRIM's
    # `clip_input_ids`, `clip_attention_mask`); generate pops them and the compaction selects their rows.
    image_side_input_names: tuple[str, ...] = ()
    # Why the family's stock checkpoints cannot load into this method's classes (weights the method needs that
    # they lack; said after "SRC is a stock LLaVA checkpoint: "), or None when they load.
    stock_checkpoint_refusal: str | None = None
    # The output class of `get_image_features`; its extra fields come from `CropReduction.extras`.
    image_features_output_class: type = BaseModelOutputWithPooling

    def add_reduction_modules(self, config) -> None:
        """Build the method's own modules; called by the family's `__init__` after the stock modules exist and
        before `post_init` (so their weights are initialised and loaded like the others)."""

    def check_reduction_inputs(self, crops: torch.Tensor, num_images: int, side_inputs: dict) -> None:
        """Raise `ValueError`/`TypeError` naming what is wrong with the config or the inputs for these crops."""

    def vision_states_needed(self) -> list[int]:
        """Indices into the vision tower's `L + 1` hidden states (negative allowed) that `reduce_crops` reads."""
        raise NotImplementedError(f"{type(self).__name__} must say which vision states its reduction reads")

    def reduce_crops(self, states: list[torch.Tensor], image_of_crop: torch.Tensor, side_inputs: dict) -> CropReduction:
        """The hidden states asked for (`[crops, N, D_v]` each, in `vision_states_needed` order) -> tokens per crop.

        `image_of_crop` is `[crops]` long: the image each crop belongs to (indices into the side inputs' rows)."""
        raise NotImplementedError(f"{type(self).__name__} must implement its reduction")


__all__ = ["CropReduction", "ReductionMethodMixin"]
