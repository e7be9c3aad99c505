"""Loading the model to tune: the checkpoint of `--model` through the one loader, with the method's overrides
from the command line, fp32 master weights, and the dtype its tuned weights are saved in."""

from __future__ import annotations

from ..inputs import FLOAT_DTYPES, parse_dtype
from ..methods import METHODS, for_model_type
from .common import TuningError


def _dtype(name):
    """The save dtype: `inputs.parse_dtype` of a name or dtype; float32 when the checkpoint records none."""
    import torch

    try:
        return parse_dtype(name, allowed=(*FLOAT_DTYPES, "float64"))
    except ValueError:
        return torch.float32


def load_for_tuning(args):
    """The checkpoint of `--model` with fp32 master weights, its processor and the save dtype."""
    import torch
    from transformers import AutoConfig

    import llava_token_reduction  # noqa: F401 - registers the model types

    from ..loading import load_checkpoint
    from ..modeling.modeling_reduced_llava import ReducedLlavaForConditionalGeneration

    source_config = AutoConfig.from_pretrained(args.model)
    method = for_model_type(source_config.model_type)
    if method is None:
        types = " or ".join(entry.model_type for entry in METHODS.values())
        raise TuningError(
            f"--model must be a {types} checkpoint, got model type {source_config.model_type!r}; convert it "
            f"first (`llava-token-reduction convert {'|'.join(METHODS)} ...`)"
        )
    for other in METHODS.values():
        for option in other.cli_options():
            if other is not method and getattr(args, option.field, None) is not None:
                raise TuningError(f"{option.flag} applies to {other.label} checkpoints only")
    overrides = method.overrides_from(args)
    save_dtype = _dtype(getattr(source_config, "dtype", None) if args.save_dtype == "auto" else args.save_dtype)
    # fp32 master weights; --mixed-precision decides the compute precision. The loader refuses a checkpoint
    # whose weights did not all load.
    try:
        model, processor = load_checkpoint(args.model, method, overrides=overrides, dtype=torch.float32)
    except ValueError as error:
        raise TuningError(str(error)) from None
    if not isinstance(model, ReducedLlavaForConditionalGeneration):
        raise TuningError(f"{args.model} did not load as a token-reducing LLaVA ({type(model).__name__})")
    return model, processor, save_dtype
