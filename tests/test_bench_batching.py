"""The benchmark's batch sweep (throughput, padding, memory apart from the weights), its GPU path (CUDA
synchronisation and allocator peak, checked with torch.cuda stood in for), hub ids, and the VisionZip
efficiency script."""

import json
import time

import pytest
import torch
from PIL import Image

from bench_support import bench_from_hub_cache, efficiency_script
from llava_token_reduction import bench
from llava_token_reduction.bench import batching, measure


def test_decode_and_generate_flops_match_a_hand_computation():
    # One decode step after 9 cached positions: 10 visible keys. d=8, m=12, 2 layers, 2 heads, 1 KV head, vocab 20.
    step = bench.lm_prefill_flops(1, 8, 12, 2, 2, 1, 20, past=9)
    per_layer = 2 * (8 * 8 * 2 + 8 * 4 * 2) + 2 * 3 * 8 * 12 + 2 * 2 * 2 * 4 * 10
    assert step["total"] == 2 * per_layer + 2 * 8 * 20

    shape = bench.BenchShape(name="t", image_size=28, patch_size=14, vision_hidden=4, vision_intermediate=8,
                             vision_layers=1, vision_heads=1, lm_hidden=8, lm_intermediate=12, lm_layers=2,
                             lm_heads=2, lm_kv_heads=1, lm_vocab=20, clip_text_hidden=4, clip_text_intermediate=8,
                             clip_text_layers=1)

    def llm(tokens, past):  # written out again: projections + MLP per token, causal pairs, LM head on one row
        pairs = tokens * past + tokens * (tokens + 1) // 2
        return 2 * (tokens * (2 * (8 * 8 * 2 + 8 * 4 * 2) + 2 * 3 * 8 * 12) + 2 * 2 * 2 * 4 * pairs) + 2 * 8 * 20

    vision = 2 * 4 * 3 * 14 * 14 * 4 + (2 * 5 * 4 * 16 + 2 * 2 * 25 * 4 + 2 * 5 * 2 * 4 * 8)  # 4 patches + CLS
    projector = 2 * (4 * 8 + 8 * 8)  # per image token
    text = 2 * 3 * 4 * 16 + 2 * 2 * 9 * 4 + 2 * 3 * 2 * 4 * 8  # 3 CLIP positions
    # Two rows of 6 and 4 positions (3 and 1 image tokens), 3 new tokens: the short row is padded to 6.
    padded = batching.generate_flops(shape, [6, 4], [3, 1], new_tokens=3, text_columns=3)
    useful = batching.generate_flops(shape, [6, 4], [3, 1], new_tokens=3, text_columns=3, padded=False)
    common = 2 * vision + 4 * projector + 2 * text
    assert padded == common + 2 * (llm(6, 0) + llm(1, 6) + llm(1, 7))
    assert useful == common + llm(6, 0) + llm(1, 6) + llm(1, 7) + llm(4, 0) + llm(1, 4) + llm(1, 5)


def test_batch_pictures_differ_and_are_deterministic():
    image = Image.open(bench.SAMPLE_IMAGE).convert("RGB")
    pictures = bench.batch_images(image, 9)
    again = bench.batch_images(image, 9)
    raw = [p.tobytes() + bytes(str(p.size), "ascii") for p in pictures]
    assert len(set(raw)) == 9 and raw == [p.tobytes() + bytes(str(p.size), "ascii") for p in again]


@pytest.fixture(scope="module")
def sweep():
    image = Image.open(bench.SAMPLE_IMAGE).convert("RGB")
    rows = [m for m in bench.DEFAULT_METHODS if m.name in ("stock", "visionzip-64", "trim")]
    workload = bench.build_preset_workload(bench.PRESETS["tiny"], image, "What is here?", rows)
    report = bench.run_benchmark(workload, repeats=1, warmup=1, new_tokens=2, attention_comparison=False,
                                 log=lambda *_: None, batch_sizes=(3,), image=image)
    return workload, report, image


