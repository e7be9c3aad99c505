"""`benchmarks/vision_depth.py`: the dead-layer benchmark's CPU path (tiny preset, seconds) and its arguments."""

import importlib.util
import json
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("vision_depth", ROOT / "benchmarks" / "vision_depth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_on_the_tiny_preset_and_reports_ratios_of_one_run(tmp_path, capsys):
    out = tmp_path / "depth.json"
    assert _script().main(["--preset", "tiny", "--repeats", "2", "--warmup", "0", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["vision_layers"] == 6 and report["layers_run_when_cut"] == 5
    times = report["times_ms"]
    assert list(times) == ["stock", "visionzip-64", "visionzip-64 full depth", "trim", "trim full depth"]
    assert all(len(row["runs"]) == 2 and row["min"] <= row["median"] <= row["max"] for row in times.values())
    for name in ("visionzip-64", "trim"):
        ratio = report["ratios"][name]
        assert ratio["vs_stock"] == pytest.approx(times[name]["median"] / times["stock"]["median"])
        assert ratio["vs_full_depth"] == pytest.approx(times[name]["median"] / times[f"{name} full depth"]["median"])
    assert len(report["load_average_1min"]) == 3  # every round, and the end
    printed = capsys.readouterr().out
    assert "| visionzip-64 full depth |" in printed and "| method | ours / stock |" in printed


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--warmup", "-1"]])
def test_bad_counts_exit_2_with_a_reason(argv, capsys):
    assert _script().main(["--preset", "tiny", *argv]) == 2
    assert "--repeats must be >= 1 and --warmup >= 0" in capsys.readouterr().err


def _clip_layer_flops(tokens: int, width: int, intermediate: int) -> int:
    """One CLIP encoder layer, written out: q/k/v/o projections, the full score and value products, the MLP."""
    return 4 * 2 * tokens * width * width + 2 * 2 * tokens * tokens * width + 2 * 2 * tokens * width * intermediate


def test_bench_counts_the_vision_layers_each_row_runs_in_its_flops():
    """Stock LLaVA runs every layer of the tower; VisionZip and TRIM read layer -2 and stop there (one fewer).
    The FLOP model counts what ran (before: every row was counted at the tower's full depth)."""
    from dataclasses import replace

    import torch
    from PIL import Image

    from llava_token_reduction import bench

    shape = replace(bench.PRESETS["tiny"], vision_layers=4, lm_layers=1)
    image = Image.open(bench.SAMPLE_IMAGE).convert("RGB")
    rows = [m for m in bench.DEFAULT_METHODS if m.name in ("stock", "visionzip-64", "trim")]
    workload = bench.build_preset_workload(shape, image, "What is here?", rows)
    report = bench.run_benchmark(workload, repeats=1, warmup=0, new_tokens=2, attention_comparison=False,
                                 log=lambda *_: None, batch_sizes=(2,))
    layers = 4
    # Layer -2 is encoder layer 2 of 0..3: layers 0, 1 and 2 run.
    assert workload.models["visionzip-64"].config.visionzip_layer == -2
    assert workload.models["trim"].config.vision_feature_layer == -2
    expected_layers = {"stock": layers, "visionzip-64": layers - 1, "trim": layers - 1}
    by_name = {row["method"]: row for row in report["methods"]}
    patches, width = shape.patches, shape.vision_hidden
    embed = 2 * patches * 3 * 14 * 14 * width
    for name, count in expected_layers.items():
        # An independent count: hooks of this test on the tower's encoder layers during one feature call.
        model = workload.models[name]
        fired = set()
        handles = [layer.register_forward_pre_hook(lambda m, a, i=i, fired=fired: fired.add(i))
                   for i, layer in enumerate(model.model.vision_tower.encoder.layers)]
        try:
            with torch.inference_mode():
                model.model.get_image_features(**bench.image_feature_inputs(model, workload.inputs[name]))
        finally:
            for handle in handles:
                handle.remove()
        assert len(fired) == count, name
        row = by_name[name]
        assert (row["vision_crops"], row["vision_layers_run"]) == (1, count), name
        assert row["vision_flops"] == embed + count * _clip_layer_flops(patches + 1, width, shape.vision_intermediate)
        cell = next(c for c in report["batching"] if (c["method"], c["batch"]) == (name, 2))
        assert cell["vision_layers_run"] == count and cell["vision_crops_per_image"] == 1
        # The call's FLOPs: the tower over 2 images at the depth that ran, the rest as generate_flops counts it.
        # (Every LLaVA-1.5 row projects the tokens the language model gets: the default.)
        rest = bench.generate_flops(shape, [cell["prefill_positions"] // 2] * 2, cell["image_tokens_per_image"], 2,
                                    text_columns=bench.batching.clip_columns(workload.inputs[name]), vision_crops=0)
        assert cell["generate_flops"] == rest + 2 * row["vision_flops"], name
    stock, cut = by_name["stock"]["vision_flops"], by_name["visionzip-64"]["vision_flops"]
    assert by_name["visionzip-64"]["vision_flops_vs_stock"] == pytest.approx(cut / stock) and cut < stock
