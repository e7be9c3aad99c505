"""The benchmark: analytic FLOPs against a hand computation, and a tiny end-to-end run with every output."""

import json

import pytest
from PIL import Image

from llava_token_reduction import bench


def test_prefill_flops_match_a_hand_computation():
    # 10 tokens, d=8, m=12, 2 layers, 2 heads (head dim 4), 1 KV head (GQA, kv width 4), vocab 20.
    flops = bench.lm_prefill_flops(10, hidden=8, intermediate=12, layers=2, heads=2, kv_heads=1, vocab=20)
    q_and_o = 2 * (2 * 10 * 8 * 8)  # q and o: [10, 8] x [8, 8], 2 FLOPs per multiply-add
    k_and_v = 2 * (2 * 10 * 8 * 4)  # k and v: [10, 8] x [8, 4]
    mlp = 3 * (2 * 10 * 8 * 12)  # gate, up ([8, 12]) and down ([12, 8])
    pairs = 10 * 11 // 2  # causal (query, key) pairs
    attention = 2 * (2 * pairs * 4) * 2  # QK^T and PV, per head (4 wide), 2 heads
    head = 2 * 8 * 20  # LM head on the last position only
    assert flops["qkvo_projections"] == 2 * (q_and_o + k_and_v)
    assert flops["mlp"] == 2 * mlp
    assert flops["attention_scores_values"] == 2 * attention
    assert flops["lm_head"] == head
    assert flops["total"] == 2 * (q_and_o + k_and_v + mlp + attention) + head


def test_flops_of_the_7b_preset_are_those_of_llava_1_5_7b():
    shape = bench.PRESETS["llava-1.5-7b"]
    per_token_layer = bench.lm_prefill_flops(1, 4096, 11008, 1, 32, 32, 32064, logits_tokens=0)["total"]
    # 4·d² attention projections + 3·d·m MLP weights, 2 FLOPs each, plus one causal pair of width d twice.
    assert per_token_layer == 2 * (4 * 4096**2 + 3 * 4096 * 11008) + 2 * 2 * 4096
    assert (shape.lm_hidden, shape.lm_intermediate, shape.lm_heads, shape.lm_layers) == (4096, 11008, 32, 32)
    assert (shape.vision_hidden, shape.vision_layers, shape.vision_heads, shape.patches) == (1024, 24, 16, 576)
    large = bench.PRESETS["llava-1.5-13b"]
    assert (large.lm_hidden, large.lm_intermediate, large.lm_heads, large.lm_layers) == (5120, 13824, 40, 40)


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    image = Image.open(bench.SAMPLE_IMAGE).convert("RGB")
    workload = bench.build_preset_workload(bench.PRESETS["tiny"], image, "What is here?", bench.DEFAULT_METHODS)
    report = bench.run_benchmark(workload, repeats=1, warmup=0, new_tokens=3, log=lambda *_: None)
    out = tmp_path_factory.mktemp("bench")
    return report, bench.write_outputs(report, out, "tiny")


