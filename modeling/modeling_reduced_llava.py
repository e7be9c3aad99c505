"""Tool-side helpers around the token-reducing models, and the names this module held before the models were
split into families and methods (kept importable for code that imports them from here).

The model code itself is `family_llava.py` (the LLaVA-1.5 family), `reduced_model.py` (what every family shares)
and `method_<name>_model.py` (each method); none of them imports this module, so checkpoints do not ship it.
"""

import contextlib

import torch
from torch import nn

from .family_llava import (  # noqa: F401 (re-exported)
    ReducedLlavaForConditionalGeneration,
    ReducedLlavaModel,
    register_llava_weight_renames,
)
from .reduced_model import ReducedLlavaModelMixin  # noqa: F401 (re-exported)
from .vision_inputs import as_pixel_batch, run_vision_tower, vision_tokens_of  # noqa: F401 (re-exported)


@contextlib.contextmanager
def capture_outputs_of(modules: dict[str, nn.Module]):
    """Record the forward output of each named module while the block runs; hooks are removed on exit,
    also when the forward raises. Yields the dict that fills up.

    Not for model code: the hooks see every forward of the modules, also other threads' (the benchmark
    uses it on a model it owns); models use `run_vision_tower`."""
    captured: dict[str, torch.Tensor] = {}

    def recorder(name):
        def hook(module, args, output):
            captured[name] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [module.register_forward_hook(recorder(name)) for name, module in modules.items()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


__all__ = [
    "ReducedLlavaForConditionalGeneration", "ReducedLlavaModel", "ReducedLlavaModelMixin", "capture_outputs_of",
    "register_llava_weight_renames",
]
