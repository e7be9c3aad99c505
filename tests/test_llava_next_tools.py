"""The tools on LLaVA-NeXT: the registry's families (Auto registrations, refusals), `demo` (image sizes passed,
the per-crop budget and the image's total printed) and `show` (every crop's kept patches drawn where the crop
lies), on tiny published-shaped checkpoints. The kept patches are checked against an eager tower's attention."""

import contextlib
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, MODEL_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

import llava_token_reduction  # noqa: F401 - registers the classes
from llava_next_checkpoints import save_published_shaped
from llava_token_reduction import cli, methods
from llava_token_reduction.conversion import convert_visionzip
from llava_token_reduction.families import FAMILIES, family_of_model_type, get_family
from llava_token_reduction.show import OUTLINE, show


DOMINANT, CONTEXTUAL = 6, 2  # per 56-px crop of 64 patches
WIDE = (56, 112)  # (height, width): exactly the 1x2 canvas of the tiny pinpoints, so 3 crops


@pytest.fixture(scope="module")
def stock_next(tmp_path_factory):
    directory = tmp_path_factory.mktemp("next-tools") / "stock"
    save_published_shaped(directory)
    return directory


@pytest.fixture(scope="module")
def next_visionzip(stock_next, tmp_path_factory):
    out = tmp_path_factory.mktemp("next-tools") / "visionzip"
    convert_visionzip(stock_next, out, dominant_tokens=DOMINANT, contextual_tokens=CONTEXTUAL, progress=False)
    return out


@pytest.fixture(scope="module")
def wide_image(tmp_path_factory):
    pixels = (torch.rand(*WIDE, 3, generator=torch.Generator().manual_seed(11)) * 255).byte().numpy()
    path = tmp_path_factory.mktemp("next-tools") / "wide.png"
    Image.fromarray(pixels).save(path)
    return path


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


# The registry's families --------------------------------------------------------------------------------------


def test_every_family_class_of_the_registry_is_registered_with_the_auto_classes():
    classes = methods.all_classes()
    assert {(c.family, c.model_type) for c in classes} >= {("llava", "llava_visionzip"),
                                                           ("llava_next", "llava_next_visionzip")}
    for entry in classes:
        config_class = entry.config_class
        assert CONFIG_MAPPING[entry.model_type] is config_class
        assert MODEL_MAPPING[config_class] is entry.model_class
        assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[config_class] is entry.generation_class
        assert PROCESSOR_MAPPING[config_class] is entry.processor_class
    assert PROCESSOR_MAPPING[CONFIG_MAPPING["llava_next_visionzip"]] is LlavaNextProcessor


def test_families_and_model_types_are_found_both_ways():
    assert methods.find_model_type("llava_next_visionzip")[0] is methods.VISIONZIP
    assert methods.find_model_type("llava_next_visionzip")[1].family == "llava_next"
    assert methods.find_model_type("llava_next") is None and methods.for_model_type("llava_next_visionzip") is None
    assert family_of_model_type("llava_next") is family_of_model_type("llava_next_visionzip") is FAMILIES["llava_next"]
    assert family_of_model_type("llava_trim") is FAMILIES["llava"] and family_of_model_type("qwen2_vl") is None
    assert methods.methods_of_family("llava_next") == (methods.VISIONZIP,)
    assert methods.methods_of_family("llava") == tuple(methods.METHODS.values())
    with pytest.raises(ValueError, match="unknown model family 'llava_video'; choose from llava, llava_next"):
        get_family("llava_video")


@pytest.mark.parametrize("name", ["trim", "prumerge"])
def test_methods_without_next_classes_are_refused_naming_what_exists(name):
    method = methods.get(name)
    with pytest.raises(ValueError) as raised:
        method.classes("llava_next")
    message = str(raised.value)
    assert f"{method.label} has no LLaVA-NeXT classes" in message
    assert "LLaVA-NeXT checkpoints take VisionZip" in message


# demo ---------------------------------------------------------------------------------------------------------


def _table(out: str) -> dict:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("-----"))
    header = re.split(r"\s{2,}", lines[start - 1].strip())
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip():
            break
        label, *cells = re.split(r"\s{2,}", line.strip())
        rows[label.strip()] = cells
    return {"header": header, **rows}