def test_tiny_run_reports_every_method_and_field(tiny_report):
    report, _ = tiny_report
    assert report["random_weights"] is True and "RANDOM" in report["notice"]
    rows = {row["method"]: row for row in report["methods"]}
    assert list(rows) == ["stock", "visionzip-192", "visionzip-128", "visionzip-64", "trim", "prumerge",
                          "prumerge-plus"]
    fixed = ("stock", "visionzip-192", "visionzip-128", "visionzip-64")
    assert [rows[name]["image_tokens"] for name in fixed] == [576, 192, 128, 64]
    text_tokens = rows["stock"]["prefill_tokens"] - 576
    for name, row in rows.items():
        assert row["prefill_tokens"] == text_tokens + row["image_tokens"], name
        for metric in ("vision_ms", "reduction_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token", "projector_ms"):
            assert row[metric]["median"] is not None and len(row[metric]["values"]) == 1, (name, metric)
        assert row["vision_ms"]["median"] > 0 and row["prefill_ms"]["median"] > 0
        assert row["ttft_ms"]["median"] >= row["prefill_ms"]["median"]
        assert row["peak_memory_bytes"] is not None and row["peak_memory_bytes"] >= 0
        shape = report["shape"]
        # fp32 keys and values: 2 · layers · tokens · kv heads · head dim · 4 bytes, after the prefill.
        head_dim = shape["lm_hidden"] // shape["lm_heads"]
        assert row["kv_cache_bytes"] == (
            2 * shape["lm_layers"] * row["prefill_tokens"] * shape["lm_kv_heads"] * head_dim * 4)
        expected_flops = bench.lm_prefill_flops(
            row["prefill_tokens"], shape["lm_hidden"], shape["lm_intermediate"], shape["lm_layers"],
            shape["lm_heads"], shape["lm_kv_heads"], shape["lm_vocab"],
        )
        assert row["prefill_flops"] == expected_flops
        predicted = rows["stock"]["prefill_flops"]["total"] / expected_flops["total"]
        assert row["prefill_speedup_predicted"] == pytest.approx(predicted)
        assert row["prefill_speedup_fraction"] == pytest.approx(row["prefill_speedup_measured"] / predicted)
    assert rows["trim"]["text_tower_ms"]["median"] > 0
    assert rows["stock"]["text_tower_ms"]["median"] == 0
    attention = report["attention_acquisition"]
    assert attention["ours_sdpa_hooks"]["attention_map_bytes"] == 0
    # Every layer's [1, H, N, N] fp32 map: 6 layers, 4 heads, 577 tokens.
    assert attention["released_eager_all_maps"]["attention_map_bytes"] == 6 * 4 * 577 * 577 * 4
    figures = {(figure["method"], figure["kind"]): figure for figure in report["figures"]}
    assert set(figures) == {
        (name, kind) for name in ("visionzip-192", "visionzip-128", "visionzip-64", "trim", "prumerge", "prumerge-plus")
        for kind in ("reduction_over_vision", "prefill_speedup_fraction", "vision_vs_stock")
    }
    vision = figures["visionzip-64", "vision_vs_stock"]
    vision_ms = {name: rows[name]["vision_ms"]["median"] for name in ("stock", "visionzip-64")}
    assert vision["value"] == pytest.approx(vision_ms["visionzip-64"] / vision_ms["stock"])
    assert vision["predicted"] == pytest.approx(rows["visionzip-64"]["vision_flops"] / rows["stock"]["vision_flops"])
    assert figures["trim", "reduction_over_vision"]["value"] == rows["trim"]["reduction_over_vision"]
    fraction = figures["visionzip-64", "prefill_speedup_fraction"]["value"]
    assert fraction == rows["visionzip-64"]["prefill_speedup_fraction"]
    assert report["machine"]["torch_threads"] >= 1


def test_tiny_run_writes_json_markdown_and_png(tiny_report):
    report, paths = tiny_report
    assert json.loads(paths["json"].read_text())["methods"][0]["method"] == "stock"
    markdown = paths["markdown"].read_text()
    assert "RANDOM" in markdown and "| visionzip-64 | 64 |" in markdown
    assert "Overheads and speed-up vs the FLOP bound" in markdown
    assert not any(word in markdown for word in ("Targets", "MET", "MISSED", "target"))
    assert "released: eager tower" in markdown
    with Image.open(paths["png"]) as png:
        assert png.format == "PNG" and png.size[0] > 800 and png.size[1] > 400
    assert paths["png"].stat().st_size > 10_000


def test_timing_hooks_leave_the_model_as_it_was(tiny_report):
    image = Image.open(bench.SAMPLE_IMAGE).convert("RGB")
    workload = bench.build_preset_workload(
        bench.PRESETS["tiny"], image, "hi", [bench.Method("visionzip-64", "visionzip", 54, 10)]
    )
    model = workload.models["visionzip-64"]
    bench.measure_generate(model, workload.inputs["visionzip-64"], 2)
    assert "get_image_features" not in vars(model.model)
    for module in model.modules():
        # transformers' own output capturing installs permanent hooks on the tower's layers (stock LLaVA too).
        ours = [hook for hook in module._forward_hooks.values() if "output_capturing_hook" not in hook.__qualname__]
        assert not ours and not module._forward_pre_hooks
    assert model.model.vision_tower.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("option", ["--lm-layers", "--vision-layers", "--threads"])
