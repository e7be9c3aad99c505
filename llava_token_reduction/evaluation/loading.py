"""Load a checkpoint for evaluation: a reduced one as it is, a stock one unreduced (the baseline) or reduced
at load time (`method=`), with config fields as load-time overrides, and check what was loaded.

Everything goes through `AutoConfig` / `AutoModelForImageTextToText` / `AutoProcessor`, so any family whose
classes are registered (the installed package, or remote code with `trust_remote_code=True`) needs no code
here; which model types belong to which method, and which stock families there are, comes from the method
registry (`llava_token_reduction.methods`).
"""

from dataclasses import dataclass

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import llava_token_reduction  # noqa: F401 - registers our model types with the Auto classes
from llava_token_reduction.methods import (
    METHODS,
    ReductionMethod,
    for_reduced_model_type,
    stock_model_types,
)
from llava_token_reduction.methods import get as get_method
from llava_token_reduction.modeling.checkpoint_source import accepted_type_mismatch


DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: object
    method: ReductionMethod | None  # None: a stock model, evaluated unreduced


def coerce_override(name: str, value, current):
    """`--model_args` values arrive as bool/int/float/str; turn them into what the config field holds."""
    if isinstance(value, str) and value.lower() == "none":
        return None
    if isinstance(current, bool) or isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer() and (current is None or isinstance(current, int)):
        return int(value)  # lmms-eval parses "-2" as -2.0
    return value


def checkpoint_config(pretrained: str, revision: str | None = None, trust_remote_code: bool = False):
    return AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)


def load_for_evaluation(
    pretrained: str,
    *,
    method: str | None = None,
    expected_method: str | None = None,
    overrides: dict | None = None,
    dtype="auto",
    device_map=None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load model and processor from `pretrained` (a directory or hub id).

    Args:
        method: reduce a stock checkpoint at load time with this method (`"visionzip"`); a reduced checkpoint
            of another method is refused.
        expected_method: the method the caller was asked for by name (`--model llava_trim`): anything else
            loaded, a stock checkpoint included, is refused.
        overrides: config fields to set at load time (`dominant_tokens=108`); unknown names are refused.
    """
    overrides = dict(overrides or {})
    config = checkpoint_config(pretrained, revision, trust_remote_code)
    loaded = for_reduced_model_type(config.model_type)
    wanted = get_method(method) if method is not None else None
    if loaded is None and config.model_type not in stock_model_types():
        raise ValueError(
            f"{pretrained} is a {config.model_type!r} checkpoint; this evaluates stock "
            f"{', '.join(stock_model_types())} checkpoints and reduced ones of {', '.join(METHODS)}"
        )
    if wanted is not None and loaded is not None and loaded.name != wanted.name:
        raise ValueError(f"{pretrained} is a {loaded.name} checkpoint ({config.model_type!r}); it cannot be evaluated "
                         f"with method={wanted.name}")
    final = loaded or wanted
    if expected_method is not None and (final is None or final.name != expected_method):
        what = f"a stock {config.model_type!r} checkpoint" if loaded is None else f"a {loaded.name} checkpoint"
        if loaded is None:
            hint = (f"pass method={expected_method} to reduce it at load time, or use --model llava_token_reduction "
                    "for the unreduced baseline")
        else:
            hint = f"use --model llava_{loaded.name} or llava_token_reduction"
        raise ValueError(f"--model llava_{expected_method} was asked for, but {pretrained} is {what}: {hint}")

    load_kwargs = dict(revision=revision, trust_remote_code=trust_remote_code, dtype=DTYPES.get(dtype, dtype))
    if device_map:
        load_kwargs["device_map"] = device_map
    if attn_implementation:
        load_kwargs["attn_implementation"] = attn_implementation
    if loaded is None and wanted is not None:
        reduced_type = stock_to_reduced(wanted, config.model_type)
        if reduced_type not in CONFIG_MAPPING:
            raise ValueError(f"the {reduced_type!r} classes are not available in this installation of "
                             "llava-token-reduction")
        config_class = CONFIG_MAPPING[reduced_type]
        # Loading the stock config into ours is the accepted case: drop transformers' type-mismatch warning for it.
        with accepted_type_mismatch(config.model_type, reduced_type):
            base = config_class.from_pretrained(pretrained, revision=revision)
            overrides = _checked_overrides(base, overrides, pretrained)
            config = config_class.from_pretrained(pretrained, revision=revision, **overrides)
        model = AutoModelForImageTextToText.from_pretrained(pretrained, config=config, **load_kwargs)
    else:
        overrides = _checked_overrides(config, overrides, pretrained)
        model = AutoModelForImageTextToText.from_pretrained(pretrained, **load_kwargs, **overrides)
    # Checked on the class's model type, whatever the instance's config says.
    if for_reduced_model_type(model_type_of(model)) is not final:
        raise ValueError(f"loading {pretrained} gave a {model_type_of(model)!r} model, not the expected one")
    model.eval()
    processor = AutoProcessor.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
    _check_processor_feeds_model(processor, model, pretrained, final)
    return LoadedModel(model=model, processor=processor, method=final)


def stock_to_reduced(method: ReductionMethod, stock_model_type: str) -> str:
    """The reduced model type that loads a stock `stock_model_type` checkpoint as `method`.

    Raises `ValueError` saying what is possible instead when it cannot be done at load time: the method's
    model class says why stock checkpoints do not fit it (TRIM: no CLIP text tower, convert first)."""
    refusal = method.model_class.stock_checkpoint_refusal
    if refusal:
        raise ValueError(f"a stock {stock_model_type!r} checkpoint cannot be loaded as {method.name} at load time: "
                         f"{refusal}")
    if stock_model_type not in method.reduced_model_types:
        raise ValueError(
            f"{method.name} has no model class for {stock_model_type!r} checkpoints; it supports "
            f"{', '.join(sorted(method.reduced_model_types))}"
        )
    return method.reduced_model_types[stock_model_type]


def model_type_of(model) -> str:
    return type(model.config).model_type


def _checked_overrides(config, overrides: dict, pretrained: str) -> dict:
    unknown = [name for name in overrides if not hasattr(config, name)]
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)}: not a field of the {config.model_type!r} config of {pretrained} "
            "(config fields are load-time overrides, e.g. dominant_tokens=108)"
        )
    return {name: coerce_override(name, value, getattr(config, name)) for name, value in overrides.items()}


def _check_processor_feeds_model(processor, model, pretrained: str, method: ReductionMethod | None) -> None:
    """A reduction that needs per-image side inputs (TRIM's CLIP question) must get them from the processor."""
    needed = tuple(getattr(model, "image_side_input_names", ()))
    if not needed:
        return
    image_token = getattr(processor, "image_token", "<image>")
    probe = processor(images=[Image.new("RGB", (32, 32))], text=[image_token], return_tensors="pt")
    missing = [name for name in needed if name not in probe]
    if missing:
        hint = f" (`llava-token-reduction convert {method.name}` writes it)" if method is not None else ""
        raise ValueError(
            f"the {model_type_of(model)!r} model needs {', '.join(missing)} from its processor, but the processor "
            f"loaded from {pretrained} ({type(processor).__name__}) does not produce them: save the method's processor "
            f"with the checkpoint and load it with trust_remote_code=True or with llava-token-reduction installed{hint}"
        )
