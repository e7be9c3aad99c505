"""`convert visionzip` from stock llava-hf LLaVA-NeXT checkpoints (by path, and by hub id from a private hub cache
offline): the output loads cleanly through our class and the Auto classes, holds the source's tensors, reduces per
crop, and its card lists the per-image totals of the checkpoint's grids. Methods without LLaVA-NeXT classes are
refused naming the one that has them."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlavaNextProcessor

from llava_next_checkpoints import legacy_state_dict, save_published_shaped
from llava_next_published import PUBLISHED_CONFIG
from llava_token_reduction import LlavaNextVisionZipConfig, LlavaNextVisionZipForConditionalGeneration
from llava_token_reduction.conversion import ConversionError, convert_visionzip, render_model_card
from llava_token_reduction.conversion.cli import main as conversion_main


BUDGET = {"dominant_tokens": 6, "contextual_tokens": 2}  # 8 tokens per 56-px crop (64 patches + CLS)
HUB_ID = "llava-hf/llava-v1.6-vicuna-7b-hf"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("next") / "llava-v1.6-tiny-hf"
    return directory, save_published_shaped(directory)


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("next-out") / "tiny-next-visionzip"
    result = convert_visionzip(source[0], out, progress=False, **BUDGET)
    return out, result


def _expected_totals(config) -> dict:
    """Per pinpoint (height, width): (grid, (1 + rows·cols)·(dominant + contextual)), from ALGORITHMS.md §1.5."""
    crop = config["vision_config"]["image_size"]
    per_crop = config.get("dominant_tokens", 54) + config.get("contextual_tokens", 10)
    return {(h, w): ((h // crop, w // crop), (1 + (h // crop) * (w // crop)) * per_crop)
            for h, w in config["image_grid_pinpoints"]}


def test_output_loads_cleanly_with_the_source_tensors(source, converted):
    out, result = converted
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava_next_visionzip" and result.source_format == "stock"
    assert (config["dominant_tokens"], config["contextual_tokens"]) == (6, 2)
    model, info = LlavaNextVisionZipForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    auto, auto_info = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True,
                                                                  output_loading_info=True)
    assert type(auto).__name__ == "LlavaNextVisionZipForConditionalGeneration"
    assert not any(auto_info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), auto_info
    # Every tensor is the source's (stored in float16, as published), the root `image_newline` included.
    stored = {key: tensor.to(torch.float16) for key, tensor in legacy_state_dict(source[1]).items()}
    mine = legacy_state_dict(model)
    assert set(mine) == set(stored)
    assert all(torch.equal(mine[key], stored[key]) for key in stored)
    assert torch.count_nonzero(model.model.image_newline) > 0
    assert type(AutoProcessor.from_pretrained(out, trust_remote_code=True)) is LlavaNextProcessor


def test_output_reduces_per_crop_like_the_source_loaded_as_visionzip(source, converted):
    out, _ = converted
    processor = AutoProcessor.from_pretrained(out)
    image = Image.fromarray((torch.rand(56, 112, 3, generator=torch.Generator().manual_seed(3)) * 255).byte().numpy())
    inputs = processor(images=image, text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt")
    model = LlavaNextVisionZipForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    direct = LlavaNextVisionZipForConditionalGeneration.from_pretrained(source[0], dtype=torch.float32,
                                                                        **BUDGET).eval()
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                  image_sizes=inputs["image_sizes"]).pooler_output
        # 56x112 px is exactly the 1x2 canvas: 3 crops of 8 tokens.
        assert features[0].shape[0] == 3 * 8
        ours = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        theirs = direct.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(ours, theirs)


def test_card_says_per_crop_and_lists_the_totals_of_every_grid(converted):
    out, _ = converted
    card = (out / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert "**per crop**" in card
    for (height, width), ((rows, cols), total) in _expected_totals(config).items():
        assert f"| {rows}x{cols} | {height}x{width} | {1 + rows * cols} | {total} |" in card


def test_card_of_the_published_config_lists_the_published_totals():
    """On llava-hf/llava-v1.6-vicuna-7b-hf's own config at 108+20 per crop: 384 / 640 / 512 (docs/llava_next.md)
    and the stock counts of 672x672 (2928) and 336x672 (1752) from TRANSFORMERS.md §13."""
    fields = {k: v for k, v in PUBLISHED_CONFIG.items() if k not in ("architectures", "model_type")}
    config = LlavaNextVisionZipConfig(**fields, dominant_tokens=108, contextual_tokens=20)
    card = render_model_card(config, repo_id="someone/next-vz", base_models=[HUB_ID])
    assert "| 1x2 | 336x672 | 3 | 384 | 1752 |" in card
    assert "| 2x2 | 672x672 | 5 | 640 | 2928 |" in card
    assert "| 1x3 | 336x1008 | 4 | 512 |" in card and "| 3x1 | 1008x336 | 4 | 512 |" in card
    assert '"VisionZip 640"' in card and f"`{HUB_ID}` with **VisionZip**" in card
    expected = _expected_totals({**PUBLISHED_CONFIG, "dominant_tokens": 108, "contextual_tokens": 20})
    assert sorted(total for _, total in expected.values()) == [384, 384, 512, 512, 640]


@pytest.mark.parametrize("method", ["trim", "prumerge"])
def test_methods_without_next_classes_are_refused_naming_visionzip(source, tmp_path, capsys, method):
    status = conversion_main([method, str(source[0]), str(tmp_path / "out"), "--no-progress"])
    error = capsys.readouterr().err.strip()
    assert status != 0 and not (tmp_path / "out").exists()
    assert len(error.splitlines()) == 1
    assert "LLaVA-NeXT" in error and "VisionZip" in error, error


def test_overwrite_replaces_a_previous_next_output(source, converted, tmp_path):
    out = tmp_path / "again"
    convert_visionzip(source[0], out, progress=False, **BUDGET)
    with pytest.raises(ConversionError, match="exists"):
        convert_visionzip(source[0], out, progress=False, **BUDGET)
    convert_visionzip(source[0], out, progress=False, overwrite=True, dominant_tokens=4, contextual_tokens=1)
    assert AutoConfig.from_pretrained(out).tokens_per_crop == 5


def test_hub_id_source_from_a_private_hub_cache_offline(source, tmp_path):
    from conversion_inputs import add_to_hub_cache

    add_to_hub_cache(tmp_path / "hub", HUB_ID, source[0])
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = tmp_path / "from-hub"
    result = subprocess.run(
        [sys.executable, "-m", "llava_token_reduction", "convert", "visionzip", HUB_ID, str(out),
         "--dominant-tokens", "6", "--contextual-tokens", "2", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Wrote and verified" in result.stdout
    model, info = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert type(model).__name__ == "LlavaNextVisionZipForConditionalGeneration"
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    card = (out / "README.md").read_text()
    assert f'base_model:\n- "{HUB_ID}"' in card and f"`{HUB_ID}` with **VisionZip**" in card


def test_card_snippets_run_as_written(tmp_path, run_isolated_python):
    """The NeXT card's usage snippets, with the hub id and the example image swapped for local files, in a clean
    process without the package (published 336-px crops, tiny widths, the default 54+10 budget)."""
    from llava_token_reduction.conversion import extract_python_snippets
    from llava_token_reduction.conversion.model_card import EXAMPLE_IMAGE_URL
    from llava_token_reduction.tiny import TinyShape

    save_published_shaped(tmp_path / "stock", shape=TinyShape(image_size=336, patch_size=14, vision_layers=2))
    checkpoint = tmp_path / "vz"
    convert_visionzip(tmp_path / "stock", checkpoint, repo_id="acme/next-vz", progress=False)
    Image.fromarray((torch.rand(80, 120, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy()).save(
        tmp_path / "cats.png")
    snippets = extract_python_snippets((checkpoint / "README.md").read_text())
    assert len(snippets) == 3 and all("acme/next-vz" in s and EXAMPLE_IMAGE_URL in s for s in snippets)
    local = [s.replace("acme/next-vz", str(checkpoint)).replace(EXAMPLE_IMAGE_URL, str(tmp_path / "cats.png"))
             for s in snippets]
    (tmp_path / "snippets.json").write_text(json.dumps(local))
    script = ("import json\nfor i, s in enumerate(json.load(open('snippets.json'))):\n"
              "    exec(compile(s, f'snippet_{i}', 'exec'), {'__name__': '__main__'})\n    print('RAN', i)\n")
    result = run_isolated_python(script, tmp_path, timeout=300)
    assert [line for line in result.stdout.splitlines() if line.startswith("RAN")] == ["RAN 0", "RAN 1", "RAN 2"]
