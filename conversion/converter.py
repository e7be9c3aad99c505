"""Turn a LLaVA checkpoint into a VisionZip or TRIM checkpoint that loads with remote code.

    SRC (stock transformers LLaVA | LLaVA-codebase `llava_llama`)   [--clip CLIPModel]   [--projector FILE]
      -> a plan: every tensor of the output, named as in our model, with where it comes from
      -> checks: every SRC tensor mapped, every model tensor provided, shapes, CLIP vision == LLaVA vision
      -> a model on the meta device, filled with the planned tensors (cast to the output dtype)
      -> save_pretrained (sharded safetensors, config with auto_map, code files) + processor + README.md,
         into a hidden temporary directory next to OUT
      -> reload that directory with AutoModelForImageTextToText / AutoProcessor and compare every tensor
      -> move it into place as OUT; optionally upload it

Nothing is ever left randomly initialised: a tensor the model has and no input provides is an error, as is
an input tensor with no place in the model.
"""

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..methods import METHODS as REGISTRY
from .errors import ConversionError
from .foreign_code import foreign_code_references, strip_foreign_code
from .original_format import DEFAULT_CLIP, load_original_tokenizer, parse_reduce_func, vision_tower_fallback
from .output_place import ConversionInterrupted, OutputPlacement, check_output, resolve_output
from .key_mapping import (
    CLIP_TEXT_PREFIX,
    CLIP_UNUSED_KEYS,
    EMBEDDINGS,
    LM_HEAD,
    PROJECTOR_TARGETS,
    VISION_PREFIX,
    VISUAL_PROJECTION,
    is_original_layout,
    is_recomputed_buffer,
    is_stock_layout,
    map_clip_key,
    map_original_key,
    map_projector_key,
    map_stock_key,
)
from .sources import TensorSource, is_hub_id, looks_like_local_path, read_config, resolve_checkpoint


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
METHODS = tuple(REGISTRY)  # the registry's method names, in its order
INCOMPLETE_MARKER = "CONVERSION_INCOMPLETE"
_LIST_LIMIT = 12
# Config fields of the LLaVA codebase that have no counterpart in transformers' LLaVA (or are re-derived).
_VISION_FIELDS_TO_MATCH = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size")


def _name_list(names, limit: int = _LIST_LIMIT) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


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


