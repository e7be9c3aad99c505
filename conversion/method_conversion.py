"""Each method's own conversion step (`ReductionMethod.conversion_hook`): the config fields and notes only the
method knows, computed from what the plan read. The converter calls the hook the registry names and knows no
method by name.

A hook takes a `MethodConversionInputs` and returns a `MethodConversion`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import ConversionError


@dataclass(frozen=True)
class MethodConversionInputs:
    """What a hook may read. `source_config` is SRC's config.json as a dict; `source_format` is "stock" or
    "original"; `clip_config` the `CLIPConfig` of `--clip` (None when only a vision config was read);
    `clip_vision_config` the vision tower's config; `source_has_text_tower` whether SRC itself carries CLIP's
    text tower (the LLaVA codebase's TRIM checkpoints do)."""

    source_config: dict
    source_format: str
    clip_config: Any
    clip_vision_config: Any
    source_has_text_tower: bool


@dataclass(frozen=True)
class MethodConversion:
    fields: dict = field(default_factory=dict)  # config fields of the output, besides the request's overrides
    notes: tuple[str, ...] = ()  # printed with the result


def parse_reduce_func(value) -> tuple[bool, float]:
    """`(append the mean token, keep ratio or -1 for the adaptive count)` of a LLaVA-codebase
    `mm_vision_token_reduce_func`, in the public TRIM code's spelling `TRIM:<k>` (mean token appended) or the
    older `TextSim:<k>` (no mean token) / `TextSim+:<k>` (mean token). `k` is -1 or a ratio in (0, 1]."""
    text = str(value).strip()
    method, _, number = text.partition(":")
    means = {"TRIM": True, "TextSim+": True, "TextSim": False}
    allowed = "TRIM:<k>, TextSim:<k> or TextSim+:<k>, with k = -1 (adaptive) or a ratio in (0, 1]"
    if method not in means:
        raise ConversionError(f"SRC's mm_vision_token_reduce_func {value!r} is not a TRIM setting; expected {allowed}")
    try:
        ratio = float(number) if number else -1.0
    except ValueError:
        ratio = None
    if ratio is None or not (ratio == -1.0 or 0.0 < ratio <= 1.0):
        raise ConversionError(f"SRC's mm_vision_token_reduce_func {value!r} has an invalid k; expected {allowed}")
    return means[method], ratio


def trim_conversion(inputs: MethodConversionInputs) -> MethodConversion:
    """TRIM: CLIP's text config; the released code's `mm_vision_token_reduce_func` spelling of the settings
    (original-format sources); a note when the weights were not trained with TRIM active (docs/trim.md §8)."""
    clip = inputs.clip_config
    text_config = clip.text_config.to_dict()
    text_config["projection_dim"] = clip.projection_dim
    fields = dict(clip_text_config=text_config, projection_dim=clip.projection_dim)
    notes = []
    original = inputs.source_format == "original"
    reduce_func = inputs.source_config.get("mm_vision_token_reduce_func") if original else None
    if reduce_func not in (None, ""):
        append_mean, ratio = parse_reduce_func(reduce_func)
        fields["trim_append_mean_token"] = append_mean
        if ratio != -1.0:
            # A fixed keep ratio: express it as equal bounds on the count.
            vision = inputs.clip_vision_config
            patches = (vision.image_size // vision.patch_size) ** 2
            fields["trim_min_tokens"] = fields["trim_max_tokens"] = int(patches * ratio)
        notes.append(f"SRC's mm_vision_token_reduce_func {reduce_func!r} mapped to the TRIM config fields")
    if not (original and inputs.source_has_text_tower):
        notes.append(
            "TRIM on stock LLaVA weights is training-free; the authors' checkpoints were fine-tuned with TRIM "
            "active, and training-free TRIM was reported to give poor output (docs/trim.md §8)"
        )
    return MethodConversion(fields=fields, notes=tuple(notes))
