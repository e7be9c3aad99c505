"""The dead-layer cut, measured: `get_image_features` of VisionZip and TRIM (the tower runs only up to layer -2,
the one they read) against stock LLaVA's (which runs all the tower's layers and drops the last one's output), and
against the same method forced to full depth (asking for the last hidden state), side by side in one run.

    python benchmarks/vision_depth.py [--preset llava-1.5-7b|tiny] [--repeats 7] [--warmup 1] [--threads 2]
                                      [--out FILE.json]

Random weights at the preset's widths (LLaVA-1.5-7B: CLIP ViT-L/14-336, 24 layers, 577 tokens; the projector at
the LM's width; TRIM's 12-layer CLIP text tower), the language model cut to one layer (it does not run here).
The calls take turns in every round (the order rotates), after warm-up rounds; the table gives medians with
(min-max) and every ratio is of medians from this one run. The load average is recorded at every round.
"""

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace

import torch
from tqdm import tqdm


def _calls(workload):
    """name -> zero-argument call of one `get_image_features`, for every timed variant."""
    calls = {}
    for name, model in workload.models.items():
        inputs = workload.inputs[name]
        side = {key: inputs[key] for key in getattr(model.model, "image_side_input_names", ())}
        pixels = inputs["pixel_values"]
        if name == "stock":
            calls["stock"] = lambda model=model, pixels=pixels: model.model.get_image_features(pixel_values=pixels)
            continue
        calls[name] = lambda model=model, pixels=pixels, side=side: model.model.get_image_features(
            pixel_values=pixels, **side)
        # Asking for the last hidden state makes the tower run every layer: the method as it ran before the cut.
        calls[f"{name} full depth"] = lambda model=model, pixels=pixels, side=side: model.model.get_image_features(
            pixel_values=pixels, output_hidden_states=[-1], **side)
    return calls


def measure(preset: str = "llava-1.5-7b", repeats: int = 7, warmup: int = 1, threads: int = 2, progress=True) -> dict:
    """Build the rows, time them interleaved and return the report (times in ms, ratios of medians)."""
    from PIL import Image

    from llava_token_reduction.bench import PRESETS, SAMPLE_IMAGE, build_preset_workload, machine_info
    from llava_token_reduction.bench.workloads import DEFAULT_QUESTION, Method

    if repeats < 1 or warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    torch.set_num_threads(threads)
    shape = replace(PRESETS[preset], lm_layers=1, lm_vocab=min(PRESETS[preset].lm_vocab, 512))
    methods = [Method("stock", "stock"), Method("visionzip-64", "visionzip", 54, 10), Method("trim", "trim")]
    workload = build_preset_workload(shape, Image.open(SAMPLE_IMAGE).convert("RGB"), DEFAULT_QUESTION, methods)
    calls = _calls(workload)
    names = list(calls)
    times = {name: [] for name in names}
    loads = []
    rounds = range(warmup + repeats)
    with torch.inference_mode():
        for round_ in tqdm(rounds, desc="vision depth rounds", disable=not progress):
            loads.append(os.getloadavg()[0])
            order = names[round_ % len(names):] + names[:round_ % len(names)]
            for name in order:
                start = time.perf_counter()
                calls[name]()
                elapsed = 1000 * (time.perf_counter() - start)
                if round_ >= warmup:
                    times[name].append(elapsed)
    loads.append(os.getloadavg()[0])
    summary = {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
               for name, v in times.items()}
    ratios = {}
    for name in names:
        if name == "stock" or name.endswith("full depth"):
            continue
        ratios[name] = {"vs_stock": summary[name]["median"] / summary["stock"]["median"],
                        "vs_full_depth": summary[name]["median"] / summary[f"{name} full depth"]["median"],
                        "full_depth_vs_stock": summary[f"{name} full depth"]["median"] / summary["stock"]["median"]}
    tower = workload.models["stock"].model.vision_tower
    return {
        "preset": preset, "vision_layers": len(tower.encoder.layers),
        "layers_run_when_cut": len(tower.encoder.layers) - 1,
        "repeats": repeats, "warmup": warmup, "machine": machine_info(), "load_average_1min": loads,
        "times_ms": summary, "ratios": ratios, "random_weights": True,
    }


def render(report: dict) -> str:
    loads = report["load_average_1min"]
    lines = [
        f"preset {report['preset']} (random weights), vision tower {report['vision_layers']} layers "
        f"({report['layers_run_when_cut']} run when cut), {report['machine']['torch_threads']} threads, "
        f"{report['repeats']} interleaved rounds after {report['warmup']} warm-up; 1-min load "
        f"{min(loads):.1f}-{max(loads):.1f} (start {loads[0]:.1f}, end {loads[-1]:.1f})",
        "",
        "| get_image_features | median ms | min | max |",
        "|---|---|---|---|",
    ]
    for name, summary in report["times_ms"].items():
        lines.append(f"| {name} | {summary['median']:.0f} | {summary['min']:.0f} | {summary['max']:.0f} |")
    lines += ["", "| method | ours / stock | ours / ours at full depth | ours at full depth / stock |",
              "|---|---|---|---|"]
    for name, ratio in report["ratios"].items():
        lines.append(f"| {name} | {ratio['vs_stock']:.3f} | {ratio['vs_full_depth']:.3f} | "
                     f"{ratio['full_depth_vs_stock']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["llava-1.5-7b", "llava-1.5-13b", "tiny"], default="llava-1.5-7b")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    try:
        report = measure(args.preset, args.repeats, args.warmup, args.threads)
    except ValueError as error:
        print(f"vision_depth: {error}", file=sys.stderr)
        return 2
    print(render(report))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