@dataclass
class ConversionResult:
    out: Path
    method: str
    parameters: int
    shards: int
    total_bytes: int
    dtype: torch.dtype
    source_format: str
    added: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pushed_to: str | None = None

    def summary(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        lines = [
            f"Wrote and verified {self.out} ({self.method}, from a {self.source_format} checkpoint)",
            f"  parameters: {self.parameters:,} ({dtype})",
            f"  weights:    {self.shards} safetensors shard(s); directory size {self.total_bytes:,} bytes",
        ]
        lines += [f"  added:      {item}" for item in self.added] or ["  added:      nothing"]
        lines += [f"  note:       {note}" for note in self.notes]
        if self.pushed_to:
            lines.append(f"  uploaded:   https://huggingface.co/{self.pushed_to}")
        return "\n".join(lines)


@dataclass
class _Entry:
    """One output tensor: where it comes from, its shape, and how to read it (in the source's dtype)."""

    origin: str
    key: str
    shape: tuple
    load: Callable[[], torch.Tensor]


def _entry(source: TensorSource, key: str) -> _Entry:
    shape, _ = source.info(key)
    return _Entry(source.label, key, tuple(shape), lambda: source.get(key))


def _grown(entry: _Entry, rows: int) -> _Entry:
    """`entry` with rows appended up to `rows`; the new rows are the mean of the source rows."""
    extra = rows - entry.shape[0]

    def load():
        tensor = entry.load()
        mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
        return torch.cat([tensor, mean.expand(extra, -1)], dim=0)

    return _Entry(entry.origin, entry.key, (rows, *entry.shape[1:]), load)


class _Conversion:
    def __init__(self, request: ConversionRequest):
        if request.method not in METHODS:
            raise ConversionError(f"unknown method {request.method!r}; expected one of {', '.join(METHODS)}")
        if request.dtype is not None and request.dtype not in DTYPES:
            raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}, got {request.dtype!r}")
        if request.pad_vocab_multiple < 1:
            raise ConversionError(f"--pad-vocab-multiple must be >= 1, got {request.pad_vocab_multiple}")
        self.request = request
        self.method = request.method
        self.spec = REGISTRY[request.method]  # the registry entry: classes, options, whether CLIP's text tower is kept
        self.out = resolve_output(request.out)
        self.plan: dict[str, _Entry] = {}
        self.unmapped: list[str] = []
        self.dropped_buffers: list[str] = []
        self.added: list[str] = []
        self.notes: list[str] = []
        self.clip_dir: Path | None = None
        self.clip_config = None
        self.clip_source: TensorSource | None = None

    # Output location -------------------------------------------------------------------------------

    def check_output(self) -> None:
        check_output(self.out, self.request.overwrite)

    # Inputs ----------------------------------------------------------------------------------------

    def read_source(self) -> None:
        self.src_dir = resolve_checkpoint(self.request.src, "SRC")
        self.src_config = read_config(self.src_dir, "SRC")
        self._refuse_input_in_output(self.src_dir, "SRC")
        self.src = TensorSource.from_directory(self.src_dir, "SRC")
        self.format = self._detect_format()

    def _refuse_input_in_output(self, path: Path, what: str) -> None:
        """OUT is replaced (with --overwrite) after the conversion: it must not be, or hold, one of the inputs."""
        path = Path(path).resolve()
        if path == self.out or self.out in path.parents:
            raise ConversionError(f"output {self.out} would replace {what} {path}; choose another OUT")

    def _detect_format(self) -> str:
        config, keys = self.src_config, self.src.keys()
        model_type = config.get("model_type")
        architectures = config.get("architectures") or []
        original_markers = ("mm_vision_tower" in config or "mm_hidden_size" in config or model_type == "llava_llama"
                            or any("LlavaLlama" in a for a in architectures))
        if original_markers or (is_original_layout(keys) and "text_config" not in config):
            if not any(a in ("LlavaLlamaForCausalLM", "LlavaLlamaModel") for a in architectures) and model_type not in (
                "llava", "llava_llama"
            ):
                raise ConversionError(
                    f"SRC is a LLaVA-codebase checkpoint of architecture {architectures or model_type!r}; only the "
                    "Llama-based LLaVA-1.5 (`llava_llama`, LlavaLlamaForCausalLM) is supported"
                )
            return "original"
        if model_type == "llava" and "text_config" in config:
            if architectures and "LlavaForConditionalGeneration" not in architectures:
                raise ConversionError(f"SRC architecture {architectures} is not LlavaForConditionalGeneration")
            if not is_stock_layout(keys):
                raise ConversionError("SRC config says transformers LLaVA but its tensor names are not LLaVA's")
            return "stock"
        hint = ""
        if model_type in (method.model_type for method in REGISTRY.values()):
            hint = (" (already converted: change the reduction settings at load time, e.g. "
                    "from_pretrained(path, dominant_tokens=108, contextual_tokens=20))")
        raise ConversionError(
            f"SRC is a {model_type!r} checkpoint ({', '.join(architectures) or 'no architectures'}); expected a LLaVA "
            f"checkpoint: transformers `llava` (LlavaForConditionalGeneration) or the LLaVA codebase's `llava_llama`{hint}"
        )

    def _map_source(self) -> None:
        mapper = map_stock_key if self.format == "stock" else map_original_key
        for key in self.src.keys():
            if is_recomputed_buffer(key):
                self.dropped_buffers.append(key)
                continue
            target = mapper(key)
            if target is None:
                self.unmapped.append(f"{key} (SRC)")
            else:
                self.plan[target] = _entry(self.src, key)

    def _src_has(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self.plan)

    def read_clip(self) -> None:
        """Find the CLIP checkpoint when one is needed: for the CLIP text tower (TRIM), for an original checkpoint's
        vision config, or for vision weights SRC does not carry."""
        has_vision = self._src_has(VISION_PREFIX)
        has_text = self._src_has(CLIP_TEXT_PREFIX)
        reference, why = self.request.clip, "--clip"
        if reference is None:
            if self.spec.needs_clip_text_tower and self.format == "stock":
                raise ConversionError(
                    "convert trim needs --clip CLIP_SRC (e.g. openai/clip-vit-large-patch14-336): SRC is a stock LLaVA "
                    "checkpoint without the CLIP text tower"
                )
            if self.spec.needs_clip_text_tower and not has_text:
                raise ConversionError("convert trim needs --clip CLIP_SRC: SRC does not carry the CLIP text tower")
            if self.format == "stock":
                return
            reference = self.src_config.get("mm_vision_tower") or self.src_config.get("vision_tower")
            if not reference:
                raise ConversionError("SRC names no vision tower (mm_vision_tower); pass --clip CLIP_SRC")
            why = "mm_vision_tower"
            fallback = vision_tower_fallback(reference)
            if fallback != reference:
                self.notes.append(f"SRC's mm_vision_tower {reference!r} is not a directory here; used the hub's "
                                  f"{fallback} instead")
                reference = fallback
        need_weights = (self.format == "original" and not has_vision) or (self.spec.needs_clip_text_tower and not has_text) or (
            self.spec.needs_clip_text_tower and has_vision and self.request.clip is not None
        )
        self.clip_reference = reference
        self.clip_dir = resolve_checkpoint(reference, f"CLIP ({why})", weights=need_weights)
        self._refuse_input_in_output(self.clip_dir, "the CLIP checkpoint")
        clip_config = read_config(self.clip_dir, "CLIP")
        from transformers import CLIPConfig, CLIPVisionConfig

        model_type = clip_config.get("model_type")
        if model_type == "clip":
            self.clip_config = CLIPConfig.from_pretrained(self.clip_dir)
            self.clip_vision_config = self.clip_config.vision_config
        elif model_type == "clip_vision_model" and not self.spec.needs_clip_text_tower:
            self.clip_config = None
            self.clip_vision_config = CLIPVisionConfig.from_pretrained(self.clip_dir)
        else:
            raise ConversionError(
                f"CLIP checkpoint {reference!r} is a {model_type!r} model; expected a CLIPModel checkpoint (model_type "
                "'clip', vision and text towers), such as openai/clip-vit-large-patch14-336"
            )
        if need_weights:
            self.clip_source = TensorSource.from_directory(self.clip_dir, "CLIP")

    def apply_clip(self, vision_config) -> None:
        """Add the CLIP tensors the output needs, and compare CLIP's vision weights with SRC's."""
        if self.clip_source is None:
            return
        clip_plan = {}
        for key in self.clip_source.keys():
            target = map_clip_key(key)
            if target is not None and not is_recomputed_buffer(key):
                clip_plan[target] = _entry(self.clip_source, key)
            elif target is None and key not in CLIP_UNUSED_KEYS and not is_recomputed_buffer(key):
                raise ConversionError(f"CLIP checkpoint has tensors that are not CLIP's: {key!r}")
        for name in _VISION_FIELDS_TO_MATCH:
            mine, theirs = getattr(vision_config, name), getattr(self.clip_vision_config, name)
            if mine != theirs:
                raise ConversionError(
                    f"shape mismatch: the CLIP checkpoint's vision tower has {name}={theirs} but SRC's has {mine}"
                )
        src_vision = {k for k in self.plan if k.startswith(VISION_PREFIX)}
        clip_vision = {k for k in clip_plan if k.startswith(VISION_PREFIX)}
        if src_vision:
            if self.spec.needs_clip_text_tower:
                self._compare_vision(clip_plan, src_vision, clip_vision)
        else:
            for key in clip_vision:
                self.plan[key] = clip_plan[key]
            if clip_vision:
                self.added.append(f"CLIP vision tower ({len(clip_vision)} tensors) from {self.clip_reference}")
        if self.spec.needs_clip_text_tower:
            text = {k for k in clip_plan if k.startswith(CLIP_TEXT_PREFIX)}
            if not self._src_has(CLIP_TEXT_PREFIX):
                if not text or VISUAL_PROJECTION not in clip_plan:
                    raise ConversionError(
                        f"CLIP checkpoint {self.clip_reference!r} lacks the text tower or visual_projection TRIM needs"
                    )
                numel = sum(math.prod(clip_plan[k].shape) for k in text)
                for key in text:
                    self.plan[key] = clip_plan[key]
                self.added.append(f"CLIP text tower + text_projection ({numel:,} parameters) from {self.clip_reference}")
            if VISUAL_PROJECTION not in self.plan:
                self.plan[VISUAL_PROJECTION] = clip_plan[VISUAL_PROJECTION]
                self.added.append(f"CLIP visual_projection from {self.clip_reference}")

    def _compare_vision(self, clip_plan, src_vision, clip_vision) -> None:
        if src_vision != clip_vision:
            raise ConversionError(
                "the CLIP checkpoint's vision tower does not have the tensors of SRC's: only in SRC: "
                f"{_name_list(src_vision - clip_vision) or '-'}; only in CLIP: {_name_list(clip_vision - src_vision) or '-'}"
            )
        differing, worst = [], 0.0
        for key in tqdm(sorted(src_vision), desc="Comparing CLIP and SRC vision towers", disable=not self.request.progress):
            mine, theirs = self.plan[key].load(), clip_plan[key].load()
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
            if not self.request.force:
                raise ConversionError(message + "; pass --force to convert anyway")
            self.notes.append("WARNING (--force): " + message)

    def apply_projector(self) -> None:
        if self.request.projector is None:
            return
        path = Path(os.path.expanduser(self.request.projector))
        self._refuse_input_in_output(path, "the projector file")
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
            found[target] = _entry(source, key)
        missing = [t for t in PROJECTOR_TARGETS if t not in found]
        if missing:
            raise ConversionError(f"projector file lacks {_name_list(missing)}")
        for target, entry in found.items():
            if target in self.plan and self.plan[target].shape != entry.shape:
                raise ConversionError(
                    f"shape mismatch: projector {entry.key} is {entry.shape} but the model's {target} is "
                    f"{self.plan[target].shape}"
                )
            self.plan[target] = entry
        self.added.append(f"projector weights from {os.path.basename(self.request.projector)} (replacing SRC's)")

    # Config ----------------------------------------------------------------------------------------

    def _method_fields(self) -> dict:
        fields = self._option_fields()
        if not self.spec.needs_clip_text_tower:
            return fields
        text_config = self.clip_config.text_config.to_dict()
        text_config["projection_dim"] = self.clip_config.projection_dim
        fields.update(clip_text_config=text_config, projection_dim=self.clip_config.projection_dim)
        reduce_func = self.src_config.get("mm_vision_token_reduce_func") if self.format == "original" else None
        if reduce_func not in (None, ""):
            append_mean, ratio = parse_reduce_func(reduce_func)
            fields["trim_append_mean_token"] = append_mean
            if ratio != -1.0:
                # A fixed keep ratio: express it as equal bounds on the count.
                patches = (self.clip_vision_config.image_size // self.clip_vision_config.patch_size) ** 2
                fields["trim_min_tokens"] = fields["trim_max_tokens"] = int(patches * ratio)
            self.notes.append(f"SRC's mm_vision_token_reduce_func {reduce_func!r} mapped to the TRIM config fields")
        return fields

    def _option_fields(self) -> dict:
        """The method's config fields the request sets: `overrides`, plus the legacy VisionZip budget fields."""
        legacy = {"dominant_tokens": self.request.dominant_tokens, "contextual_tokens": self.request.contextual_tokens}
        fields = {name: value for name, value in legacy.items() if value is not None}
        allowed = {option.field for option in self.spec.options}
        unknown = sorted((set(fields) | set(self.request.overrides)) - allowed)
        if unknown:
            raise ConversionError(f"{self.spec.label} has no setting {', '.join(unknown)}; its settings are "
                                  f"{', '.join(sorted(allowed))}")
        return {**fields, **self.request.overrides}

    def _config_class(self):
        return self.spec.config_class

    def _base_kwargs_stock(self) -> dict:
        from transformers import LlavaConfig

        base = LlavaConfig.from_pretrained(self.src_dir).to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "dtype",
                    "torch_dtype"):
            base.pop(key, None)
        return base

    def _base_kwargs_original(self, image_token_id: int, pad_token_id) -> dict:
        from transformers import LlamaConfig

        config = self.src_config
        if config.get("mm_use_im_start_end"):
            raise ConversionError("SRC uses image start/end tokens (mm_use_im_start_end); only LLaVA-1.5 style is supported")
        projector_type = config.get("mm_projector_type", "linear" if "mm_projector_type" not in config and
                                    "model.mm_projector.2.weight" not in self.src else "mlp2x_gelu")
        if projector_type != "mlp2x_gelu":
            raise ConversionError(f"SRC projector type {projector_type!r} is not supported (LLaVA-1.5's mlp2x_gelu only)")
        if str(config.get("image_aspect_ratio", "pad")).startswith("anyres") or config.get("mm_patch_merge_type", "flat") != "flat":
            raise ConversionError("SRC is a LLaVA-NeXT (anyres) checkpoint; only LLaVA-1.5 is supported")
        vision_config = self.clip_vision_config
        if config.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
            raise ConversionError(
                f"shape mismatch: SRC mm_hidden_size={config['mm_hidden_size']} but the CLIP vision tower has "
                f"hidden_size={vision_config.hidden_size}"
            )
        allowed = set(LlamaConfig().to_dict()) | {"rope_scaling", "rope_theta"}
        skipped = {"model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype",
                   "auto_map", "id2label", "label2id"}
        text_kwargs = {k: v for k, v in config.items() if k in allowed and k not in skipped}
        if text_kwargs.get("rope_scaling", 0) is None:
            del text_kwargs["rope_scaling"]  # LLaVA-1.5 writes null; transformers 5 deprecates the field
        text_config = LlamaConfig(**text_kwargs)
        select = config.get("mm_vision_select_feature", "patch")
        if select not in ("patch", "cls_patch"):
            raise ConversionError(f"SRC mm_vision_select_feature {select!r} is not supported (patch or cls_patch)")
        patches = (vision_config.image_size // vision_config.patch_size) ** 2
        if config.get("image_aspect_ratio", "pad") == "pad":
            self.notes.append(
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

    # Tokenizer and processor -----------------------------------------------------------------------

    def build_processor(self):
        from transformers import AddedToken, AutoProcessor, AutoTokenizer, CLIPImageProcessor, LlavaProcessor

        from ..tiny import LLAVA_CHAT_TEMPLATE

        if self.format == "stock":
            try:
                stock = AutoProcessor.from_pretrained(self.src_dir, trust_remote_code=False)
            except Exception as error:  # noqa: BLE001
                raise ConversionError(f"SRC {self.src_dir} has no usable processor/tokenizer files: {error}")
            if not isinstance(stock, LlavaProcessor):
                raise ConversionError(f"SRC's processor is a {type(stock).__name__}, expected a LlavaProcessor")
            tokenizer, image_processor = stock.tokenizer, stock.image_processor
            settings = dict(patch_size=stock.patch_size, vision_feature_select_strategy=stock.vision_feature_select_strategy,
                            num_additional_image_tokens=stock.num_additional_image_tokens, chat_template=stock.chat_template)
        else:
            tokenizer = load_original_tokenizer(self.src_dir, self.notes)
            if (self.clip_dir / "preprocessor_config.json").is_file():
                image_processor = CLIPImageProcessor.from_pretrained(self.clip_dir)
            else:
                size = self.clip_vision_config.image_size
                image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
                self.notes.append("CLIP checkpoint has no preprocessor_config.json; used CLIP's default image processor")
            strategy = "full" if self.src_config.get("mm_vision_select_feature") == "cls_patch" else "default"
            settings = dict(patch_size=self.clip_vision_config.patch_size, vision_feature_select_strategy=strategy,
                            num_additional_image_tokens=1, chat_template=getattr(tokenizer, "chat_template", None)
                            or LLAVA_CHAT_TEMPLATE)
        image_token = getattr(tokenizer, "image_token", None) or "<image>"
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(image_token, special=True, normalized=False)], special_tokens=True)
            self.added.append(f"tokenizer token {image_token!r} (id {tokenizer.convert_tokens_to_ids(image_token)})")
        if tokenizer.pad_token is None and tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
            self.notes.append("tokenizer had no pad token; it pads with its unk token, as the LLaVA codebase does")
        image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.spec.needs_clip_text_tower:  # its processor also tokenizes the question for CLIP's text tower
            try:
                clip_tokenizer = AutoTokenizer.from_pretrained(self.clip_dir, trust_remote_code=False)
            except Exception as error:  # noqa: BLE001
                raise ConversionError(f"CLIP checkpoint {self.clip_reference!r} has no usable tokenizer files: {error}")
            processor = self.spec.processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                                  clip_tokenizer=clip_tokenizer, image_token=image_token, **settings)
            if self.format == "stock":
                self.added.append(f"CLIP tokenizer from {self.clip_reference} ({self.spec.processor_class.__name__})")
        else:
            processor = self.spec.processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                                  image_token=image_token, **settings)
        return processor, image_token_id

    def grow_vocabulary(self, tokenizer_size: int, image_token_id: int) -> int:
        """Make room for tokens the tokenizer has and the embedding lacks; returns the new row count."""
        for key in (EMBEDDINGS, LM_HEAD):
            if key not in self.plan:
                raise ConversionError(f"SRC lacks {key}, the {'embedding' if key == EMBEDDINGS else 'LM head'} (missing keys)")
        rows = self.plan[EMBEDDINGS].shape[0]
        needed = max(tokenizer_size, image_token_id + 1)
        if needed <= rows:
            return rows
        multiple = self.request.pad_vocab_multiple
        new_rows = -(-needed // multiple) * multiple
        for key in (EMBEDDINGS, LM_HEAD):
            self.plan[key] = _grown(self.plan[key], new_rows)
        self.added.append(f"embedding and LM head rows {rows} -> {new_rows} (new rows = mean of the source rows)")
        return new_rows

    # Build, write, verify --------------------------------------------------------------------------

    def build_config(self, processor, image_token_id: int):
        if self.format == "stock":
            kwargs = self._base_kwargs_stock()
            kwargs["image_token_index"] = image_token_id
        else:
            kwargs = self._base_kwargs_original(image_token_id, processor.tokenizer.pad_token_id)
        rows = self.grow_vocabulary(len(processor.tokenizer), image_token_id)
        kwargs["text_config"] = {**kwargs["text_config"], "vocab_size": rows}
        try:
            config = self._config_class()(**kwargs, **self._method_fields())
        except ValueError as error:
            raise ConversionError(f"invalid {self.method} settings: {error}")
        self.out_dtype = DTYPES[self.request.dtype] if self.request.dtype else (self.src.main_float_dtype() or torch.float32)
        config.dtype = self.out_dtype
        _scrub_local_paths(config)
        return config

    def check_plan(self, model) -> None:
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.expected = expected
        unmapped = list(self.unmapped)
        unmapped += [f"{e.key} ({e.origin})" for k, e in self.plan.items() if k not in expected]
        missing = [k for k in expected if k not in self.plan]
        problems = []
        if unmapped:
            problems.append(f"unmapped keys: {_name_list(unmapped)}")
        if missing:
            problems.append(f"missing keys (no input provides them): {_name_list(missing)}")
        mismatched = [
            f"{k}: {self.plan[k].origin} {self.plan[k].key} is {list(self.plan[k].shape)}, the model needs {list(shape)}"
            for k, shape in expected.items() if k in self.plan and self.plan[k].shape != shape
        ]
        if mismatched:
            problems.append(f"shape mismatch: {'; '.join(mismatched[:5])}" + (f" ({len(mismatched)} in all)" if len(mismatched) > 5 else ""))
        if problems:
            hint = ""
            if unmapped and not self.spec.needs_clip_text_tower and any(CLIP_TEXT_PREFIX in u or "text_tower" in u for u in unmapped):
                hint = " (SRC carries a CLIP text tower: did you mean `convert trim`?)"
            raise ConversionError("cannot map SRC onto the model: " + " | ".join(problems) + hint)

    def expected_tensor(self, key: str) -> torch.Tensor:
        return _cast(self.plan[key].load(), self.out_dtype)

    def write(self, directory: Path, model_class, config, processor) -> None:
        from accelerate import init_empty_weights
        from transformers import GenerationConfig

        with init_empty_weights(include_buffers=False):
            model = model_class(config)
        self.check_plan(model)
        state = {}
        for key in tqdm(self.expected, desc="Reading and casting tensors", disable=not self.request.progress):
            state[key] = self.expected_tensor(key)
        model.load_state_dict(state, strict=True, assign=True)
        del state
        model.eval()
        if (self.src_dir / "generation_config.json").is_file():
            generation_config = GenerationConfig.from_pretrained(self.src_dir)
        else:
            generation_config = GenerationConfig.from_model_config(model.config)
        default_length = GenerationConfig().max_length
        if generation_config.max_length != default_length:
            # LLaVA-codebase saves write their context size here (4096); kept, every
            # generate(max_new_tokens=...) would warn that both limits are set.
            self.notes.append(f"generation_config max_length={generation_config.max_length} dropped (a context size, "
                              "not a generation limit; pass max_new_tokens)")
            generation_config.max_length = default_length
        model.generation_config = generation_config
        _write_model(model, directory, self.request.max_shard_size)
        del model
        _write_processor(processor, directory)
        stripped = strip_foreign_code(directory)
        if stripped:
            self.notes.append(f"dropped the inputs' auto_map code references from {', '.join(stripped)} (never run, "
                              "never shipped: the output carries only this package's code)")
        _write_model_card(directory, self.render_card(config))

    def render_card(self, config) -> str:
        from .model_card import render_model_card

        return render_model_card(
            config, repo_id=self.repo_id(), base_models=self.base_models(), license=self.license(),
            tuned_projector=self.request.projector is not None, source_format=self.format,
            source_is_trim_trained=self.format == "original" and self._src_has(CLIP_TEXT_PREFIX),
            extra_notes=[note for note in self.notes if note.startswith("WARNING")],  # e.g. a --force'd mismatch
        )

    def repo_id(self) -> str:
        return self.request.repo_id or self.request.push_to_hub or f"your-username/{self.out.name}"

    def base_models(self) -> list[str]:
        if self.request.base_models:
            return list(self.request.base_models)
        return [self.request.src] if is_hub_id(self.request.src) and not Path(self.request.src).exists() else []

    def license(self) -> str:
        if self.request.license:
            return self.request.license
        readme = self.src_dir / "README.md"
        if readme.is_file():
            text = readme.read_text(encoding="utf-8", errors="replace")
            if text.startswith("---"):
                for line in text.split("---", 2)[1].splitlines():
                    if line.strip().startswith("license:"):
                        value = line.split(":", 1)[1].strip().strip("'\"")
                        if value:
                            return value
        return "other"

    def verify(self, directory: Path, config) -> None:
        from safetensors import safe_open
        from transformers import AutoModelForImageTextToText, AutoProcessor

        # Before anything is loaded with remote code allowed: the only code it may name is ours.
        foreign = foreign_code_references(directory)
        if foreign:
            raise ConversionError(
                f"verification failed: the output's auto_map names code that is not this package's, or whose file is "
                f"missing: {_name_list(foreign)}"
            )
        try:
            model, info = AutoModelForImageTextToText.from_pretrained(
                directory, trust_remote_code=True, dtype=self.out_dtype, output_loading_info=True
            )
        except Exception as error:  # noqa: BLE001
            raise ConversionError(f"verification failed: the written checkpoint does not load: {error}")
        problems = {name: info.get(name) for name in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
        problems = {name: value for name, value in problems.items() if value}
        if problems:
            raise ConversionError(f"verification failed: loading the written checkpoint reported {problems}")
        if type(model) is not self.spec.generation_class:
            raise ConversionError(f"verification failed: the output loads as {type(model).__name__}")
        loaded = model.state_dict()
        if set(loaded) != set(self.expected):
            raise ConversionError(
                f"verification failed: reloaded tensors differ in names: {_name_list(set(loaded) ^ set(self.expected))}"
            )
        for key in tqdm(self.expected, desc="Verifying tensors", disable=not self.request.progress):
            wanted = self.expected_tensor(key)
            if not _same_values(loaded[key].to(wanted.dtype), wanted):
                raise ConversionError(f"verification failed: {key} differs from {self.plan[key].origin} {self.plan[key].key}")
        del model, loaded
        for file in directory.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    dtype = handle.get_slice(key).get_dtype()
                    if dtype in ("F16", "BF16", "F32", "F64") and dtype != _SAFETENSORS_NAME[self.out_dtype]:
                        raise ConversionError(f"verification failed: {file.name}:{key} is stored as {dtype}")
        try:
            processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
        except Exception as error:  # noqa: BLE001
            raise ConversionError(f"verification failed: the written processor does not load: {error}")
        if type(processor) is not self.spec.processor_class:
            raise ConversionError(f"verification failed: the processor loads as {type(processor).__name__}")
        if processor.image_token_id != config.image_token_id:
            raise ConversionError(
                f"verification failed: processor image token id {processor.image_token_id} != config.image_token_id "
                f"{config.image_token_id}"
            )

    def run(self) -> ConversionResult:
        self.check_output()
        self.read_source()
        self._map_source()
        self.read_clip()
        vision_config = self._vision_config_for_checks()
        self.apply_clip(vision_config)
        self.apply_projector()
        processor, image_token_id = self.build_processor()
        config = self.build_config(processor, image_token_id)
        model_class = self.spec.generation_class
        placement = OutputPlacement(self.out, self.request.overwrite)
        staging = placement.create()
        try:
            (staging / INCOMPLETE_MARKER).write_text(
                "This directory is an unfinished conversion; it is not a checkpoint. It can be deleted.\n"
            )
            self.write(staging, model_class, config, processor)
            self.verify(staging, config)
            (staging / INCOMPLETE_MARKER).unlink()
            result = self.result(staging)
            placement.move_into_place()
        except KeyboardInterrupt:
            placement.clean_up()
            raise ConversionInterrupted(placement.interrupted_message()) from None
        except BaseException:
            placement.clean_up()
            raise
        result.out = self.out
        if self.request.push_to_hub:
            try:
                push_to_hub(self.out, self.request.push_to_hub, private=self.request.private)
            except KeyboardInterrupt:  # OUT is complete: do not let the caller report that nothing was written
                raise ConversionError(
                    f"written and verified {self.out}, but the upload to {self.request.push_to_hub} was interrupted"
                ) from None
            result.pushed_to = self.request.push_to_hub
        return result

    def _vision_config_for_checks(self):
        if self.format == "stock":
            from transformers import LlavaConfig

            return LlavaConfig.from_pretrained(self.src_dir).vision_config
        return self.clip_vision_config

    def result(self, directory: Path) -> ConversionResult:
        files = [p for p in directory.rglob("*") if p.is_file()]
        if self.dropped_buffers:
            self.notes.append(f"dropped {len(self.dropped_buffers)} recomputed buffers of SRC (position_ids / inv_freq)")
        if self.spec.needs_clip_text_tower and not self._src_trained_for_trim():
            self.notes.append(
                "TRIM on stock LLaVA weights is training-free; the authors' checkpoints were fine-tuned with TRIM active, "
                "and training-free TRIM was reported to give poor output (docs/trim.md §8)"
            )
        return ConversionResult(
            out=directory, method=self.method, parameters=sum(math.prod(s) for s in self.expected.values()),
            shards=len(list(directory.glob("*.safetensors"))), total_bytes=sum(p.stat().st_size for p in files),
            dtype=self.out_dtype, source_format=self.format, added=list(self.added), notes=list(self.notes),
        )

    def _src_trained_for_trim(self) -> bool:
        return self.format == "original" and any(k.startswith(CLIP_TEXT_PREFIX) for k, e in self.plan.items()
                                                 if e.origin == "SRC")


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal tensors, with NaN equal to NaN in the same places (a NaN copied faithfully is not a difference)."""
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0))


_SAFETENSORS_NAME = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _scrub_local_paths(config) -> None:
    """Remove values that point at the converting machine's file system (e.g. `_name_or_path`)."""
    for sub in [config, *(getattr(config, name, None) for name in ("vision_config", "text_config", "clip_text_config"))]:
        if sub is not None and looks_like_local_path(getattr(sub, "_name_or_path", "")):
            sub._name_or_path = ""


# The write steps, separate so that tests can interrupt a conversion between them.
def _write_model(model, directory: Path, max_shard_size) -> None:
    model.save_pretrained(directory, max_shard_size=max_shard_size)


def _write_processor(processor, directory: Path) -> None:
    processor.save_pretrained(directory)


def _write_model_card(directory: Path, text: str) -> None:
    (directory / "README.md").write_text(text, encoding="utf-8")


def push_to_hub(directory: Path, repo_id: str, *, private: bool = False) -> None:
    """Upload a verified output directory to the hub (creating the model repository if needed)."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model",
                          commit_message="Upload checkpoint converted with llava-token-reduction")
    except Exception as error:  # noqa: BLE001
        raise ConversionError(f"written and verified {directory}, but the upload to {repo_id} failed: {error}")


def convert(request: ConversionRequest) -> ConversionResult:
    """Run one conversion; raises `ConversionError` (one-line message) when it cannot be done."""
    from transformers.utils import logging as transformers_logging

    started = time.monotonic()
    bars_were_enabled = transformers_logging.is_progress_bar_enabled()
    if not request.progress:
        transformers_logging.disable_progress_bar()
    try:
        result = _Conversion(request).run()
    finally:
        if bars_were_enabled:
            transformers_logging.enable_progress_bar()
    result.notes.append(f"took {time.monotonic() - started:.1f} s")
    return result


def converter_for(method: str) -> Callable[..., ConversionResult]:
    """`convert_<method>(src, out, **options)`: the converter entry of a registered method (its registry
    `convert_function` may name this, or its own function)."""

    def convert_method(src: str, out: str, **options) -> ConversionResult:
        return convert(ConversionRequest(method=method, src=str(src), out=str(out), **options))

    convert_method.__name__ = convert_method.__qualname__ = f"convert_{method}"
    convert_method.__doc__ = f"Convert SRC into a {REGISTRY[method].label} checkpoint at OUT (see `ConversionRequest`)."
    return convert_method


convert_visionzip = converter_for("visionzip")
convert_trim = converter_for("trim")
convert_prumerge = converter_for("prumerge")


__all__ = [
    "ConversionRequest", "ConversionResult", "convert", "converter_for", "convert_visionzip", "convert_trim",
    "convert_prumerge", "push_to_hub",
    "DEFAULT_CLIP", "DTYPES", "INCOMPLETE_MARKER", "ConversionInterrupted",
]
