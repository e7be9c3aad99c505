"""The plan of a conversion: what to read, where every output tensor comes from, the output dtype and the
method's config fields, decided from the request and the inputs' files (configs and tensor indexes; tensors are
read only to compare CLIP's vision tower with SRC's). No model is built here, so a plan can be tested without
one. `plan_conversion(request) -> ConversionPlan`; `build.py` and `write.py` take the plan from there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from tqdm.auto import tqdm

from ..families import FAMILIES, ModelFamily, family_of_stock_type
from ..methods import METHODS as REGISTRY
from ..methods import FamilyClasses, ReductionMethod
from .errors import ConversionError
from .key_mapping import (
    CLIP_TEXT_PREFIX,
    CLIP_UNUSED_KEYS,
    PROJECTOR_TARGETS,
    VISION_PREFIX,
    VISUAL_PROJECTION,
    is_recomputed_buffer,
    map_clip_key,
    map_original_key,
    map_projector_key,
    map_stock_key,
)
from .method_conversion import MethodConversionInputs
from .original_format import vision_tower_fallback
from .output_place import resolve_output
from .source_format import detect_format
from .sources import TensorSource, read_config, resolve_checkpoint


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
METHODS = tuple(REGISTRY)  # the registry's method names, in its order
_LIST_LIMIT = 12
# The vision-tower fields CLIP's config and SRC's must agree on.
_VISION_FIELDS_TO_MATCH = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size")


def name_list(names, limit: int = _LIST_LIMIT) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


@dataclass
class ConversionRequest:
    """What to convert. `method` is a registry name (`llava_token_reduction.methods.METHODS`); `src`, `clip` are
    local directories or hub ids. `overrides` are config fields of the method (its `options`) to set in the
    checkpoint; `dominant_tokens` / `contextual_tokens` are the same for VisionZip, kept for existing callers."""

    method: str
    src: str
    out: str
    clip: str | None = None
    projector: str | None = None
    dominant_tokens: int | None = None
    contextual_tokens: int | None = None
    dtype: str | None = None
    max_shard_size: str | int = "5GB"
    overwrite: bool = False
    force: bool = False
    push_to_hub: str | None = None
    private: bool = False
    repo_id: str | None = None
    base_models: list[str] | None = None
    license: str | None = None
    pad_vocab_multiple: int = 64
    progress: bool = True
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    """One output tensor: where it comes from, its shape, and how to read it (in the source's dtype)."""

    origin: str
    key: str
    shape: tuple
    load: Callable[[], torch.Tensor]


def entry(source: TensorSource, key: str) -> Entry:
    shape, _ = source.info(key)
    return Entry(source.label, key, tuple(shape), lambda: source.get(key))


@dataclass(frozen=True)
class ConversionPlan:
    """Everything decided before a model is built. `tensors` maps each output tensor name (as in our model) to
    its `Entry`; `unmapped` lists input tensors with no place in the model (an error once the model's names are
    known); `config_fields` are the method's config fields (the request's overrides and the method's conversion
    hook); `added` / `notes` are reported with the result."""

    request: ConversionRequest
    method: ReductionMethod
    family: ModelFamily  # SRC's model family (LLaVA-1.5 for original-format sources)
    classes: FamilyClasses  # the method's classes in that family: the output's config, model and processor
    out: Path
    src_dir: Path
    src_config: dict
    src: TensorSource
    format: str  # "stock" (transformers LLaVA) or "original" (the LLaVA codebase's llava_llama)
    tensors: Mapping[str, Entry]
    unmapped: tuple[str, ...]
    dropped_buffers: tuple[str, ...]
    clip_dir: Path | None
    clip_reference: str | None
    clip_config: Any  # CLIPConfig, or None
    clip_vision_config: Any  # CLIPVisionConfig of the vision tower, or None for a stock source without --clip
    out_dtype: torch.dtype
    config_fields: Mapping[str, Any]
    added: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def has_tensors(self, prefix: str, origin: str | None = None) -> bool:
        return any(k.startswith(prefix) and origin in (None, e.origin) for k, e in self.tensors.items())


def check_request(request: ConversionRequest) -> ReductionMethod:
    if request.method not in METHODS:
        raise ConversionError(f"unknown method {request.method!r}; expected one of {', '.join(METHODS)}")
    if request.dtype is not None and request.dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}, got {request.dtype!r}")
    if request.pad_vocab_multiple < 1:
        raise ConversionError(f"--pad-vocab-multiple must be >= 1, got {request.pad_vocab_multiple}")
    return REGISTRY[request.method]


