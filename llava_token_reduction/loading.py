"""The one way the tools (demo, show, tune; bench later) load a checkpoint for a method: through the method's
class (or the Auto classes), with the loading report checked, so a tool never measures, draws or trains a
model whose weights were silently random-initialised."""

from __future__ import annotations


def check_loading_info(source, info: dict, allow_unexpected: bool = False) -> None:
    """Refuse a model whose weights did not all load (they would be random). Unexpected weights are refused
    too, unless `allow_unexpected` (a checkpoint of another method, whose extra modules this one ignores)."""
    missing, unexpected = list(info.get("missing_keys", ())), list(info.get("unexpected_keys", ()))
    if allow_unexpected:
        unexpected = []
    if missing or unexpected:
        raise ValueError(
            f"{source} did not load cleanly: {len(missing)} missing weights (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def load_checkpoint(source, method=None, *, overrides: dict | None = None, device=None, dtype=None,
                    trust_remote_code: bool = False, with_processor: bool = True):
    """`(model, processor)` of the checkpoint `source` (a directory or hub id).

    With `method` (a `methods.ReductionMethod`), the model is its class in the checkpoint's model family (LLaVA-1.5
    or LLaVA-NeXT, from the config's model type; a `ValueError` when the method has none there) with the load-time
    `overrides`: a stock checkpoint, or another method's (its extra weights are then ignored), loads as that
    method. Without, the Auto classes pick the class from the config; `trust_remote_code=False` means the
    checkpoint's own code never runs (importing this package registered our classes). The loading report is
    checked (`check_loading_info`); `processor` is None when `with_processor` is false."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    overrides = dict(overrides or {})
    options = {"dtype": dtype, "device_map": device, "output_loading_info": True}
    options = {name: value for name, value in options.items() if value is not None}
    if method is None:
        model, info = AutoModelForImageTextToText.from_pretrained(
            source, trust_remote_code=trust_remote_code, **options, **overrides
        )
        check_loading_info(source, info)
    else:
        from .families import FAMILIES, family_of_model_type

        model_type = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).model_type
        family = family_of_model_type(model_type) or FAMILIES["llava"]  # unknown types: the class says what it takes
        classes = method.classes(family.name)
        # The class loads a stock checkpoint of its family without transformers' model-type warning (the documented
        # use).
        model, info = classes.generation_class.from_pretrained(source, **options, **overrides)
        check_loading_info(source, info, allow_unexpected=model_type not in (family.name, classes.model_type))
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code) if with_processor else None
    return model, processor


__all__ = ["check_loading_info", "load_checkpoint"]
