"""The evaluation summary: accuracy per task next to what the language model saw, so that "keeps 95% of
the accuracy at 11% of the tokens" is one table.

Inputs are what one `python -m lmms_eval` run writes: its `*_results.json` (scores per task) and the plugin's
`stats_path` file (one record per generated sample: image tokens kept, image placeholders, LM prompt length
with and without the reduction, and the LM's widths). Per task the table gives the score, the mean image
tokens per image the LM saw, the same before the reduction, and the ratio of LM prefill FLOPs (reduced over
unreduced, analytic, `bench.lm_prefill_flops`). Multiple-choice (loglikelihood) tasks have no token records.

    python -m llava_token_reduction.evaluation.summary --results OUT_DIR --stats stats.jsonl [--stats ...]
"""

import argparse
import glob
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass


@dataclass
class TaskRow:
    task: str
    metric: str
    score: float | None
    samples: int = 0
    images: int = 0
    image_tokens_per_image: float | None = None
    placeholders_per_image: float | None = None
    prefill_flops_ratio: float | None = None


def find_results_file(path: str) -> str:
    """`path` itself if it is a results file, else the newest `*_results.json` under it."""
    if os.path.isfile(path):
        return path
    found = sorted(glob.glob(os.path.join(path, "**", "*_results.json"), recursive=True), key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"no lmms-eval *_results.json under {path}: the run failed (lmms-eval exits 0 anyway)")
    return found[-1]


def task_scores(results: dict) -> dict[str, tuple[str, float]]:
    """Per task, its first metric (as `metric,filter` in lmms-eval's results) and value."""
    scores = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            if "," in key and "_stderr" not in key and isinstance(value, (int, float)):
                scores[task] = (key.split(",")[0], float(value))
                break
    return scores


def read_stats(paths: list[str]) -> tuple[dict | None, list[dict]]:
    model, samples = None, []
    for path in paths:
        for candidate in [path, *sorted(glob.glob(path + ".rank*"))]:
            if not os.path.exists(candidate):
                continue
            with open(candidate, encoding="utf-8") as handle:
                for line in handle:
                    record = json.loads(line)
                    if record.get("kind") == "model":
                        model = model or record
                    elif record.get("kind") == "sample":
                        samples.append(record)
    return model, samples


def summarize(results_path: str, stats_paths: list[str]) -> tuple[dict | None, list[TaskRow]]:
    from ..bench import lm_prefill_flops

    with open(find_results_file(results_path), encoding="utf-8") as handle:
        results = json.load(handle)
    model, samples = read_stats(stats_paths)
    by_task = defaultdict(dict)
    for record in samples:  # one record per (task, doc); a re-run appending to the same file replaces it
        by_task[record["task"]][record["doc_id"]] = record
    lm = model["lm"] if model is not None else None  # the LM's widths, for the analytic prefill FLOPs

    def flops(tokens):
        return lm_prefill_flops(tokens, lm["hidden"], lm["intermediate"], lm["layers"], lm["heads"], lm["kv_heads"],
                                lm["vocab"])["total"]

    rows = []
    for task, (metric, score) in task_scores(results).items():
        row = TaskRow(task=task, metric=metric, score=score)
        records = list(by_task.get(task, {}).values())
        if records:
            row.samples = len(records)
            row.images = sum(r["images"] for r in records)
            if row.images:
                row.image_tokens_per_image = sum(r["image_tokens"] for r in records) / row.images
                row.placeholders_per_image = sum(r["image_placeholders"] for r in records) / row.images
            if lm is not None:
                unreduced = sum(flops(r["lm_tokens_unreduced"]) for r in records)
                row.prefill_flops_ratio = sum(flops(r["lm_tokens"]) for r in records) / unreduced if unreduced else None
        rows.append(row)
    return model, rows


def _fmt(value, pattern: str) -> str:
    return "–" if value is None else format(value, pattern)


def _method(model: dict) -> str:
    """`visionzip (VisionZip 10+4)`: the method and, when the stats file has it, its setting."""
    if not model["method"]:
        return "none, unreduced"
    return model["method"] + (f" ({model['setting']})" if model.get("setting") else "")


def render_table(model: dict | None, rows: list[TaskRow]) -> str:
    title = "model: unknown (no stats file)" if model is None else (
        f"model: {model['pretrained']} ({model['model_type']}, method: {_method(model)}"
        + (f", overrides: {model['overrides']}" if model.get("overrides") else "") + ")"
    )
    lines = [title, "", "| task | metric | score | samples | image tokens / image | of (unreduced) | prefill FLOPs |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = "–" if row.prefill_flops_ratio is None else f"{100 * row.prefill_flops_ratio:.1f}%"
        lines.append(
            f"| {row.task} | {row.metric} | {_fmt(row.score, '.4g')} | {row.samples or '–'} | "
            f"{_fmt(row.image_tokens_per_image, '.1f')} | {_fmt(row.placeholders_per_image, '.0f')} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_token_reduction.evaluation.summary",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="lmms-eval's --output_path (or one *_results.json)")
    parser.add_argument("--stats", action="append", default=[], help="the plugin's stats_path file (repeatable)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args(argv)
    try:
        model, rows = summarize(args.results, args.stats)
    except FileNotFoundError as error:
        print(f"summary: error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"model": model, "tasks": [row.__dict__ for row in rows]}, indent=2))
    else:
        print(render_table(model, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
