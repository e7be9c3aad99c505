"""`LlavaVisionZipConfig`: defaults, round trips, and a `ValueError` naming field, value and allowed range
for every invalid value, whether given at construction, set afterwards, or applied as a load-time override."""

import json

import pytest
from transformers import AutoConfig, LlavaConfig

from llava_token_reduction import LlavaVisionZipConfig, LlavaVisionZipForConditionalGeneration


# The tiny vision tower: 3 layers, 56px / patch 7 -> 64 patches + CLS = 65 tokens; 64 placeholders per image.


def test_defaults_match_the_contract():
    config = LlavaVisionZipConfig()
    assert config.model_type == "llava_visionzip"
    assert (config.dominant_tokens, config.contextual_tokens, config.visionzip_layer) == (54, 10, -2)
    assert config.tokens_per_image == 64
    assert isinstance(config, LlavaConfig)


@pytest.mark.parametrize("dominant, contextual", [(54, 10), (108, 20), (162, 30), (1, 0), (576, 0), (1, 575)])
def test_published_and_extreme_budgets_are_valid_for_llava_1_5(dominant, contextual):
    config = LlavaVisionZipConfig(dominant_tokens=dominant, contextual_tokens=contextual)
    assert config.tokens_per_image == dominant + contextual


def test_round_trip_through_dict_and_disk(make_visionzip_config, tmp_path):
    config = make_visionzip_config(dominant_tokens=20, contextual_tokens=6, visionzip_layer=0)
    again = LlavaVisionZipConfig.from_dict(config.to_dict())
    assert (again.dominant_tokens, again.contextual_tokens, again.visionzip_layer) == (20, 6, 0)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["dominant_tokens"], saved["contextual_tokens"], saved["visionzip_layer"]) == (20, 6, 0)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is LlavaVisionZipConfig
    assert (loaded.dominant_tokens, loaded.contextual_tokens, loaded.visionzip_layer) == (20, 6, 0)
    assert loaded.vision_config.num_hidden_layers == config.vision_config.num_hidden_layers


def test_load_time_overrides_take_effect(make_visionzip_config, tmp_path):
    make_visionzip_config().save_pretrained(tmp_path)
    config = LlavaVisionZipConfig.from_pretrained(tmp_path, dominant_tokens=30, contextual_tokens=0, visionzip_layer=-1)
    assert (config.dominant_tokens, config.contextual_tokens, config.visionzip_layer) == (30, 0, -1)


# Single fields ---------------------------------------------------------------------------------------

# (field, value, pattern the message must match: field name, allowed range, the value)
SINGLE_FIELD_ERRORS = [
    pytest.param("dominant_tokens", 0, r"`dominant_tokens`.*>= 1.*\b0\b", id="dominant-0"),
    pytest.param("dominant_tokens", -3, r"`dominant_tokens`.*>= 1.*-3", id="dominant-negative"),
    pytest.param("contextual_tokens", -1, r"`contextual_tokens`.*>= 0.*-1", id="contextual-negative"),
    pytest.param("dominant_tokens", True, r"`dominant_tokens`.*int.*>= 1.*True", id="dominant-bool"),
    pytest.param("contextual_tokens", False, r"`contextual_tokens`.*int.*>= 0.*False", id="contextual-bool"),
    pytest.param("dominant_tokens", 10.0, r"`dominant_tokens`.*int.*>= 1.*10\.0", id="dominant-float"),
    pytest.param("contextual_tokens", 2.5, r"`contextual_tokens`.*int.*>= 0.*2\.5", id="contextual-float"),
    pytest.param("dominant_tokens", "10", r"`dominant_tokens`.*int.*>= 1.*'10'", id="dominant-str"),
    pytest.param("dominant_tokens", None, r"`dominant_tokens`.*int.*>= 1.*None", id="dominant-none"),
    pytest.param("visionzip_layer", True, r"`visionzip_layer`.*int.*True", id="layer-bool"),
    pytest.param("visionzip_layer", -2.0, r"`visionzip_layer`.*int.*-2\.0", id="layer-float"),
]


@pytest.mark.parametrize("field, value, message", SINGLE_FIELD_ERRORS)
def test_invalid_single_field_at_construction(make_visionzip_config, field, value, message):
    with pytest.raises(ValueError, match=message):
        make_visionzip_config(**{field: value})