def test_demo_on_a_stock_next_checkpoint_prints_the_per_crop_budget(stock_next, wide_image):
    status, out, err = run_main(["demo", "--model", stock_next, "--image", wide_image, "--repeats", "1",
                                 "--max-new-tokens", "2", "--dominant-tokens", DOMINANT,
                                 "--contextual-tokens", CONTEXTUAL])
    assert status == 0, err
    table = _table(out)
    assert table["header"] == ["stock LLaVA-NeXT", "VisionZip 6+2"]
    processor = AutoProcessor.from_pretrained(stock_next)
    inputs = processor(images=Image.open(wide_image), text="<image>", return_tensors="pt")
    stock_tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
    crops = 3  # base + 1x2 grid
    assert table["image tokens per image"][0] == str(stock_tokens)
    assert table["image tokens per image"][1].startswith(f"{crops * (DOMINANT + CONTEXTUAL)} (")
    assert table["made of"][1] == f"{crops} crops x ({DOMINANT} dominant + {CONTEXTUAL} merged)"
    assert f"image: {WIDE[0]}x{WIDE[1]} px -> 1x2 grid, 3 crops" in out
    assert f"VisionZip 6+2: the budget is per crop: 8 per crop x 3 crops = {crops * 8} tokens for this image" in out
    assert "as LLaVA-NeXT with VisionZip" in err


def test_demo_on_a_next_visionzip_checkpoint_and_a_method_it_lacks(next_visionzip, wide_image):
    status, out, err = run_main(["demo", "--model", next_visionzip, "--image", wide_image, "--repeats", "1",
                                 "--max-new-tokens", "2"])
    assert status == 0, err
    assert _table(out)["header"] == ["stock LLaVA-NeXT", "VisionZip 6+2"]
    status, out, err = run_main(["demo", "--model", next_visionzip, "--method", "trim", "--repeats", "1"])
    assert status != 0
    assert "TRIM has no LLaVA-NeXT classes" in err and "LLaVA-NeXT checkpoints take VisionZip" in err


# show ---------------------------------------------------------------------------------------------------------


def _eager_kept_patches(checkpoint, image_path) -> list[set]:
    """Per crop, the `DOMINANT - 1` patches with the largest CLS attention (summed over heads) of layer
    `visionzip_layer` (-2), from an eager stock tower's attention maps (ALGORITHMS.md §1.2), with their margin."""
    model = LlavaNextForConditionalGeneration.from_pretrained(checkpoint, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    inputs = processor(images=Image.open(image_path), text="<image>", return_tensors="pt")
    crops = inputs["pixel_values"][0, :3]
    with torch.no_grad():
        attentions = model.model.vision_tower(crops, output_attentions=True).attentions
    layer = -2 % len(attentions)
    scores = attentions[layer][:, :, 0, 1:].sum(dim=1)  # [crops, patches]
    ordered = scores.sort(dim=1, descending=True).values
    margin = (ordered[:, DOMINANT - 2] - ordered[:, DOMINANT - 1]).min().item()
    assert margin > 1e-5, f"tie at the top-k boundary ({margin}): the comparison would be luck"
    return [set(row.topk(DOMINANT - 1).indices.tolist()) for row in scores]


def test_show_draws_every_crops_kept_patches_where_the_crop_lies(next_visionzip, wide_image, tmp_path):
    out, selection, layout = show(wide_image, "visionzip", model_path=str(next_visionzip), out=tmp_path / "n.png")
    assert selection.crops is not None and len(selection.crops) == 3
    assert selection.tokens == 3 * (DOMINANT + CONTEXTUAL)
    assert "per crop x 3 crops" in selection.description
    expected = _eager_kept_patches(next_visionzip, wide_image)
    assert [set(crop.kept) for crop in selection.crops] == expected
    assert all(len(crop.targets) == CONTEXTUAL for crop in selection.crops)
    # The grid crops sit side by side (1x2) right of the base crop, at the same height.
    side = layout.cell * layout.grid
    (base_x, base_y), (left_x, left_y), (right_x, right_y) = layout.origins
    assert layout.crop_grid == (1, 2) and left_y == right_y == base_y and right_x - left_x == side > 0
    assert left_x > base_x + side
    picture = np.asarray(Image.open(out).convert("RGB"))
    for index, crop in enumerate(selection.crops):
        for patch in crop.kept:
            x0, y0, _, _ = layout.patch_box(index, patch)
            assert tuple(picture[y0, x0]) == OUTLINE, (index, patch)
        unmarked = set(range(layout.grid**2)) - set(crop.kept)
        patch = min(unmarked)
        x0, y0, _, _ = layout.patch_box(index, patch)
        assert tuple(picture[y0 + 1, x0 + 1]) != OUTLINE


def test_show_refuses_a_method_the_next_checkpoint_has_no_classes_for(next_visionzip, wide_image, tmp_path):
    with pytest.raises(ValueError, match="PruMerge has no LLaVA-NeXT classes"):
        show(wide_image, "prumerge", model_path=str(next_visionzip), out=tmp_path / "p.png")
