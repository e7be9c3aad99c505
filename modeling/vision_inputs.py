"""Pixel checks and the vision tower run shared by the token-reducing models (and by the generation
mechanism, which counts images before any compute).

Shipped with every checkpoint (remote code): it imports only torch and transformers.
"""

import torch
from torch import nn
from transformers import CLIPVisionModel
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.utils.output_capturing import capture_outputs


def as_pixel_batch(pixel_values, vision_config, interpolate_pos_encoding: bool = False) -> torch.Tensor:
    """Validate `pixel_values` and return them as one `[B, C, H, W]` tensor.

    Accepts a `[B, C, H, W]` tensor or a list/tuple of `[C, H, W]` tensors of one size. Images must have the
    vision tower's `image_size` unless `interpolate_pos_encoding=True` (CLIP's own size check would refuse
    them later). Raises `TypeError` or `ValueError` that says what was given and what is allowed, before the
    vision tower runs.
    """
    if isinstance(pixel_values, (list, tuple)):
        if not pixel_values or not all(torch.is_tensor(image) and image.ndim == 3 for image in pixel_values):
            raise ValueError(
                "`pixel_values` given as a list must be a non-empty list of [channels, height, width] tensors"
            )
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
            "`pixel_values` must have shape [images, channels, height, width] (4 dims), got shape "
            f"{tuple(pixel_values.shape)}"
        )
    channels, height, width = pixel_values.shape[1:]
    if channels != vision_config.num_channels:
        raise ValueError(
            f"`pixel_values` must have {vision_config.num_channels} channels (dim 1), got shape "
            f"{tuple(pixel_values.shape)}"
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


def vision_tower_pieces(tower: nn.Module) -> tuple[nn.Module, ...]:
    """The modules a run of `run_vision_tower` calls one after another, whether the tower is cut short or not:
    a CLIP tower's embeddings, pre-layernorm and encoder layers (the tower's own `forward` is skipped in a cut
    run, so hooks on the tower module itself do not fire then), any other tower as a whole. For timing and
    counting with forward hooks."""
    if isinstance(tower, CLIPVisionModel):
        return (tower.embeddings, tower.pre_layrnorm, *tower.encoder.layers)
    return (tower,)


@capture_outputs(tie_last_hidden_states=False)
def _clip_tower_first_layers(tower: CLIPVisionModel, pixel_values: torch.Tensor, depth: int,
                             interpolate_pos_encoding: bool = False, **kwargs) -> BaseModelOutput:
    """`CLIPVisionModel.forward` through its first `depth` encoder layers only, `[B, C, H, W]` -> `[B, N, D_v]`.

    The same modules are called in the same order with the same arguments as in the tower's own forward
    (embeddings, pre-layernorm, then `encoder.layers[i](hidden_states, None, **kwargs)`, as `CLIPEncoder` does), so
    every hidden state up to `depth` is bit for bit the full run's; the layers keep their attention implementation
    (sdpa/flash), their gradient checkpointing and any accelerate hooks on them. Nothing is set on the modules:
    the loop's state is local, and `capture_outputs` records the hidden states asked for (`output_hidden_states`,
    indices up to `depth`) in a per-call context variable, as for the tower's own forward; it also hides any
    outer caller's recording from the layers' hooks, as the tower's own forward would.
    """
    hidden_states = tower.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
    hidden_states = tower.pre_layrnorm(hidden_states)
    for layer in tower.encoder.layers[:depth]:
        hidden_states = layer(hidden_states, None, **kwargs)
    return BaseModelOutput(last_hidden_state=hidden_states)


def run_vision_tower(
    tower: nn.Module,
    pixel_values: torch.Tensor,
    needed_states: list[int],
    output_hidden_states=None,
    output_attentions=None,
    **kwargs,
):
    """Run the vision tower once, only as deep as needed, and return `(outputs, states)`: the tower's outputs
    and the hidden states at `needed_states` (indices into its `L + 1` hidden states, negative allowed), in
    that order.

    Depth: hidden state `i` is the output of encoder layer `i - 1`, so a CLIP tower runs only its first
    `max(needed + asked, 1)` layers (state 0 is recorded as layer 0's input, so at least one layer runs): layer
    -2, VisionZip's and TRIM's default, skips the last of ViT-L's 24 layers, whose output nobody reads. The states
    are bit for bit those of the full-depth run. The whole tower runs through its own forward when a state of
    the last layer is needed or asked for, when the caller asks for every hidden state
    (`output_hidden_states=True`) or for attentions (`output_attentions`, or the tower config's), and for towers
    other than transformers' `CLIPVisionModel` (whose forward this module does not know).

    The states are recorded by transformers' own output capturing, which keeps what it records per call
    (in a context variable), so concurrent calls on one model each get their own tensors; module hooks of
    our own would record every thread's forward. `outputs.hidden_states` / `outputs.attentions` are what the
    caller asked for with `output_hidden_states` (a flag or indices) and `output_attentions`, as the stock
    tower returns them (None when not asked; unselected indices None; under sdpa the attentions are an empty
    tuple, as stock). When the tower was cut short, `outputs.last_hidden_state` is the output of the last layer
    run (the tower's own `last_hidden_state` and `pooler_output` were never computed; the latter is None).
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
    asks_attentions = output_attentions if output_attentions is not None else tower.config.output_attentions
    depth = max(request, default=0) if requested is not None else num_states - 1
    depth = max(depth, 1)
    if asks_attentions or not isinstance(tower, CLIPVisionModel) or depth >= len(tower.encoder.layers):
        outputs = tower(pixel_values, output_hidden_states=request, return_dict=True, **kwargs)
    else:
        outputs = _clip_tower_first_layers(
            tower, pixel_values, depth, output_hidden_states=request, return_dict=True, **kwargs
        )
        # The stock tower's tuple has all L + 1 entries (None where not selected); the layers not run are not.
        recorded = tuple(outputs.hidden_states)
        outputs = BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=recorded + (None,) * (num_states - len(recorded)),
        )
    states = [outputs.hidden_states[index] for index in needed]
    if requested is not None:  # hand back only what the caller selected
        outputs.hidden_states = (
            tuple(state if index in requested else None for index, state in enumerate(outputs.hidden_states))
            if requested else None
        )
    return outputs, states
