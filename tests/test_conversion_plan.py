"""The conversion plan (`conversion/plan.py`) on its own: what it reads, where every output tensor comes from, the
output dtype and the method's config fields, decided without building a model. Expected tensor names are
written from the published layouts (a stock LLaVA's state dict, CLIPModel's names), not from the key mapping."""

import dataclasses
from unittest import mock

import pytest
import torch
from transformers import PreTrainedModel

from conversion_inputs import save_clip, save_original, save_stock, vision_state_of
from llava_token_reduction import methods
from llava_token_reduction.conversion import ConversionError, ConversionRequest
from llava_token_reduction.conversion.method_conversion import MethodConversion
from llava_token_reduction.conversion.plan import plan_conversion
from llava_token_reduction.tiny import TEST_SHAPE


PATCHES = (TEST_SHAPE.image_size // TEST_SHAPE.patch_size) ** 2


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    directory = tmp_path_factory.mktemp("plan_stock") / "llava-tiny-hf"
    return directory, save_stock(directory)


@pytest.fixture(scope="module")
def clip(stock, tmp_path_factory):
    directory = tmp_path_factory.mktemp("plan_clip") / "clip-tiny"
    return directory, save_clip(directory, vision_state_of(stock[1]))


def _refuse_models(self, *args, **kwargs):
    raise AssertionError(f"the plan built a model ({type(self).__name__})")


def _plan(method, src, tmp_path, **options):
    """The plan of a request; building any transformers model while planning is a failure (it reads files)."""
    request = ConversionRequest(method=method, src=str(src), out=str(tmp_path / "out"), **options)
    with mock.patch.object(PreTrainedModel, "__init__", _refuse_models):
        return plan_conversion(request)


def _clip_text_names(clip_model) -> set:
    """CLIPModel's text tower and both projections, under our model's names."""
    names = {"model.clip_text_model." + k for k in clip_model.state_dict() if k.startswith(("text_model.",
                                                                                             "text_projection."))}
    return names - {n for n in names if n.endswith("position_ids")} | {"model.visual_projection.weight"}


def test_plan_of_a_stock_source(stock, tmp_path):
    plan = _plan("visionzip", stock[0], tmp_path)
    assert plan.format == "stock" and plan.method is methods.VISIONZIP
    assert set(plan.tensors) == set(stock[1].state_dict())
    assert {entry.origin for entry in plan.tensors.values()} == {"SRC"}
    assert plan.tensors["lm_head.weight"].shape == tuple(stock[1].lm_head.weight.shape)
    assert plan.unmapped == () and plan.clip_dir is None and plan.clip_config is None
    assert plan.out_dtype == torch.float32 and dict(plan.config_fields) == {} and plan.notes == ()
    assert plan.out == (tmp_path / "out").resolve()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.format = "original"
    with pytest.raises(TypeError):
        plan.tensors["lm_head.weight"] = None


def test_overrides_and_dtype_are_planned(stock, tmp_path):
    plan = _plan("visionzip", stock[0], tmp_path, dtype="bfloat16", dominant_tokens=12,
                 overrides={"contextual_tokens": 3, "visionzip_layer": -3})
    assert plan.out_dtype == torch.bfloat16
    assert dict(plan.config_fields) == {"dominant_tokens": 12, "contextual_tokens": 3, "visionzip_layer": -3}
    with pytest.raises(ConversionError, match=r"VisionZip has no setting trim_iqr_multiplier; its settings are "
                                              r"contextual_tokens, dominant_tokens, visionzip_layer"):
        _plan("visionzip", stock[0], tmp_path, overrides={"trim_iqr_multiplier": 2.0})
    with pytest.raises(ConversionError, match="--dtype must be one of float32, float16, bfloat16, got 'int8'"):
        _plan("visionzip", stock[0], tmp_path, dtype="int8")


def test_trim_from_a_stock_source_needs_clip(stock, tmp_path):
    with pytest.raises(ConversionError, match="convert trim needs --clip CLIP_SRC"):
        _plan("trim", stock[0], tmp_path)


def test_trim_from_a_stock_source_with_clip(stock, clip, tmp_path):
    plan = _plan("trim", stock[0], tmp_path, clip=str(clip[0]))
    text = _clip_text_names(clip[1])
    assert set(plan.tensors) == set(stock[1].state_dict()) | text
    assert {plan.tensors[name].origin for name in text} == {"CLIP"}
    vision = {name for name in plan.tensors if name.startswith("model.vision_tower.")}
    assert vision and {plan.tensors[name].origin for name in vision} == {"SRC"}  # compared with CLIP's, kept
    fields = dict(plan.config_fields)
    assert fields["projection_dim"] == TEST_SHAPE.projection_dim
    assert fields["clip_text_config"]["hidden_size"] == clip[1].config.text_config.hidden_size
    assert fields["clip_text_config"]["projection_dim"] == TEST_SHAPE.projection_dim
    assert not {"trim_append_mean_token", "trim_min_tokens", "trim_max_tokens"} & set(fields)
    assert any("training-free" in note for note in plan.notes)
    assert any(item.startswith("CLIP text tower + text_projection") for item in plan.added)


def test_original_source_takes_the_vision_tower_from_clip(clip, tmp_path):
    src = tmp_path / "llava-v1.5-tiny"
    base, _ = save_original(src, vision_tower=str(clip[0]), dtype=torch.float16)
    plan = _plan("visionzip", src, tmp_path)
    assert plan.format == "original" and plan.clip_dir == clip[0].resolve()
    assert set(plan.tensors) == set(base.state_dict())
    vision = {name for name in plan.tensors if name.startswith("model.vision_tower.")}
    assert vision and {plan.tensors[name].origin for name in vision} == {"CLIP"}
    assert plan.out_dtype == torch.float16  # the source's own dtype when --dtype is not given
    assert dict(plan.config_fields) == {}


@pytest.mark.parametrize("spelling, mean_token, bound", [("TextSim+:-1", True, None), ("TextSim:0.25", False,
                                                                                         int(PATCHES * 0.25))])
def test_released_trim_spellings_become_config_fields(clip, tmp_path, spelling, mean_token, bound):
    src = tmp_path / "llava-v1.5-tiny-TRIM"
    base, _ = save_original(src, vision_tower=str(clip[0]), with_vision=True, clip=clip[1], reduce_func=spelling)
    plan = _plan("trim", src, tmp_path)
    text = _clip_text_names(clip[1])
    assert set(plan.tensors) == set(base.state_dict()) | text
    assert {plan.tensors[name].origin for name in text} == {"SRC"}  # trained with TRIM: its own text tower
    fields = dict(plan.config_fields)
    assert fields["trim_append_mean_token"] is mean_token
    assert fields.get("trim_min_tokens") == bound and fields.get("trim_max_tokens") == bound
    assert any(spelling in note for note in plan.notes)
    assert not any("training-free" in note for note in plan.notes)


def test_the_registry_names_the_conversion_hook(stock, tmp_path, monkeypatch):
    """A method's conversion step is the registry's `conversion_hook`: the plan calls it, knowing no method."""
    seen = []

    def hook(inputs):
        seen.append(inputs)
        return MethodConversion(fields={"visionzip_layer": -4}, notes=("hook ran",))

    monkeypatch.setattr("llava_token_reduction.conversion.method_conversion._test_hook", hook, raising=False)
    entry = dataclasses.replace(methods.VISIONZIP,
                                conversion_hook="llava_token_reduction.conversion.method_conversion:_test_hook")
    monkeypatch.setitem(methods.METHODS, "visionzip", entry)
    plan = _plan("visionzip", stock[0], tmp_path, dominant_tokens=20)
    assert dict(plan.config_fields) == {"dominant_tokens": 20, "visionzip_layer": -4} and plan.notes == ("hook ran",)
    assert seen[0].source_format == "stock" and seen[0].source_has_text_tower is False
    assert methods.VISIONZIP.conversion_hook is None and methods.TRIM.conversion_hook_function is not None


@pytest.mark.parametrize("name", list(methods.METHODS))
def test_every_registered_conversion_hook_resolves(name):
    method = methods.get(name)
    assert method.conversion_hook is None or callable(method.conversion_hook_function)
