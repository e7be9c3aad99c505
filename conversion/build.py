"""Build what a plan describes: the processor (with the image token and, for methods that keep CLIP's text
tower, its tokenizer), the vocabulary growth the tokenizer asks for, the output config, and the model on the
meta device filled with the planned tensors in the output dtype.

`build_checkpoint(plan) -> BuiltCheckpoint`; `build_model(plan, built) -> model` (checked: every tensor of the
model is planned, every planned tensor has its place and shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from ..methods import METHODS as REGISTRY
from .errors import ConversionError
from .key_mapping import CLIP_TEXT_PREFIX, EMBEDDINGS, LM_HEAD
from .original_format import load_original_tokenizer
from .plan import ConversionPlan, Entry, name_list
from .sources import looks_like_local_path


@dataclass(frozen=True)
class BuiltCheckpoint:
    """The output config and processor, the planned tensors after vocabulary growth, and what building added."""

    config: Any
    processor: Any
    tensors: Mapping[str, Entry]
    added: tuple[str, ...]
    notes: tuple[str, ...]

    def tensor(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The output's tensor `key`, read from its input and cast to `dtype` (floating tensors only)."""
        tensor = self.tensors[key].load()
        return tensor.to(dtype) if tensor.is_floating_point() else tensor


def build_checkpoint(plan: ConversionPlan) -> BuiltCheckpoint:
    added, notes = [], []
    processor, image_token_id = build_processor(plan, added, notes)
    if plan.format == "stock":
        kwargs = _base_kwargs_stock(plan)
        kwargs["image_token_index"] = image_token_id
    else:
        kwargs = _base_kwargs_original(plan, image_token_id, processor.tokenizer.pad_token_id, notes)
    tensors = dict(plan.tensors)
    rows = grow_vocabulary(tensors, len(processor.tokenizer), image_token_id, plan.request.pad_vocab_multiple, added)
    kwargs["text_config"] = {**kwargs["text_config"], "vocab_size": rows}
    try:
        config = plan.classes.config_class(**kwargs, **plan.config_fields)
    except ValueError as error:
        raise ConversionError(f"invalid {plan.method.name} settings: {error}") from None
    config.dtype = plan.out_dtype
    _scrub_local_paths(config)
    return BuiltCheckpoint(config=config, processor=processor, tensors=MappingProxyType(tensors),
                           added=tuple(added), notes=tuple(notes))


# Tokenizer and processor ---------------------------------------------------------------------------------------


def build_processor(plan: ConversionPlan, added: list, notes: list):
    """The output's processor and its image token id."""
    from transformers import AddedToken, AutoProcessor, AutoTokenizer, CLIPImageProcessor

    from ..tiny import LLAVA_CHAT_TEMPLATE

    if plan.format == "stock":
        try:
            stock = AutoProcessor.from_pretrained(plan.src_dir, trust_remote_code=False)
        except Exception as error:  # noqa: BLE001
            raise ConversionError(f"SRC {plan.src_dir} has no usable processor/tokenizer files: {error}") from None
        expected = plan.family.stock_processor_class
        if not isinstance(stock, expected):
            raise ConversionError(f"SRC's processor is a {type(stock).__name__}, expected a {expected.__name__} "
                                  f"(SRC is a {plan.family.label} checkpoint)")
        tokenizer, image_processor = stock.tokenizer, stock.image_processor
        settings = dict(patch_size=stock.patch_size,
                        vision_feature_select_strategy=stock.vision_feature_select_strategy,
                        num_additional_image_tokens=stock.num_additional_image_tokens,
                        chat_template=stock.chat_template)
    else:
        tokenizer = load_original_tokenizer(plan.src_dir, notes)
        vision = plan.clip_vision_config
        if (plan.clip_dir / "preprocessor_config.json").is_file():
            image_processor = CLIPImageProcessor.from_pretrained(plan.clip_dir)
        else:
            size = vision.image_size
            image_processor = CLIPImageProcessor(size={"shortest_edge": size},
                                                 crop_size={"height": size, "width": size})
            notes.append("CLIP checkpoint has no preprocessor_config.json; used CLIP's default image processor")
        strategy = "full" if plan.src_config.get("mm_vision_select_feature") == "cls_patch" else "default"
        settings = dict(patch_size=vision.patch_size, vision_feature_select_strategy=strategy,
                        num_additional_image_tokens=1,
                        chat_template=getattr(tokenizer, "chat_template", None) or LLAVA_CHAT_TEMPLATE)
    image_token = getattr(tokenizer, "image_token", None) or "<image>"
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
        added.append(f"tokenizer token {image_token!r} (id {tokenizer.convert_tokens_to_ids(image_token)})")
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
        notes.append("tokenizer had no pad token; it pads with its unk token, as the LLaVA codebase does")
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    processor_class = plan.classes.processor_class
    if plan.method.needs_clip_text_tower:  # its processor also tokenizes the question for CLIP's text tower
        try:
            clip_tokenizer = AutoTokenizer.from_pretrained(plan.clip_dir, trust_remote_code=False)
        except Exception as error:  # noqa: BLE001
            raise ConversionError(
                f"CLIP checkpoint {plan.clip_reference!r} has no usable tokenizer files: {error}"
            ) from None
        processor = processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    clip_tokenizer=clip_tokenizer, image_token=image_token, **settings)
        if plan.format == "stock":
            added.append(f"CLIP tokenizer from {plan.clip_reference} ({processor_class.__name__})")
    else:
        processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, image_token=image_token,
                                    **settings)
    return processor, image_token_id