def test_sweep_has_every_row_at_batch_1_and_3_with_its_ratios(sweep):
    workload, report, _ = sweep
    cells = {(c["method"], c["batch"]): c for c in report["batching"]}
    assert set(cells) == {(name, size) for name in ("stock", "visionzip-64", "trim") for size in (1, 3)}
    assert report["batch_sizes"] == [1, 3] and report["device"] == "cpu"
    for (name, size), cell in cells.items():
        assert len(cell["images_per_s"]["values"]) == 1
        run_ms = cell["total_ms"]["values"][0]
        assert cell["images_per_s"]["median"] == pytest.approx(1000 * size / run_ms)
        released, stock = cells[name, 1], cells["stock", size]
        assert cell["vs_released_measured"] == pytest.approx(
            cell["images_per_s"]["median"] / released["images_per_s"]["median"])
        assert cell["vs_released_predicted"] == pytest.approx(released["flops_per_image"] / cell["flops_per_image"])
        assert cell["vs_stock_predicted"] == pytest.approx(stock["flops_per_image"] / cell["flops_per_image"])
        assert cell["ttft_ms"]["median"] > 0 and cell["weights_bytes"] > 0
        # fp32 keys and values of every row at the padded length: 2 · layers · B · L · kv heads · head dim · 4.
        shape = workload.shape
        length = cell["prefill_positions"] // size
        assert cell["kv_cache_bytes"] == 2 * shape.lm_layers * size * length * shape.lm_kv_heads * (
            shape.lm_hidden // shape.lm_heads) * 4
        assert cell["peak_memory_bytes"] is not None and cell["peak_memory_bytes"] >= 0
    assert cells["visionzip-64", 3]["image_tokens_per_image"] == [64, 64, 64]
    assert cells["stock", 3]["padding_fraction"] == cells["visionzip-64", 3]["padding_fraction"] == 0
    # The text tower's weights are the TRIM row's only: it holds more than the stock row.
    assert cells["trim", 1]["weights_bytes"] > cells["stock", 1]["weights_bytes"]
    # Every parameter and buffer once, by storage (the LM head may be tied to the embeddings).
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*workload.models["stock"].parameters(), *workload.models["stock"].buffers()]}
    assert cells["stock", 1]["weights_bytes"] == sum(storages.values())
    markdown = bench.render_markdown(report)
    assert "Throughput under batching" in markdown and "| trim | 3 |" in markdown
    assert "peak (activations + KV) MiB" in markdown


def test_sweep_writes_its_plot(sweep, tmp_path):
    _, report, _ = sweep
    paths = bench.write_outputs(report, tmp_path, "sweep")
    with Image.open(paths["batch_png"]) as png:
        assert png.format == "PNG" and png.size[0] > 800
    assert paths["batch_png"].name == "sweep-batching.png"


def test_trim_padding_is_what_each_picture_alone_implies(sweep):
    workload, report, image = sweep
    trim = workload.models["trim"]
    cell = next(c for c in report["batching"] if (c["method"], c["batch"]) == ("trim", 3))
    # Each picture alone: its kept count, independently of the batch.
    counts = []
    for picture in bench.batch_images(image, 3):
        alone = workload.batch([picture])["trim"]
        counts.append(bench.image_tokens_kept(trim, alone))
    assert cell["image_tokens_per_image"] == counts
    text = int((workload.inputs["trim"]["input_ids"] != trim.config.image_token_id).sum())
    lengths = [text + k for k in counts]
    assert cell["padding_fraction"] == pytest.approx(1 - sum(lengths) / (3 * max(lengths)))
    assert cell["prefill_positions"] == 3 * max(lengths)


