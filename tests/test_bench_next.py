"""`bench` on LLaVA-NeXT: the preset at LLaVA-NeXT-7B widths, stock `LlavaNextForConditionalGeneration` against
VisionZip at the published per-crop budgets on shared weights, a 672x672 picture (2x2 grid, 5 crops, 2928 stock
placeholders), `image_sizes` as the side input; the batch sweep; a LLaVA-NeXT checkpoint by hub id, offline."""

import json
from dataclasses import replace

import pytest
from PIL import Image
from transformers import LlavaNextForConditionalGeneration

from bench_support import bench_from_hub_cache, efficiency_script
from llava_token_reduction import LlavaNextVisionZipForConditionalGeneration, bench


# ALGORITHMS.md §1.5: 108+20 / 54+10 / 27+5 per crop, 640 / 320 / 160 tokens on a 5-crop image.
PUBLISHED_BUDGETS = {"visionzip-640": (108, 20), "visionzip-320": (54, 10), "visionzip-160": (27, 5)}


def stock_count(height: int, width: int, grid_rows: int, grid_cols: int, side: int = 24) -> int:
    """The stock LLaVA-NeXT placeholder count of a picture whose aspect matches its grid canvas (no unpadding):
    the base crop's patches, the canvas's patches and one newline per canvas row."""
    assert height * grid_cols == width * grid_rows
    return side * side + (grid_rows * side) * (grid_cols * side) + grid_rows * side


def test_the_llava_next_7b_preset_has_its_widths_and_a_672_picture():
    shape = bench.PRESETS["llava-next-7b"]
    assert shape.family == "llava_next" and shape.input_image_size == (672, 672)
    assert (shape.vision_hidden, shape.vision_layers, shape.vision_heads, shape.image_size, shape.patch_size) == (
        1024, 24, 16, 336, 14)
    assert (shape.lm_hidden, shape.lm_intermediate, shape.lm_layers, shape.lm_heads, shape.lm_kv_heads,
            shape.lm_vocab) == (4096, 11008, 32, 32, 32, 32064)
    rows = bench.default_methods(bench.LLAVA_NEXT)
    assert [m.name for m in rows] == ["stock", *PUBLISHED_BUDGETS]
    assert {m.name: (m.config_overrides()["dominant_tokens"], m.config_overrides()["contextual_tokens"])
            for m in rows[1:]} == PUBLISHED_BUDGETS
    # The stock processor at these widths: 2928 placeholders for the 672x672 picture.
    from llava_token_reduction.tiny_next import build_next_processor

    picture = bench.fit_image(Image.open(bench.SAMPLE_IMAGE).convert("RGB"), shape)
    assert picture.size == (672, 672)
    processor = build_next_processor(shape)
    inputs = processor(images=[picture], text=["USER: <image>\nhi ASSISTANT:"], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_id).sum()) == stock_count(672, 672, 2, 2) == 2928
    assert inputs["pixel_values"].shape[:2] == (1, 5) and inputs["image_sizes"].tolist() == [[672, 672]]


@pytest.fixture(scope="module")
def next_run():
    shape = replace(bench.PRESETS["tiny-next"], vision_layers=3, lm_layers=1)
    image = Image.open(bench.SAMPLE_IMAGE).convert("RGB")
    workload = bench.build_preset_workload(shape, image, "What is here?")
    report = bench.run_benchmark(workload, repeats=1, warmup=0, new_tokens=2, log=lambda *_: None, batch_sizes=(2,))
    return workload, report