def grow_vocabulary(tensors: dict, tokenizer_size: int, image_token_id: int, multiple: int, added: list) -> int:
    """Make room in `tensors` for tokens the tokenizer has and the embedding lacks; returns the new row count.
    The new rows are the mean of the source rows."""
    for key in (EMBEDDINGS, LM_HEAD):
        if key not in tensors:
            what = "embedding" if key == EMBEDDINGS else "LM head"
            raise ConversionError(f"SRC lacks {key}, the {what} (missing keys)")
    rows = tensors[EMBEDDINGS].shape[0]
    needed = max(tokenizer_size, image_token_id + 1)
    if needed <= rows:
        return rows
    new_rows = -(-needed // multiple) * multiple
    for key in (EMBEDDINGS, LM_HEAD):
        tensors[key] = _grown(tensors[key], new_rows)
    added.append(f"embedding and LM head rows {rows} -> {new_rows} (new rows = mean of the source rows)")
    return new_rows


def _grown(entry: Entry, rows: int) -> Entry:
    extra = rows - entry.shape[0]

    def load():
        tensor = entry.load()
        mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
        return torch.cat([tensor, mean.expand(extra, -1)], dim=0)

    return Entry(entry.origin, entry.key, (rows, *entry.shape[1:]), load)


# Config --------------------------------------------------------------------------------------------------------

_NOT_COPIED = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype",
               "torch_dtype")


def _base_kwargs_stock(plan: ConversionPlan) -> dict:
    base = plan.family.stock_config_class.from_pretrained(plan.src_dir).to_dict()
    for key in _NOT_COPIED:
        base.pop(key, None)
    return base


