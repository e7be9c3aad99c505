"""Reproduce VisionZip's efficiency table (prefill time and total time, stock against VisionZip) on one GPU.

    python benchmarks/visionzip_efficiency.py --model llava-hf/llava-1.5-7b-hf --device cuda --dtype float16 \
        --budgets 54+10,108+20,162+30 --images path/to/pictures --samples 200

Every sample is one `generate` call on one picture and the question, batch 1, as the paper times it; the rows
(stock, then one VisionZip row per budget, all on the same weights) take turns on every sample after a warm-up,
so a change in the machine's speed hits every row alike. Per row: LM prefill (the first language-model call,
the paper's "prefill": the LLM forward over the embedded prompt), time to first token (vision tower, reduction,
projector and that prefill), and the total time over all samples, with the speed-ups over stock. On a GPU every
reading waits for the queued kernels (`torch.cuda.synchronize`). The published table (LLaVA-NeXT-7B, POPE, one
A800; ALGORITHMS.md §4.3) is printed next to it: compare speed-ups, not milliseconds, across machines.

The published rows are LLaVA-NeXT-7B (2880 -> 160 tokens, 27+5 per crop: a budget is per 336-px crop there,
and a row is named by its tokens on a 2x2-grid picture, 5 crops):

    python benchmarks/visionzip_efficiency.py --model llava-hf/llava-v1.6-vicuna-7b-hf --device cuda \
        --dtype float16 --budgets 27+5

Without a GPU it runs on the CPU (`--device cpu`, the default), which is how the tests exercise it.
"""

import argparse
import json
import sys
from pathlib import Path


# The VisionZip paper's efficiency table (LLaVA-NeXT-7B, POPE, one A800), as ALGORITHMS.md §4.3 re-prints it.
PUBLISHED = {
    "model": "LLaVA-NeXT-7B, POPE, one A800 (VisionZip paper)",
    "rows": [
        {"method": "vanilla", "tokens": 2880, "total_s": 2293, "prefill_ms": 218},
        {"method": "VisionZip", "tokens": 160, "total_s": 756, "prefill_ms": 27.8},
    ],
}
DEFAULT_QUESTION = "Is there a person in the image? Answer the question using a single word or phrase."


def parse_budgets(text: str) -> list[tuple[int, int]]:
    """`"54+10,108+20"` -> [(54, 10), (108, 20)]: dominant (CLS included) + contextual tokens per image."""
    budgets = []
    for part in (p.strip() for p in text.split(",")):
        dominant, plus, contextual = part.partition("+")
        if not plus or not dominant.strip().isdigit() or not contextual.strip().isdigit():
            raise argparse.ArgumentTypeError(f"a budget is DOMINANT+CONTEXTUAL such as 54+10, got {part!r}")
        if int(dominant) < 1:
            raise argparse.ArgumentTypeError(f"dominant tokens include CLS and must be >= 1, got {part!r}")
        budgets.append((int(dominant), int(contextual)))
    return budgets


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a stock LLaVA or LLaVA-NeXT checkpoint: hub id or directory")
    parser.add_argument("--budgets", type=parse_budgets, default=parse_budgets("54+10,108+20,162+30"),
                        help="VisionZip budgets DOMINANT+CONTEXTUAL, comma-separated, per crop on LLaVA-NeXT "
                             "(default: 54+10,108+20,162+30)")
    parser.add_argument("--images", help="a directory of pictures (.jpg, .jpeg, .png); default: the bundled sample")
    parser.add_argument("--samples", type=positive, default=20, help="timed samples per row (default: 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed samples per row first (default: 2)")
    parser.add_argument("--new-tokens", type=positive, default=8, help="tokens generated per sample (default: 8)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--attn-implementation", choices=("sdpa", "eager", "flash_attention_2"), default=None)
    parser.add_argument("--out", help="also write the results as JSON to this file")
    return parser


def load_pictures(directory):
    from PIL import Image

    from llava_token_reduction.bench import SAMPLE_IMAGE

    if directory is None:
        return [Image.open(SAMPLE_IMAGE).convert("RGB")]
    files = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise ValueError(f"no .jpg/.jpeg/.png pictures in {directory}")
    return [Image.open(p).convert("RGB") for p in files]