def refuse_input_in_output(out: Path, path: Path, what: str) -> None:
    """OUT is replaced (with --overwrite) after the conversion: it must not be, or hold, one of the inputs."""
    path = Path(path).resolve()
    if path == out or out in path.parents:
        raise ConversionError(f"output {out} would replace {what} {path}; choose another OUT")


def option_fields(request: ConversionRequest, method: ReductionMethod) -> dict:
    """The method's config fields the request sets: `overrides`, plus the legacy VisionZip budget fields."""
    legacy = {"dominant_tokens": request.dominant_tokens, "contextual_tokens": request.contextual_tokens}
    fields = {name: value for name, value in legacy.items() if value is not None}
    allowed = {option.field for option in method.options}
    unknown = sorted((set(fields) | set(request.overrides)) - allowed)
    if unknown:
        raise ConversionError(f"{method.label} has no setting {', '.join(unknown)}; its settings are "
                              f"{', '.join(sorted(allowed))}")
    return {**fields, **request.overrides}


def source_family(src_config: dict, source_format: str) -> ModelFamily:
    """SRC's model family: the one of its stock model type; the LLaVA codebase's checkpoints are LLaVA-1.5."""
    return family_of_stock_type(src_config.get("model_type")) if source_format == "stock" else FAMILIES["llava"]


def method_classes(method: ReductionMethod, family: ModelFamily) -> FamilyClasses:
    """The method's classes for SRC's family; a `ConversionError` naming the methods that family has otherwise."""
    try:
        return method.classes(family.name)
    except ValueError as error:
        raise ConversionError(f"SRC is a {family.label} checkpoint: {error}") from None


def map_source(src: TensorSource, source_format: str, family: ModelFamily) -> tuple[dict, list, list]:
    """SRC's tensors under our names (the family's own renames first): (tensors, unmapped input keys, dropped
    recomputed buffers)."""
    tensors, unmapped, dropped = {}, [], []
    for key in src.keys():
        if is_recomputed_buffer(key):
            dropped.append(key)
            continue
        target = map_stock_key(key, family.stock_key_prefixes) if source_format == "stock" else map_original_key(key)
        if target is None:
            unmapped.append(f"{key} (SRC)")
        else:
            tensors[target] = entry(src, key)
    return tensors, unmapped, dropped


def plan_conversion(request: ConversionRequest) -> ConversionPlan:
    """Read the request's inputs and decide the output; raises `ConversionError` naming what is wrong."""
    method = check_request(request)
    out = resolve_output(request.out)
    src_dir = resolve_checkpoint(request.src, "SRC")
    src_config = read_config(src_dir, "SRC")
    refuse_input_in_output(out, src_dir, "SRC")
    src = TensorSource.from_directory(src_dir, "SRC")
    source_format = detect_format(src_config, src.keys())
    family = source_family(src_config, source_format)
    classes = method_classes(method, family)
    tensors, unmapped, dropped = map_source(src, source_format, family)
    added, notes = [], []
    clip = _read_clip(request, method, out, src_config, source_format, tensors, notes)
    if source_format == "stock":
        vision_config = family.stock_config_class.from_pretrained(src_dir).vision_config
    else:
        vision_config = clip["vision_config"]
    if clip["source"] is not None:
        _apply_clip(request, method, clip, vision_config, tensors, added, notes)
    if request.projector is not None:
        _apply_projector(request, out, tensors, added)
    fields = option_fields(request, method)
    hook = method.conversion_hook_function
    if hook is not None:
        source_has_text_tower = any(k.startswith(CLIP_TEXT_PREFIX) and e.origin == "SRC" for k, e in tensors.items())
        extra = hook(MethodConversionInputs(
            source_config=src_config, source_format=source_format, clip_config=clip["config"],
            clip_vision_config=clip["vision_config"], source_has_text_tower=source_has_text_tower,
        ))
        fields.update(extra.fields)
        notes.extend(extra.notes)
    out_dtype = DTYPES[request.dtype] if request.dtype else (src.main_float_dtype() or torch.float32)
    return ConversionPlan(
        request=request, method=method, family=family, classes=classes, out=out, src_dir=src_dir,
        src_config=src_config, src=src,
        format=source_format, tensors=MappingProxyType(tensors), unmapped=tuple(unmapped),
        dropped_buffers=tuple(dropped), clip_dir=clip["dir"], clip_reference=clip["reference"],
        clip_config=clip["config"], clip_vision_config=clip["vision_config"], out_dtype=out_dtype,
        config_fields=MappingProxyType(fields), added=tuple(added), notes=tuple(notes),
    )


