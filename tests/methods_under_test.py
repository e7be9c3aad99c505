"""The one list of methods the shared behaviour tests run over, and the one way they build a model of each:
a method added to the registry joins every test that parametrizes over `METHOD_NAMES` by one line in
`METHOD_FIELDS` (and its independent reference in `METHOD_REFERENCES`)."""

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

import prumerge_reference
import trim_reference
import visionzip_reference
from llava_token_reduction.methods import METHODS
from llava_token_reduction.tiny import TEST_SHAPE, build_method_model, build_method_processor


# One line per method: its name and the config fields the shared tests build it with (a budget that reduces
# the tiny shape's 64 patches). `test_the_method_list_covers_the_registry` keeps it complete.
METHOD_FIELDS = {
    "visionzip": {"dominant_tokens": 8, "contextual_tokens": 4},
    "trim": {},
    "prumerge": {"prumerge_plus": True, "prumerge_max_tokens": 6},
}
METHOD_NAMES = tuple(METHOD_FIELDS)
# Per method, `(model, processor inputs) -> projected features per image`, written from ALGORITHMS.md in the
# method's `*_reference.py`, never from the code under test.
METHOD_REFERENCES = {
    "visionzip": visionzip_reference.reference_features,
    "trim": lambda model, inputs: trim_reference.reference_features(model, inputs)[0],
    "prumerge": prumerge_reference.reference_features,
}


def spread_weights(module: torch.nn.Module, seed: int = 1, qk_gain: float = 2.5) -> torch.nn.Module:
    """Redraw every parameter of `module` in place (seeded) so that its activations stay near unit scale
    while CLS attention is peaked.

    Default initialisation makes CLS attention almost uniform: score gaps are ~1e-7, so any two correct
    implementations may pick different tokens. Here weights get std `1/sqrt(fan_in)` (`qk_gain` times that
    for `q_proj`/`k_proj`, which sharpens attention), biases and embeddings small random values, and layer
    norms stay near identity; score gaps at the selection boundaries become ~1e-3 or larger."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            if "layer_norm" in name or "layrnorm" in name:
                value = (1.0 if name.endswith("weight") else 0.0) + 0.1 * noise
            elif "position_embedding" in name or "class_embedding" in name:
                value = 0.5 * noise
            elif parameter.ndim >= 2:  # linear and patch-convolution weights
                gain = qk_gain if ("q_proj" in name or "k_proj" in name) else 1.0
                value = noise * gain / parameter[0].numel() ** 0.5
            else:  # biases
                value = 0.1 * noise
            parameter.copy_(value.to(parameter.dtype))
    return module


# The inner model's modules the language model and projector do not own: the vision tower and whatever a method
# scores with (TRIM's CLIP text tower and `visual_projection`).
_LLAVA_OWN = ("language_model", "multi_modal_projector")


def method_model(name: str, seed: int = 0, spread: bool = True, processor=None, shape=TEST_SHAPE, **fields):
    """A random-weight model of method `name` (`tiny.build_method_model`, eval mode), its config's values
    `fields` as given (no `METHOD_FIELDS` defaults: a method's own tests set what they test). `spread=True`
    redraws the vision tower and every scoring module the method adds with `spread_weights(seed + 1)`, so
    selections have clear margins."""
    model = build_method_model(name, shape, processor=processor, seed=seed, **fields)
    if spread:
        for child_name, child in model.model.named_children():
            if child_name not in _LLAVA_OWN:
                spread_weights(child, seed=seed + 1)
    return model


def stock_twin(model) -> LlavaForConditionalGeneration:
    """A stock `LlavaForConditionalGeneration` holding `model`'s LLaVA weights (the reference of "== stock LLaVA
    on the reduced prompt"); the method's own modules are left out."""
    stock_config = LlavaConfig(**{k: v for k, v in model.config.to_dict().items()
                                  if k in LlavaConfig().to_dict() and k not in ("model_type", "architectures")})
    stock = LlavaForConditionalGeneration(stock_config).eval()
    missing, _ = stock.load_state_dict(model.state_dict(), strict=False)
    assert not missing, missing
    stock.generation_config.suppress_tokens = list(model.generation_config.suppress_tokens or [])
    return stock


def build_method(name: str, seed: int = 0, spread: bool = True, **fields):
    """`(model, processor, stock twin)` of method `name` on the tiny test shape: a random-weight model (its
    config's values: `METHOD_FIELDS[name]`, then `fields`; weights as `method_model`'s), its processor, and
    `stock_twin(model)`. Both models never generate the image token (a random LM would, now and then)."""
    processor = build_method_processor(name)
    model = method_model(name, seed=seed, spread=spread, processor=processor, **{**METHOD_FIELDS[name], **fields})
    model.generation_config.suppress_tokens = [model.config.image_token_id]
    return model, processor, stock_twin(model)


def image_features(model, inputs, name: str):
    """The reduced features of every image in `inputs`, from the method's `get_image_features`."""
    side = {key: inputs[key] for key in METHODS[name].side_inputs}
    with torch.inference_mode():
        return list(model.model.get_image_features(pixel_values=inputs["pixel_values"], **side).pooler_output)
