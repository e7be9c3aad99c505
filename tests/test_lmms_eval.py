"""lmms-eval's own command line (`python -m lmms_eval --model llava_token_reduction ...`) on offline tasks,
against tiny saved VisionZip, TRIM and stock checkpoints (the stock one also reduced at load time, as VisionZip
and as PruMerge+).

lmms-eval lives in a separate environment (EVALUATION.md §3; `eval_support.lmms_eval_python`): under CI a
missing or broken interpreter fails these tests; elsewhere they are skipped without it, saying why.

The references are computed here, in the main environment, the way a user would: `AutoProcessor` and
`AutoModelForImageTextToText` on the same checkpoint, the chat rendered by the processor, `generate()` one
sample at a time, and the `labels` loss of `forward` for multiple choice.
"""

import json
import os
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import eval_support as support
from eval_support import completed, samples
from llava_token_reduction.evaluation.summary import render_table, summarize


RUN_TIMEOUT = 420  # seconds for all lmms-eval processes together


@pytest.fixture(scope="module")
def eval_python():
    return support.lmms_eval_python()


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_eval")
    built = support.build_tasks(root)
    built["root"] = root
    built["visionzip"] = support.save_visionzip_checkpoint(root / "visionzip")
    built["trim"] = support.save_trim_checkpoint(root / "trim")
    built["stock"] = support.save_stock_checkpoint(root / "stock")
    return built


GEN, TWO, CHOICE = support.TASK_NAMES["generate"], support.TASK_NAMES["multi_image"], support.TASK_NAMES["choice"]

# name -> (--model, model_args beyond pretrained/device, checkpoint, tasks, batch size, extra flags)
RUNS = {
    "visionzip_b1": ("llava_visionzip", "", "visionzip", [GEN, TWO], 1, []),
    "visionzip_b4": ("llava_visionzip", "", "visionzip", [GEN, TWO], 4, []),
    "trim_b4": ("llava_trim", "", "trim", [GEN, TWO], 4, []),
    "trim_simple": ("llava_trim", "", "trim", [CHOICE, GEN], 4, ["--force_simple"]),
    "stock_as_visionzip": ("llava_token_reduction", "method=visionzip,dominant_tokens=6,contextual_tokens=2",
                           "stock", [GEN], 3, []),
    "stock_under_visionzip_name": ("llava_visionzip", "", "stock", [GEN], 1, []),
    "stock_as_prumerge_plus": ("llava_prumerge", "method=prumerge,prumerge_plus=True,prumerge_max_tokens=4",
                               "stock", [GEN, TWO], 4, []),
}


@pytest.fixture(scope="module")
def runs(eval_python, offline):
    """Start every lmms-eval run at once (they are mostly start-up time), wait for all, bounded."""
    root = offline["root"]
    launches = {}
    for name, (model, args, checkpoint, tasks, batch, extra) in RUNS.items():
        stats = root / f"stats_{name}.jsonl"
        model_args = f"pretrained={offline[checkpoint]},device=cpu,stats_path={stats}" + (f",{args}" if args else "")
        launches[name] = (model, model_args, tasks, batch, extra)
    started = support.launch_lmms_eval(eval_python, str(root), launches, offline["tasks"])
    results = support.collect_lmms_eval(started, RUN_TIMEOUT)
    for name, run in results.items():
        run["out"] = root / f"out_{name}"
        run["stats"] = root / f"stats_{name}.jsonl"
    return results


_loaded = {}


def load(path):
    if path not in _loaded:
        model = AutoModelForImageTextToText.from_pretrained(path).eval()
        _loaded[path] = (model, AutoProcessor.from_pretrained(path))
    return _loaded[path]


def direct_answer(path, images, text, max_new_tokens=8) -> str:
    """`generate()` on one sample, as a user runs it: the chat through the processor's template."""
    model, processor = load(path)
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": text}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True,
        return_tensors="pt",
    )
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return answer.split(support.STOP)[0]


def question(index) -> str:
    return f"{support.QUESTIONS[index]} {support.SUFFIX}"


@pytest.mark.parametrize("name,checkpoint", [("visionzip_b4", "visionzip"), ("trim_b4", "trim")])
@pytest.mark.parametrize("task", [GEN, TWO])
def test_answers_equal_direct_generate(runs, offline, name, checkpoint, task):
    run = completed(runs, name)
    got = samples(run, task)
    assert sorted(got) == list(range(support.DOCS))
    for index in range(support.DOCS):
        images = support.doc_images(offline, index, two=task == TWO)
        expected = direct_answer(offline[checkpoint], images, question(index))
        assert got[index]["filtered_resps"] == expected, (index, got[index]["filtered_resps"], expected)


def test_batch_of_four_equals_batch_of_one(runs):
    one, four = completed(runs, "visionzip_b1"), completed(runs, "visionzip_b4")
    for task in (GEN, TWO):
        a, b = samples(one, task), samples(four, task)
        assert {i: s["filtered_resps"] for i, s in a.items()} == {i: s["filtered_resps"] for i, s in b.items()}


