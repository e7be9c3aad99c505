"""The toy held-out split as an offline lmms-eval task: `llava-token-reduction toy lmms-task OUT`.

The folder holds the 500 questions of `evaluate.test_split()` (250 scenes from the test seed, two questions
each) as an `imagefolder` dataset, a task YAML and its functions module, so that

    python -m lmms_eval --model llava_token_reduction --model_args pretrained=.../toy/llava,dtype=float32 \\
        --tasks toy_heldout --include_path OUT

scores a toy checkpoint the way `toy eval` does: the prompt is exactly the question (the chat template adds
the image and the roles, as in `toy eval`), greedy decoding of at most `evaluate.MAX_ANSWER_TOKENS` new tokens,
exact match of the stripped answer, and one `exact_match_<kind>` per question kind.

    OUT/toy_heldout.yaml          the task (its `data_dir` is OUT/data, as an absolute path)
    OUT/toy_heldout_utils.py      doc_to_visual, process_results, the per-kind mean (`lmms_task_utils.py`)
    OUT/data/test/NNN.png         one image per question, NNN the question's index in the split
    OUT/data/test/metadata.jsonl  file_name, question_id, scene, kind, question, answer
    OUT/toy_lmms_task.json        what wrote it (`--overwrite` replaces only a folder that has this file)
    OUT/README.md                 the commands

The folder is written into a hidden staging directory next to OUT and renamed into place (the converters'
`OutputPlacement`), so an interrupted run leaves no half-written task.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from ..conversion.output_place import OutputKind, OutputPlacement, check_output, resolve_output
from ..errors import UserError
from . import ASSETS
from .evaluate import MAX_ANSWER_TOKENS, TEST_IMAGES, test_split
from .scenes import QUESTION_KINDS, TEST_SEED


TASK_NAME = "toy_heldout"
UTILS_MODULE = f"{TASK_NAME}_utils"
MANIFEST = "toy_lmms_task.json"
WRITTEN_BY = "llava-token-reduction toy lmms-task"
FORMAT_VERSION = 1


def _is_task_folder(directory: Path) -> bool:
    """An empty directory, or one this command wrote (its manifest names the command)."""
    if _is_empty_directory(directory):
        return True
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("written_by") == WRITTEN_BY


TASK_FOLDER = OutputKind(
    "an lmms-eval task", _is_task_folder,
    f"is not a task folder written by `{WRITTEN_BY}` (no {MANIFEST}); --overwrite only replaces those: remove it "
    "yourself or choose another OUT",
    error=UserError,
)


def task_yaml(data_dir: Path) -> str:
    """The task: the question as the whole prompt, greedy decoding as `toy eval`, exact match overall and per
    kind. `data_dir` is written as given (absolute: lmms-eval and `datasets` resolve it from any directory)."""
    per_kind = "".join(
        f"  - metric: exact_match_{kind}\n"
        f"    aggregation: !function {UTILS_MODULE}.mean_of_kind\n"
        f"    higher_is_better: true\n"
        for kind in QUESTION_KINDS
    )
    return (
        f"# The toy model's held-out split (seed {TEST_SEED}: {TEST_IMAGES} scenes, two questions each), written by\n"
        f"# `{WRITTEN_BY}`. It scores what `llava-token-reduction toy eval` scores: the prompt is the\n"
        "# question alone, decoding is greedy, the stripped answer must equal the one-word answer.\n"
        f"task: {TASK_NAME}\n"
        "dataset_path: imagefolder\n"
        "dataset_kwargs:\n"
        f"  data_dir: {json.dumps(str(data_dir))}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        f"doc_to_visual: !function {UTILS_MODULE}.doc_to_visual\n"
        "doc_to_text: question\n"
        "doc_to_target: answer\n"
        "generation_kwargs:\n"
        f"  max_new_tokens: {MAX_ANSWER_TOKENS}\n"
        "  temperature: 0\n"
        "  do_sample: false\n"
        "  num_beams: 1\n"
        f"process_results: !function {UTILS_MODULE}.process_results\n"
        "metric_list:\n"
        "  - metric: exact_match\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        f"{per_kind}"
        "metadata:\n"
        f"  version: {FORMAT_VERSION}.0\n"
        f"  seed: {TEST_SEED}\n"
        f"  scenes: {TEST_IMAGES}\n"
    )


def lmms_eval_commands(out, assets=ASSETS, output_path: str = "runs/toy") -> str:
    """The shell commands that score the shipped toy checkpoints on the task in `out`: stock, VisionZip 13+3
    (the VisionZip checkpoint at a load-time budget) and TRIM, each recording what its language model saw for
    `python -m llava_token_reduction.evaluation.summary`. `dtype=float32`: the weights are stored in float16,
    and `toy eval` computes in float32."""
    out, assets = Path(out), Path(assets)
    settings = (
        ("stock", "llava", ""),
        ("visionzip-13-3", "visionzip", ",dominant_tokens=13,contextual_tokens=3"),
        ("trim", "trim", ""),
    )
    runs = [
        f"python -m lmms_eval --model llava_token_reduction --model_args "
        f"pretrained={assets / kind},dtype=float32{extra},stats_path={output_path}/{name}/stats.jsonl "
        f"--tasks {TASK_NAME} --include_path {out} --batch_size 50 --output_path {output_path}/{name}"
        for name, kind, extra in settings
    ]
    summary = ("# then, per run, the score next to the image tokens: python -m llava_token_reduction.evaluation.summary"
               f" --results {output_path}/trim --stats {output_path}/trim/stats.jsonl")
    return "\n".join([*runs, summary])


def _readme(out: Path, questions: int) -> str:
    return (
        f"# {TASK_NAME}: the toy model's held-out split as an lmms-eval task\n\n"
        f"Written by `{WRITTEN_BY}`: {questions} questions about {TEST_IMAGES} synthetic scenes (seed {TEST_SEED}), "
        "the split `llava-token-reduction toy eval` scores. Offline: the images and `metadata.jsonl` are in "
        "`data/test/`.\n\n"
        "```bash\n" + lmms_eval_commands(out) + "\n```\n\n"
        "The task's `data_dir` is this folder's absolute path: after moving it, write it again.\n"
    )


def write_lmms_task(out, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the task folder at `out` (see the module docstring); returns its absolute path. An existing
    non-empty `out` is refused unless `overwrite`, and then only if this function wrote it."""
    out = resolve_output(out, TASK_FOLDER)
    replace = overwrite or _is_empty_directory(out)
    check_output(out, replace, TASK_FOLDER)  # before any work
    split = test_split()
    placement = OutputPlacement(out, replace, TASK_FOLDER)
    staging = placement.create()
    try:
        _write(staging, out, split, progress)
        _verify(staging, len(split.questions))
        placement.move_into_place()
    except BaseException:
        placement.clean_up()
        raise
    return out


