"""`llava-token-reduction toy lmms-task OUT`: the held-out split written as an lmms-eval task folder.

The reference for the contents is the split itself (`toy.evaluate.test_split()`: its questions, answers and
rendered scenes) and the settings `toy eval` uses; lmms-eval's runs on the folder are in test_toy_lmms_eval.py.
Tests of the refusals and of an interrupted write use a five-scene split so that they cost no time.
"""

import importlib.util
import json

import numpy as np
import pytest
import yaml
from PIL import Image

import llava_token_reduction.toy.lmms_task as lmms_task
from llava_token_reduction.cli import main
from llava_token_reduction.errors import UserError
from llava_token_reduction.toy.evaluate import MAX_ANSWER_TOKENS
from llava_token_reduction.toy.evaluate import test_split as held_out_split
from llava_token_reduction.toy.scenes import QUESTION_KINDS, TEST_SEED, make_split


class _TaskLoader(yaml.SafeLoader):
    """Reads lmms-eval's `!function module.name` tags as the string `module.name`."""


_TaskLoader.add_constructor("!function", lambda loader, node: "!function " + loader.construct_scalar(node))


def read_task(folder) -> dict:
    return yaml.load((folder / "toy_heldout.yaml").read_text(), Loader=_TaskLoader)


def rows_of(folder) -> list[dict]:
    lines = (folder / "data" / "test" / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def utils_of(folder):
    spec = importlib.util.spec_from_file_location("toy_heldout_utils", folder / "toy_heldout_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task") / "toy-task"
    assert main(["toy", "lmms-task", str(folder), "--no-progress"]) == 0
    return folder


def test_folder_holds_every_held_out_question_with_its_scene(written):
    split = held_out_split()
    rows = rows_of(written)
    assert len(rows) == len(split.questions) == 500
    assert len({row["file_name"] for row in rows}) == 500
    for number, (row, question) in enumerate(zip(rows, split.questions)):
        assert row["question_id"] == number and row["scene"] == question.image_index
        assert (row["question"], row["answer"], row["kind"]) == (question.text, question.answer, question.kind)
    rendered = split.images()
    for row in rows[::7]:  # a PNG keeps the pixels `toy eval` feeds the model
        stored = np.asarray(Image.open(written / "data" / "test" / row["file_name"]).convert("RGB"))
        assert np.array_equal(stored, np.asarray(rendered[row["scene"]]))
    manifest = json.loads((written / "toy_lmms_task.json").read_text())
    assert manifest["questions"] == 500 and manifest["scenes"] == 250 and manifest["seed"] == TEST_SEED
    assert not list(written.parent.glob(".toy-task.*"))  # no staging directory left behind


def test_task_asks_the_question_alone_and_decodes_as_toy_eval(written):
    task = read_task(written)
    assert task["task"] == "toy_heldout" and task["output_type"] == "generate_until"
    assert task["dataset_path"] == "imagefolder" and task["test_split"] == "test"
    assert task["dataset_kwargs"]["data_dir"] == str(written / "data")  # absolute: the final place, not staging
    # The prompt is the metadata's `question` column as it is (no pre- or post-prompt), the target its answer.
    assert task["doc_to_text"] == "question" and task["doc_to_target"] == "answer"
    assert "lmms_eval_specific_kwargs" not in task
    assert task["generation_kwargs"] == {"max_new_tokens": MAX_ANSWER_TOKENS, "temperature": 0, "do_sample": False,
                                         "num_beams": 1}
    metrics = [metric["metric"] for metric in task["metric_list"]]
    assert metrics == ["exact_match", *(f"exact_match_{kind}" for kind in QUESTION_KINDS)]
    utils = utils_of(written)
    for reference in (task["doc_to_visual"], task["process_results"], task["metric_list"][1]["aggregation"]):
        module, name = reference.removeprefix("!function ").split(".")
        assert module == "toy_heldout_utils" and callable(getattr(utils, name))
    assert "--include_path " + str(written) in (written / "README.md").read_text()


def test_scoring_functions(written):
    """Correct means the stripped answer equals the one-word answer; a kind's mean covers that kind only."""
    utils = utils_of(written)
    assert tuple(utils.KINDS) == QUESTION_KINDS
    doc = {"kind": "color", "answer": "red"}
    scores = utils.process_results(doc, [" red "])
    assert scores["exact_match"] == 1.0 and scores["exact_match_color"] == 1.0
    assert all(scores[f"exact_match_{kind}"] is None for kind in QUESTION_KINDS if kind != "color")
    assert utils.process_results(doc, ["Red"])["exact_match"] == 0.0
    assert utils.process_results(doc, ["red red"])["exact_match_color"] == 0.0
    assert utils.mean_of_kind([1.0, None, 0.0, None, 1.0]) == pytest.approx(2 / 3)
    image = Image.new("L", (4, 4))
    [visual] = utils.doc_to_visual({"image": image})
    assert visual.mode == "RGB"


@pytest.fixture
def small_split(monkeypatch):
    monkeypatch.setattr(lmms_task, "test_split", lambda: make_split(TEST_SEED, 5))


def test_refuses_an_existing_folder_without_overwrite(tmp_path, small_split, capsys):
    out = tmp_path / "task"
    lmms_task.write_lmms_task(out, progress=False)
    (out / "note.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        lmms_task.write_lmms_task(out, progress=False)
    assert main(["toy", "lmms-task", str(out), "--no-progress"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "note.txt").read_text() == "mine"
    lmms_task.write_lmms_task(out, overwrite=True, progress=False)  # a folder it wrote: replaced as a whole
    assert not (out / "note.txt").exists() and len(rows_of(out)) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]


def test_overwrite_replaces_only_a_task_folder_it_wrote(tmp_path, small_split):
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "important.json").write_text("{}")
    with pytest.raises(UserError, match="not a task folder written by"):
        lmms_task.write_lmms_task(foreign, overwrite=True, progress=False)
    assert [p.name for p in foreign.iterdir()] == ["important.json"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        lmms_task.write_lmms_task(a_file, overwrite=True, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    lmms_task.write_lmms_task(empty, progress=False)  # an empty folder is no one's data
    assert len(rows_of(empty)) == 10
    with pytest.raises(UserError, match="OUT is empty"):
        lmms_task.write_lmms_task("", progress=False)


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_write_leaves_no_half_written_task(tmp_path, small_split, monkeypatch, existing):
    out = tmp_path / "task"
    if existing:
        lmms_task.write_lmms_task(out, progress=False)
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
    saved = []

    def save_then_stop(self, path, *args, **kwargs):
        saved.append(path)
        if len(saved) == 4:
            raise KeyboardInterrupt
        return original(self, path, *args, **kwargs)

    original = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        lmms_task.write_lmms_task(out, overwrite=existing, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["task"] if existing else [])
    if existing:
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
