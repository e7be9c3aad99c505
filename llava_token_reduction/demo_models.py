"""How the demo gets the models it compares: random-weight checkpoints of every method saved and loaded back
through the Auto classes, or a user's checkpoint loaded (or converted, for a method that needs CLIP's text
tower) for each method asked, all on one set of LLaVA weights. Split from `demo.py`, which parses the command
and prints the comparison."""

import contextlib
import time
from pathlib import Path

from . import methods as registry
from .families import FAMILIES, family_of_model_type
from .loading import load_checkpoint
from .shared_weights import twin


# Checkpoint subfolders of the demo's directory, in the order of the table's columns: the registry's methods.
REDUCTIONS = tuple(registry.METHODS)
LLAVA_1_5_CLIP = "openai/clip-vit-large-patch14-336"


def _family_of(source: str):
    """The model family of the checkpoint `source` (stock, or one of ours), from its config; a `ValueError`
    naming the model types the demo takes otherwise."""
    from transformers import PretrainedConfig

    model_type = PretrainedConfig.get_config_dict(source)[0].get("model_type")
    family = family_of_model_type(model_type)
    if family is None:
        known = {**{name: f.stock_label for name, f in FAMILIES.items()},
                 **{classes.model_type: f"{method.label} on {classes.model_family.label}"
                    for method in registry.METHODS.values() for classes in method.families.values()}}
        raise ValueError(
            f"{source} has model_type {model_type!r}; the demo takes "
            + ", ".join(f"{label} ({kind!r})" for kind, label in known.items()) + " checkpoints"
        )
    return family


def _towered(methods) -> tuple:
    """The methods among `methods` that need CLIP's text tower (their checkpoints are built with `--clip`)."""
    return tuple(method for method in methods if method.needs_clip_text_tower)


def save_random_checkpoints(directory, torch_dtype, seed: int, overrides: dict, methods=REDUCTIONS) -> None:
    """Build one small LLaVA with random weights and save it into `directory/<method>` as the checkpoint of each
    method in `methods`, with its processor. It is built as the first registered method that needs CLIP's text
    tower (a random one), so every other checkpoint holds exactly the LLaVA weights of that one."""
    from .tiny import DEMO_SHAPE, build_method_model, build_method_processor

    base = (_towered(registry.METHODS.values()) or tuple(registry.METHODS.values()))[0]
    processor = build_method_processor(base, DEMO_SHAPE)
    model = build_method_model(base, DEMO_SHAPE, processor=processor, seed=seed).to(torch_dtype)
    for name in methods:
        method = registry.get(name)
        own = {field: value for field, value in overrides.items() if field in {o.field for o in method.options}}
        parts = (model, processor) if method is base and not own else (
            twin(model, method.generation_class, **own), _processor_for(method, processor)
        )
        for part in parts:
            part.save_pretrained(Path(directory) / name)


def _processor_for(method, processor):
    """The processor of `method`'s checkpoint on the parts of `processor` (another method's)."""
    if type(processor) is method.processor_class:
        return processor
    if method.side_inputs:
        raise ValueError(f"{method.label} needs its own processor ({method.processor_class.__name__})")
    return llava_processor(processor)


def _load_auto(directory, device: str, torch_dtype, trust_remote_code: bool = False):
    """Load a checkpoint through the Auto classes (the shared loader, which checks the loading report). Without
    `trust_remote_code` the checkpoint's own code never runs: importing this package registered our classes,
    which transformers then uses for our model types."""
    return load_checkpoint(directory, device=device, dtype=torch_dtype, trust_remote_code=trust_remote_code)


