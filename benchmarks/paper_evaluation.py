"""Run the papers' benchmark sets with lmms-eval on a GPU machine and print our numbers next to the published ones.

    python benchmarks/paper_evaluation.py --family llava-1.5 --output runs/llava15 [--num-processes 8]
    python benchmarks/paper_evaluation.py --family llava-1.5 --settings trim --trim-checkpoint llava-v1.5-7b-trim-hf ...
    python benchmarks/paper_evaluation.py --family llava-next --output runs/next        # needs the NeXT classes
    python benchmarks/paper_evaluation.py --family llava-1.5 --output runs/llava15 --table-only

Every (setting, benchmark set) is one `python -m lmms_eval` run (through `accelerate launch` with
`--num-processes` > 1) writing to OUTPUT/<setting>/, with the plugin's per-sample token records in
OUTPUT/<setting>/stats.jsonl. A setting whose results file exists is not run again. Then one table: per setting,
each benchmark's score as ours / published, the mean image tokens per image the language model saw, and the
average retention against our own vanilla run (the papers' "avg" column, over the benchmarks both have).

Published numbers: ALGORITHMS.md §4 (VisionZip paper tables as re-printed; MME = perception + cognition).
MMBench and MM-Vet score with a GPT judge in lmms-eval (an OpenAI key); the other benchmarks need the hub's data.
lmms-eval reports some metrics as fractions and some as percentages: fractions are shown ×100.
"""

import argparse
import glob
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Benchmark:
    name: str            # column name, as in the papers
    task: str            # lmms-eval task
    metrics: tuple       # lmms-eval metric names, summed (MME: perception + cognition)


@dataclass(frozen=True)
class Setting:
    key: str
    label: str
    model: str           # lmms-eval --model
    model_args: str      # without device/stats_path
    published: dict = field(default_factory=dict)   # benchmark name -> number
    note: str = ""


LLAVA15_BENCHMARKS = (
    Benchmark("GQA", "gqa", ("exact_match",)),
    Benchmark("MMB", "mmbench_en_dev", ("gpt_eval_score",)),
    Benchmark("MME", "mme", ("mme_perception_score", "mme_cognition_score")),
    Benchmark("POPE", "pope", ("pope_f1_score",)),
    Benchmark("SQA", "scienceqa_img", ("exact_match",)),
    Benchmark("VQAv2", "vqav2_val", ("exact_match",)),
    Benchmark("TextVQA", "textvqa_val", ("exact_match",)),
    Benchmark("MMMU", "mmmu_val", ("mmmu_acc",)),
    Benchmark("SEED", "seedbench", ("seed_image",)),
    Benchmark("MMVet", "mmvet", ("gpt_eval_score",)),
)
NEXT_BENCHMARKS = tuple(
    b for b in LLAVA15_BENCHMARKS if b.name in ("GQA", "MMB", "MME", "SQA", "VQAv2", "TextVQA", "POPE", "MMMU")
)

_V15 = "pretrained=llava-hf/llava-1.5-7b-hf,dtype=float16"
_NEXT = "pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,dtype=float16"
_COLUMNS = ("GQA", "MMB", "MME", "POPE", "SQA", "VQAv2", "TextVQA", "MMMU", "SEED", "MMVet")


def _row(*values) -> dict:
    return {name: value for name, value in zip(_COLUMNS, values) if value is not None}


LLAVA15_SETTINGS = (
    Setting("vanilla-576", "vanilla 576", "llava_token_reduction", _V15,
            _row(61.9, 64.7, 1862, 85.9, 69.5, 78.5, 58.2, 36.3, 58.6, 31.1)),
    Setting("visionzip-192", "VisionZip 192 (162+30)", "llava_token_reduction",
            _V15 + ",method=visionzip,dominant_tokens=162,contextual_tokens=30",
            _row(59.3, 63.0, 1782.6, 85.3, 68.9, 76.8, 57.3, 36.6, 56.4, 31.7)),
    Setting("visionzip-128", "VisionZip 128 (108+20)", "llava_token_reduction",
            _V15 + ",method=visionzip,dominant_tokens=108,contextual_tokens=20",
            _row(57.6, 62.0, 1761.7, 83.2, 68.9, 75.6, 56.8, 37.9, 54.9, 32.6)),
    Setting("visionzip-64", "VisionZip 64 (54+10)", "llava_token_reduction",
            _V15 + ",method=visionzip,dominant_tokens=54,contextual_tokens=10",
            _row(55.1, 60.1, 1690, 77.0, 69.0, 72.4, 55.5, 36.2, 52.2, 31.7)),
    Setting("trim", "TRIM adaptive (released 7B)", "llava_trim", "pretrained={trim_checkpoint},dtype=bfloat16",
            {}, note="no confirmed per-benchmark TRIM numbers (ALGORITHMS.md §4.4); the model card claims ~79% "
                     "fewer image tokens (~121 of 576 per image)"),
)

