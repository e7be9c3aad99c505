"""The tiny LLaVA-NeXT builders: a stock processor and model that run end to end offline, whose placeholder
counts the model-side functions predict, for the NeXT model tests."""

import torch
from PIL import Image
from transformers import LlavaNextProcessor

from llava_token_reduction.configuration.configuration_llava_next_visionzip import LlavaNextVisionZipConfig
from llava_token_reduction.modeling.family_llava_next import image_layouts
from llava_token_reduction.tiny import TEST_SHAPE
from llava_token_reduction.tiny_next import build_next_processor, llava_next_config_kwargs, stock_next_model


# (height, width): 2x2, 1x3, 1x2, 2x1 grids at the tiny 56-px crop size.
SIZES = [(120, 120), (30, 200), (56, 100), (100, 40)]


def test_stock_tiny_next_generates_on_mixed_grids(tmp_path):
    processor = build_next_processor()
    processor.save_pretrained(tmp_path)
    processor = LlavaNextProcessor.from_pretrained(tmp_path)  # as users load it
    model = stock_next_model()
    images = [Image.new("RGB", (width, height), (9 * i, 50, 200)) for i, (height, width) in enumerate(SIZES)]
    prompts = ["USER: <image>\nWhat? ASSISTANT:", "USER: <image><image>\nAnd? ASSISTANT:",
               "USER: <image>\nHm ASSISTANT:"]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    layouts = image_layouts(inputs["image_sizes"], model.config)
    assert [layout.grid for layout in layouts] == [(2, 2), (1, 3), (1, 2), (2, 1)]
    assert inputs["pixel_values"].shape[:2] == (4, 5)
    per_row = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    counts = [layout.placeholders for layout in layouts]
    assert per_row == [counts[0], counts[1] + counts[2], counts[3]]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape == (3, inputs["input_ids"].shape[1] + 2)


def test_tiny_next_config_takes_a_per_crop_budget():
    config = LlavaNextVisionZipConfig(**llava_next_config_kwargs(), dominant_tokens=10, contextual_tokens=4)
    assert config.vision_config.image_size == TEST_SHAPE.image_size
    assert config.image_grid_pinpoints == [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
    assert config.tokens_per_crop == 14