# CLIP ----------------------------------------------------------------------------------------------------------


def _read_clip(request, method, out, src_config, source_format, tensors, notes) -> dict:
    """Find the CLIP checkpoint when one is needed: for the CLIP text tower (TRIM), for an original checkpoint's
    vision config, or for vision weights SRC does not carry."""
    none = dict(dir=None, reference=None, config=None, vision_config=None, source=None)
    has_vision = any(k.startswith(VISION_PREFIX) for k in tensors)
    has_text = any(k.startswith(CLIP_TEXT_PREFIX) for k in tensors)
    needs_text = method.needs_clip_text_tower
    reference, why = request.clip, "--clip"
    if reference is None:
        if needs_text and source_format == "stock":
            raise ConversionError(
                f"convert {method.name} needs --clip CLIP_SRC (e.g. openai/clip-vit-large-patch14-336): SRC is a "
                "stock LLaVA checkpoint without the CLIP text tower"
            )
        if needs_text and not has_text:
            raise ConversionError(f"convert {method.name} needs --clip CLIP_SRC: SRC does not carry the CLIP text "
                                  "tower")
        if source_format == "stock":
            return none
        reference = src_config.get("mm_vision_tower") or src_config.get("vision_tower")
        if not reference:
            raise ConversionError("SRC names no vision tower (mm_vision_tower); pass --clip CLIP_SRC")
        why = "mm_vision_tower"
        fallback = vision_tower_fallback(reference)
        if fallback != reference:
            notes.append(f"SRC's mm_vision_tower {reference!r} is not a directory here; used the hub's "
                         f"{fallback} instead")
            reference = fallback
    need_weights = ((source_format == "original" and not has_vision) or (needs_text and not has_text)
                    or (needs_text and has_vision and request.clip is not None))
    clip_dir = resolve_checkpoint(reference, f"CLIP ({why})", weights=need_weights)
    refuse_input_in_output(out, clip_dir, "the CLIP checkpoint")
    clip_config = read_config(clip_dir, "CLIP")
    from transformers import CLIPConfig, CLIPVisionConfig

    model_type = clip_config.get("model_type")
    if model_type == "clip":
        config = CLIPConfig.from_pretrained(clip_dir)
        vision_config = config.vision_config
    elif model_type == "clip_vision_model" and not needs_text:
        config, vision_config = None, CLIPVisionConfig.from_pretrained(clip_dir)
    else:
        raise ConversionError(
            f"CLIP checkpoint {reference!r} is a {model_type!r} model; expected a CLIPModel checkpoint (model_type "
            "'clip', vision and text towers), such as openai/clip-vit-large-patch14-336"
        )
    source = TensorSource.from_directory(clip_dir, "CLIP") if need_weights else None
    return dict(dir=clip_dir, reference=reference, config=config, vision_config=vision_config, source=source)