NEXT_SETTINGS = (
    Setting("next-vanilla-2880", "NeXT vanilla 2880", "llava_token_reduction", _NEXT,
            {"GQA": 64.2, "MMB": 67.9, "MME": 1851, "SQA": 70.2, "VQAv2": 81.8, "TextVQA": 61.3}),
    Setting("next-visionzip-640", "NeXT VisionZip 640 (108+20 per crop)", "llava_token_reduction",
            _NEXT + ",method=visionzip,dominant_tokens=108,contextual_tokens=20",
            {"GQA": 61.3, "MMB": 66.3, "MME": 1787, "SQA": 68.1, "VQAv2": 79.1, "TextVQA": 60.2}),
    Setting("next-visionzip-320", "NeXT VisionZip 320 (54+10 per crop)", "llava_token_reduction",
            _NEXT + ",method=visionzip,dominant_tokens=54,contextual_tokens=10",
            {"GQA": 59.3, "MMB": 63.1, "MME": 1702, "SQA": 67.3, "VQAv2": 76.2, "TextVQA": 58.9, "POPE": 82.1,
             "MMMU": 35.3}),
    Setting("next-visionzip-160", "NeXT VisionZip 160 (27+5 per crop)", "llava_token_reduction",
            _NEXT + ",method=visionzip,dominant_tokens=27,contextual_tokens=5",
            {"GQA": 55.5, "MMB": 60.1, "MME": 1630, "SQA": 68.3, "VQAv2": 71.4, "TextVQA": 56.2, "POPE": 74.8,
             "MMMU": 36.1}),
)

FAMILIES = {"llava-1.5": (LLAVA15_SETTINGS, LLAVA15_BENCHMARKS), "llava-next": (NEXT_SETTINGS, NEXT_BENCHMARKS)}


def lmms_eval_command(setting: Setting, benchmarks, output: str, python: str = sys.executable, num_processes: int = 1,
                      batch_size: int = 1, limit: int | None = None, trim_checkpoint: str | None = None,
                      include_path: str | None = None) -> list[str]:
    directory = os.path.join(output, setting.key)
    model_args = setting.model_args.format(trim_checkpoint=trim_checkpoint or "TRIM_CHECKPOINT")
    model_args += f",stats_path={os.path.join(directory, 'stats.jsonl')}"
    if num_processes > 1:
        launcher = [python, "-m", "accelerate.commands.launch", f"--num_processes={num_processes}", "-m", "lmms_eval"]
    else:
        launcher = [python, "-m", "lmms_eval"]  # the plugin picks cuda when there is one
    command = launcher + ["--model", setting.model, "--model_args", model_args,
                          "--tasks", ",".join(b.task for b in benchmarks), "--batch_size", str(batch_size),
                          "--output_path", os.path.join(directory, "results"), "--log_samples"]
    if limit:
        command += ["--limit", str(limit)]
    if include_path:
        command += ["--include_path", include_path]
    return command


def benchmark_score(results: dict, benchmark: Benchmark, published: float | None) -> float | None:
    values = results.get("results", {}).get(benchmark.task, {})
    total, found = 0.0, False
    for metric in benchmark.metrics:
        for key, value in values.items():
            if key.split(",")[0] == metric and isinstance(value, (int, float)):
                total, found = total + float(value), True
                break
    if not found:
        return None
    # Fractions next to a percentage-scale paper number are shown in percent.
    if total <= 1.0 and (published is None or published > 1.5) and benchmark.name != "MME":
        total *= 100
    return total


@dataclass
class SettingResult:
    setting: Setting
    scores: dict            # benchmark name -> our score (None when missing)
    image_tokens: float | None


