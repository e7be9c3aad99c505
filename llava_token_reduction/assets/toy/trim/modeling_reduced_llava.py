"""What the token-reducing LLaVA models share: input checks, temporary module hooks, the outer
class with its checkpoint saving, and the weight renames that let stock LLaVA checkpoints load.

Shipped with every checkpoint (remote code): it imports only torch, transformers and sibling modules.
"""

import contextlib
import os

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel

from .checkpoint_code import auto_map_entry, write_checkpoint_code
from .reduced_generation import ReducedGenerationMixin


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


def as_pixel_batch(pixel_values, vision_config) -> torch.Tensor:
    """Validate `pixel_values` and return them as one `[B, C, H, W]` tensor.

    Accepts a `[B, C, H, W]` tensor or a list/tuple of `[C, H, W]` tensors of one size. Raises `TypeError`
    or `ValueError` that says what was given and what is allowed, before the vision tower runs.
    """
    if isinstance(pixel_values, (list, tuple)):
        if not pixel_values or not all(torch.is_tensor(image) and image.ndim == 3 for image in pixel_values):
            raise ValueError("`pixel_values` given as a list must be a non-empty list of [channels, height, width] tensors")
        if len({tuple(image.shape) for image in pixel_values}) != 1:
            raise ValueError(
                f"`pixel_values` images must all have one size, got shapes {[tuple(i.shape) for i in pixel_values]}"
            )
        pixel_values = torch.stack(list(pixel_values))
    if not torch.is_tensor(pixel_values):
        raise TypeError(f"`pixel_values` must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4:
        raise ValueError(
            f"`pixel_values` must have shape [images, channels, height, width] (4 dims), got shape {tuple(pixel_values.shape)}"
        )
    channels, height, width = pixel_values.shape[1:]
    if channels != vision_config.num_channels:
        raise ValueError(
            f"`pixel_values` must have {vision_config.num_channels} channels (dim 1), got shape {tuple(pixel_values.shape)}"
        )
    patch = vision_config.patch_size
    if height < patch or width < patch:
        raise ValueError(f"`pixel_values` images must be at least {patch}x{patch} pixels, got {height}x{width}")
    if not pixel_values.is_floating_point():
        raise TypeError(f"`pixel_values` must be a floating-point tensor, got {pixel_values.dtype}")
    return pixel_values


def vision_tokens_of(pixel_values: torch.Tensor, vision_config) -> int:
    """Tokens a CLIP-style tower emits for these pixels: the patch grid plus CLS."""
    patch = vision_config.patch_size
    return (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch) + 1


@contextlib.contextmanager
def capture_outputs_of(modules: dict[str, nn.Module]):
    """Record the forward output of each named module while the block runs; hooks are removed on exit,
    also when the forward raises. Yields the dict that fills up."""
    captured: dict[str, torch.Tensor] = {}

    def recorder(name):
        def hook(module, args, output):
            captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in modules.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class ReducedLlavaForConditionalGeneration(ReducedGenerationMixin, LlavaForConditionalGeneration):
    """LLaVA whose inner model reduces each image's tokens; the base of the public model classes.

    Subclasses set `config_class` and `inner_model_class`. The inner model's `get_image_features`
    returns one `[k_i, text_hidden]` tensor per image; `ReducedGenerationMixin` makes `generate` and
    `forward` accept prompts expanded by the stock processor.
    """

    inner_model_class: type = None

    def __init__(self, config):
        # Not LlavaForConditionalGeneration.__init__: that would build (and initialise) a stock LlavaModel.
        LlavaPreTrainedModel.__init__(self, config)
        self.model = self.inner_model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """Save weights and config, plus the code files that make the directory load with
        `AutoModelForImageTextToText.from_pretrained(dir, trust_remote_code=True)` anywhere."""
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoConfig": auto_map_entry(type(self.config)),
            "AutoModel": auto_map_entry(self.inner_model_class),
            "AutoModelForImageTextToText": auto_map_entry(type(self)),
        }
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_checkpoint_code(save_directory, [type(self).__module__])
        return result
