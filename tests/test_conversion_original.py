"""`convert` from original LLaVA-codebase checkpoints (`llava_llama`) and with projector-only files: every key
mapped, `<image>` added with grown embeddings, local paths rewritten, the released-TRIM layout (CLIP text tower
inside SRC), dtype kept, and the errors for unsupported or malformed inputs."""

import json
import pickle

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from conversion_inputs import (
    projector_tensors,
    save_clip,
    save_original,
    save_projector_bin,
    save_projector_safetensors,
    save_stock,
    stock_model,
    vision_state_of,
)
from llava_token_reduction.conversion import ConversionError, convert_trim, convert_visionzip
from llava_token_reduction.conversion.converter import DEFAULT_CLIP
from llava_token_reduction.tiny import build_llm_tokenizer


LOCAL_CLIP_PATH = "/home/someone/checkpoints/clip-vit-large-patch14-336"


@pytest.fixture(scope="module")
def base_model():
    """The stock model every original-format input here is written from (tokenizer without `<image>`)."""
    return stock_model(tokenizer=build_llm_tokenizer(with_image_token=False))


@pytest.fixture(scope="module")
def clip(base_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip") / "clip-tiny"
    return directory, save_clip(directory, vision_state_of(base_model))


@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    """LLaVA-1.5 as released by the LLaVA codebase: no vision tower, a `.bin`, `mm_vision_tower` a local path."""
    directory = tmp_path_factory.mktemp("orig") / "llava-v1.5-tiny"
    save_original(directory, vision_tower=LOCAL_CLIP_PATH, weights="bin")
    return directory


@pytest.fixture(scope="module")
def released_trim(clip, tmp_path_factory):
    """As the released TRIM checkpoints: bf16, sharded, vision tower + CLIP text tower inside, TextSim+ config."""
    directory = tmp_path_factory.mktemp("orig_trim") / "llava-v1.5-tiny-TRIM"
    _, state = save_original(directory, vision_tower=str(clip[0]), with_vision=True, clip=clip[1],
                             reduce_func="TextSim+:-1", dtype=torch.bfloat16, weights="sharded")
    return directory, state


def _load(directory, **kwargs):
    model, info = AutoModelForImageTextToText.from_pretrained(directory, trust_remote_code=True,
                                                              output_loading_info=True, **kwargs)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model, AutoProcessor.from_pretrained(directory, trust_remote_code=True)


def _check_llm_and_grown_vocab(model, base_model, dtype=torch.float32):
    got, want = model.state_dict(), base_model.state_dict()
    rows = want["model.language_model.embed_tokens.weight"].shape[0]
    for key, value in want.items():
        value = value.to(dtype)
        if key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            grown = got[key].to(dtype)
            assert grown.shape[0] % 64 == 0 and grown.shape[0] > rows
            assert torch.equal(grown[:rows], value), key  # source rows first, unchanged
            mean = value.float().mean(0, keepdim=True).to(dtype)
            assert torch.equal(grown[rows:], mean.expand(grown.shape[0] - rows, -1))
        else:
            assert torch.equal(got[key].to(dtype), value), key


def test_llava15_with_clip_to_visionzip(llava15, base_model, clip, tmp_path):
    out = tmp_path / "vz"
    result = convert_visionzip(llava15, out, clip=str(clip[0]), dominant_tokens=10, contextual_tokens=4, progress=False)
    assert result.source_format == "original"
    model, processor = _load(out)
    _check_llm_and_grown_vocab(model, base_model)  # the vision tower came from CLIP, equal to base_model's
    assert any("<image>" in item for item in result.added) and any("vision tower" in item for item in result.added)
    # `<image>` is new: the next id after the source vocabulary, and the processor agrees with the config.
    assert model.config.image_token_id == len(build_llm_tokenizer(with_image_token=False))
    assert processor.image_token_id == model.config.image_token_id
    assert model.config.text_config.vocab_size == model.model.language_model.embed_tokens.weight.shape[0]
    assert (model.config.vision_feature_layer, model.config.image_seq_length) == (-2, 64)
    config_text = (out / "config.json").read_text()
    assert "/home/someone" not in config_text and "./checkpoints" not in config_text
    assert "mm_vision_tower" not in config_text
    inputs = processor(images=[torch.rand(3, 56, 56)], text="USER: <image>\nWhat is it? ASSISTANT:",
                       return_tensors="pt", do_rescale=False)
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 64
    assert model.generate(**inputs, max_new_tokens=2, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 2


def test_local_vision_tower_path_falls_back_to_the_hub_clip(llava15, clip, tmp_path, monkeypatch):
    requested = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        requested.append(repo_id)
        return str(clip[0])

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    result = convert_visionzip(llava15, tmp_path / "vz", dominant_tokens=10, contextual_tokens=4, progress=False)
    assert requested and set(requested) == {DEFAULT_CLIP}
    assert any(LOCAL_CLIP_PATH in note and DEFAULT_CLIP in note for note in result.notes)


def test_released_trim_layout_without_clip(released_trim, base_model, clip, tmp_path):
    directory, state = released_trim
    out = tmp_path / "trim"
    result = convert_trim(directory, out, progress=False)
    assert result.dtype == torch.bfloat16  # the source's dtype by default
    model, processor = _load(out, dtype=torch.bfloat16)
    _check_llm_and_grown_vocab(model, base_model, torch.bfloat16)
    got = model.state_dict()
    for key in clip[1].state_dict():
        if key.startswith("text_model."):
            assert torch.equal(got["model.clip_text_model." + key].to(torch.bfloat16),
                               state["model.vision_tower.text_tower." + key]), key
    assert torch.equal(got["model.visual_projection.weight"].to(torch.bfloat16),
                       state["model.vision_tower.vision_tower.visual_projection.weight"])
    assert model.config.trim_append_mean_token is True
    assert type(processor).__name__ == "LlavaTrimProcessor"
    assert processor.image_token_id == model.config.image_token_id
    assert not any("CLIP text tower" in item for item in result.added)  # it came with SRC
    readme = (out / "README.md").read_text()
    assert "fine-tuned with TRIM active" in readme and "not trained with TRIM" not in readme
    assert str(clip[0]) not in (out / "config.json").read_text()


def test_released_trim_layout_with_matching_clip(released_trim, clip, tmp_path):
    # SRC's bf16 vision tower equals the fp32 CLIP's rounded to bf16: accepted without --force.
    result = convert_trim(released_trim[0], tmp_path / "trim", clip=str(clip[0]), progress=False)
    assert not any("WARNING" in note for note in result.notes)


def test_released_trim_layout_as_visionzip_fails_with_the_text_tower_keys(released_trim, tmp_path):
    with pytest.raises(ConversionError, match=r"unmapped keys: .*text_tower.*did you mean `convert trim`"):
        convert_visionzip(released_trim[0], tmp_path / "vz", progress=False)
    assert not (tmp_path / "vz").exists()


def test_original_llava_without_a_text_tower_is_not_carded_as_trim_trained(clip, tmp_path):
    """The CLIP text tower added from --clip does not make the weights TRIM-trained: card and note agree."""
    directory = tmp_path / "llava-v1.5"
    save_original(directory, vision_tower=str(clip[0]))
    result = convert_trim(directory, tmp_path / "out", clip=str(clip[0]), progress=False)
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "not trained with TRIM" in readme and "fine-tuned with TRIM active" not in readme
    assert any("training-free" in note for note in result.notes)


def test_fixed_ratio_reduce_func_becomes_equal_bounds(clip, tmp_path):
    directory = tmp_path / "ratio"
    save_original(directory, vision_tower=str(clip[0]), with_vision=True, clip=clip[1], reduce_func="TextSim:0.25")
    result = convert_trim(directory, tmp_path / "out", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["trim_min_tokens"], config["trim_max_tokens"], config["trim_append_mean_token"]) == (16, 16, False)
    assert any("TextSim:0.25" in note for note in result.notes)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
        ({"mm_projector_type": "linear"}, "projector type"),
        ({"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad"}, "LLaVA-NeXT"),
        ({"architectures": ["LlavaMistralForCausalLM"], "model_type": "llava_mistral"}, "Llama-based"),
        ({"mm_hidden_size": 48}, "shape mismatch"),
    ],
)
def test_unsupported_original_configs(clip, tmp_path, overrides, message):
    directory = tmp_path / "bad"
    save_original(directory, vision_tower=str(clip[0]), config_overrides=overrides)
    with pytest.raises(ConversionError, match=message):
        convert_visionzip(directory, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_llava15_config_with_model_type_llava_is_detected_as_original(clip, tmp_path):
    # liuhaotian/llava-v1.5-* configs say model_type "llava" (no text_config): still the LLaVA-codebase format.
    directory = tmp_path / "llava_typed"
    save_original(directory, vision_tower=str(clip[0]), config_overrides={"model_type": "llava"})
    result = convert_visionzip(directory, tmp_path / "out", dominant_tokens=10, contextual_tokens=4, progress=False)
    assert result.source_format == "original"


def test_original_without_clip_reference_fails(tmp_path):
    directory = tmp_path / "no_tower"
    save_original(directory, vision_tower="")
    with pytest.raises(ConversionError, match="--clip"):
        convert_visionzip(directory, tmp_path / "out", progress=False)


# Projector files -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stock_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stock") / "llava-tiny-hf"
    save_stock(directory)
    return directory


@pytest.mark.parametrize("kind", ["bin", "safetensors"])
def test_projector_file_replaces_the_projector(stock_dir, tmp_path, kind):
    tensors = projector_tensors()
    path = tmp_path / ("mm_projector.bin" if kind == "bin" else "projector.safetensors")
    (save_projector_bin if kind == "bin" else save_projector_safetensors)(path, tensors)
    out = tmp_path / "vz"
    result = convert_visionzip(stock_dir, out, projector=str(path), dominant_tokens=54, contextual_tokens=10,
                               progress=False)
    assert any(path.name in item for item in result.added)
    model, _ = _load(out)
    for name, value in tensors.items():
        assert torch.equal(model.state_dict()[f"model.multi_modal_projector.{name}"], value), name
    readme = (out / "README.md").read_text()
    assert "tuned for the reduced tokens" in readme and '"VisionZip‡ 64"' in readme


def test_projector_file_errors(stock_dir, tmp_path):
    tensors = projector_tensors()
    wrong_shape = dict(tensors, **{"linear_1.bias": torch.zeros(7)})
    save_projector_safetensors(tmp_path / "shape.safetensors", wrong_shape)
    with pytest.raises(ConversionError, match="shape mismatch"):
        convert_visionzip(stock_dir, tmp_path / "o", projector=str(tmp_path / "shape.safetensors"), progress=False)
    torch.save({"model.mm_projector.0.weight": tensors["linear_1.weight"]}, tmp_path / "partial.bin")
    with pytest.raises(ConversionError, match="lacks"):
        convert_visionzip(stock_dir, tmp_path / "o", projector=str(tmp_path / "partial.bin"), progress=False)
    extra = {f"model.mm_projector.{0 if k.startswith('linear_1') else 2}.{k.split('.')[1]}": v
             for k, v in tensors.items()}
    torch.save({**extra, "model.mm_projector.4.weight": torch.zeros(2)}, tmp_path / "extra.bin")
    with pytest.raises(ConversionError, match="not a LLaVA projector weight"):
        convert_visionzip(stock_dir, tmp_path / "o", projector=str(tmp_path / "extra.bin"), progress=False)
    assert not (tmp_path / "o").exists()


def test_projector_directory_is_named_as_a_directory(stock_dir, tmp_path):
    (tmp_path / "projector_dir").mkdir()
    with pytest.raises(ConversionError, match="is a directory; expected the projector file itself"):
        convert_visionzip(stock_dir, tmp_path / "o", projector=str(tmp_path / "projector_dir"), progress=False)


def test_nan_weights_are_copied_and_verified(stock_dir, tmp_path):
    """A NaN in SRC is carried over as it is; verification must not call it a difference (NaN != NaN)."""
    import shutil

    from safetensors.torch import load_file, save_file

    source = shutil.copytree(stock_dir, tmp_path / "nan_src")
    state = load_file(source / "model.safetensors")
    key = next(k for k in state if k.endswith("multi_modal_projector.linear_1.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, source / "model.safetensors", metadata={"format": "pt"})
    convert_visionzip(source, tmp_path / "out", progress=False)
    converted = load_file(tmp_path / "out" / "model.safetensors")
    stored = next(v for k, v in converted.items() if k.endswith("multi_modal_projector.linear_1.weight"))
    assert torch.isnan(stored[0, 0]) and int(torch.isnan(stored).sum()) == 1


class _Payload:
    """Unpickling this would create a file: the converter must refuse before that can happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_projector_file_is_never_unpickled(stock_dir, tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.bin", "wb") as handle:
        pickle.dump({"model.mm_projector.0.weight": _Payload(str(marker))}, handle)
    with pytest.raises(ConversionError, match="refusing to unpickle"):
        convert_visionzip(stock_dir, tmp_path / "o", projector=str(tmp_path / "evil.bin"), progress=False)
    assert not marker.exists()
    torch.save({"model.mm_projector.0.weight": "not a tensor"}, tmp_path / "strings.bin")
    with pytest.raises(ConversionError, match="dict of name -> tensor"):
        convert_visionzip(stock_dir, tmp_path / "o", projector=str(tmp_path / "strings.bin"), progress=False)
