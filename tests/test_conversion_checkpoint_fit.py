"""Checkpoints that do not fit a class are refused before any weight is built; the documented stock load as
VisionZip is quiet."""

import logging

import pytest
import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

from llava_token_reduction import LlavaTrimForConditionalGeneration, LlavaVisionZipForConditionalGeneration
from llava_token_reduction.tiny import llava_config_kwargs


@pytest.fixture(scope="module")
def llava_next_dir(tmp_path_factory):
    """A tiny llava-hf-style LLaVA-NeXT checkpoint (model_type llava_next, image_grid_pinpoints, image_newline)."""
    kwargs = llava_config_kwargs()
    config = LlavaNextConfig(vision_config=kwargs["vision_config"].to_dict(),
                             text_config=kwargs["text_config"].to_dict(),
                             image_token_index=kwargs["image_token_index"], image_grid_pinpoints=[[56, 56], [56, 112]])
    directory = tmp_path_factory.mktemp("next") / "llava-next-tiny"
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(config).save_pretrained(directory)
    return directory


def _init_counter(monkeypatch):
    """Count calls of the weight initialiser: a refusal must come before any."""
    calls = []
    original = LlavaVisionZipForConditionalGeneration._init_weights

    def counting(self, module):
        calls.append(module)
        return original(self, module)

    for cls in (LlavaVisionZipForConditionalGeneration, LlavaTrimForConditionalGeneration):
        monkeypatch.setattr(cls, "_init_weights", counting)
    return calls


@pytest.mark.parametrize("cls", [LlavaVisionZipForConditionalGeneration, LlavaTrimForConditionalGeneration])
def test_llava_next_checkpoint_is_refused(llava_next_dir, cls, monkeypatch):
    calls = _init_counter(monkeypatch)
    with pytest.raises(ValueError, match="LLaVA-NeXT"):
        cls.from_pretrained(llava_next_dir)
    assert calls == []


def test_stock_checkpoint_in_the_trim_class_names_convert_trim(stock_llava_dir, monkeypatch):
    calls = _init_counter(monkeypatch)
    with pytest.raises(ValueError, match="convert trim") as raised:
        LlavaTrimForConditionalGeneration.from_pretrained(stock_llava_dir)
    assert "CLIP text tower" in str(raised.value) and calls == []


def test_other_model_types_are_refused(visionzip_checkpoint_dir):
    with pytest.raises(ValueError, match="'llava_visionzip'.*loads 'llava_trim'"):
        LlavaTrimForConditionalGeneration.from_pretrained(visionzip_checkpoint_dir)


def test_stock_load_as_visionzip_is_quiet(stock_llava_dir):
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = LlavaVisionZipForConditionalGeneration.from_pretrained(stock_llava_dir, output_loading_info=True)
        # Explicit config objects and our own checkpoints take the ordinary path.
    finally:
        logger.removeHandler(handler)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not [r for r in records if "to instantiate a model of type" in r], records
    # The filter is gone after the load: the same config read directly still warns.
    records.clear()
    logger.addHandler(handler)
    try:
        type(model.config).from_pretrained(stock_llava_dir)
    finally:
        logger.removeHandler(handler)
    assert any("to instantiate a model of type" in r for r in records)


@pytest.mark.parametrize("remote_code", [False, True])
def test_trim_checkpoint_without_its_clip_tokenizer_folder_is_refused(stock_llava_dir, stock_llava_model, tmp_path,
                                                                      remote_code):
    """Copying a TRIM checkpoint's top-level files only (or a mirror without subfolders) loses
    `clip_tokenizer/`; transformers would then hand TRIM the language model's tokenizer."""
    import shutil

    from transformers import AutoProcessor

    from conversion_inputs import save_clip, vision_state_of
    from llava_token_reduction.conversion import convert_trim

    save_clip(tmp_path / "clip", vision_state_of(stock_llava_model))
    convert_trim(stock_llava_dir, tmp_path / "trim", clip=str(tmp_path / "clip"), progress=False)
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in (tmp_path / "trim").iterdir():
        if path.is_file():
            shutil.copy(path, flat / path.name)
    AutoProcessor.from_pretrained(tmp_path / "trim", trust_remote_code=remote_code)  # complete: loads
    with pytest.raises(ValueError, match="clip_tokenizer/"):
        AutoProcessor.from_pretrained(flat, trust_remote_code=remote_code)