def test_stop_strings_are_applied(runs):
    """The random model says the stop string now and then; no answer may contain it."""
    for name in ("visionzip_b4", "trim_b4"):
        for task in (GEN, TWO):
            for record in samples(completed(runs, name), task).values():
                assert support.STOP not in record["filtered_resps"]


def test_token_counts_report_the_reduced_sequence(runs, offline):
    """input_tokens is the prompt the LM saw: the processor's prompt minus every placeholder plus the kept tokens."""
    model, processor = load(offline["visionzip"])
    budget = model.config.dominant_tokens + model.config.contextual_tokens
    for task, images in ((GEN, 1), (TWO, 2)):
        for index, record in samples(completed(runs, "visionzip_b4"), task).items():
            content = [{"type": "image"}] * images + [{"type": "text", "text": question(index)}]
            prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
            full = processor(images=support.doc_images(offline, index, two=images == 2), text=prompt)["input_ids"][0]
            placeholders = sum(1 for token in full if token == model.config.image_token_id)
            [counts] = record["token_counts"]
            assert counts["input_tokens"] == len(full) - placeholders + images * budget
            assert 1 <= counts["output_tokens"] <= 8


def test_loglikelihood_equals_the_labels_loss(runs, offline):
    run = completed(runs, "trim_simple")
    model, processor = load(offline["trim"])
    got = samples(run, CHOICE)
    for index in range(support.DOCS):
        images = support.doc_images(offline, index)
        text = f"{support.QUESTIONS[index]} Answer with the option's letter from the given choices directly."
        content = [{"type": "image"}, {"type": "text", "text": text}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        prompt_length = processor(images=images, text=prompt, return_tensors="pt")["input_ids"].shape[1]
        for choice, (value, greedy) in zip(["alpha", "beta", "gamma"], got[index]["filtered_resps"]):
            inputs = processor(images=images, text=prompt + " " + choice, return_tensors="pt")
            labels = inputs["input_ids"].clone()
            labels[:, :prompt_length] = -100
            with torch.no_grad():
                loss = model(**inputs, labels=labels).loss
            assert float(value) == pytest.approx(float(loss), abs=1e-4), (index, choice)
            assert greedy in ("False", "True", False, True)
    assert "acc,none" in json.load(open(run["results"]))["results"][CHOICE]
    # The same --force_simple run also generated, through the simple interface.
    for index, record in samples(run, GEN).items():
        expected = direct_answer(offline["trim"], support.doc_images(offline, index), question(index))
        assert record["filtered_resps"] == expected


def test_stock_checkpoint_reduced_at_load_time_with_overrides(runs, offline):
    run = completed(runs, "stock_as_visionzip")
    model, rows = summarize(str(run["out"]), [str(run["stats"])])
    assert model["model_type"] == "llava_visionzip" and model["method"] == "visionzip"
    [row] = rows
    assert row.image_tokens_per_image == 8 and row.placeholders_per_image == 64  # 6 + 2 of 64, from model_args
    from llava_token_reduction import LlavaVisionZipForConditionalGeneration

    reduced = LlavaVisionZipForConditionalGeneration.from_pretrained(
        offline["stock"], dominant_tokens=6, contextual_tokens=2
    ).eval()
    _, processor = load(offline["stock"])
    _loaded[offline["stock"] + "#vz"] = (reduced, processor)
    for index, record in samples(run, GEN).items():
        expected = direct_answer(offline["stock"] + "#vz", support.doc_images(offline, index), question(index))
        assert record["filtered_resps"] == expected


def test_prumerge_plus_through_the_plugin(runs, offline):
    """`--model llava_prumerge` with `method=prumerge` and PruMerge's registry fields in `--model_args`: the
    answers are `generate()`'s of the PruMerge+ class on the stock weights, and the summary's kept counts are
    the tokens its `get_image_features` returns for each image."""
    from llava_token_reduction import LlavaPruMergeForConditionalGeneration

    run = completed(runs, "stock_as_prumerge_plus")
    fields = {"prumerge_plus": True, "prumerge_max_tokens": 4}
    reduced = LlavaPruMergeForConditionalGeneration.from_pretrained(offline["stock"], **fields).eval()
    _, processor = load(offline["stock"])
    _loaded[offline["stock"] + "#pm+"] = (reduced, processor)
    model, rows = summarize(str(run["out"]), [str(run["stats"])])
    assert (model["model_type"], model["method"], model["setting"]) == ("llava_prumerge", "prumerge", "PruMerge+")
    assert model["overrides"] == fields
    by_task = {row.task: row for row in rows}
    for task, two in ((GEN, False), (TWO, True)):
        kept = []
        for index, record in samples(run, task).items():
            images = support.doc_images(offline, index, two=two)
            assert record["filtered_resps"] == direct_answer(offline["stock"] + "#pm+", images, question(index))
            pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                kept += [len(f) for f in reduced.model.get_image_features(pixel_values=pixels).pooler_output]
        assert by_task[task].image_tokens_per_image == pytest.approx(sum(kept) / len(kept))
        assert by_task[task].placeholders_per_image == 64 and max(kept) < 64
    assert "method: prumerge (PruMerge+)" in render_table(model, rows)


def test_stock_checkpoint_refused_under_a_reduction_name(runs):
    run = runs["stock_under_visionzip_name"]
    assert run["results"] is None
    assert "method=visionzip" in run["log"] and "stock 'llava' checkpoint" in run["log"]


def test_summary_table_on_the_offline_task(runs, offline):
    run = completed(runs, "trim_b4")
    model, rows = summarize(str(run["out"]), [str(run["stats"])])
    results = json.load(open(run["results"]))["results"]
    by_task = {row.task: row for row in rows}
    assert set(by_task) == {GEN, TWO}
    kept = {}
    for task in (GEN, TWO):
        records = [json.loads(line) for line in open(run["stats"])]
        records = [r for r in records if r.get("task") == task]
        assert len(records) == support.DOCS
        row = by_task[task]
        assert row.score == results[task]["exact_match,none"]
        assert row.samples == support.DOCS and row.images == support.DOCS * (2 if task == TWO else 1)
        assert row.image_tokens_per_image == pytest.approx(sum(r["image_tokens"] for r in records) / row.images)
        assert row.placeholders_per_image == 64
        assert 0 < row.prefill_flops_ratio < 1
        kept[task] = records
    # TRIM's kept counts equal what the model keeps for each image with the whole user turn as its question.
    trim, processor = load(offline["trim"])
    for record in kept[GEN]:
        index = record["doc_id"]
        inputs = processor(images=support.doc_images(offline, index), text="<image>", clip_text=question(index),
                           return_tensors="pt")
        features = trim.model.get_image_features(
            pixel_values=inputs["pixel_values"], clip_input_ids=inputs["clip_input_ids"],
            clip_attention_mask=inputs["clip_attention_mask"],
        ).pooler_output
        assert record["image_tokens"] == len(features[0])
    table = render_table(model, rows)
    assert f"| {GEN} | exact_match |" in table and "llava_trim" in table


def _paper_script():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "paper_evaluation.py")
    spec = importlib.util.spec_from_file_location("paper_evaluation", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_paper_table_on_the_offline_task(runs, tmp_path):
    """The reproduction script's table, fed with two real runs of the offline task laid out as it writes them."""
    paper = _paper_script()
    benchmark = paper.Benchmark("OFF", GEN, ("exact_match",))
    settings = [paper.Setting("base", "VisionZip 10+4", "llava_visionzip", "", {"OFF": 50.0}),
                paper.Setting("small", "stock as VisionZip 6+2", "llava_token_reduction", "", {"OFF": 40.0},
                              note="offline")]
    for setting, name in zip(settings, ("visionzip_b4", "stock_as_visionzip")):
        run = completed(runs, name)
        os.makedirs(tmp_path / setting.key)
        os.symlink(run["out"], tmp_path / setting.key / "results")
        os.symlink(run["stats"], tmp_path / setting.key / "stats.jsonl")
    collected = paper.collect(str(tmp_path), settings, [benchmark])
    scores = [json.load(open(completed(runs, n)["results"]))["results"][GEN]["exact_match,none"]
              for n in ("visionzip_b4", "stock_as_visionzip")]
    assert [c.scores["OFF"] for c in collected] == [100 * s for s in scores]
    assert [c.image_tokens for c in collected] == [14, 8]
    table = paper.render(collected, [benchmark])
    assert f"| VisionZip 10+4 | 14.0 | {100 * scores[0]:.1f} / 50.0 |" in table
    assert "| stock as VisionZip 6+2 | 8.0 |" in table and "offline" in table


def test_paper_commands():
    paper = _paper_script()
    [setting] = [s for s in paper.LLAVA15_SETTINGS if s.key == "visionzip-128"]
    command = paper.lmms_eval_command(setting, paper.LLAVA15_BENCHMARKS, "/runs", python="py", num_processes=8)
    assert command[:5] == ["py", "-m", "accelerate.commands.launch", "--num_processes=8", "-m"]
    args = command[command.index("--model_args") + 1]
    assert "method=visionzip,dominant_tokens=108,contextual_tokens=20" in args
    assert "stats_path=/runs/visionzip-128/" in args
    assert command[command.index("--tasks") + 1].split(",")[:3] == ["gqa", "mmbench_en_dev", "mme"]
    [trim] = [s for s in paper.LLAVA15_SETTINGS if s.key == "trim"]
    trim_command = paper.lmms_eval_command(trim, paper.LLAVA15_BENCHMARKS, "/r", trim_checkpoint="/ckpt/trim")
    assert trim_command[trim_command.index("--model") + 1] == "llava_trim"
    assert trim_command[trim_command.index("--model_args") + 1].startswith("pretrained=/ckpt/trim,")
