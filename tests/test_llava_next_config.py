"""`LlavaNextVisionZipConfig` (per-crop budget, validation as LLaVA-1.5's VisionZip config) and the per-image
budget check that runs before the vision tower."""

import json

import pytest
from transformers import LlavaNextConfig

from llava_next_published import save_published_files
from llava_token_reduction.configuration.configuration_llava_next_visionzip import LlavaNextVisionZipConfig
from llava_token_reduction.modeling.family_llava_next import check_budget_fits, image_layouts, reduced_token_counts
from llava_token_reduction.tiny import TEST_SHAPE
from llava_token_reduction.tiny_next import PUBLISHED_PINPOINTS, llava_next_config_kwargs


def tiny_config(**kwargs):
    return LlavaNextVisionZipConfig(**{**llava_next_config_kwargs(), **kwargs})


def test_defaults_are_the_published_setting():
    config = LlavaNextVisionZipConfig()
    assert isinstance(config, LlavaNextConfig)
    assert config.model_type == "llava_next_visionzip"
    assert (config.dominant_tokens, config.contextual_tokens, config.visionzip_layer) == (54, 10, -2)
    assert config.tokens_per_crop == 64
    assert config.image_grid_pinpoints == PUBLISHED_PINPOINTS
    assert not hasattr(config, "tokens_per_image")  # the count depends on each image


def test_save_and_load_round_trip(tmp_path):
    tiny_config(dominant_tokens=6, contextual_tokens=2).save_pretrained(tmp_path)
    loaded = LlavaNextVisionZipConfig.from_pretrained(tmp_path)
    assert (loaded.dominant_tokens, loaded.contextual_tokens) == (6, 2)
    assert loaded.image_grid_pinpoints == llava_next_config_kwargs()["image_grid_pinpoints"]
    with pytest.raises(ValueError, match="contextual_tokens"):
        LlavaNextVisionZipConfig.from_pretrained(tmp_path, contextual_tokens=-1)  # load-time override


def test_the_published_config_takes_the_budget_at_load_time(tmp_path):
    (tmp_path / "stock").mkdir()
    source = save_published_files(tmp_path / "stock", with_tokenizer=False)
    config = LlavaNextVisionZipConfig.from_pretrained(source, dominant_tokens=27, contextual_tokens=5)
    assert config.tokens_per_crop == 32 and config.image_grid_pinpoints == PUBLISHED_PINPOINTS
    assert config.vision_config.image_size == 336 and config.vision_config.patch_size == 14
    config.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert (saved["model_type"], saved["dominant_tokens"], saved["contextual_tokens"]) == (
        "llava_next_visionzip", 27, 5
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dominant_tokens": 0}, "`dominant_tokens` must be >= 1"),
        ({"dominant_tokens": True}, "`dominant_tokens` must be an int"),
        ({"contextual_tokens": -1}, "`contextual_tokens` must be >= 0"),
        ({"dominant_tokens": TEST_SHAPE.patches + 2}, r"`dominant_tokens` must be <= 65"),
        ({"dominant_tokens": 60, "contextual_tokens": 6}, r"`contextual_tokens` must be <= 5"),
        ({"visionzip_layer": 3}, "`visionzip_layer` must index one of the vision tower's 3 layers"),
        ({"vision_feature_layer": [-2, -1]}, "`vision_feature_layer` must be one int"),
        ({"image_grid_pinpoints": [[56, 100]]}, "multiples of the vision tower's image_size=56"),
        ({"image_grid_pinpoints": [[56]]}, r"\[height, width\] pairs"),
        ({"image_grid_pinpoints": [[0, 56]]}, "`image_grid_pinpoints` must be >= 56"),
    ],
)
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def test_fields_are_checked_when_set():
    config = tiny_config()
    with pytest.raises(ValueError, match="dominant_tokens"):
        config.dominant_tokens = 0
    config.contextual_tokens = 65 - config.dominant_tokens  # fits one crop's 65 tokens
    config.validate_token_reduction()
    config.contextual_tokens += 1
    with pytest.raises(ValueError, match="contextual_tokens"):
        config.validate_token_reduction()


def test_a_budget_that_does_not_fit_an_image_names_it():
    """10x1000 px has a 1x3 grid (4 crops) but only 576 placeholders (the published config)."""
    config = LlavaNextVisionZipConfig(dominant_tokens=120, contextual_tokens=25)
    layouts = image_layouts([[672, 672], [10, 1000]], config)
    assert [layout.placeholders for layout in layouts] == [2928, 576]
    assert reduced_token_counts(layouts, config.tokens_per_crop) == [725, 580]
    with pytest.raises(ValueError) as error:
        check_budget_fits(layouts, config.tokens_per_crop, "dominant_tokens + contextual_tokens")
    message = str(error.value)
    for part in ("image 1 ", "10x1000", "576 image tokens", "580", "= 145 per crop", "fits this image is 144"):
        assert part in message
    check_budget_fits(layouts, 144, "dominant_tokens + contextual_tokens")  # exactly 576: fits


def test_published_budgets_fit_every_published_grid():
    config = LlavaNextVisionZipConfig()
    sizes = [[672, 672], [480, 640], [336, 672], [300, 1000], [10, 1000], [1000, 10], [1, 49], [50, 50]]
    for per_crop in (128, 64, 32):
        check_budget_fits(image_layouts(sizes, config), per_crop, "budget")
    with pytest.raises(ValueError, match="image 4 "):
        check_budget_fits(image_layouts(sizes, config), 162 + 30, "budget")
