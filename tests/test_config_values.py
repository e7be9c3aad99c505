"""Config values as users pass them: a multi-layer `vision_feature_layer` (allowed by `LlavaConfig`) is refused by
name at construction and as a load-time override; numpy / torch scalars are stored as plain numbers, so the
config saves to JSON and loads back."""

import json

import numpy as np
import pytest
import torch

from llava_token_reduction import LlavaVisionZipConfig
from llava_token_reduction.methods import METHODS
from llava_token_reduction.tiny import llava_config_kwargs, method_config_kwargs
from methods_under_test import METHOD_FIELDS, METHOD_NAMES


def _config(method, **overrides):
    return METHODS[method].config_class(**{**method_config_kwargs(method), **METHOD_FIELDS[method], **overrides})


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("layers", [[-2, -1], (-3, -2), "-2", 1.0])
def test_multi_layer_vision_feature_layer_is_refused_at_construction(method, layers):
    with pytest.raises(ValueError, match=r"`vision_feature_layer` must be one int.*got"):
        _config(method, vision_feature_layer=layers)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_multi_layer_vision_feature_layer_is_refused_as_a_load_time_override(method, tmp_path):
    _config(method).save_pretrained(tmp_path)
    config_class = METHODS[method].config_class
    with pytest.raises(ValueError, match=r"`vision_feature_layer` must be one int"):
        config_class.from_pretrained(tmp_path, vision_feature_layer=[-2, -1])
    # A config changed after construction is caught too, before a 2x-wide projector is built.
    config = _config(method)
    with pytest.raises(ValueError, match=r"`vision_feature_layer`"):
        config.vision_feature_layer = [-2, -1]
    model_class = METHODS[method].generation_class
    assert model_class(_config(method, vision_feature_layer=-3)).config.vision_feature_layer == -3


_SCALARS = {
    "visionzip": {"dominant_tokens": np.int64(8), "contextual_tokens": torch.tensor(3), "visionzip_layer": np.int32(-1),
                  "vision_feature_layer": np.int64(-3)},
    "trim": {"trim_max_tokens": np.int64(20), "trim_min_tokens": torch.tensor(2),
             "trim_iqr_multiplier": np.float32(2.5),
             "trim_negate_similarity": np.bool_(False), "trim_batch_coupled": torch.tensor(True),
             "projection_dim": np.int64(16)},
    "prumerge": {"prumerge_plus": np.bool_(True), "prumerge_iqr_multiplier": np.float32(2.5),
                 "prumerge_batch_coupled": torch.tensor(False), "prumerge_min_tokens": np.int64(2),
                 "prumerge_max_tokens": torch.tensor(20)},
}


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("when", ["construction", "assignment", "load-time override"])
def test_numpy_and_torch_scalars_are_stored_as_plain_numbers(method, when, tmp_path):
    values = _SCALARS[method]
    if when == "construction":
        config = _config(method, **values)
    elif when == "assignment":
        config = _config(method)
        for field, value in values.items():
            setattr(config, field, value)
    else:
        _config(method).save_pretrained(tmp_path / "base")
        config = METHODS[method].config_class.from_pretrained(tmp_path / "base", **values)
    for field, value in values.items():
        stored = getattr(config, field)
        assert type(stored) in (int, float, bool), (field, type(stored))
        assert stored == value.item()
    config.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    reloaded = type(config).from_pretrained(tmp_path / "saved")
    for field, value in values.items():
        assert saved[field] == getattr(reloaded, field) == value.item()


@pytest.mark.parametrize("value", [np.array([10]), torch.tensor([10]), np.float64(10.0), torch.tensor(10.5)])
def test_non_integer_arrays_and_floats_are_still_refused_for_int_fields(value):
    with pytest.raises(ValueError, match=r"`dominant_tokens` must be an int"):
        _config("visionzip", dominant_tokens=value)


def test_a_stock_checkpoint_loaded_into_our_class_keeps_our_model_type(tmp_path):
    """`from_pretrained(stock_dir)` must not leave the stock `model_type: "llava"` on the instance: the registry,
    the tools and transformers' own look-ups ask `config.model_type`."""
    from transformers import LlavaConfig

    from llava_token_reduction.tiny import TEST_SHAPE

    LlavaConfig(**llava_config_kwargs(TEST_SHAPE)).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava"
    config = LlavaVisionZipConfig.from_pretrained(tmp_path, dominant_tokens=6, contextual_tokens=2)
    assert config.model_type == "llava_visionzip"
    assert config.to_dict()["model_type"] == "llava_visionzip"
