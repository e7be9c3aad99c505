"""The tools' one loader (`llava_token_reduction.loading`) and the shared inputs (`llava_token_reduction.inputs`)."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from llava_token_reduction import show
from llava_token_reduction.inputs import DEFAULT_QUESTION, SAMPLE_IMAGE, chat_prompt, parse_dtype
from llava_token_reduction.loading import load_checkpoint
from llava_token_reduction.methods import METHODS
from llava_token_reduction.tiny import DEMO_SHAPE, build_method_model, build_method_processor, build_processor


def _save_with_a_weight_missing(directory):
    model = build_method_model("visionzip", DEMO_SHAPE, seed=0)
    model.save_pretrained(directory)
    build_processor(DEMO_SHAPE).save_pretrained(directory)
    weights = load_file(directory / "model.safetensors")
    dropped = next(name for name in weights if "multi_modal_projector" in name)
    del weights[dropped]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


def test_show_refuses_a_checkpoint_whose_weights_did_not_all_load(tmp_path):
    """Before the shared loader, `show` drew with a randomly initialised projector without a word."""
    _save_with_a_weight_missing(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="did not load cleanly: 1 missing"):
        show.show(SAMPLE_IMAGE, "visionzip", model_path=str(tmp_path / "ckpt"), out=tmp_path / "v.png")
    with pytest.raises(ValueError, match="did not load cleanly"):
        load_checkpoint(tmp_path / "ckpt", METHODS["visionzip"])
    assert not (tmp_path / "v.png").exists()


def test_loader_loads_a_stock_checkpoint_as_a_method_with_overrides(tmp_path):
    model = build_method_model("visionzip", seed=0)
    model.save_pretrained(tmp_path / "vz")
    build_processor().save_pretrained(tmp_path / "vz")
    loaded, processor = load_checkpoint(tmp_path / "vz", METHODS["visionzip"], overrides={"dominant_tokens": 5})
    assert type(loaded) is METHODS["visionzip"].generation_class and loaded.config.dominant_tokens == 5
    assert processor.image_token == "<image>"
    auto, _ = load_checkpoint(tmp_path / "vz", with_processor=False)
    assert type(auto) is type(loaded)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_show_takes_a_method_from_the_registry_entry(tmp_path, monkeypatch):
    """A renamed copy of VisionZip's entry draws through `show` with no edit to it."""
    copy = dataclasses.replace(METHODS["visionzip"], name="zipcopy", label="ZipCopy")
    monkeypatch.setitem(METHODS, "zipcopy", copy)
    out, selection, _ = show.show(SAMPLE_IMAGE, copy, out=tmp_path / "z.png", overrides={"dominant_tokens": 20})
    assert out.is_file() and selection.tokens == 30
    with pytest.raises(ValueError, match="ZipCopy has no setting trim_max_tokens"):
        show.show(SAMPLE_IMAGE, copy, out=tmp_path / "z.png", overrides={"trim_max_tokens": 3})


def test_chat_prompt_uses_the_processors_template():
    processor = build_method_processor("trim")
    prompt = chat_prompt(processor, DEFAULT_QUESTION)
    assert prompt == processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_QUESTION}]}],
        add_generation_prompt=True)
    processor.chat_template = None
    assert chat_prompt(processor, "Why?") == "USER: <image>\nWhy? ASSISTANT:"


def test_parse_dtype():
    assert parse_dtype("float16") is torch.float16 and parse_dtype("torch.bfloat16") is torch.bfloat16
    assert parse_dtype(torch.float32) is torch.float32 and parse_dtype("auto", "cpu") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int8'; choose from auto, float32"):
        parse_dtype("int8")