def test_rows_are_stock_llava_next_and_visionzip_per_crop_on_shared_weights(next_run):
    workload, _ = next_run
    assert list(workload.models) == ["stock", *PUBLISHED_BUDGETS]
    stock = workload.models["stock"]
    assert type(stock) is LlavaNextForConditionalGeneration
    for name, (dominant, contextual) in PUBLISHED_BUDGETS.items():
        model = workload.models[name]
        assert isinstance(model, LlavaNextVisionZipForConditionalGeneration)
        assert (model.config.dominant_tokens, model.config.contextual_tokens) == (dominant, contextual)
        for module in ("vision_tower", "multi_modal_projector", "language_model"):
            assert getattr(model.model, module) is getattr(stock.model, module), (name, module)
        assert model.model.image_newline is stock.model.image_newline and model.lm_head is stock.lm_head
    assert workload.image.size == (672, 672)
    for inputs in workload.inputs.values():
        assert inputs["image_sizes"].tolist() == [[672, 672]] and inputs["pixel_values"].shape[:2] == (1, 5)


def test_next_report_counts_tokens_crops_layers_kv_and_flops(next_run):
    workload, report = next_run
    shape = workload.shape
    rows = {row["method"]: row for row in report["methods"]}
    assert rows["stock"]["image_tokens"] == stock_count(672, 672, 2, 2) == 2928
    text = rows["stock"]["prefill_tokens"] - 2928
    for name, (dominant, contextual) in PUBLISHED_BUDGETS.items():
        assert rows[name]["image_tokens"] == 5 * (dominant + contextual)
        assert rows[name]["prefill_tokens"] == text + rows[name]["image_tokens"]
    head_dim = shape.lm_hidden // shape.lm_heads
    for name, row in rows.items():
        # Every crop of the image through the tower; stock all 3 layers, VisionZip up to layer -2 (2 layers).
        assert (row["vision_crops"], row["vision_layers_run"]) == (5, 3 if name == "stock" else 2), name
        assert row["kv_cache_bytes"] == 2 * shape.lm_layers * row["prefill_tokens"] * shape.lm_kv_heads * head_dim * 4
        assert row["prefill_flops"] == bench.lm_prefill_flops(
            row["prefill_tokens"], shape.lm_hidden, shape.lm_intermediate, shape.lm_layers, shape.lm_heads,
            shape.lm_kv_heads, shape.lm_vocab)
        assert row["prefill_speedup_predicted"] == pytest.approx(
            rows["stock"]["prefill_flops"]["total"] / row["prefill_flops"]["total"])
    assert report["family"] == "llava_next" and report["input_image_size"] == [672, 672]
    # The released way of getting VisionZip's attention runs the tower over the image's 5 crops, every map kept.
    attention = report["attention_acquisition"]
    assert attention["released_eager_all_maps"]["attention_map_bytes"] == 3 * 5 * 4 * 577 * 577 * 4
    kinds = {(f["method"], f["kind"]) for f in report["figures"]}
    assert kinds == {(name, kind) for name in PUBLISHED_BUDGETS
                     for kind in ("reduction_over_vision", "prefill_speedup_fraction", "vision_vs_stock")}
    markdown = bench.render_markdown(report)
    assert "(LLaVA-NeXT)" in markdown and "picture 672x672, 5 crops per image" in markdown
    assert "| visionzip-160 | 160 |" in markdown and "| 5 × 2 |" in markdown and "| 5 × 3 |" in markdown
    assert "CLIP text" not in markdown.split("\n")[2]
    assert not any(word in markdown for word in ("Targets", "MET", "MISSED", "target"))


def test_next_batch_cells_count_every_crop_and_the_stock_projection(next_run):
    workload, report = next_run
    shape = workload.shape
    cells = {(c["method"], c["batch"]): c for c in report["batching"]}
    assert set(cells) == {(name, size) for name in ("stock", *PUBLISHED_BUDGETS) for size in (1, 2)}
    for (name, size), cell in cells.items():
        tokens = 2928 if name == "stock" else 5 * sum(PUBLISHED_BUDGETS[name])
        assert cell["image_tokens_per_image"] == [tokens] * size and cell["padding_fraction"] == 0
        assert cell["vision_crops_per_image"] == 5
    # Stock LLaVA-NeXT projects every crop's 576 patches and adds its 48 newline tokens after the projector.
    stock = cells["stock", 2]
    length = stock["prefill_positions"] // 2
    layer = (4 * 2 * 577 * shape.vision_hidden ** 2 + 2 * 2 * 577 * 577 * shape.vision_hidden
             + 2 * 2 * 577 * shape.vision_hidden * shape.vision_intermediate)
    vision = 10 * (2 * 576 * 3 * 14 * 14 * shape.vision_hidden + 3 * layer)
    projector = 2 * 5 * 576 * 2 * (shape.vision_hidden * shape.lm_hidden + shape.lm_hidden ** 2)
    language = 2 * sum(bench.shape_prefill_flops(shape, n, past=p)["total"]
                       for n, p in ((length, 0), (1, length)))
    assert stock["generate_flops"] == vision + projector + language