def test_the_cpu_path_runs_nothing_of_cuda(monkeypatch):
    image = Image.open(bench.SAMPLE_IMAGE).convert("RGB")
    rows = [bench.Method("visionzip-64", "visionzip", 54, 10)]
    workload = bench.build_preset_workload(bench.PRESETS["tiny"], image, "hi", rows)

    def refuse(*args, **kwargs):
        raise AssertionError("CUDA touched on the CPU path")

    for name in ("synchronize", "is_available", "reset_peak_memory_stats", "max_memory_allocated",
                 "memory_allocated", "device_count"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    assert bench.command.check_device("cpu", "float32", "sdpa") == "cpu"
    assert measure.clock_of(torch.device("cpu")) is time.perf_counter
    assert isinstance(measure.memory_meter(torch.device("cpu")), measure.PeakRSS)
    result = bench.measure_generate(workload.models["visionzip-64"], workload.inputs["visionzip-64"], 2, True)
    assert result["prefill_ms"] > 0


def test_the_cuda_clock_and_memory_wait_for_the_device_and_read_the_allocator(monkeypatch):
    # No GPU here: torch.cuda's calls are stood in for, to check what the GPU path calls and in which order.
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(("sync", device)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 1600)
    device = torch.device("cuda", 0)
    clock = measure.clock_of(device)
    before = time.perf_counter()
    assert clock() >= before and calls == [("sync", device)]
    calls.clear()
    with measure.memory_meter(device) as meter:
        assert calls == [("sync", device), ("reset", device)]
    assert calls[-1] == ("sync", device)
    assert meter.peak_bytes == 600  # the peak above what was allocated at entry (weights, inputs)


@pytest.mark.parametrize("argv,message", [
    (["--batch-sizes", "1,x"], "--batch-sizes takes comma-separated whole numbers, got '1,x'"),
    (["--batch-sizes", "0,4"], "--batch-sizes takes whole numbers >= 1, got '0,4'"),
    (["--device", "gpu"], "--device must be cpu, cuda or cuda:N, got 'gpu'"),
    (["--attn-implementation", "flash_attention_2"],
     "--attn-implementation flash_attention_2 runs on a CUDA device in float16 or bfloat16, not on cpu in float32"),
])
def test_bad_batch_device_and_attention_options_are_named(argv, message, capsys):
    from llava_token_reduction.cli import main

    assert main(["bench", "--preset", "tiny", *argv]) == 1
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_by_name(capsys):
    from llava_token_reduction.cli import main

    assert main(["bench", "--preset", "tiny", "--device", "cuda"]) == 1
    assert "--device cuda: CUDA is not available here" in capsys.readouterr().err


def _save_tiny_stock(directory):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from llava_token_reduction.tiny import build_processor, llava_config_kwargs

    processor = build_processor()
    torch.manual_seed(0)
    LlavaForConditionalGeneration(LlavaConfig(**llava_config_kwargs(tokenizer=processor.tokenizer))).save_pretrained(
        directory)
    processor.save_pretrained(directory)


def test_bench_takes_a_hub_id_from_the_hub_cache_offline(tmp_path):
    _save_tiny_stock(tmp_path / "model")
    report = bench_from_hub_cache(tmp_path, "llava-hf/llava-1.5-7b-hf", tmp_path / "model", [
        "--methods", "stock,visionzip-64", "--batch-sizes", "1,2", "--repeats", "1", "--warmup", "0",
        "--new-tokens", "2", "--no-attention-comparison"])
    assert report["source"] == "llava-hf/llava-1.5-7b-hf" and report["random_weights"] is False
    assert {(c["method"], c["batch"]) for c in report["batching"]} == {
        (m, b) for m in ("stock", "visionzip-64") for b in (1, 2)}


def test_efficiency_script_runs_on_the_cpu_and_reports_the_published_table(tmp_path, capsys):
    script = efficiency_script()
    _save_tiny_stock(tmp_path / "model")
    out = tmp_path / "efficiency.json"
    status = script.main(["--model", str(tmp_path / "model"), "--budgets", "6+2,10+4", "--samples", "2",
                          "--warmup", "1", "--new-tokens", "2", "--out", str(out)])
    assert status == 0
    report = json.loads(out.read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert list(rows) == ["stock", "visionzip-8", "visionzip-14"]
    assert [rows[name]["image_tokens"] for name in rows] == [64, 8, 14]
    for row in rows.values():
        assert row["prefill_ms"] > 0 and row["total_s"] > 0
        assert row["prefill_speedup"] == pytest.approx(rows["stock"]["prefill_ms"] / row["prefill_ms"])
    printed = capsys.readouterr().out
    assert "| visionzip-8 | 8 |" in printed and "Published: LLaVA-NeXT-7B, POPE, one A800" in printed
    assert "| VisionZip | 160 | 27.8 | 7.8× | 756 | 3.0× |" in printed


@pytest.mark.parametrize("argv,message", [
    (["--budgets", "54"], "a budget is DOMINANT+CONTEXTUAL such as 54+10, got '54'"),
    (["--budgets", "0+10"], "dominant tokens include CLS and must be >= 1, got '0+10'"),
    (["--samples", "0"], "must be >= 1, got 0"),
])
def test_efficiency_script_names_bad_arguments(argv, message, capsys):
    script = efficiency_script()
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--model", "x", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_efficiency_script_refuses_what_it_cannot_run(tmp_path, capsys):
    script = efficiency_script()
    assert script.main(["--model", "x", "--device", "cuda:x"]) == 2
    assert "--device must be cpu, cuda or cuda:N" in capsys.readouterr().err
    assert script.main(["--model", "x", "--images", str(tmp_path)]) == 2
    assert f"no .jpg/.jpeg/.png pictures in {tmp_path}" in capsys.readouterr().err


def test_a_half_precision_preset_is_built_as_from_pretrained_would_load_it():
    image = Image.open(bench.SAMPLE_IMAGE).convert("RGB")
    rows = [m for m in bench.DEFAULT_METHODS if m.name in ("stock", "trim")]
    workload = bench.build_preset_workload(bench.PRESETS["tiny"], image, "hi", rows, dtype="bfloat16",
                                           attn_implementation="eager")
    trim = workload.models["trim"]
    kept_fp32 = ("model.clip_text_model.", "model.visual_projection.", "model.vision_tower.post_layernorm.")
    for name, parameter in trim.named_parameters():
        expected = torch.float32 if name.startswith(kept_fp32) else torch.bfloat16
        assert parameter.dtype == expected, name
    assert workload.inputs["trim"]["pixel_values"].dtype == torch.bfloat16
    assert workload.inputs["trim"]["clip_input_ids"].dtype == torch.long
    for model in workload.models.values():
        assert model.model.vision_tower.config._attn_implementation == "eager"
        assert model.model.language_model.config._attn_implementation == "eager"