def _is_empty_directory(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _write(staging: Path, out: Path, split, progress: bool) -> None:
    data = staging / "data" / "test"
    data.mkdir(parents=True)
    images = {}
    rows = []
    for number, question in enumerate(tqdm(split.questions, desc="writing the lmms-eval task", disable=not progress)):
        if question.image_index not in images:
            images[question.image_index] = split.scenes[question.image_index].render()
        name = f"{number:03d}.png"
        images[question.image_index].save(data / name)
        rows.append({"file_name": name, "question_id": number, "scene": question.image_index, "kind": question.kind,
                     "question": question.text, "answer": question.answer})
    (data / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (staging / f"{TASK_NAME}.yaml").write_text(task_yaml(out / "data"), encoding="utf-8")
    shutil.copyfile(Path(__file__).with_name("lmms_task_utils.py"), staging / f"{UTILS_MODULE}.py")
    (staging / "README.md").write_text(_readme(out, len(rows)), encoding="utf-8")
    manifest = {"written_by": WRITTEN_BY, "format": FORMAT_VERSION, "task": TASK_NAME, "seed": TEST_SEED,
                "scenes": TEST_IMAGES, "questions": len(rows)}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _verify(staging: Path, questions: int) -> None:
    """Every metadata row names an image that was written; as many rows as questions."""
    data = staging / "data" / "test"
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    missing = [row["file_name"] for row in rows if not (data / row["file_name"]).is_file()]
    if len(rows) != questions or missing:
        raise RuntimeError(f"the task folder came out wrong: {len(rows)} rows for {questions} questions, "
                        f"missing images {missing[:5]}")


__all__ = ["TASK_NAME", "write_lmms_task", "lmms_eval_commands", "task_yaml"]
