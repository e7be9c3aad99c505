"""Inputs a user can get wrong are refused with an error that names the problem and what is allowed, before
the vision tower or the CLIP text tower runs: images of another size than the model's, a single `[C, H, W]`
image, empty / all-padding / out-of-vocabulary / float CLIP ids."""

import pytest
import torch
from PIL import Image

from llava_token_reduction.methods import METHODS
from llava_token_reduction.tiny import (
    TEST_SHAPE,
    build_clip_tokenizer,
    build_method_model,
    build_processor,
)
from methods_under_test import METHOD_FIELDS, METHOD_NAMES


SIZE = TEST_SHAPE.image_size


@pytest.fixture(scope="module")
def models():
    return {name: build_method_model(name, seed=0, **METHOD_FIELDS[name]) for name in METHOD_NAMES}


def _clip(batch):
    encoded = build_clip_tokenizer()(["what is it"] * batch, padding="max_length", max_length=77, return_tensors="pt")
    return {"clip_input_ids": encoded["input_ids"], "clip_attention_mask": encoded["attention_mask"]}


def _side_inputs(method, batch):
    """The per-image inputs `method` needs besides the pixels (TRIM's CLIP question rows)."""
    return {key: value for key, value in _clip(batch).items() if key in METHODS[method].side_inputs}


class _NoCompute:
    """Fails the test if any tower runs inside the block."""

    def __init__(self, model):
        self.towers = [model.model.vision_tower] + ([model.model.clip_text_model]
                                                     if hasattr(model.model, "clip_text_model") else [])

    def __enter__(self):
        self.calls = []
        self.handles = [t.register_forward_pre_hook(lambda *a: self.calls.append("tower")) for t in self.towers]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        assert self.calls == [], "a tower ran before the error"


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("size", [2 * SIZE, SIZE - TEST_SHAPE.patch_size])
def test_images_of_another_size_name_the_size_the_model_needs(models, method, size):
    model = models[method]
    extra = _side_inputs(method, 1)
    with _NoCompute(model), pytest.raises(ValueError, match=rf"must be {SIZE}x{SIZE} pixels.*got {size}x{size}"):
        model.model.get_image_features(pixel_values=torch.zeros(1, 3, size, size), **extra)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_a_single_image_without_batch_dimension_is_named_as_such(models, method):
    model = models[method]
    extra = _side_inputs(method, 1)
    prompt = build_processor()(images=Image.new("RGB", (64, 64)), text="USER: <image>\nhi ASSISTANT:",
                               return_tensors="pt")
    pixel_values = prompt.pop("pixel_values")[0]  # [3, H, W]
    for call in (lambda: model.model.get_image_features(pixel_values=pixel_values, **extra),
                 lambda: model.generate(**prompt, pixel_values=pixel_values, max_new_tokens=1, **extra),
                 lambda: model(**prompt, pixel_values=pixel_values, **extra)):
        message = r"\(3, 56, 56\).*one image without the batch dimension"
        with _NoCompute(model), pytest.raises(ValueError, match=message):
            call()


_IDS = _clip(2)


@pytest.mark.parametrize("inputs, error, message", [
    pytest.param({"clip_input_ids": _IDS["clip_input_ids"],
                  "clip_attention_mask": torch.zeros(2, 77, dtype=torch.long)},
                 ValueError, r"`clip_attention_mask` rows \[0, 1\] attend no token", id="all-zero-mask"),
    pytest.param({"clip_input_ids": _IDS["clip_input_ids"],
                  "clip_attention_mask": torch.cat([_IDS["clip_attention_mask"][:1],
                                                     torch.zeros(1, 77, dtype=torch.long)])},
                 ValueError, r"rows \[1\] attend no token", id="one-zero-row"),
    pytest.param({"clip_input_ids": torch.zeros(2, 0, dtype=torch.long), "clip_attention_mask": torch.zeros(2, 0)},
                 ValueError, r"`clip_input_ids` rows are empty.*BOS and EOS", id="empty"),
    pytest.param({"clip_input_ids": _IDS["clip_input_ids"] + 10_000}, ValueError,
                 r"CLIP token ids in \[0, 513\].*got values from", id="out-of-vocabulary"),
    pytest.param({"clip_input_ids": -_IDS["clip_input_ids"]}, ValueError, r"CLIP token ids in \[0, 513\]",
                 id="negative"),
    pytest.param({"clip_input_ids": _IDS["clip_input_ids"].float()}, TypeError, r"integer token ids.*torch.float32",
                 id="float"),
])
def test_bad_clip_inputs_are_refused_before_compute(models, inputs, error, message):
    model = models["trim"]
    with _NoCompute(model), pytest.raises(error, match=message):
        model.model.get_image_features(pixel_values=torch.zeros(2, 3, SIZE, SIZE), **inputs)
