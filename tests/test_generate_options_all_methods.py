"""Generate options over every registered method (`methods_under_test.METHOD_NAMES`, the shared `method_setup`):
beam search and a streamer against stock LLaVA on the reduced prompt, and the static cache against the default
one. Before, these ran on VisionZip only."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from methods_under_test import image_features


NEW_TOKENS = 5
PROMPT = "USER: <image>\nWhat is shown here? ASSISTANT:"


@pytest.fixture(scope="module")
def setup(method_setup):
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((60, 57, 3)) * 255).astype("uint8"))
    inputs = method_setup.processor(images=[image], text=[PROMPT], return_tensors="pt")
    return method_setup.name, method_setup.model, method_setup.processor, method_setup.stock, inputs


def _reference(stock, processor, features, **generate_kwargs):
    """Stock LLaVA on the prompt with exactly k placeholders and the reduced features placed there."""
    pieces = PROMPT.split("<image>")
    ids = processor.tokenizer(pieces[0] + "<image>" * len(features[0]) + pieces[1], return_tensors="pt").input_ids
    encoded = BaseModelOutputWithPooling(pooler_output=features)
    out = stock.generate(input_ids=ids, mm_encoder_outputs={"image": encoded}, max_new_tokens=NEW_TOKENS,
                         do_sample=False, **generate_kwargs)
    return out[0, ids.shape[1]:]


def _new_tokens(model, inputs, **generate_kwargs):
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, **generate_kwargs)
    return out[0, inputs["input_ids"].shape[1]:]


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).clone())

    def end(self):
        self.chunks.append(None)


def test_beam_search_equals_stock_llava_on_the_reduced_prompt(setup):
    name, model, processor, stock, inputs = setup
    features = image_features(model, inputs, name)
    assert len(features[0]) < (inputs["input_ids"] == model.config.image_token_id).sum()  # it did reduce
    expected = _reference(stock, processor, features, num_beams=3)
    assert torch.equal(_new_tokens(model, inputs, num_beams=3), expected)


def test_streamer_gets_one_prompt_chunk_then_the_new_tokens(setup):
    """The first chunk is the prompt the language model sees (k placeholders; `skip_prompt=True` drops it),
    then the new tokens one by one, then the end."""
    name, model, processor, stock, inputs = setup
    streamer = _Collect()
    new = _new_tokens(model, inputs, streamer=streamer)
    features = image_features(model, inputs, name)
    assert torch.equal(new, _reference(stock, processor, features))
    assert streamer.chunks[-1] is None
    placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert len(streamer.chunks[0]) == inputs["input_ids"].shape[1] - placeholders + len(features[0])
    assert torch.equal(torch.cat(streamer.chunks[1:-1]), new)


def test_static_cache_equals_the_default_cache(setup):
    name, model, processor, stock, inputs = setup
    assert torch.equal(_new_tokens(model, inputs, cache_implementation="static"), _new_tokens(model, inputs))
