"""LlavaTrimConfig: contract defaults, sub-config handling, validation at construction, on setattr and on
load-time overrides."""

import math

import pytest
import torch
from transformers import AutoConfig, CLIPTextConfig, LlavaConfig

from llava_token_reduction import LlavaTrimConfig, LlavaTrimForConditionalGeneration
from llava_token_reduction.tiny import clip_text_config, method_config_kwargs


def tiny_trim_config(**overrides) -> LlavaTrimConfig:
    return LlavaTrimConfig(**{**method_config_kwargs("trim"), **overrides})


def test_contract_defaults():
    config = LlavaTrimConfig()
    assert isinstance(config, LlavaConfig) and config.model_type == "llava_trim"
    assert isinstance(config.clip_text_config, CLIPTextConfig)
    assert config.projection_dim == 768 == config.clip_text_config.projection_dim
    assert config.clip_text_config.hidden_size == 768 and config.clip_text_config.max_position_embeddings == 77
    assert config.trim_negate_similarity is True and config.trim_iqr_multiplier == 1.5
    assert config.trim_batch_coupled is False and config.trim_append_mean_token is True
    assert config.trim_min_tokens is None and config.trim_max_tokens is None
    assert config.num_patches == 576
    assert config.get_text_config() is config.text_config  # clip_text_config does not make it ambiguous


def test_default_clip_text_config_follows_projection_dim():
    assert LlavaTrimConfig(projection_dim=16).clip_text_config.projection_dim == 16


def test_round_trip(tmp_path):
    config = tiny_trim_config(trim_max_tokens=9, trim_min_tokens=2, trim_iqr_multiplier=2.0, trim_batch_coupled=True,
                              trim_negate_similarity=False, trim_append_mean_token=False)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is LlavaTrimConfig
    for field in ("trim_max_tokens", "trim_min_tokens", "trim_iqr_multiplier", "trim_batch_coupled",
                  "trim_negate_similarity", "trim_append_mean_token", "projection_dim"):
        assert getattr(loaded, field) == getattr(config, field)
    assert loaded.clip_text_config.to_dict() == config.clip_text_config.to_dict()
    assert LlavaTrimConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


INVALID = [
    ("trim_min_tokens", -1, ">= 0"),
    ("trim_min_tokens", 2.0, "must be an int"),
    ("trim_min_tokens", True, "must be an int"),
    ("trim_max_tokens", 0, ">= 1"),
    ("trim_max_tokens", "8", "must be an int"),
    ("trim_iqr_multiplier", -0.5, ">= 0"),
    ("trim_iqr_multiplier", math.inf, "finite"),
    ("trim_iqr_multiplier", math.nan, "finite"),
    ("trim_iqr_multiplier", True, "finite"),
    ("trim_negate_similarity", 1, "bool"),
    ("trim_batch_coupled", "yes", "bool"),
    ("trim_append_mean_token", None, "bool"),
    ("projection_dim", 0, ">= 1"),
]


@pytest.mark.parametrize("field,value,message", INVALID)
def test_invalid_values_raise_at_construction(field, value, message):
    with pytest.raises(ValueError, match=rf"`{field}`.*{message}|{message}.*`{field}`") as error:
        tiny_trim_config(**{field: value})
    assert repr(value) in str(error.value) or str(value) in str(error.value)


@pytest.mark.parametrize("field,value,message", INVALID)
def test_invalid_values_raise_on_setattr(field, value, message):
    config = tiny_trim_config()
    with pytest.raises(ValueError, match=f"`{field}`"):
        setattr(config, field, value)


@pytest.mark.parametrize("overrides,message", [
    ({"trim_min_tokens": 5, "trim_max_tokens": 4}, r"`trim_min_tokens` must be <= `trim_max_tokens`=4, got 5"),
    ({"trim_max_tokens": 65}, r"`trim_max_tokens` must be <= 64 \(the patches per image\), got 65"),
    ({"trim_min_tokens": 65}, r"`trim_min_tokens` must be <= 64"),
    ({"clip_text_config": clip_text_config(), "projection_dim": 8}, r"`clip_text_config.projection_dim` must equal"),
    ({"image_seq_length": 10}, r"image_seq_length=10"),
])
def test_cross_field_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_trim_config(**overrides)


def test_bounds_at_the_limits_are_valid():
    config = tiny_trim_config(trim_min_tokens=0, trim_max_tokens=64)
    assert config.trim_max_tokens == 64
    tiny_trim_config(trim_min_tokens=64, trim_max_tokens=64, trim_iqr_multiplier=0)
    tiny_trim_config(image_seq_length=10, trim_max_tokens=9)  # 9 patches + the mean token fit 10 placeholders


def test_load_time_overrides_are_validated(tmp_path):
    tiny_trim_config().save_pretrained(tmp_path)
    assert LlavaTrimConfig.from_pretrained(tmp_path, trim_max_tokens=8).trim_max_tokens == 8
    with pytest.raises(ValueError, match="`trim_max_tokens` must be >= 1, got 0"):
        LlavaTrimConfig.from_pretrained(tmp_path, trim_max_tokens=0)
    with pytest.raises(ValueError, match="`trim_batch_coupled`"):
        AutoConfig.from_pretrained(tmp_path, trim_batch_coupled="true")


def test_model_revalidates_cross_field_overrides():
    # Each setattr alone is valid; together they are not. The model refuses before building anything.
    config = tiny_trim_config()
    config.trim_min_tokens = 10
    config.trim_max_tokens = 5
    with pytest.raises(ValueError, match="`trim_min_tokens` must be <= `trim_max_tokens`"):
        LlavaTrimForConditionalGeneration(config)
    config = tiny_trim_config()
    config.trim_max_tokens = 100  # more than the 64 patches
    with pytest.raises(ValueError, match="`trim_max_tokens` must be <= 64"):
        LlavaTrimForConditionalGeneration(config)


def test_bound_checked_before_compute_after_override():
    torch.manual_seed(0)
    model = LlavaTrimForConditionalGeneration(tiny_trim_config()).eval()
    model.config.trim_min_tokens = 70  # valid alone, larger than the image's 64 patches
    calls = []
    model.model.vision_tower.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="`trim_min_tokens` must be <= 64"):
        model.model.get_image_features(
            pixel_values=torch.zeros(1, 3, 56, 56), clip_input_ids=torch.zeros(1, 77, dtype=torch.long)
        )
    assert calls == []