def collect(output: str, settings, benchmarks) -> list[SettingResult]:
    import json

    from llava_token_reduction.evaluation.summary import summarize

    collected = []
    for setting in settings:
        directory = os.path.join(output, setting.key)
        scores, image_tokens = {b.name: None for b in benchmarks}, None
        found = glob.glob(os.path.join(directory, "results", "**", "*_results.json"), recursive=True)
        if found:
            results = {"results": {}}
            for path in sorted(found, key=os.path.getmtime):  # later runs of a task win
                with open(path, encoding="utf-8") as handle:
                    results["results"].update(json.load(handle)["results"])
            for benchmark in benchmarks:
                scores[benchmark.name] = benchmark_score(results, benchmark, setting.published.get(benchmark.name))
            _, rows = summarize(sorted(found, key=os.path.getmtime)[-1], [os.path.join(directory, "stats.jsonl")])
            images = sum(row.images for row in rows)
            if images:
                image_tokens = sum(row.image_tokens_per_image * row.images for row in rows if row.images) / images
        collected.append(SettingResult(setting, scores, image_tokens))
    return collected


def render(collected: list[SettingResult], benchmarks) -> str:
    header = "| setting | image tokens / image | " + " | ".join(b.name for b in benchmarks) + " | avg vs our vanilla |"
    lines = ["ours / published", "", header, "|" + "---|" * (len(benchmarks) + 3)]
    vanilla = collected[0].scores if collected else {}
    for result in collected:
        cells = []
        for b in benchmarks:
            ours, published = result.scores.get(b.name), result.setting.published.get(b.name)
            cells.append(f"{'–' if ours is None else f'{ours:.1f}'} / {'–' if published is None else published}")
        ratios = [result.scores[b.name] / vanilla[b.name] for b in benchmarks
                  if result.scores.get(b.name) is not None and vanilla.get(b.name)]
        avg = f"{100 * sum(ratios) / len(ratios):.1f}%" if ratios else "–"
        tokens = "–" if result.image_tokens is None else f"{result.image_tokens:.1f}"
        lines.append(f"| {result.setting.label} | {tokens} | " + " | ".join(cells) + f" | {avg} |")
    notes = [f"- {r.setting.label}: {r.setting.note}" for r in collected if r.setting.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=sorted(FAMILIES), default="llava-1.5")
    parser.add_argument("--output", required=True)
    parser.add_argument("--settings", help="comma-separated setting keys (default: all of the family)")
    parser.add_argument("--benchmarks", help="comma-separated column names, e.g. GQA,POPE (default: all)")
    parser.add_argument("--trim-checkpoint", help="the TRIM checkpoint (from `convert trim`) for the trim setting")
    parser.add_argument("--num-processes", type=int, default=1, help="GPUs (data parallel through accelerate)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--limit", type=int, help="documents per task (a quick check, not a paper number)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter with lmms-eval installed")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--table-only", action="store_true", help="run nothing, print the table of what exists")
    args = parser.parse_args(argv)
    settings, benchmarks = FAMILIES[args.family]
    if args.settings:
        wanted = args.settings.split(",")
        unknown = sorted(set(wanted) - {s.key for s in settings})
        if unknown:
            parser.error(f"unknown settings {unknown}; known: {[s.key for s in settings]}")
        settings = [s for s in settings if s.key in wanted]
    if args.benchmarks:
        benchmarks = [b for b in benchmarks if b.name in args.benchmarks.split(",")]
    if any(s.key == "trim" for s in settings) and not args.trim_checkpoint and not (args.dry_run or args.table_only):
        parser.error(
            "the trim setting needs --trim-checkpoint (a checkpoint written by `llava-token-reduction convert trim`)"
        )
    if not args.table_only:
        for setting in settings:
            command = lmms_eval_command(setting, benchmarks, args.output, args.python, args.num_processes,
                                        args.batch_size, args.limit, args.trim_checkpoint)
            print("$ " + shlex.join(command), flush=True)
            if args.dry_run:
                continue
            if glob.glob(os.path.join(args.output, setting.key, "results", "**", "*_results.json"), recursive=True):
                print(f"  ({setting.key}: results exist, not run again)")
                continue
            os.makedirs(os.path.join(args.output, setting.key), exist_ok=True)
            status = subprocess.call(command)
            if status != 0:
                print(f"  ({setting.key}: lmms-eval exited {status})", file=sys.stderr)
    if not args.dry_run:
        print(render(collect(args.output, settings, benchmarks), benchmarks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