def _base_kwargs_original(plan: ConversionPlan, image_token_id: int, pad_token_id, notes: list) -> dict:
    from transformers import LlamaConfig

    config = plan.src_config
    if config.get("mm_use_im_start_end"):
        raise ConversionError("SRC uses image start/end tokens (mm_use_im_start_end); only LLaVA-1.5 style is "
                              "supported")
    default_projector = ("linear" if "mm_projector_type" not in config and "model.mm_projector.2.weight" not in plan.src
                         else "mlp2x_gelu")
    projector_type = config.get("mm_projector_type", default_projector)
    if projector_type != "mlp2x_gelu":
        raise ConversionError(f"SRC projector type {projector_type!r} is not supported (LLaVA-1.5's mlp2x_gelu only)")
    anyres = str(config.get("image_aspect_ratio", "pad")).startswith("anyres")
    if anyres or config.get("mm_patch_merge_type", "flat") != "flat":
        raise ConversionError("SRC is a LLaVA-codebase LLaVA-NeXT (anyres) checkpoint; only LLaVA-1.5 is supported "
                              "in that format: convert the llava-hf version of the model (llava-hf/llava-v1.6-*)")
    vision_config = plan.clip_vision_config
    if config.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise ConversionError(
            f"shape mismatch: SRC mm_hidden_size={config['mm_hidden_size']} but the CLIP vision tower has "
            f"hidden_size={vision_config.hidden_size}"
        )
    allowed = set(LlamaConfig().to_dict()) | {"rope_scaling", "rope_theta"}
    skipped = {*_NOT_COPIED, "id2label", "label2id"}
    text_kwargs = {k: v for k, v in config.items() if k in allowed and k not in skipped}
    if text_kwargs.get("rope_scaling", 0) is None:
        del text_kwargs["rope_scaling"]  # LLaVA-1.5 writes null; transformers 5 deprecates the field
    text_config = LlamaConfig(**text_kwargs)
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConversionError(f"SRC mm_vision_select_feature {select!r} is not supported (patch or cls_patch)")
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    if config.get("image_aspect_ratio", "pad") == "pad":
        notes.append(
            "the LLaVA codebase pads images to a square with the mean colour (image_aspect_ratio=pad); "
            "transformers' CLIP image processor resizes and center-crops instead, as llava-hf checkpoints do"
        )
    return dict(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
        image_token_index=image_token_id, image_seq_length=patches + (1 if select == "cls_patch" else 0),
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        projector_hidden_act="gelu", multimodal_projector_bias=True, pad_token_id=pad_token_id,
    )


def _scrub_local_paths(config) -> None:
    """Remove values that point at the converting machine's file system (e.g. `_name_or_path`)."""
    subs = [config, *(getattr(config, name, None) for name in ("vision_config", "text_config", "clip_text_config"))]
    for sub in subs:
        if sub is not None and looks_like_local_path(getattr(sub, "_name_or_path", "")):
            sub._name_or_path = ""


# Model ---------------------------------------------------------------------------------------------------------


def check_tensors(plan: ConversionPlan, built: BuiltCheckpoint, expected: dict) -> None:
    """Every model tensor planned, every planned tensor a model tensor of the same shape."""
    tensors = built.tensors
    unmapped = list(plan.unmapped)
    unmapped += [f"{e.key} ({e.origin})" for k, e in tensors.items() if k not in expected]
    missing = [k for k in expected if k not in tensors]
    problems = []
    if unmapped:
        problems.append(f"unmapped keys: {name_list(unmapped)}")
    if missing:
        problems.append(f"missing keys (no input provides them): {name_list(missing)}")
    mismatched = [
        f"{k}: {tensors[k].origin} {tensors[k].key} is {list(tensors[k].shape)}, the model needs {list(shape)}"
        for k, shape in expected.items() if k in tensors and tensors[k].shape != shape
    ]
    if mismatched:
        more = f" ({len(mismatched)} in all)" if len(mismatched) > 5 else ""
        problems.append(f"shape mismatch: {'; '.join(mismatched[:5])}" + more)
    if problems:
        hint = ""
        text_tower = any(CLIP_TEXT_PREFIX in u or "text_tower" in u for u in unmapped)
        keeping = [f"`convert {m.name}`" for m in REGISTRY.values() if m.needs_clip_text_tower]
        if unmapped and not plan.method.needs_clip_text_tower and text_tower and keeping:
            hint = f" (SRC carries a CLIP text tower: did you mean {' or '.join(keeping)}?)"
        raise ConversionError("cannot map SRC onto the model: " + " | ".join(problems) + hint)


def build_model(plan: ConversionPlan, built: BuiltCheckpoint):
    """The output model class on the meta device, checked against the plan and filled with its tensors."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = plan.classes.generation_class(built.config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_tensors(plan, built, expected)
    state = {}
    for key in tqdm(expected, desc="Reading and casting tensors", disable=not plan.request.progress):
        state[key] = built.tensor(key, plan.out_dtype)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    return model.eval()