def test_a_count_below_one_is_refused_by_name(option, capsys):
    from llava_token_reduction.cli import main

    assert main(["bench", "--preset", "tiny", option, "0"]) == 1
    assert f"{option} must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("methods,reason", [
    ("stock,vz64", "unknown method(s) vz64;"), (",", "--methods names no method;"),
])
def test_bad_methods_are_named_with_the_choices(methods, reason, capsys):
    from llava_token_reduction.cli import main

    assert main(["bench", "--preset", "tiny", "--methods", methods]) == 1
    error = capsys.readouterr().err
    assert reason in error and "choose from stock, visionzip-192, visionzip-128, visionzip-64, trim" in error


def test_checkpoint_workload_reports_the_checkpoints_own_shapes(tmp_path):
    from llava_token_reduction.tiny import build_method_model, build_trim_processor

    processor = build_trim_processor()
    model = build_method_model("trim", processor=processor)
    model.save_pretrained(tmp_path)
    config = model.config
    processor.save_pretrained(tmp_path)
    image = Image.open(bench.SAMPLE_IMAGE).convert("RGB")
    methods = [m for m in bench.DEFAULT_METHODS if m.kind in ("stock", "trim")]
    workload = bench.build_checkpoint_workload(str(tmp_path), image, "What is here?", methods)
    shape, clip_text = workload.shape, config.clip_text_config
    assert workload.random_weights is False and list(workload.models) == ["stock", "trim"]
    assert (shape.lm_hidden, shape.lm_layers, shape.vision_hidden, shape.vision_layers) == (
        config.text_config.hidden_size, config.text_config.num_hidden_layers,
        config.vision_config.hidden_size, config.vision_config.num_hidden_layers)
    assert (shape.clip_text_hidden, shape.clip_text_layers, shape.clip_text_intermediate, shape.projection_dim) == (
        clip_text.hidden_size, clip_text.num_hidden_layers, clip_text.intermediate_size, config.projection_dim)


def test_image_features_are_timed_by_module_hooks_not_by_replacing_the_method():
    image = Image.open(bench.SAMPLE_IMAGE).convert("RGB")
    rows = [m for m in bench.DEFAULT_METHODS if m.name in ("visionzip-64", "trim")]
    workload = bench.build_preset_workload(bench.PRESETS["tiny"], image, "hi", rows)
    for name, model in workload.models.items():
        seen = []

        def probe_hook(module, args, output, seen=seen, inner=model.model):
            seen.append("get_image_features" in vars(inner))

        probe = model.model.multi_modal_projector.register_forward_hook(probe_hook)
        try:
            result = bench.measure_generate(model, workload.inputs[name], 2)
        finally:
            probe.remove()
        assert seen == [False], name  # the method is the class's own while generate runs
        # The feature span covers the towers, the reduction and the projector.
        assert result["reduction_ms"] >= result["text_tower_ms"] >= 0, name
    assert result["text_tower_ms"] > 0  # trim, the last row


def test_a_stock_checkpoint_skips_the_rows_that_need_the_clip_text_tower(tmp_path):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from llava_token_reduction.tiny import build_processor, llava_config_kwargs

    processor = build_processor()
    LlavaForConditionalGeneration(LlavaConfig(**llava_config_kwargs(tokenizer=processor.tokenizer))).save_pretrained(
        tmp_path
    )
    processor.save_pretrained(tmp_path)
    image = Image.open(bench.SAMPLE_IMAGE).convert("RGB")
    rows = [bench.Method("stock", "stock"), bench.Method("vz", "visionzip", 6, 2), bench.Method("trim", "trim")]
    workload = bench.build_checkpoint_workload(str(tmp_path), image, "What is here?", rows)
    assert list(workload.models) == ["stock", "vz"]
    assert workload.notes == [
        "TRIM skipped: the checkpoint has no CLIP text tower (convert it with `convert trim`)."
    ]
    assert (workload.models["vz"].config.dominant_tokens, workload.models["vz"].config.contextual_tokens) == (6, 2)
    assert set(workload.inputs["vz"]) == set(workload.inputs["stock"]) and "clip_input_ids" not in workload.inputs["vz"]


def test_committed_reports_name_their_figures_not_pass_marks():
    """The benchmark write-ups say what a figure is ("measured / FLOP-predicted speed-up"), not whether it passed."""
    from pathlib import Path

    benchmarks = Path(__file__).resolve().parent.parent / "benchmarks"
    for path in [benchmarks / "README.md", *sorted((benchmarks / "results").glob("*.md"))]:
        text = path.read_text()
        for wording in ("MET:", "MISSED", "Targets:", "the issue's target"):
            assert wording not in text, (path.name, wording)