def _load_checkpoint(source: str, methods, clip, overrides: dict, device: str, torch_dtype, directory: Path,
                     keep: bool, status, notes: list, trust_remote_code: bool = False) -> dict:
    """The models of `methods` (registry names) on the weights of `source`, each as (model, processor). A method
    that needs CLIP's text tower (TRIM) is loaded, or converted from stock LLaVA with `clip`'s text tower into
    `directory/<name>`; it is then the base the other methods share. Without one, each other method loads from
    `source` directly; with `keep` their checkpoints are written to `directory/<name>`."""
    from transformers import PretrainedConfig

    model_type = PretrainedConfig.get_config_dict(source)[0].get("model_type")
    family = _family_of(source)  # a type the demo knows
    found = registry.find_model_type(model_type)
    source_method = found[0] if found else None
    wanted = [registry.get(name) for name in methods]
    others = "/".join(m.name for m in registry.METHODS.values() if not m.needs_clip_text_tower)
    if source_method is not None and source_method.needs_clip_text_tower and clip:
        raise ValueError(f"{source} is a {source_method.label} checkpoint and carries its CLIP text tower already; "
                         "drop --clip")
    to_convert = [m for m in _towered(wanted) if m is not source_method]
    for method in to_convert:
        if source_method is not None:
            raise ValueError(
                f"{source} is a {source_method.label} checkpoint; {method.label} is built from the stock LLaVA "
                f"checkpoint it came from (--model LLAVA --clip CLIP_SRC), or use --method {others}"
            )
        if not clip:
            raise ValueError(
                f"{method.label} needs the CLIP text tower of {source}'s vision tower, which a stock LLaVA checkpoint "
                f"lacks: pass --clip CLIP_SRC (for LLaVA-1.5: {LLAVA_1_5_CLIP}), or use --method {others}"
            )

    loaded = {}
    for method in to_convert:
        target = directory / method.name
        with _step(status, f"converting {source} to {method.label} with the CLIP text tower of {clip} "
                           f"(`convert {method.name}`) into {target}"):
            result = registry._resolve(method.convert_function)(source, target, clip=clip, progress=False,
                                                                overwrite=True)
        notes += [f"convert {method.name}: {note}" for note in result.notes if not note.startswith("took ")]
        with _step(status, f"loading {target} with AutoModelForImageTextToText"):
            loaded[method.name] = _load_auto(target, device, torch_dtype)
    if source_method is not None and source_method.needs_clip_text_tower:
        # Loaded even when not wanted: it lends the other methods its LLaVA weights.
        with _step(status, f"loading {source} with AutoModelForImageTextToText"):
            loaded[source_method.name] = _load_auto(source, device, torch_dtype, trust_remote_code=trust_remote_code)
    base = next(iter(loaded.values()), None)
    for method in wanted:
        if method.name in loaded:
            continue
        own = {field: value for field, value in overrides.items() if field in {o.field for o in method.options}}
        if base is not None:
            loaded[method.name] = (twin(base[0], method.generation_class, **own), _processor_for(method, base[1]))
        else:
            with _step(status, f"loading {source} as {family.label} with {method.label}"):
                loaded[method.name] = load_checkpoint(source, method, overrides=own, device=device, dtype=torch_dtype,
                                                      trust_remote_code=trust_remote_code)
    for name in [name for name in loaded if name not in methods]:
        del loaded[name]  # a checkpoint that only lent the others its weights
    if keep:
        for method in wanted:
            if method.needs_clip_text_tower:
                continue  # converted into its folder already, or loaded from `source`
            target = directory / method.name
            with _step(status, f"saving the {method.label} checkpoint and processor to {target}"):
                for part in loaded[method.name]:
                    part.save_pretrained(target)
    return {name: loaded[name] for name in methods}


def llava_processor(processor):
    """A stock `LlavaProcessor` with the image processor, tokenizer and settings of `processor` (e.g. the
    LLaVA part of a `LlavaTrimProcessor`), for a VisionZip checkpoint of the same weights."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=processor.image_processor, tokenizer=processor.tokenizer, patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        num_additional_image_tokens=processor.num_additional_image_tokens, chat_template=processor.chat_template,
        image_token=processor.image_token,
    )


@contextlib.contextmanager
def _step(status, text: str):
    status(f"demo: {text} ...")
    start = time.perf_counter()
    yield
    status(f"demo:   done in {time.perf_counter() - start:.1f} s")
