"""What `bench` runs: the rows (stock LLaVA and each registered method's variants), the models on one set of
weights, and the inputs each row gets."""

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .. import methods as registry
from .shapes import BenchShape


SAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "sample.png"
DEFAULT_QUESTION = "What is shown in this picture? Describe the objects and their colours."
STOCK = "stock"


@dataclass(frozen=True)
class Method:
    """One row of the benchmark. `kind` is "stock" or the name of a registered reduction method
    (`llava_token_reduction.methods`); `overrides` are the config fields that make the row, as
    `(field, value)` pairs. `dominant_tokens` / `contextual_tokens` are VisionZip's budget spelled out, kept for
    callers that write `Method("visionzip-64", "visionzip", 54, 10)`; they join the overrides."""

    name: str
    kind: str
    dominant_tokens: int | None = None
    contextual_tokens: int | None = None
    overrides: tuple = ()

    @property
    def reduction(self):
        """The registry entry of the row's method; None for stock LLaVA."""
        return None if self.kind == STOCK else registry.get(self.kind)

    def config_overrides(self) -> dict:
        fields = dict(self.overrides)
        for name in ("dominant_tokens", "contextual_tokens"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        return fields


# Stock LLaVA, then every registered method's default rows, in registry order.
DEFAULT_METHODS = (
    Method(STOCK, STOCK),
    *(Method(variant.name, method.name, overrides=variant.overrides)
      for method in registry.METHODS.values() for variant in method.bench_variants),
)


def _configs(shape: BenchShape, image_token_id: int, pad_id: int, bos_id: int, eos_id: int,
             clip_ids=(None, None, None)):
    from transformers import CLIPTextConfig, CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
        num_hidden_layers=shape.vision_layers, num_attention_heads=shape.vision_heads,
        image_size=shape.image_size, patch_size=shape.patch_size, projection_dim=shape.projection_dim,
    )
    text = LlamaConfig(
        hidden_size=shape.lm_hidden, intermediate_size=shape.lm_intermediate, num_hidden_layers=shape.lm_layers,
        num_attention_heads=shape.lm_heads, num_key_value_heads=shape.lm_kv_heads, vocab_size=shape.lm_vocab,
        max_position_embeddings=4096, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    clip_text = CLIPTextConfig(
        bos_token_id=clip_ids[0], eos_token_id=clip_ids[1], pad_token_id=clip_ids[2],
        hidden_size=shape.clip_text_hidden, intermediate_size=shape.clip_text_intermediate,
        num_hidden_layers=shape.clip_text_layers, num_attention_heads=shape.clip_text_heads,
        projection_dim=shape.projection_dim, vocab_size=shape.clip_text_vocab, max_position_embeddings=77,
    )
    common = dict(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        image_seq_length=shape.patches, pad_token_id=pad_id,
    )
    return common, clip_text


def build_models(base, methods) -> dict:
    """One model per row, all on the weights of `base` (a stock LLaVA, or a model of a method that needs CLIP's
    text tower, which only that model carries). Rows of methods without the text tower get a twin of `base`
    (shared modules); a row of a text-tower method is `base` itself, with its overrides set on the config."""
    from transformers import LlavaForConditionalGeneration

    from ..shared_weights import twin

    models = {}
    for method in methods:
        reduction = method.reduction
        if reduction is None:
            model = twin(base, LlavaForConditionalGeneration)
        elif reduction.needs_clip_text_tower:
            if not isinstance(base, reduction.generation_class):
                raise ValueError(f"{reduction.label} needs a CLIP text tower: the base model is not a "
                                 f"{reduction.label} model")
            if any(model is base for model in models.values()):
                raise ValueError(f"only one row can use the base model itself; {method.name} would be a second")
            model = base
            for key, value in method.config_overrides().items():
                setattr(model.config, key, value)
        else:
            model = twin(base, reduction.generation_class, **method.config_overrides())
        model.generation_config.pad_token_id = getattr(base.config, "pad_token_id", None)
        models[method.name] = model.eval()
    return models


@dataclass
class Workload:
    """The models, their inputs and a description of where they came from. `make_inputs(images)` builds a
    batch of `len(images)` prompts, one image each (the question of the run), for every row; `batch` places it
    on the models' device and dtype."""

    shape: BenchShape
    models: dict
    inputs: dict  # method name -> generate kwargs (one image)
    random_weights: bool
    source: str
    notes: list = field(default_factory=list)
    make_inputs: Callable | None = None
    device: str = "cpu"
    dtype: str = "float32"

    def batch(self, images) -> dict:
        """Method name -> generate kwargs of a batch of `images`, on the models' device (pixels in their dtype)."""
        if self.make_inputs is None:
            raise ValueError("this workload has no processor to build batches with")
        rows = self.make_inputs(images)
        return {name: place_inputs(inputs, self.device, self.dtype) for name, inputs in rows.items()}


def place_inputs(inputs: dict, device: str, dtype: str) -> dict:
    """`inputs` on `device`, floating-point tensors (the pixels) in `dtype`."""
    import torch

    placed = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=getattr(torch, dtype) if value.is_floating_point() else None)
        placed[key] = value
    return placed


