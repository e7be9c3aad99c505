"""`convert` on checkpoints shaped as they are published, reached by hub id through a private offline hub cache,
so that the README's commands run as written:

- `liuhaotian/llava-v1.5-7b`: an original LLaVA-codebase save with a sentencepiece `tokenizer.model` only,
  `padding_side: "right"`, `model_type: "llava"`, `generation_config.max_length: 4096`, `mm_vision_tower:
  "openai/clip-vit-large-patch14-336"`.
- `FreedomIntelligence/llava-v1.5-7b-TRIM`: the same plus the vision tower and CLIP text tower inside, the setting
  spelled as the public TRIM code writes it (`TRIM:<k>`), and `mm_vision_tower` as its training scripts write it.
"""

import json
import sys
import warnings

import pytest
import sentencepiece
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from conversion_inputs import (
    add_to_hub_cache,
    generation_config_as_published,
    save_clip,
    save_original,
    sentencepiece_model_bytes,
    vision_state_of,
)
from llava_token_reduction.conversion import ConversionError, convert_trim, convert_visionzip
from llava_token_reduction.conversion.cli import main as conversion_main


OPENAI_CLIP = "openai/clip-vit-large-patch14-336"
LLAVA = "liuhaotian/llava-v1.5-7b"
TRIM = "FreedomIntelligence/llava-v1.5-7b-TRIM"


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    llava = root / "llava"
    model, _ = save_original(llava, vision_tower=OPENAI_CLIP, weights="bin", sentencepiece_tokenizer=True,
                             config_overrides={"model_type": "llava"})
    generation_config_as_published(llava)
    clip = root / "clip"
    clip_model = save_clip(clip, vision_state_of(model))
    trim = root / "trim"
    save_original(trim, vision_tower="clip-vit-large-patch14-336", with_vision=True, clip=clip_model,
                  reduce_func="TRIM:-1", dtype=torch.bfloat16, weights="sharded", sentencepiece_tokenizer=True,
                  config_overrides={"model_type": "llava"})
    generation_config_as_published(trim)
    cache = root / "hub"
    for repo_id, directory in ((LLAVA, llava), (OPENAI_CLIP, clip), (TRIM, trim)):
        add_to_hub_cache(cache, repo_id, directory)
    return {"cache": cache, "llava": llava, "clip": clip, "trim": trim}


