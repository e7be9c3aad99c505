"""LLaVA-NeXT VisionZip as users run it from a saved checkpoint: `pipeline("image-text-to-text")`, bf16,
`device_map` with disk offload, and the code files a checkpoint ships."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, pipeline

from llava_token_reduction import LlavaNextVisionZipConfig, LlavaNextVisionZipForConditionalGeneration
from llava_token_reduction.tiny_next import build_next_processor, llava_next_config_kwargs


NEW_TOKENS = 4


def picture(size, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    processor = build_next_processor()
    torch.manual_seed(0)
    config = LlavaNextVisionZipConfig(**llava_next_config_kwargs(tokenizer=processor.tokenizer),
                                      dominant_tokens=8, contextual_tokens=4)
    model = LlavaNextVisionZipForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = [config.image_token_id]
    directory = tmp_path_factory.mktemp("next_visionzip")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory, model, processor


def expected_text(model, processor, prompt, image):
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_checkpoint_ships_only_next_visionzip_code(checkpoint):
    directory, _, _ = checkpoint
    shipped = {name for name in os.listdir(directory) if name.endswith(".py")}
    assert shipped == {
        "checkpoint_code.py", "checkpoint_source.py", "config_checks.py", "configuration_llava_next_visionzip.py",
        "configuration_llava_visionzip.py", "family_llava_next.py", "family_llava_next_model.py", "method_base.py",
        "method_visionzip.py", "method_visionzip_model.py", "modeling_llava_next_visionzip.py",
        "reduced_generation.py", "reduced_inputs.py", "reduced_model.py", "token_compaction.py",
        "token_selection.py", "vision_inputs.py",
    }  # no LLaVA-1.5 family file, nothing of TRIM


def test_pipeline_one_image_and_a_batch_of_one_grid(checkpoint):
    directory, model, processor = checkpoint
    pipe = pipeline("image-text-to-text", model=str(directory), trust_remote_code=True)
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    image = picture((120, 120), 1)
    result = pipe(images=image, text=prompt, max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False)
    assert result[0]["generated_text"] == expected_text(model, processor, prompt, image)
    full = pipe(images=image, text=prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert full[0]["generated_text"] == prompt + result[0]["generated_text"]
    # Two 2x2-grid images of different sizes (different placeholder counts) in one batch.
    images = [picture((120, 120), 2), picture((100, 90), 3)]
    prompts = [prompt, "USER: <image>\nA much longer question about it? ASSISTANT:"]
    results = pipe(images=images, text=prompts, max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False,
                   batch_size=2)
    for result, text, each in zip(results, prompts, images):
        result = result[0] if isinstance(result, list) else result
        assert result["generated_text"] == expected_text(model, processor, text, each)


def test_pipeline_batch_mixing_grids_equals_each_image_alone(checkpoint, tmp_path):
    """TRANSFORMERS.md §13 expected transformers' pipeline collate to fail on 5-D `pixel_values` with different crop
    counts; in transformers 5.24 it pads them, and stock LLaVA-NeXT batches them too. Ours gives each image's
    text alone, as stock does."""
    directory, model, processor = checkpoint
    stock_config = LlavaNextConfig(**llava_next_config_kwargs(tokenizer=processor.tokenizer))
    stock = LlavaNextForConditionalGeneration(stock_config)
    stock.load_state_dict(model.state_dict())
    stock.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    prompts = ["USER: <image>\nWhat? ASSISTANT:", "USER: <image>\nAnd this one, in detail? ASSISTANT:"]
    images = [picture((120, 120), 4), picture((56, 100), 5)]  # 2x2 (5 crops) and 1x2 (3 crops)
    for source, trust in ((directory, True), (tmp_path, False)):
        pipe = pipeline("image-text-to-text", model=str(source), trust_remote_code=trust)
        batched = pipe(images=images, text=prompts, max_new_tokens=NEW_TOKENS, do_sample=False, batch_size=2,
                       return_full_text=False)
        for result, text, image in zip(batched, prompts, images):
            result = result[0] if isinstance(result, list) else result
            alone = pipe(images=image, text=text, max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False)
            assert result["generated_text"] == alone[0]["generated_text"], source
    # and ours equals its own generate on each prompt
    pipe = pipeline("image-text-to-text", model=str(directory), trust_remote_code=True)
    batched = pipe(images=images, text=prompts, max_new_tokens=NEW_TOKENS, do_sample=False, batch_size=2,
                   return_full_text=False)
    for result, text, image in zip(batched, prompts, images):
        result = result[0] if isinstance(result, list) else result
        assert result["generated_text"] == expected_text(model, processor, text, image)


@pytest.fixture(scope="module")
def plain(checkpoint):
    directory, model, processor = checkpoint
    images = [picture((120, 120), 6), picture((30, 200), 7), picture((56, 100), 8)]
    inputs = processor(images=images, text=["<image>"] * 3, return_tensors="pt", padding=True)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                  image_sizes=inputs["image_sizes"])
    return inputs, list(features.pooler_output)


def test_disk_offload_gives_the_same_features(checkpoint, plain, tmp_path):
    directory, _, _ = checkpoint
    model = LlavaNextVisionZipForConditionalGeneration.from_pretrained(
        directory, device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "offload").eval()
    assert "disk" in set(model.hf_device_map.values()), model.hf_device_map
    inputs, expected = plain
    with torch.no_grad():
        actual = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    for a, b in zip(actual.pooler_output, expected):
        torch.testing.assert_close(a.cpu(), b, atol=1e-6, rtol=0)


def test_bfloat16_generates(checkpoint, plain):
    directory, _, processor = checkpoint
    model = LlavaNextVisionZipForConditionalGeneration.from_pretrained(directory, dtype=torch.bfloat16).eval()
    inputs, expected = plain
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"].bfloat16(),
                                                  image_sizes=inputs["image_sizes"])
    assert [f.shape for f in features.pooler_output] == [f.shape for f in expected]
    assert all(f.dtype == torch.bfloat16 and torch.isfinite(f).all() for f in features.pooler_output)
    prompt = processor(images=[picture((120, 120), 6)], text=["USER: <image>\nWhat? ASSISTANT:"], return_tensors="pt")
    prompt["pixel_values"] = prompt["pixel_values"].bfloat16()
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + NEW_TOKENS)


def _readme_block(heading: str) -> str:
    """The first ```python block after `heading` in README.md."""
    with open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    section = readme[readme.index(heading):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_next_snippet_runs_as_written(tmp_path):
    """README's LLaVA-NeXT snippet, unchanged, against `llava-hf/llava-v1.6-vicuna-7b-hf` resolved from a private
    hub cache (a tiny stock LLaVA-NeXT checkpoint in the published key layout, offline)."""
    import subprocess
    import sys

    from conversion_inputs import add_to_hub_cache
    from llava_next_published import published_stock_checkpoint
    from llava_token_reduction.tiny import TinyShape

    # The published crop (336 px, patch 14: 576 patches) with a narrow, shallow model, so that 54+10 per crop fit.
    shape = TinyShape(image_size=336, patch_size=14, vision_layers=2)
    processor = build_next_processor(shape)
    torch.manual_seed(0)
    config = LlavaNextVisionZipConfig(**llava_next_config_kwargs(shape, tokenizer=processor.tokenizer))
    (tmp_path / "source").mkdir()
    source = published_stock_checkpoint(LlavaNextVisionZipForConditionalGeneration(config), processor,
                                         tmp_path / "source", shape=shape)
    add_to_hub_cache(tmp_path / "hub", "llava-hf/llava-v1.6-vicuna-7b-hf", source)
    picture((300, 400), 9).save(tmp_path / "photo.jpg")
    snippet = _readme_block("## VisionZip on LLaVA-NeXT")
    assert 'model_id = "llava-hf/llava-v1.6-vicuna-7b-hf"' in snippet
    script = snippet + "\nassert output.shape[1] > inputs['input_ids'].shape[1]\nprint('README-OK')\n"
    (tmp_path / "readme.py").write_text(script)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "readme.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0 and "README-OK" in result.stdout, result.stdout + result.stderr