def batch_images(image, count: int) -> list:
    """`count` different pictures made from `image` (flips, quarter turns, crops), deterministic, so that a
    batch is not `count` copies of one picture and an adaptive count (TRIM) can differ between its rows."""
    from PIL import Image

    width, height = image.size
    variants = [
        lambda im: im,
        lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        lambda im: im.transpose(Image.Transpose.ROTATE_180),
        lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        lambda im: im.crop((0, 0, width * 2 // 3, height * 2 // 3)),
        lambda im: im.crop((width // 3, 0, width, height * 2 // 3)),
        lambda im: im.crop((0, height // 3, width * 2 // 3, height)),
        lambda im: im.crop((width // 3, height // 3, width, height)),
    ]
    pictures = []
    for index in range(count):
        picture = variants[index % len(variants)](image)
        if index >= len(variants):  # past the eight variants: a quarter turn of them
            picture = picture.transpose(Image.Transpose.ROTATE_90)
        pictures.append(picture)
    return pictures


def _clip_rows(clip_tokenizer, question: str, images: int = 1):
    """The question as CLIP token rows (padded to CLIP's 77 positions), one per image: the per-image inputs of
    the methods that need CLIP's text tower."""
    encoded = clip_tokenizer(
        [question] * images, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    return {"clip_input_ids": encoded["input_ids"], "clip_attention_mask": encoded["attention_mask"]}


def _prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


def _processed(processor, images, question: str) -> dict:
    """The stock processor's inputs of one prompt per image (left-padded by the tokenizer if they differ)."""
    images = list(images)
    return dict(processor(images=images, text=[_prompt(question)] * len(images), padding=True, return_tensors="pt"))


def _row_inputs(methods, stock_inputs: dict, side_inputs: dict) -> dict:
    """Per row: the processor's stock inputs plus the per-image inputs of the row's own method."""
    rows = {}
    for method in methods:
        wanted = method.reduction.side_inputs if method.reduction else ()
        rows[method.name] = {**stock_inputs, **{key: side_inputs[key] for key in wanted}}
    return rows


def _needs_text_tower(methods) -> bool:
    return any(m.reduction is not None and m.reduction.needs_clip_text_tower for m in methods)


def _text_tower_method():
    """The registered method whose model carries CLIP's text tower (the preset base of every row)."""
    return next(method for method in registry.METHODS.values() if method.needs_clip_text_tower)


def _keep_fp32_modules(model) -> None:
    """Put the modules a class keeps in fp32 (`_keep_in_fp32_modules_strict`, TRIM's scoring modules) back to fp32
    after a half-precision build, as `from_pretrained` leaves them."""
    for module in list(model.modules()):
        for name in getattr(module, "_keep_in_fp32_modules_strict", None) or ():
            try:
                module.get_submodule(name).float()
            except AttributeError:  # the outer class repeats its inner model's list, relative to the inner model
                continue


def build_preset_workload(shape: BenchShape, image, question: str, methods, seed: int = 0, device: str = "cpu",
                          dtype: str = "float32", attn_implementation: str | None = None) -> Workload:
    """Random-weight models of `shape` (built locally from configs) on `device` in `dtype`, with
    `attn_implementation` (default sdpa) everywhere, and the processed inputs."""
    import torch
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from ..tiny import LLAVA_CHAT_TEMPLATE, build_clip_tokenizer, build_llm_tokenizer

    tokenizer = build_llm_tokenizer()
    clip_tokenizer = build_clip_tokenizer()
    if len(tokenizer) > shape.lm_vocab or len(clip_tokenizer) > shape.clip_text_vocab:
        raise ValueError("the preset's vocabularies are smaller than the offline tokenizers")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": shape.image_size}, crop_size={"height": shape.image_size, "width": shape.image_size}
        ),
        tokenizer=tokenizer, patch_size=shape.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )
    common, clip_text = _configs(
        shape, tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id, tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        clip_ids=(clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id, clip_tokenizer.pad_token_id),
    )
    # One base with CLIP's text tower too, so that every row can run on its weights.
    base_method = _text_tower_method()
    torch.manual_seed(seed)
    config = base_method.config_class(**common, clip_text_config=clip_text, projection_dim=shape.projection_dim)
    # Built on the device in the dtype: a 7B-width preset is never materialised in fp32 on the host first.
    with torch.device(device):
        base = base_method.generation_class._from_config(
            config, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
        ).eval()
    _keep_fp32_modules(base)
    models = build_models(base, methods)

    def make_inputs(images):
        stock_inputs = _processed(processor, images, question)
        return _row_inputs(methods, stock_inputs, _clip_rows(clip_tokenizer, question, len(images)))

    workload = Workload(shape, models, {}, random_weights=True, source=f"preset {shape.name}",
                        make_inputs=make_inputs, device=device, dtype=dtype)
    workload.inputs = workload.batch([image])
    return workload


def build_checkpoint_workload(path: str, image, question: str, methods, dtype: str = "float32", device: str = "cpu",
                              attn_implementation: str | None = None) -> Workload:
    """Models on a checkpoint, a local directory or a hub id (read through the hub cache as `from_pretrained`
    does): stock LLaVA or any registered method, loaded in `dtype` straight onto `device`, with
    `attn_implementation` (default: transformers' choice, sdpa). Rows of methods that need CLIP's text tower
    need a checkpoint of such a method, which carries it; they are skipped with a note otherwise."""
    import torch
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    from ..tiny import build_clip_tokenizer

    config = AutoConfig.from_pretrained(path)
    own = registry.for_model_type(config.model_type)
    if own is None and config.model_type != "llava":
        known = ", ".join(["llava", *(method.model_type for method in registry.METHODS.values())])
        raise ValueError(f"{path} is a {config.model_type!r} checkpoint; bench loads model types {known} (LLaVA-NeXT "
                         "checkpoints need the LLaVA-NeXT classes, not in this version yet)")
    load = {"dtype": getattr(torch, dtype)}
    if device != "cpu":
        load["device_map"] = {"": device}
    if attn_implementation is not None:
        load["attn_implementation"] = attn_implementation
    notes = []
    if own is not None and own.needs_clip_text_tower:
        base = own.generation_class.from_pretrained(path, **load).eval()
    else:
        base = LlavaForConditionalGeneration.from_pretrained(path, **load).eval()
        lacking = {m.kind: m.reduction for m in methods
                   if m.reduction is not None and m.reduction.needs_clip_text_tower}
        for reduction in lacking.values():
            notes.append(f"{reduction.label} skipped: the checkpoint has no CLIP text tower (convert it with "
                         f"`convert {reduction.name}`).")
        methods = [m for m in methods if m.kind not in lacking]
    processor = AutoProcessor.from_pretrained(path)
    vision, text = base.config.vision_config, base.config.text_config
    shape = BenchShape(
        name=Path(path).name, image_size=vision.image_size, patch_size=vision.patch_size,
        vision_hidden=vision.hidden_size, vision_intermediate=vision.intermediate_size,
        vision_layers=vision.num_hidden_layers, vision_heads=vision.num_attention_heads,
        lm_hidden=text.hidden_size, lm_intermediate=text.intermediate_size, lm_layers=text.num_hidden_layers,
        lm_heads=text.num_attention_heads, lm_kv_heads=text.num_key_value_heads, lm_vocab=text.vocab_size,
    )
    clip_text = getattr(base.config, "clip_text_config", None)
    if clip_text is not None:  # report the checkpoint's CLIP text tower, not the ViT-L/14 defaults
        shape = replace(
            shape, projection_dim=base.config.projection_dim, clip_text_hidden=clip_text.hidden_size,
            clip_text_intermediate=clip_text.intermediate_size, clip_text_layers=clip_text.num_hidden_layers,
            clip_text_heads=clip_text.num_attention_heads, clip_text_vocab=clip_text.vocab_size,
        )
    models = build_models(base, methods)
    # A processor of a text-tower method also returns the per-image inputs: keep them for their rows only.
    side_names = {name for method in registry.METHODS.values() for name in method.side_inputs}
    clip_tokenizer = None
    if _needs_text_tower(methods):
        clip_tokenizer = getattr(processor, "clip_tokenizer", None) or build_clip_tokenizer()

    def make_inputs(images):
        processed = _processed(processor, images, question)
        stock_inputs = {key: value for key, value in processed.items() if key not in side_names}
        side_inputs = _clip_rows(clip_tokenizer, question, len(images)) if clip_tokenizer is not None else {}
        return _row_inputs(methods, stock_inputs, side_inputs)

    workload = Workload(shape, models, {}, random_weights=False, source=str(path), notes=notes,
                        make_inputs=make_inputs, device=device, dtype=dtype)
    workload.inputs = workload.batch([image])
    return workload