@pytest.fixture
def offline_hub(published, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_CACHE", str(published["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(published["cache"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return published


def _codebase_ids(prompt: str, image_token_id: int) -> list[int]:
    """What the LLaVA codebase feeds the model: the prompt split at `<image>`, each piece tokenised by the slow
    (sentencepiece) Llama tokenizer with its dummy-prefix `▁`, BOS once, the image index between pieces."""
    processor = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model_bytes())
    ids = [processor.bos_id()]
    for index, piece in enumerate(prompt.split("<image>")):
        if index:
            ids.append(image_token_id)
        ids += processor.encode(piece)
    return ids


def _cli(capsys, *argv):
    status = conversion_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_readme_llava15_command_tokenises_like_the_codebase_and_pads_left(offline_hub, tmp_path, capsys):
    out = tmp_path / "llava-v1.5-7b-visionzip"
    status, stdout, stderr = _cli(capsys, "convert", "visionzip", LLAVA, out, "--no-progress")
    assert status == 0, stderr
    processor = AutoProcessor.from_pretrained(out)
    tokenizer = processor.tokenizer
    image_id = processor.image_token_id
    prompt = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    ids = tokenizer(prompt).input_ids
    assert ids == _codebase_ids(prompt, image_id)
    word_start, newline = tokenizer.convert_tokens_to_ids("▁"), 13
    assert ids[ids.index(image_id) + 1: ids.index(image_id) + 3] == [word_start, newline]  # llava-hf: 32000, 29871, 13
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["USER: hi", prompt], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert "max_length" not in json.loads((out / "generation_config.json").read_text())


def test_converted_original_generates_without_warnings(offline_hub, tmp_path, capsys, caplog):
    out = tmp_path / "vz"
    assert _cli(capsys, "visionzip", LLAVA, out, "--no-progress")[0] == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForImageTextToText.from_pretrained(out)
        processor = AutoProcessor.from_pretrained(out)
        inputs = processor(images=[torch.rand(3, 56, 56)], text="USER: <image>\nWhat? ASSISTANT:", return_tensors="pt",
                           do_rescale=False)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "max_length" in m or "max_new_tokens" in m], messages


def test_sentencepiece_only_tokenizer_needs_named_packages(offline_hub, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as in an install without it
    with pytest.raises(ConversionError, match="pip install sentencepiece"):
        convert_visionzip(LLAVA, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_dependencies_include_the_sentencepiece_readers():
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    names = {dep.split(">")[0].split("=")[0].split("<")[0].strip().lower()
             for dep in pyproject["project"]["dependencies"]}
    assert {"sentencepiece", "protobuf"} <= names


def test_readme_trim_command_with_the_released_spellings(offline_hub, tmp_path, capsys):
    out = tmp_path / "trim"
    status, stdout, stderr = _cli(capsys, "convert", "trim", TRIM, out, "--no-progress")
    assert status == 0, stderr
    # The bare `clip-vit-large-patch14-336` falls back to OpenAI's CLIP of that name, and says so.
    assert "clip-vit-large-patch14-336" in stdout and OPENAI_CLIP in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["trim_append_mean_token"] is True
    assert config.get("trim_min_tokens") is None and config.get("trim_max_tokens") is None  # -1: adaptive
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    prompt = "USER: <image>\nWhat color is the car? ASSISTANT:"
    assert processor.tokenizer(prompt).input_ids == _codebase_ids(prompt, processor.image_token_id)


@pytest.mark.parametrize("spelling, bounds, mean", [
    ("TRIM:0.25", 16, True), ("TRIM:-1", None, True), ("TextSim+:0.5", 32, True), ("TextSim:0.25", 16, False),
])
def test_reduce_func_spellings(published, tmp_path, spelling, bounds, mean):
    directory = tmp_path / "src"
    clip = save_clip(tmp_path / "clip", None)
    save_original(directory, vision_tower=str(tmp_path / "clip"), with_vision=False, clip=clip, reduce_func=spelling)
    # The vision tower comes from the CLIP checkpoint; the text tower from SRC.
    convert_trim(directory, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config.get("trim_min_tokens"), config.get("trim_max_tokens"), config["trim_append_mean_token"]) == (
        bounds, bounds, mean)


@pytest.mark.parametrize("spelling", ["TRIM:2", "TRIM:abc", "Random:0.5"])
def test_unknown_reduce_func_is_refused(published, tmp_path, spelling):
    directory = tmp_path / "src"
    clip = save_clip(tmp_path / "clip", None)
    save_original(directory, vision_tower=str(tmp_path / "clip"), clip=clip, reduce_func=spelling)
    with pytest.raises(ConversionError, match="mm_vision_token_reduce_func"):
        convert_trim(directory, tmp_path / "out", progress=False)


@pytest.mark.parametrize("tower", ["clip-vit-large-patch14-336", "model/clip-vit-large-patch14-336",
                                   "/data/someone/clip-vit-large-patch14-336"])
def test_vision_tower_names_fall_back_to_openai_clip(offline_hub, tmp_path, tower):
    directory = tmp_path / "src"
    model, _ = save_original(directory, vision_tower=tower)
    result = convert_visionzip(directory, tmp_path / "out", progress=False)
    assert any(tower in note and OPENAI_CLIP in note for note in result.notes), result.notes


def test_readme_trim_command_with_clip_as_written(offline_hub, tmp_path, capsys):
    """README: `convert trim FreedomIntelligence/llava-v1.5-7b-TRIM llava-v1.5-7b-trim-hf --clip
    openai/clip-vit-large-patch14-336`, both ids from the (offline) hub cache."""
    out = tmp_path / "llava-v1.5-7b-trim-hf"
    status, stdout, stderr = _cli(capsys, "convert", "trim", TRIM, out, "--clip", OPENAI_CLIP, "--no-progress")
    assert status == 0, stderr
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "LlavaTrimForConditionalGeneration" and model.dtype == torch.bfloat16