@pytest.mark.parametrize("field, value, message", SINGLE_FIELD_ERRORS)
def test_invalid_single_field_by_setattr_is_refused_and_leaves_the_config_unchanged(
    make_visionzip_config, field, value, message
):
    config = make_visionzip_config()
    before = getattr(config, field)
    with pytest.raises(ValueError, match=message):
        setattr(config, field, value)
    assert getattr(config, field) == before
    with pytest.raises(ValueError, match=message):
        config.update({field: value})


@pytest.mark.parametrize("field, value, message", SINGLE_FIELD_ERRORS)
def test_invalid_single_field_as_load_time_override(make_visionzip_config, tmp_path, field, value, message):
    make_visionzip_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        LlavaVisionZipConfig.from_pretrained(tmp_path, **{field: value})


def test_invalid_value_in_a_saved_config_is_refused_on_load(make_visionzip_config, tmp_path):
    make_visionzip_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["contextual_tokens"] = -2
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"`contextual_tokens`.*>= 0.*-2"):
        AutoConfig.from_pretrained(tmp_path)


# Values that depend on the vision tower ---------------------------------------------------------------

# The tiny tower has 3 layers (valid indices -3..2) and 65 tokens; image_seq_length 100 isolates the
# token-count checks from the placeholder check.
BUDGET_ERRORS = [
    pytest.param({"visionzip_layer": 3}, r"`visionzip_layer`.*-3 to 2.*got 3", id="layer-too-high"),
    pytest.param({"visionzip_layer": -4}, r"`visionzip_layer`.*-3 to 2.*got -4", id="layer-too-low"),
    pytest.param(
        {"dominant_tokens": 66, "contextual_tokens": 0, "image_seq_length": 100},
        r"`dominant_tokens`.*<= 65.*got 66",
        id="dominant-over-tokens",
    ),
    pytest.param(
        {"dominant_tokens": 60, "contextual_tokens": 6, "image_seq_length": 100},
        r"`contextual_tokens`.*<= 5.*got 6",
        id="budget-over-tokens",
    ),
    pytest.param(
        {"dominant_tokens": 60, "contextual_tokens": 5},
        r"`dominant_tokens \+ contextual_tokens`.*image_seq_length=64.*got 65",
        id="budget-over-placeholders",
    ),
]


@pytest.mark.parametrize("values, message", BUDGET_ERRORS)
def test_invalid_budget_or_layer_at_construction(make_visionzip_config, values, message):
    with pytest.raises(ValueError, match=message):
        make_visionzip_config(**values)


@pytest.mark.parametrize("values, message", BUDGET_ERRORS)
def test_invalid_budget_or_layer_set_later_is_caught_by_the_model(make_visionzip_config, values, message):
    # Fields set one at a time can only be checked together later: when the model is built.
    config = make_visionzip_config()
    for field, value in values.items():
        setattr(config, field, value)
    with pytest.raises(ValueError, match=message):
        config.validate_token_reduction()
    with pytest.raises(ValueError, match=message):
        LlavaVisionZipForConditionalGeneration(config)


@pytest.mark.parametrize("values, message", BUDGET_ERRORS)
def test_invalid_budget_or_layer_as_load_time_override(make_visionzip_config, tmp_path, values, message):
    # `from_pretrained(path, **overrides)` applies overrides by setattr after construction; building the
    # model re-validates the whole budget.
    make_visionzip_config().save_pretrained(tmp_path)
    config = LlavaVisionZipConfig.from_pretrained(tmp_path, **values)
    with pytest.raises(ValueError, match=message):
        LlavaVisionZipForConditionalGeneration(config)


@pytest.mark.parametrize(
    "values",
    [
        {"dominant_tokens": 65, "contextual_tokens": 0, "image_seq_length": 65},  # every token kept
        {"dominant_tokens": 1, "contextual_tokens": 64, "image_seq_length": 65},  # R == contextual
        {"dominant_tokens": 1, "contextual_tokens": 0},  # CLS only
        {"visionzip_layer": -3},
        {"visionzip_layer": 2},
    ],
)
def test_edge_values_that_are_valid(make_visionzip_config, values):
    config = make_visionzip_config(**values)
    config.validate_token_reduction()
    for field, value in values.items():
        assert getattr(config, field) == value


def test_budget_checked_against_the_actual_image_token_count(make_visionzip_config):
    config = make_visionzip_config()  # 10 + 4
    config.validate_token_reduction(vision_tokens=14)  # exactly enough
    with pytest.raises(ValueError, match=r"`contextual_tokens`.*<= 3.*got 4"):
        config.validate_token_reduction(vision_tokens=13)
    with pytest.raises(ValueError, match=r"`dominant_tokens`.*<= 9.*got 10"):
        config.validate_token_reduction(vision_tokens=9)
