"""The one list of methods the shared behaviour tests run over, and the one way they build a model of each:
a method added to the registry joins every test that parametrizes over `METHOD_NAMES`."""

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from llava_token_reduction.methods import METHODS
from llava_token_reduction.tiny import build_method_model, build_method_processor

# One line per method: its name and the config fields the shared tests build it with (a budget that reduces
# the tiny shape's 64 patches). `test_the_method_list_covers_the_registry` keeps it complete.
METHOD_FIELDS = {
    "visionzip": {"dominant_tokens": 8, "contextual_tokens": 4},
    "trim": {},
    "prumerge": {"prumerge_plus": True},
}
METHOD_NAMES = tuple(METHOD_FIELDS)


def build_method(name: str, seed: int = 0, **fields):
    """`(model, processor, stock twin)` of method `name` on the tiny test shape: a random-weight model (its
    config's values: `METHOD_FIELDS[name]`, then `fields`), its processor, and a stock `LlavaForConditionalGeneration` holding
    the same LLaVA weights (the reference of "== stock LLaVA on the reduced prompt")."""
    processor = build_method_processor(name)
    model = build_method_model(name, processor=processor, seed=seed, **{**METHOD_FIELDS[name], **fields})
    stock_config = LlavaConfig(**{k: v for k, v in model.config.to_dict().items()
                                  if k in LlavaConfig().to_dict() and k not in ("model_type", "architectures")})
    stock = LlavaForConditionalGeneration(stock_config).eval()
    missing, _ = stock.load_state_dict(model.state_dict(), strict=False)
    assert not missing, missing
    image_token = model.config.image_token_id
    for each in (model, stock):
        each.generation_config.suppress_tokens = [image_token]
    return model, processor, stock


def image_features(model, inputs, name: str):
    """The reduced features of every image in `inputs`, from the method's `get_image_features`."""
    side = {key: inputs[key] for key in METHODS[name].side_inputs}
    with torch.inference_mode():
        return list(model.model.get_image_features(pixel_values=inputs["pixel_values"], **side).pooler_output)
