"""PruMerge's config checks, its classes on stock and saved checkpoints (remote code, shipped files, pipeline),
and the tools reaching it through the registry (convert, model card, show, demo)."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from conftest import assert_ships_only, save_checkpoint
from llava_token_reduction import LlavaPruMergeConfig, LlavaPruMergeForConditionalGeneration, show
from llava_token_reduction.conversion.cli import main as conversion_main
from llava_token_reduction.tiny import build_method_model, build_processor, llava_config_kwargs


def _config(**fields):
    return LlavaPruMergeConfig(**{**llava_config_kwargs(), **fields})


# Config ----------------------------------------------------------------------------------------------------


def test_defaults_and_model_type():
    config = _config()
    assert config.model_type == "llava_prumerge" and config.num_patches == 64
    assert (config.prumerge_plus, config.prumerge_iqr_multiplier, config.prumerge_batch_coupled) == (False, 1.5, False)
    assert (config.prumerge_min_tokens, config.prumerge_max_tokens) == (None, None)
    assert not hasattr(config, "tokens_per_image")  # the count depends on the image


@pytest.mark.parametrize("field, value, message", [
    ("prumerge_plus", 1, r"`prumerge_plus` must be a bool"),
    ("prumerge_batch_coupled", "yes", r"`prumerge_batch_coupled` must be a bool"),
    ("prumerge_iqr_multiplier", -0.5, r"`prumerge_iqr_multiplier` must be >= 0, got -0.5"),
    ("prumerge_iqr_multiplier", float("nan"), r"`prumerge_iqr_multiplier` must be a finite number"),
    ("prumerge_min_tokens", -1, r"`prumerge_min_tokens` must be >= 0, got -1"),
    ("prumerge_max_tokens", 0, r"`prumerge_max_tokens` must be >= 1, got 0"),
    ("prumerge_max_tokens", 2.0, r"`prumerge_max_tokens` must be an int >= 1"),
    ("prumerge_max_tokens", 65, r"`prumerge_max_tokens` must be <= 64 \(the patches per image\), got 65"),
    ("vision_feature_layer", [-2, -1], r"`vision_feature_layer` must be one int"),
])
def test_bad_values_name_the_field_value_and_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        _config(**{field: value})


def test_combinations_and_sets_are_checked():
    with pytest.raises(ValueError, match=r"`prumerge_min_tokens` must be <= `prumerge_max_tokens`=4, got 5"):
        _config(prumerge_min_tokens=5, prumerge_max_tokens=4)
    config = _config()
    with pytest.raises(ValueError, match=r"`prumerge_iqr_multiplier` must be >= 0"):
        config.prumerge_iqr_multiplier = -1
    config.prumerge_max_tokens = np.int64(8)  # stored as a plain int (JSON)
    assert type(config.prumerge_max_tokens) is int
    with pytest.raises(ValueError, match="image_seq_length=10"):
        _config(image_seq_length=10)


def test_load_time_overrides_are_checked(stock_llava_dir):
    model, info = LlavaPruMergeForConditionalGeneration.from_pretrained(
        stock_llava_dir, prumerge_plus=True, prumerge_max_tokens=6, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.prumerge_plus is True and model.config.prumerge_max_tokens == 6
    with pytest.raises(ValueError, match="`prumerge_max_tokens`"):
        LlavaPruMergeForConditionalGeneration.from_pretrained(stock_llava_dir, prumerge_max_tokens=0)
    model.config.__dict__["prumerge_min_tokens"] = 100  # bypassing the setter: re-checked before any compute
    with pytest.raises(ValueError, match=r"`prumerge_min_tokens` must be <= `prumerge_max_tokens`=6, got 100"):
        model.model.get_image_features(pixel_values=torch.rand(1, 3, 56, 56))


# Saved checkpoints -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prumerge_checkpoint(tmp_path_factory):
    processor = build_processor()
    model = build_method_model("prumerge", processor=processor, seed=0, prumerge_plus=True, prumerge_min_tokens=3)
    model.generation_config.suppress_tokens = [model.config.image_token_id]
    directory = save_checkpoint(model, processor, tmp_path_factory.mktemp("prumerge_checkpoint"))
    return directory, model, processor


def test_checkpoint_ships_only_prumerge_code(prumerge_checkpoint):
    assert_ships_only(
        prumerge_checkpoint[0],
        {"configuration_llava_prumerge.py", "modeling_llava_prumerge.py", "method_prumerge.py",
         "method_prumerge_model.py"},
        ("def visionzip_reduce", "class VisionZipReduction", "def trim_reduce", "class TrimReduction", "convert trim"),
    )


# Tools, through the registry -------------------------------------------------------------------------------


def test_convert_prumerge_from_stock_writes_a_card_and_a_checkpoint(stock_llava_dir, tmp_path, capsys):
    out = tmp_path / "pm"
    status = conversion_main(["prumerge", str(stock_llava_dir), str(out), "--prumerge-plus", "--no-progress"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    model, info = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model).__name__ == "LlavaPruMergeForConditionalGeneration" and model.config.prumerge_plus is True
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava_prumerge"
    card = (out / "README.md").read_text()
    assert "LLaVA with PruMerge+" in card and "- prumerge" in card and "docs/prumerge.md" in card
    assert "$" not in card.replace("$ ", "")  # every placeholder filled
    assert "modeling_llava_prumerge.py" in os.listdir(out)


def test_show_draws_prumerge_plus_samples(tmp_path):
    sample = show.Path(show.__file__).resolve().parent / "assets" / "sample.png"
    out, selection, layout = show.show(sample, "prumerge", out=tmp_path / "pm.png", overrides={"prumerge_plus": True})
    assert out.is_file() and selection.grid == 24 and len(selection.scores) == 576
    assert selection.kept and selection.targets and set(selection.targets) <= set(selection.kept)
    png = Image.open(out).convert("RGB")
    x0, y0, x1, y1 = layout.patch_box(selection.kept[0])
    assert tuple(png.getpixel(((x0 + x1) // 2, y0))) == show.OUTLINE
    assert "PruMerge+" in selection.description


def test_demo_runs_prumerge():
    from llava_token_reduction import demo

    report = demo.run_demo(method="prumerge", overrides={"prumerge_plus": True}, repeats=1, max_new_tokens=1,
                           status=lambda text: None)
    labels = [measurement.label for measurement in report.measurements]
    assert labels == ["stock LLaVA", "PruMerge+"]
    assert 1 <= report.measurements[1].image_tokens <= 576