def test_methods_without_llava_next_classes_are_refused_by_name(capsys):
    from llava_token_reduction.cli import main

    assert main(["bench", "--preset", "tiny-next", "--methods", "stock,trim"]) == 1
    assert ("unknown method(s) trim; choose from stock, visionzip-640, visionzip-320, visionzip-160 (LLaVA-NeXT rows)"
            in capsys.readouterr().err)
    with pytest.raises(ValueError, match="TRIM has no LLaVA-NeXT classes; LLaVA-NeXT methods: VisionZip"):
        bench.build_models(None, [bench.Method("trim", "trim")], bench.LLAVA_NEXT)


def _save_tiny_next(directory):
    from llava_token_reduction.tiny_next import build_next_processor, stock_next_model

    stock_next_model().save_pretrained(directory)
    build_next_processor().save_pretrained(directory)


def test_bench_takes_a_llava_next_hub_id_from_the_hub_cache_offline(tmp_path):
    _save_tiny_next(tmp_path / "model")
    report = bench_from_hub_cache(tmp_path, "llava-hf/llava-v1.6-vicuna-7b-hf", tmp_path / "model", [
        "--methods", "stock,visionzip-160", "--batch-sizes", "1", "--repeats", "1", "--warmup", "0",
        "--new-tokens", "2"])
    assert report["source"] == "llava-hf/llava-v1.6-vicuna-7b-hf" and report["family"] == "llava_next"
    rows = {row["method"]: row for row in report["methods"]}
    # The sample picture (336x336) on the tiny crops (56 px, 8x8 patches): a 2x2 grid, 5 crops.
    assert rows["stock"]["image_tokens"] == stock_count(336, 336, 2, 2, side=8) == 336
    assert rows["visionzip-160"]["image_tokens"] == 160 and rows["visionzip-160"]["vision_crops"] == 5
    assert report["attention_acquisition"]["released_eager_all_maps"]["attention_map_bytes"] > 0


def test_an_unknown_model_type_is_refused_with_the_types_bench_loads(tmp_path):
    from transformers import LlavaOnevisionConfig

    LlavaOnevisionConfig().save_pretrained(tmp_path)
    image = Image.open(bench.SAMPLE_IMAGE).convert("RGB")
    with pytest.raises(ValueError, match="is a 'llava_onevision' checkpoint; bench loads model types llava, "
                                         "llava_visionzip, llava_trim, llava_prumerge, llava_next, "
                                         "llava_next_visionzip"):
        bench.build_checkpoint_workload(str(tmp_path), image, "hi")


def test_efficiency_script_runs_a_llava_next_checkpoint(tmp_path, capsys):
    _save_tiny_next(tmp_path / "model")
    out = tmp_path / "efficiency.json"
    assert efficiency_script().main(["--model", str(tmp_path / "model"), "--budgets", "27+5", "--samples", "1",
                                      "--warmup", "0", "--new-tokens", "2", "--out", str(out)]) == 0
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["stock", "visionzip-160"]
    assert rows["stock"]["image_tokens"] == 336 and rows["visionzip-160"]["image_tokens"] == 160
    assert "| visionzip-160 | 160 |" in capsys.readouterr().out