def _apply_clip(request, method, clip, vision_config, tensors, added, notes) -> None:
    """Add the CLIP tensors the output needs to `tensors`, and compare CLIP's vision weights with SRC's."""
    reference = clip["reference"]
    clip_tensors = {}
    for key in clip["source"].keys():
        target = map_clip_key(key)
        if target is not None and not is_recomputed_buffer(key):
            clip_tensors[target] = entry(clip["source"], key)
        elif target is None and key not in CLIP_UNUSED_KEYS and not is_recomputed_buffer(key):
            raise ConversionError(f"CLIP checkpoint has tensors that are not CLIP's: {key!r}")
    for name in _VISION_FIELDS_TO_MATCH:
        mine, theirs = getattr(vision_config, name), getattr(clip["vision_config"], name)
        if mine != theirs:
            raise ConversionError(
                f"shape mismatch: the CLIP checkpoint's vision tower has {name}={theirs} but SRC's has {mine}"
            )
    src_vision = {k for k in tensors if k.startswith(VISION_PREFIX)}
    clip_vision = {k for k in clip_tensors if k.startswith(VISION_PREFIX)}
    if src_vision:
        if method.needs_clip_text_tower:
            _compare_vision(request, tensors, clip_tensors, src_vision, clip_vision, notes)
    else:
        for key in clip_vision:
            tensors[key] = clip_tensors[key]
        if clip_vision:
            added.append(f"CLIP vision tower ({len(clip_vision)} tensors) from {reference}")
    if not method.needs_clip_text_tower:
        return
    text = {k for k in clip_tensors if k.startswith(CLIP_TEXT_PREFIX)}
    if not any(k.startswith(CLIP_TEXT_PREFIX) for k in tensors):
        if not text or VISUAL_PROJECTION not in clip_tensors:
            raise ConversionError(
                f"CLIP checkpoint {reference!r} lacks the text tower or visual_projection {method.label} needs"
            )
        numel = sum(math.prod(clip_tensors[k].shape) for k in text)
        for key in text:
            tensors[key] = clip_tensors[key]
        added.append(f"CLIP text tower + text_projection ({numel:,} parameters) from {reference}")
    if VISUAL_PROJECTION not in tensors:
        tensors[VISUAL_PROJECTION] = clip_tensors[VISUAL_PROJECTION]
        added.append(f"CLIP visual_projection from {reference}")


def _compare_vision(request, tensors, clip_tensors, src_vision, clip_vision, notes) -> None:
    if src_vision != clip_vision:
        raise ConversionError(
            "the CLIP checkpoint's vision tower does not have the tensors of SRC's: only in SRC: "
            f"{name_list(src_vision - clip_vision) or '-'}; only in CLIP: {name_list(clip_vision - src_vision) or '-'}"
        )
    differing, worst = [], 0.0
    for key in tqdm(sorted(src_vision), desc="Comparing CLIP and SRC vision towers", disable=not request.progress):
        mine, theirs = tensors[key].load(), clip_tensors[key].load()
        if mine.shape != theirs.shape:
            raise ConversionError(f"shape mismatch for {key}: SRC {tuple(mine.shape)} vs CLIP {tuple(theirs.shape)}")
        # Compare in the coarser dtype: a half-precision LLaVA holds rounded copies of an fp32 CLIP.
        coarse = mine.dtype if mine.element_size() <= theirs.element_size() else theirs.dtype
        if not torch.equal(mine.to(coarse), theirs.to(coarse)):
            differing.append(key)
            worst = max(worst, (mine.float() - theirs.float()).abs().max().item())
    if differing:
        message = (
            f"the CLIP checkpoint's vision weights differ from SRC's vision tower in {len(differing)} tensors "
            f"(e.g. {differing[0]}, max abs difference {worst:.3g}): TRIM's text tower must belong to the same "
            "CLIP as the vision tower"
        )
        if not request.force:
            raise ConversionError(message + "; pass --force to convert anyway")
        notes.append("WARNING (--force): " + message)


# Projector -----------------------------------------------------------------------------------------------------


def _apply_projector(request, out, tensors, added) -> None:
    path = Path(os.path.expanduser(request.projector))
    refuse_input_in_output(out, path, "the projector file")
    source = TensorSource.from_file(path, "projector")
    found = {}
    for key in source.keys():
        target = map_projector_key(key)
        if target is None or target not in PROJECTOR_TARGETS:
            raise ConversionError(
                f"projector file has a tensor that is not a LLaVA projector weight: {key!r} (expected "
                "model.mm_projector.{0,2}.{weight,bias} or multi_modal_projector.linear_{1,2}.{weight,bias})"
            )
        if target in found:
            raise ConversionError(f"projector file holds {target} twice ({found[target].key} and {key})")
        found[target] = entry(source, key)
    missing = [t for t in PROJECTOR_TARGETS if t not in found]
    if missing:
        raise ConversionError(f"projector file lacks {name_list(missing)}")
    for target, found_entry in found.items():
        if target in tensors and tensors[target].shape != found_entry.shape:
            raise ConversionError(
                f"shape mismatch: projector {found_entry.key} is {found_entry.shape} but the model's {target} is "
                f"{tensors[target].shape}"
            )
        tensors[target] = found_entry
    added.append(f"projector weights from {os.path.basename(request.projector)} (replacing SRC's)")