def run(args) -> dict:
    import statistics

    from tqdm.auto import tqdm
    from transformers import AutoConfig

    from llava_token_reduction.bench import (
        Method,
        budget_row_name,
        build_checkpoint_workload,
        family_of_model_type,
        image_tokens_kept,
        measure_generate,
    )
    from llava_token_reduction.bench.command import check_device

    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    check_device(args.device, args.dtype, args.attn_implementation)
    pictures = load_pictures(args.images)
    family, _ = family_of_model_type(AutoConfig.from_pretrained(args.model).model_type)
    # Named by the tokens per image on the family's reference picture (LLaVA-NeXT: a 2x2 grid, 5 crops).
    rows = [Method("stock", "stock")] + [
        Method(budget_row_name("visionzip", d + c, family.reference_crops), "visionzip", d, c) for d, c in args.budgets
    ]
    workload = build_checkpoint_workload(args.model, pictures[0], args.question, rows, dtype=args.dtype,
                                         device=args.device, attn_implementation=args.attn_implementation)
    if not set(workload.models) >= {row.name for row in rows}:
        raise ValueError(f"{args.model} could not run every row: {workload.notes}")
    runs = {row.name: [] for row in rows}
    total = (args.warmup + args.samples) * len(rows)
    with tqdm(total=total, desc="visionzip efficiency", unit="sample") as progress:
        for index in range(args.warmup + args.samples):
            inputs = workload.batch([pictures[index % len(pictures)]])
            for row in rows:  # the rows take turns on every sample
                result = measure_generate(workload.models[row.name], inputs[row.name], args.new_tokens)
                if index >= args.warmup:
                    runs[row.name].append(result)
                progress.update()
    table = []
    for row in rows:
        results = runs[row.name]
        prefill = statistics.median(r["prefill_ms"] for r in results)
        ttft = statistics.median(r["ttft_ms"] for r in results)
        total_s = sum(r["total_ms"] for r in results) / 1000
        table.append({
            # On the first picture (LLaVA-NeXT's count depends on each picture's grid).
            "method": row.name, "image_tokens": image_tokens_kept(workload.models[row.name], workload.inputs[row.name]),
            "prefill_ms": prefill, "prefill_ms_range": [min(r["prefill_ms"] for r in results),
                                                        max(r["prefill_ms"] for r in results)],
            "ttft_ms": ttft, "total_s": total_s,
        })
    for entry in table:
        entry["prefill_speedup"] = table[0]["prefill_ms"] / entry["prefill_ms"]
        entry["ttft_speedup"] = table[0]["ttft_ms"] / entry["ttft_ms"]
        entry["total_speedup"] = table[0]["total_s"] / entry["total_s"]
    return {"model": args.model, "device": args.device, "dtype": args.dtype, "samples": args.samples,
            "warmup": args.warmup, "new_tokens": args.new_tokens, "rows": table, "published": PUBLISHED}


def render(report: dict) -> str:
    lines = [
        f"{report['model']} on {report['device']} ({report['dtype']}), {report['samples']} samples per row after "
        f"{report['warmup']} warm-up, batch 1, {report['new_tokens']} new tokens each; medians (min–max).",
        "",
        "| method | image tokens | LM prefill ms | speed-up | TTFT ms | speed-up | total s | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        low, high = row["prefill_ms_range"]
        lines.append(
            f"| {row['method']} | {row['image_tokens']} | {row['prefill_ms']:.1f} ({low:.1f}–{high:.1f}) "
            f"| {row['prefill_speedup']:.2f}× | {row['ttft_ms']:.1f} | {row['ttft_speedup']:.2f}× "
            f"| {row['total_s']:.2f} | {row['total_speedup']:.2f}× |"
        )
    published = report["published"]
    base = published["rows"][0]
    lines += ["", f"Published: {published['model']}", "",
              "| method | image tokens | prefill ms | speed-up | total s | speed-up |", "|---|---|---|---|---|---|"]
    for row in published["rows"]:
        lines.append(f"| {row['method']} | {row['tokens']} | {row['prefill_ms']} | "
                     f"{base['prefill_ms'] / row['prefill_ms']:.1f}× | {row['total_s']} | "
                     f"{base['total_s'] / row['total_s']:.1f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from llava_token_reduction.cli import CommandError

    args = build_parser().parse_args(argv)
    try:
        report = run(args)
    except (ValueError, CommandError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(render(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
