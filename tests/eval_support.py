"""Offline material for the evaluation and serving tests: tiny saved checkpoints, lmms-eval tasks, and
lmms-eval's own command line run as users run it.

Tasks are built the way EVALUATION.md §4 describes (an `imagefolder` dataset with a `metadata.jsonl`, task
YAMLs given with `--include_path`): an exact-match generate task, a two-images-per-prompt variant and a
multiple-choice (loglikelihood) variant.

lmms-eval lives in a separate environment (it drags in what breaks the main one, EVALUATION.md §3): `.ci/run`
builds it and exports its interpreter as `LLAVA_TOKEN_REDUCTION_EVAL_PYTHON`. Under CI a missing or broken
interpreter fails the tests that need it (`lmms_eval_python`); elsewhere they are skipped, saying why.
`launch_lmms_eval` starts several `python -m lmms_eval` runs at once (they are mostly start-up time) and
`collect_lmms_eval` waits for all of them, bounded, and stops any that overran by its PID.
"""

import glob
import json
import os
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaConfig, LlavaForConditionalGeneration

from llava_token_reduction import (
    LlavaVisionZipConfig,
    LlavaVisionZipForConditionalGeneration,
)
from llava_token_reduction.tiny import (
    build_method_model,
    build_method_processor,
    build_processor,
    build_trim_processor,
    llava_config_kwargs,
)
from methods_under_test import spread_weights


DOCS = 6
QUESTIONS = ["What is in the picture?", "Which colour dominates?", "Is it day or night?",
             "How many things are there?", "What shape is it?", "Where is this?"]
SUFFIX = "Answer the question using a single word or phrase."
CHOICES = [" alpha", " beta", " gamma"]

TASK_NAMES = {"generate": "lte_offline_gen", "multi_image": "lte_offline_two_images", "choice": "lte_offline_choice"}

_GENERATE_TASK = """\
task: lte_offline_gen
dataset_path: imagefolder
dataset_kwargs:
  data_dir: {data_dir}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.one_image
doc_to_text: "{{{{question}}}} {suffix}"
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  until: ["{stop}"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

_MULTI_TASK = _GENERATE_TASK.replace("task: lte_offline_gen", "task: lte_offline_two_images").replace(
    "utils.one_image", "utils.two_images")

_CHOICE_TASK = """\
task: lte_offline_choice
dataset_path: imagefolder
dataset_kwargs:
  data_dir: {data_dir}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.one_image
