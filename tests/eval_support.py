"""Offline material for the evaluation and serving tests: tiny saved checkpoints and lmms-eval tasks.

Tasks are built the way EVALUATION.md §4 describes (an `imagefolder` dataset with a `metadata.jsonl`, task
YAMLs given with `--include_path`): an exact-match generate task, a two-images-per-prompt variant and a
multiple-choice (loglikelihood) variant.
"""

import json
import os

import numpy as np
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
