"""LLaVA-NeXT model-side counts: each image's stock placeholder count and crop count from `image_sizes` and the
config, checked against the stock `LlavaNextProcessor` loaded from files shaped like
llava-hf/llava-v1.6-vicuna-7b-hf's."""

import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import LlavaNextConfig, LlavaNextProcessor

from llava_next_published import save_published_files
from llava_token_reduction.modeling.family_llava_next import (
    image_layouts,
    image_placeholder_counts,
    image_size_pairs,
    reduced_token_counts,
)


# (height, width) -> stock placeholders (TRANSFORMERS.md §13) and grid (rows, cols).
KNOWN = {(672, 672): (2928, (2, 2)), (480, 640): (2340, (2, 2)), (336, 672): (1752, (1, 2)),
         (300, 1000): (2182, (1, 3)), (10, 1000): (576, (1, 3))}


@pytest.fixture(scope="module")
def published_dir(tmp_path_factory):
    return save_published_files(tmp_path_factory.mktemp("llava-v1.6-vicuna-7b-hf"))


@pytest.fixture(scope="module")
def published_processor(published_dir):
    return LlavaNextProcessor.from_pretrained(published_dir)


@pytest.fixture(scope="module")
def published_config(published_dir):
    return LlavaNextConfig.from_pretrained(published_dir)


def processor_counts(processor, size):
    """The stock processor's placeholder count and crop count for one image of `size` (height, width)."""
    height, width = size
    inputs = processor(images=Image.new("RGB", (width, height), (120, 60, 30)), text="<image>", return_tensors="pt")
    placeholders = int((inputs["input_ids"] == processor.image_token_id).sum())
    return placeholders, inputs["pixel_values"].shape[1], inputs["image_sizes"]


@pytest.mark.parametrize("size", list(KNOWN))
def test_known_counts_match_the_processor(published_processor, published_config, size):
    expected, grid = KNOWN[size]
    placeholders, crops, image_sizes = processor_counts(published_processor, size)
    (layout,) = image_layouts(image_sizes, published_config)
    assert placeholders == expected == layout.placeholders
    assert layout.grid == grid and layout.crops == crops == 1 + grid[0] * grid[1]


def test_random_sizes_match_the_processor(published_processor, published_config):
    rng = random.Random(13)
    # Small (both sides <= 336: transformers' tie-break), thin, and large images.
    sizes = [(rng.randint(1, 336), rng.randint(1, 336)) for _ in range(6)]
    sizes += [(rng.randint(1, 40), rng.randint(300, 1400)) for _ in range(4)]
    sizes += [(rng.randint(300, 1400), rng.randint(1, 40)) for _ in range(4)]
    sizes += [(rng.randint(1, 1400), rng.randint(1, 1400)) for _ in range(20)]
    observed = [processor_counts(published_processor, size)[:2] for size in sizes]
    layouts = image_layouts(torch.tensor(sizes), published_config)
    assert [(layout.placeholders, layout.crops) for layout in layouts] == observed
    assert image_placeholder_counts(torch.tensor(sizes), published_config) == [count for count, _ in observed]
    assert len({layout.grid for layout in layouts}) == 5  # every published grid was exercised


def test_a_batch_of_sizes_matches_the_processor_batch(published_processor, published_config):
    sizes = [(672, 672), (10, 1000), (500, 300)]
    images = [Image.new("RGB", (width, height)) for height, width in sizes]
    inputs = published_processor(images=images, text=["<image>", "<image> and <image>"], return_tensors="pt",
                                 padding=True)
    per_row = (inputs["input_ids"] == published_processor.image_token_id).sum(dim=1).tolist()
    counts = image_placeholder_counts(inputs["image_sizes"], published_config)
    assert per_row == [counts[0], counts[1] + counts[2]]


def test_full_strategy_keeps_the_base_crop_cls(published_config):
    full = LlavaNextConfig(**{**published_config.to_dict(), "vision_feature_select_strategy": "full"})
    assert image_placeholder_counts([[672, 672]], full) == [2929]


def test_image_sizes_are_read_as_python_ints():
    assert image_size_pairs(torch.tensor([[480, 640]])) == [(480, 640)]
    assert all(type(side) is int for side in image_size_pairs(torch.tensor([[480, 640]]))[0])
    with pytest.raises(ValueError, match="row 0"):
        image_size_pairs([[480, 0]])
    with pytest.raises(ValueError, match="row 1"):
        image_size_pairs([[480, 640], [3, 4, 5]])
    with pytest.raises(TypeError, match="image_sizes"):
        image_size_pairs(480)


def test_budget_table_in_the_docs(published_config):
    """docs/llava_next.md's per-grid totals are what the per-crop budgets give."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "llava_next.md").read_text()
    rows = re.findall(r"^\| (\d)x(\d) \| (\d) \| (\d+) \| (\d+) \| (\d+) \|", text, flags=re.MULTILINE)
    assert {(int(r), int(c)) for r, c, *_ in rows} == {(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)}
    for rows_, cols, crops, *totals in rows:
        grid = (int(rows_), int(cols))
        assert int(crops) == 1 + grid[0] * grid[1]
        for per_crop, total in zip((128, 64, 32), totals):
            assert int(total) == int(crops) * per_crop
    layouts = image_layouts([[672, 672], [336, 672], [300, 1000]], published_config)
    assert reduced_token_counts(layouts, 64) == [320, 192, 256]