doc_to_text: "{{{{question}}}} Answer with the option's letter from the given choices directly."
doc_to_choice: ["alpha", "beta", "gamma"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

_UTILS = '''\
from PIL import Image


def one_image(doc):
    return [doc["image"].convert("RGB")]


def two_images(doc):
    return [doc["image"].convert("RGB"), Image.open(doc["second_image"]).convert("RGB")]
'''

# A stop string a random byte-level model produces now and then, so that cutting at `until` is exercised.
STOP = "e"


def picture(seed: int, size=(56, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def build_tasks(root) -> dict:
    """Write the dataset and the three task YAMLs under `root`; returns paths and the documents."""
    root = os.fspath(root)
    data = os.path.join(root, "data", "test")
    os.makedirs(data, exist_ok=True)
    docs = []
    for index in range(DOCS):
        name, second = f"img{index}.png", os.path.join(root, f"second{index}.png")
        picture(index, size=(56 + 8 * (index % 3), 56)).save(os.path.join(data, name))
        picture(100 + index).save(second)
        docs.append({"file_name": name, "question": QUESTIONS[index], "answer": "yes" if index % 2 else "no",
                     "label": index % 3, "second_image": second})
    with open(os.path.join(data, "metadata.jsonl"), "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc) + "\n")
    tasks = os.path.join(root, "tasks")
    os.makedirs(tasks, exist_ok=True)
    data_dir = os.path.join(root, "data")
    for file_name, template in (("gen.yaml", _GENERATE_TASK), ("two.yaml", _MULTI_TASK), ("choice.yaml", _CHOICE_TASK)):
        with open(os.path.join(tasks, file_name), "w", encoding="utf-8") as handle:
            handle.write(template.format(data_dir=data_dir, suffix=SUFFIX, stop=STOP))
    with open(os.path.join(tasks, "utils.py"), "w", encoding="utf-8") as handle:
        handle.write(_UTILS)
    return {"tasks": tasks, "data": data, "docs": docs}


def doc_images(built: dict, index: int, two: bool = False) -> list:
    doc = built["docs"][index]
    images = [Image.open(os.path.join(built["data"], doc["file_name"])).convert("RGB")]
    if two:
        images.append(Image.open(doc["second_image"]).convert("RGB"))
    return images


def _saved(model, processor, directory, seed: int) -> str:
    """Spread `model`'s vision weights (peaked CLS attention, as the other tests), save it with `processor`."""
    spread_weights(model.model.vision_tower, seed=seed + 1)
    model.eval().save_pretrained(directory)
    processor.save_pretrained(directory)
    return os.fspath(directory)


def save_visionzip_checkpoint(directory, seed: int = 0) -> str:
    torch.manual_seed(seed)
    config = LlavaVisionZipConfig(**llava_config_kwargs(), dominant_tokens=10, contextual_tokens=4)
    return _saved(LlavaVisionZipForConditionalGeneration(config), build_processor(), directory, seed)


def save_trim_checkpoint(directory, seed: int = 0) -> str:
    torch.manual_seed(seed)
    return _saved(build_method_model("trim"), build_trim_processor(), directory, seed)


def save_method_checkpoint(directory, name: str, seed: int = 0, **fields) -> str:
    """A tiny checkpoint of the registry's method `name`, with its processor, built as the tools build one."""
    processor = build_method_processor(name)
    return _saved(build_method_model(name, processor=processor, seed=seed, **fields), processor, directory, seed)


def save_stock_checkpoint(directory, seed: int = 0) -> str:
    torch.manual_seed(seed)
    stock = LlavaForConditionalGeneration(LlavaConfig(**llava_config_kwargs()))
    return _saved(stock, build_processor(), directory, seed)


# -- lmms-eval's command line ---------------------------------------------------------------------------

EVAL_PYTHON_VARIABLE = "LLAVA_TOKEN_REDUCTION_EVAL_PYTHON"


def lmms_eval_python() -> str:
    """The lmms-eval environment's interpreter, checked to import lmms_eval and the plugin."""
    python = os.environ.get(EVAL_PYTHON_VARIABLE)
    if not python:
        if os.environ.get("CI"):
            pytest.fail(f"CI must set {EVAL_PYTHON_VARIABLE} to the lmms-eval environment's python (.ci/run does)")
        pytest.skip(f"lmms-eval environment not configured: set {EVAL_PYTHON_VARIABLE} (see .ci/run)")
    probe = subprocess.run([python, "-c", "import lmms_eval, llava_token_reduction.evaluation.lmms_plugin"],
                           capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        pytest.fail(f"{EVAL_PYTHON_VARIABLE}={python} cannot import lmms_eval and the plugin:\n{probe.stderr[-3000:]}")
    return python


def launch_lmms_eval(python, root, runs: dict, include_path) -> dict:
    """Start `python -m lmms_eval` once per entry of `runs`, name -> (--model, --model_args, tasks, batch size,
    extra flags), offline, one thread each, in `root` (results in root/out_NAME, log in root/log_NAME.txt).
    Returns what `collect_lmms_eval` needs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": os.path.join(root, "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    started = {}
    for name, (model, model_args, tasks, batch, extra) in runs.items():
        out = os.path.join(root, f"out_{name}")
        command = [python, "-m", "lmms_eval", "--model", model, "--model_args", model_args, "--tasks",
                   ",".join(tasks), "--include_path", os.fspath(include_path), "--batch_size", str(batch),
                   "--output_path", out, "--log_samples", *extra]
        log_path = os.path.join(root, f"log_{name}.txt")
        log = open(log_path, "w")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
        started[name] = (process, log, log_path, out, time.monotonic())
    return started


def collect_lmms_eval(started: dict, timeout: float) -> dict:
    """Wait for every run of `launch_lmms_eval`, `timeout` seconds for all together; kill what is left by its
    PID. Per name: returncode, log, out, results (the `*_results.json`, None when it wrote none) and seconds
    (its wall time, start to exit, to within a tenth of a second)."""
    deadline = time.monotonic() + timeout
    ended = {}
    try:
        while len(ended) < len(started) and time.monotonic() < deadline:
            for name, (process, *_) in started.items():
                if name not in ended and process.poll() is not None:
                    ended[name] = time.monotonic()
            time.sleep(0.1)
    finally:
        for process, log, *_ in started.values():
            if process.poll() is None:
                process.kill()
            process.wait()
            log.close()
    results = {}
    for name, (process, _, log_path, out, began) in started.items():
        with open(log_path) as handle:
            text = handle.read()
        if name not in ended:
            text += f"\n[stopped after the {timeout:.0f} s allowed for all runs]"
        found = glob.glob(os.path.join(out, "**", "*_results.json"), recursive=True)
        results[name] = {"returncode": process.returncode, "log": text, "out": out,
                         "results": found[0] if found else None, "seconds": ended.get(name, time.monotonic()) - began}
    return results


def completed(runs, name) -> dict:
    run = runs[name]
    if run["results"] is None:  # lmms-eval exits 0 even when the evaluation failed
        pytest.fail(f"lmms-eval run {name} wrote no results file (exit {run['returncode']}):\n{run['log'][-4000:]}")
    return run


def samples(run, task) -> dict[int, dict]:
    """The run's logged samples of `task`, by doc_id."""
    [path] = glob.glob(os.path.join(run["out"], "**", f"*_samples_{task}.jsonl"), recursive=True)
    with open(path, encoding="utf-8") as handle:
        return {record["doc_id"]: record for record in map(json.loads, handle)}
