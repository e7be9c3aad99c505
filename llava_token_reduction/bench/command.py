"""The `bench` command line."""

import argparse
from dataclasses import replace
from pathlib import Path

from .. import methods as registry
from .report import render_markdown, write_outputs
from .runner import RANDOM_WEIGHTS_NOTICE, run_benchmark
from .shapes import PRESETS
from .workloads import DEFAULT_METHODS, DEFAULT_QUESTION, SAMPLE_IMAGE, build_checkpoint_workload, build_preset_workload


def register(subparsers) -> None:
    rows = [method.name for method in DEFAULT_METHODS]
    labels = ", ".join(method.label for method in registry.METHODS.values())
    parser = subparsers.add_parser(
        "bench",
        help=f"benchmark stock LLaVA and the token reductions ({labels}) on the same weights",
        description=(
            f"Time stock LLaVA and the token reductions (rows: {', '.join(rows)}) on the same weights, image and "
            "prompt: vision tower, reduction, LM prefill, time to first token, decode, KV cache, peak memory, analytic "
            "prefill FLOPs. Presets use the real LLaVA-1.5 widths with RANDOM weights (cut the depth with "
            "--lm-layers / --vision-layers to fit a CPU); --model benchmarks a local checkpoint. Writes JSON, "
            "a markdown table and a PNG plot."
        ),
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llava-1.5-7b",
                        help="model shape (default: llava-1.5-7b)")
    parser.add_argument("--model", metavar="PATH",
                        help=f"a local stock LLaVA checkpoint or one of {labels} instead of a preset")
    parser.add_argument("--lm-layers", type=int, metavar="N",
                        help="language-model layers (preset default: the real depth)")
    parser.add_argument("--vision-layers", type=int, metavar="N", help="vision-tower layers (preset default: 24)")
    parser.add_argument("--repeats", type=int, default=3, metavar="N", help="timed runs per method (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs per method first (default: 1)")
    parser.add_argument("--new-tokens", type=int, default=8, metavar="N", help="tokens generated per run (default: 8)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads (default: the number of CPUs)")
    parser.add_argument("--image", metavar="FILE", help="image (default: the bundled sample picture)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="question asked about the image")
    parser.add_argument("--methods", default=",".join(rows), help=f"comma-separated subset of {', '.join(rows)}")
    parser.add_argument("--no-attention-comparison", action="store_true",
                        help="skip timing a vision layer's attention the released way (eager, all maps)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--out", metavar="DIR", default="bench-results",
                        help="output directory (default: bench-results)")
    parser.add_argument("--stem", default="bench", help="file name stem of the outputs (default: bench)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from ..cli import CommandError

    for name in ("repeats", "new_tokens"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise CommandError("--warmup must be >= 0")
    for name in ("lm_layers", "vision_layers", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    known = {m.name: m for m in DEFAULT_METHODS}
    wanted = [name.strip() for name in args.methods.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        what = f"unknown method(s) {', '.join(unknown)}" if unknown else "--methods names no method"
        raise CommandError(f"{what}; choose from {', '.join(known)}")
    methods = [known[name] for name in wanted]
    image_path = Path(args.image) if args.image else SAMPLE_IMAGE
    if not image_path.is_file():
        raise CommandError(f"image not found: {image_path}")
    image = Image.open(image_path).convert("RGB")
    if args.model:
        if args.lm_layers or args.vision_layers:
            raise CommandError("--lm-layers / --vision-layers apply to presets only")
        workload = build_checkpoint_workload(args.model, image, args.question, methods, dtype=args.dtype)
    else:
        shape = PRESETS[args.preset]
        if args.lm_layers:
            shape = replace(shape, lm_layers=args.lm_layers)
        if args.vision_layers:
            shape = replace(shape, vision_layers=args.vision_layers)
        print(f"Building {shape.name} with random weights (vision {shape.vision_layers} layers, "
              f"LM {shape.lm_layers} layers)...", flush=True)
        workload = build_preset_workload(shape, image, args.question, methods, seed=args.seed)
        if args.dtype != "float32":
            for model in {id(m): m for m in workload.models.values()}.values():
                model.to(getattr(torch, args.dtype))
            for inputs in workload.inputs.values():
                inputs["pixel_values"] = inputs["pixel_values"].to(getattr(torch, args.dtype))
        print(RANDOM_WEIGHTS_NOTICE, flush=True)
    report = run_benchmark(
        workload, repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens,
        attention_comparison=not args.no_attention_comparison,
    )
    paths = write_outputs(report, args.out, args.stem)
    print()
    print(render_markdown(report))
    print("Wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
