"""Pixel checks and the vision tower run shared by the token-reducing models (and by the generation
mechanism, which counts images before any compute).

Shipped with every checkpoint (remote code): it imports only torch.
"""

import torch
from torch import nn


def as_pixel_batch(pixel_values, vision_config, interpolate_pos_encoding: bool = False) -> torch.Tensor:
    """Validate `pixel_values` and return them as one `[B, C, H, W]` tensor.

    Accepts a `[B, C, H, W]` tensor or a list/tuple of `[C, H, W]` tensors of one size. Images must have the
    vision tower's `image_size` unless `interpolate_pos_encoding=True` (CLIP's own size check would refuse
    them later). Raises `TypeError` or `ValueError` that says what was given and what is allowed, before the
    vision tower runs.
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
    if pixel_values.ndim == 3 and pixel_values.shape[0] == vision_config.num_channels:
        raise ValueError(
            f"`pixel_values` must have shape [images, channels, height, width] (4 dims), got shape "
            f"{tuple(pixel_values.shape)}: one image without the batch dimension (use `pixel_values[None]`)"
        )
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
    size = vision_config.image_size
    if not interpolate_pos_encoding and (height, width) != (size, size):
        raise ValueError(
            f"`pixel_values` images must be {size}x{size} pixels (the vision tower's `image_size`), got "
            f"{height}x{width}: resize them with the model's image processor, or pass "
            "`interpolate_pos_encoding=True` to run the tower at another size"
        )
    if not pixel_values.is_floating_point():
        raise TypeError(f"`pixel_values` must be a floating-point tensor, got {pixel_values.dtype}")
    return pixel_values


def vision_tokens_of(pixel_values: torch.Tensor, vision_config) -> int:
    """Tokens a CLIP-style tower emits for these pixels: the patch grid plus CLS."""
    patch = vision_config.patch_size
    return (pixel_values.shape[-2] // patch) * (pixel_values.shape[-1] // patch) + 1


def run_vision_tower(
    tower: nn.Module,
    pixel_values: torch.Tensor,
    needed_states: list[int],
    output_hidden_states=None,
    output_attentions=None,
    **kwargs,
):
    """Run the vision tower once and return `(outputs, states)`: its output and the hidden states at
    `needed_states` (indices into its `L + 1` hidden states, negative allowed), in that order.

    The states are recorded by transformers' own output capturing, which keeps what it records per call
    (in a context variable), so concurrent calls on one model each get their own tensors; module hooks of
    our own would record every thread's forward. `outputs.hidden_states` / `outputs.attentions` are what the
    caller asked for with `output_hidden_states` (a flag or indices) and `output_attentions`, as the stock
    tower returns them (None when not asked; under sdpa the attentions are an empty tuple, as stock).
    """
    num_states = tower.config.num_hidden_layers + 1
    needed = [index % num_states for index in needed_states]
    if output_hidden_states is True:
        requested, request = None, True
    else:
        if isinstance(output_hidden_states, bool) or output_hidden_states is None:
            requested = set()
        else:
            indices = [output_hidden_states] if isinstance(output_hidden_states, int) else output_hidden_states
            requested = {index % num_states for index in indices}
        request = sorted(set(needed) | requested)
    if output_attentions is not None:
        kwargs["output_attentions"] = output_attentions
    outputs = tower(pixel_values, output_hidden_states=request, return_dict=True, **kwargs)
    states = [outputs.hidden_states[index] for index in needed]
    if requested is not None:  # hand back only what the caller selected
        outputs.hidden_states = (
            tuple(state if index in requested else None for index, state in enumerate(outputs.hidden_states))
            if requested else None
        )
    return outputs, states
