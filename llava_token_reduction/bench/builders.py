"""How `bench` gets its models: random weights at a preset's widths (built locally from configs), or a checkpoint
(a directory or a hub id), for either model family (`families`)."""

from dataclasses import replace
from pathlib import Path

from .. import methods as registry
from .families import FAMILIES, family_of_model_type
from .shapes import BenchShape
from .workloads import Workload, _clip_rows, _processed, _row_inputs, build_models, default_methods, fit_image


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


def _needs_text_tower(methods) -> bool:
    return any(m.reduction is not None and m.reduction.needs_clip_text_tower for m in methods)


def _text_tower_method(family):
    """The registered method of `family` whose model carries CLIP's text tower (the preset base of every row);
    None when the family has none."""
    return next((method for method in registry.METHODS.values()
                 if method.needs_clip_text_tower and family.has(method)), None)


def _keep_fp32_modules(model) -> None:
    """Put the modules a class keeps in fp32 (`_keep_in_fp32_modules_strict`, TRIM's scoring modules) back to fp32
    after a half-precision build, as `from_pretrained` leaves them."""
    for module in list(model.modules()):
        for name in getattr(module, "_keep_in_fp32_modules_strict", None) or ():
            try:
                module.get_submodule(name).float()
            except AttributeError:  # the outer class repeats its inner model's list, relative to the inner model
                continue


def _preset_processor(shape: BenchShape, family, tokenizer):
    """The stock processor of the shape's family, offline: `LlavaProcessor` (one crop per image) or, for an anyres
    family, `LlavaNextProcessor` (llava-hf's pinpoints at the shape's crop size)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from ..tiny import LLAVA_CHAT_TEMPLATE
    from ..tiny_next import build_next_processor

    if family.anyres:
        return build_next_processor(shape)
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": shape.image_size}, crop_size={"height": shape.image_size, "width": shape.image_size}
        ),
        tokenizer=tokenizer, patch_size=shape.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_preset_workload(shape: BenchShape, image, question: str, methods=None, seed: int = 0, device: str = "cpu",
                          dtype: str = "float32", attn_implementation: str | None = None) -> Workload:
    """Random-weight models of `shape` (built locally from configs) on `device` in `dtype`, with
    `attn_implementation` (default sdpa) everywhere, and the processed inputs of `image` (resized to the shape's
    `input_image_size` when it has one). `methods` default to the family's rows (`default_methods`)."""
    import torch

    from ..tiny import build_clip_tokenizer, build_llm_tokenizer
    from ..tiny_next import grid_pinpoints

    family = FAMILIES[shape.family]
    methods = default_methods(family) if methods is None else methods
    image = fit_image(image, shape)
    processor = _preset_processor(shape, family, build_llm_tokenizer())
    tokenizer = processor.tokenizer
    clip_tokenizer = build_clip_tokenizer()
    if len(tokenizer) > shape.lm_vocab or len(clip_tokenizer) > shape.clip_text_vocab:
        raise ValueError("the preset's vocabularies are smaller than the offline tokenizers")
    common, clip_text = _configs(
        shape, tokenizer.convert_tokens_to_ids("<image>"), tokenizer.pad_token_id, tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        clip_ids=(clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id, clip_tokenizer.pad_token_id),
    )
    if family.anyres:
        common["image_grid_pinpoints"] = grid_pinpoints(shape)
    torch.manual_seed(seed)
    # The base carries CLIP's text tower when a method of the family needs it, so that every row runs on its
    # weights; else it is the family's stock model.
    text_tower = _text_tower_method(family)
    if text_tower is not None:
        base_class = family.generation_class(text_tower)
        config = base_class.config_class(**common, clip_text_config=clip_text, projection_dim=shape.projection_dim)
    else:
        base_class = family.stock_class
        config = base_class.config_class(**common)
    # Built on the device in the dtype: a 7B-width preset is never materialised in fp32 on the host first.
    with torch.device(device):
        base = base_class._from_config(config, dtype=getattr(torch, dtype), attn_implementation=attn_implementation)
    base.eval()
    _keep_fp32_modules(base)
    models = build_models(base, methods, family)

    def make_inputs(images):
        stock_inputs = _processed(processor, images, question)
        return _row_inputs(methods, stock_inputs, _clip_rows(clip_tokenizer, question, len(images)))

    workload = Workload(shape, models, {}, random_weights=True, source=f"preset {shape.name}",
                        make_inputs=make_inputs, device=device, dtype=dtype, image=image)
    workload.inputs = workload.batch([image])
    return workload


def build_checkpoint_workload(path: str, image, question: str, methods=None, dtype: str = "float32",
                              device: str = "cpu", attn_implementation: str | None = None) -> Workload:
    """Models on a checkpoint, a local directory or a hub id (read through the hub cache as `from_pretrained`
    does): stock LLaVA or LLaVA-NeXT or any of our models of them, loaded in `dtype` straight onto `device`, with
    `attn_implementation` (default: transformers' choice, sdpa). `methods` default to the family's rows. Rows of
    methods that need CLIP's text tower need a checkpoint of such a method, which carries it; they are skipped
    with a note otherwise."""
    import torch
    from transformers import AutoConfig, AutoProcessor

    from ..tiny import build_clip_tokenizer

    config = AutoConfig.from_pretrained(path)
    try:
        family, own = family_of_model_type(config.model_type)
    except ValueError as error:
        raise ValueError(f"{path} is {error}") from None
    methods = default_methods(family) if methods is None else methods
    load = {"dtype": getattr(torch, dtype)}
    if device != "cpu":
        load["device_map"] = {"": device}
    if attn_implementation is not None:
        load["attn_implementation"] = attn_implementation
    notes = []
    if own is not None and own.needs_clip_text_tower:
        base = family.generation_class(own).from_pretrained(path, **load).eval()
    else:
        base = family.stock_class.from_pretrained(path, **load).eval()
        lacking = {m.kind: m.reduction for m in methods
                   if m.reduction is not None and m.reduction.needs_clip_text_tower}
        for reduction in lacking.values():
            notes.append(f"{reduction.label} skipped: the checkpoint has no CLIP text tower (convert it with "
                         f"`convert {reduction.name}`).")
        methods = [m for m in methods if m.kind not in lacking]
    processor = AutoProcessor.from_pretrained(path)
    vision, text = base.config.vision_config, base.config.text_config
    shape = BenchShape(
        name=Path(path).name, family=family.name, image_size=vision.image_size, patch_size=vision.patch_size,
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
    models = build_models(base, methods, family)
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
                        make_inputs=make_inputs, device=device, dtype=dtype, image=image)
    workload.inputs = workload.batch([image])
    return workload
