"""The `bench` command line."""

import argparse
from dataclasses import replace
from pathlib import Path

from .. import methods as registry
from .builders import build_checkpoint_workload, build_preset_workload
from .families import FAMILIES, family_of_model_type
from .report import render_markdown, write_outputs
from .runner import RANDOM_WEIGHTS_NOTICE, run_benchmark
from .shapes import PRESETS
from .workloads import DEFAULT_QUESTION, SAMPLE_IMAGE, default_methods


ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def register(subparsers) -> None:
    rows = {family.label: [method.name for method in default_methods(family)] for family in FAMILIES.values()}
    rows_in_words = "; ".join(f"{label}: {', '.join(names)}" for label, names in rows.items())
    labels = ", ".join(method.label for method in registry.METHODS.values())
    parser = subparsers.add_parser(
        "bench",
        help=f"benchmark stock LLaVA and the token reductions ({labels}) on the same weights",
        description=(
            f"Time stock LLaVA and the token reductions (rows of {rows_in_words}) on the same weights, image and "
            "prompt: vision tower, reduction, LM prefill, time to first token, decode, KV cache, peak memory, analytic "
            "prefill FLOPs; then images/s, time to first token, padding and memory apart from the weights at every "
            "--batch-sizes, next to the FLOP-predicted ratios. Presets use the real LLaVA-1.5 / LLaVA-NeXT widths with "
            "RANDOM weights (cut the depth with --lm-layers / --vision-layers to fit a CPU; llava-next-7b resizes "
            "the picture to 672x672: a 2x2 grid, 5 crops); --model benchmarks a checkpoint (directory or hub id); "
            "--device cuda runs on a GPU. Writes JSON, markdown and PNG plots."
        ),
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llava-1.5-7b",
                        help="model shape (default: llava-1.5-7b)")
    parser.add_argument("--model", metavar="PATH_OR_ID",
                        help=f"a stock LLaVA or LLaVA-NeXT checkpoint or one of {labels} (a directory or a hub id "
                             "such as llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-vicuna-7b-hf) instead of a preset")
    parser.add_argument("--lm-layers", type=int, metavar="N",
                        help="language-model layers (preset default: the real depth)")
    parser.add_argument("--vision-layers", type=int, metavar="N", help="vision-tower layers (preset default: 24)")
    parser.add_argument("--repeats", type=int, default=3, metavar="N", help="timed runs per method (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed runs per method first (default: 1)")
    parser.add_argument("--new-tokens", type=int, default=8, metavar="N", help="tokens generated per run (default: 8)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads (default: the number of CPUs)")
    parser.add_argument("--image", metavar="FILE", help="image (default: the bundled sample picture)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="question asked about the image")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of the family's rows ({rows_in_words}; default: all of them)")
    parser.add_argument("--no-attention-comparison", action="store_true",
                        help="skip timing a vision layer's attention the released way (eager, all maps)")
    parser.add_argument("--batch-sizes", default="1,4,8", metavar="B,B,...",
                        help="batch sizes of the throughput table; batch 1 (the released way) is always run "
                             "(default: 1,4,8)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--device", default="cpu", metavar="DEVICE",
                        help="cpu (default), cuda or cuda:N; on a GPU every timed piece is bracketed by CUDA "
                             "synchronisation and the memory is the allocator's peak")
    parser.add_argument("--attn-implementation", choices=ATTENTION_IMPLEMENTATIONS, default=None,
                        help="attention of the towers and the language model (default: sdpa; flash_attention_2 "
                             "needs the flash-attn package, a GPU and float16/bfloat16)")
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
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    device = check_device(args.device, args.dtype, args.attn_implementation)
    if args.model:
        from transformers import AutoConfig

        try:
            family = family_of_model_type(AutoConfig.from_pretrained(args.model).model_type)[0]
        except ValueError as error:
            raise CommandError(f"{args.model} is {error}") from None
    else:
        family = FAMILIES[PRESETS[args.preset].family]
    methods = parse_methods(args.methods, family)
    image_path = Path(args.image) if args.image else SAMPLE_IMAGE
    if not image_path.is_file():
        raise CommandError(f"image not found: {image_path}")
    image = Image.open(image_path).convert("RGB")
    if args.model:
        if args.lm_layers or args.vision_layers:
            raise CommandError("--lm-layers / --vision-layers apply to presets only")
        workload = build_checkpoint_workload(args.model, image, args.question, methods, dtype=args.dtype,
                                             device=device, attn_implementation=args.attn_implementation)
    else:
        shape = PRESETS[args.preset]
        if args.lm_layers:
            shape = replace(shape, lm_layers=args.lm_layers)
        if args.vision_layers:
            shape = replace(shape, vision_layers=args.vision_layers)
        print(f"Building {shape.name} with random weights (vision {shape.vision_layers} layers, "
              f"LM {shape.lm_layers} layers)...", flush=True)
        workload = build_preset_workload(shape, image, args.question, methods, seed=args.seed, device=device,
                                         dtype=args.dtype, attn_implementation=args.attn_implementation)
        print(RANDOM_WEIGHTS_NOTICE, flush=True)
    report = run_benchmark(
        workload, repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens,
        attention_comparison=not args.no_attention_comparison, batch_sizes=batch_sizes, image=workload.image,
    )
    paths = write_outputs(report, args.out, args.stem)
    print()
    print(render_markdown(report))
    print("Wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def parse_methods(text: str | None, family) -> list:
    """The rows named in `text` (comma-separated) among `family`'s rows, all of them for None; a `CommandError`
    naming the unknown ones and the choices otherwise."""
    from ..cli import CommandError

    known = {m.name: m for m in default_methods(family)}
    if text is None:
        return list(known.values())
    wanted = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        what = f"unknown method(s) {', '.join(unknown)}" if unknown else "--methods names no method"
        raise CommandError(f"{what}; choose from {', '.join(known)} ({family.label} rows)")
    return [known[name] for name in wanted]


def parse_batch_sizes(text: str) -> list[int]:
    """`"1,4,8"` -> [1, 4, 8]; a `CommandError` naming what is wrong otherwise."""
    from ..cli import CommandError

    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CommandError(f"--batch-sizes takes comma-separated whole numbers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise CommandError(f"--batch-sizes takes whole numbers >= 1, got {text!r}")
    return sorted(set(sizes))


def check_device(device: str, dtype: str, attn_implementation: str | None) -> str:
    """`device` if this machine can run it with `dtype` and `attn_implementation`, else a `CommandError` saying
    why. Only asks torch about CUDA when a CUDA device was asked for."""
    import re

    from ..cli import CommandError

    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise CommandError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CommandError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, "
                               f"built with CUDA {torch.version.cuda or 'none'})")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise CommandError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if attn_implementation == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if not device.startswith("cuda") or dtype == "float32":
            raise CommandError("--attn-implementation flash_attention_2 runs on a CUDA device in float16 or "
                               f"bfloat16, not on {device} in {dtype}")
        if not is_flash_attn_2_available():
            raise CommandError("--attn-implementation flash_attention_2 needs the flash-attn package "
                               "(pip install flash-attn); use sdpa otherwise")
    return device
