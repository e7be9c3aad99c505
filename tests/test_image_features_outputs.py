"""`get_image_features` honours `output_hidden_states`, `output_attentions` and `return_dict` as stock
`LlavaModel.get_image_features` does, for every method (`methods_under_test.METHOD_NAMES`). The reference is stock
LLaVA with the same weights."""

import pytest
import torch
from PIL import Image
from transformers import LlavaModel

from llava_token_reduction.methods import METHODS
from llava_token_reduction.tiny import TEST_SHAPE
from methods_under_test import METHOD_NAMES, build_method


def _models(method, attention="sdpa"):
    ours, processor, twin = build_method(method, spread=False)
    prompts = ["USER: <image>\na cat ASSISTANT:", "USER: <image>\nwhat is it ASSISTANT:"]
    encoded = processor(images=[Image.new("RGB", (56, 56))] * 2, text=prompts, padding=True, return_tensors="pt")
    extra = {key: encoded[key] for key in METHODS[method].side_inputs}  # TRIM's CLIP question rows
    stock = LlavaModel(twin.config).eval()
    stock.load_state_dict(twin.model.state_dict())
    for model in (ours.model, stock):
        model.vision_tower.set_attn_implementation(attention)
    return ours.model, stock, extra


def _pixels():
    return torch.randn(2, 3, TEST_SHAPE.image_size, TEST_SHAPE.image_size, generator=torch.Generator().manual_seed(1))


def _ours_stock_and_plain(method, attention="sdpa", **kwargs):
    """`get_image_features(**kwargs)` of our model and of stock LLaVA with the same weights, and ours without them."""
    ours, stock, extra = _models(method, attention)
    with torch.no_grad():
        return (ours.get_image_features(pixel_values=_pixels(), **kwargs, **extra),
                stock.get_image_features(pixel_values=_pixels(), **kwargs),
                ours.get_image_features(pixel_values=_pixels(), **extra))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_output_hidden_states_are_the_towers_as_stock(method):
    got, expected, plain = _ours_stock_and_plain(method, output_hidden_states=True)
    assert len(got.hidden_states) == TEST_SHAPE.vision_layers + 1 == len(expected.hidden_states)
    for mine, theirs in zip(got.hidden_states, expected.hidden_states):
        assert torch.equal(mine, theirs)
    assert plain.hidden_states is None and plain.attentions is None
    for a, b in zip(got.pooler_output, plain.pooler_output):  # asking for more changes nothing else
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_output_attentions_as_stock_under_the_same_attention(method, attention):
    got, expected, _ = _ours_stock_and_plain(method, attention, output_attentions=True)
    assert len(got.attentions) == len(expected.attentions)
    if attention == "eager":
        assert len(got.attentions) == TEST_SHAPE.vision_layers
        for mine, theirs in zip(got.attentions, expected.attentions):
            assert torch.equal(mine, theirs)
    else:
        assert got.attentions == ()  # sdpa computes no weights, stock returns none either


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_return_dict_false_gives_a_tuple(method):
    as_tuple, stock_tuple, as_dict = _ours_stock_and_plain(method, return_dict=False)
    assert isinstance(as_tuple, tuple) and isinstance(stock_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.last_hidden_state)
    assert len(as_tuple[1]) == 2 and all(torch.equal(a, b) for a, b in zip(as_tuple[1], as_dict.pooler_output))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_config_return_dict_false_is_honoured(method):
    ours, stock, extra = _models(method)
    ours.config.return_dict = stock.config.return_dict = False
    with torch.no_grad():
        got = ours.get_image_features(pixel_values=_pixels(), **extra)
        expected = stock.get_image_features(pixel_values=_pixels())
        explicit = ours.get_image_features(pixel_values=_pixels(), return_dict=True, **extra)
    assert isinstance(got, tuple) and isinstance(expected, tuple)
    assert all(torch.equal(a, b) for a, b in zip(got[1], explicit.pooler_output))
