"""The toy held-out task (`toy lmms-task`) through lmms-eval's own command line gives `toy eval`'s numbers.

Every run scores all 500 held-out questions with a shipped toy checkpoint (stock LLaVA and TRIM, whose kept
count depends on the question text), as docs/toy_model.md tells users to. The reference is
`toy.evaluate.evaluate` on the same settings, computed here in the same test run (the shipped weights change
when the toy is retrained, so no number is written down): the same answers question by question, the same
accuracy overall and per kind, and for TRIM the same image tokens per question. A run costs about 16 CPU
seconds, almost all lmms-eval's own start-up (importing it and indexing its tasks), so `--limit` would save
little; VisionZip at a budget in `--model_args` is the third command of the docs, left out here to keep the
suite fast (test_lmms_eval.py covers load-time budgets against `generate()`).
"""

import json

import pytest

import eval_support as support
from eval_support import completed, samples
from llava_token_reduction.cli import main
from llava_token_reduction.toy import ASSETS
from llava_token_reduction.toy.evaluate import STOCK, Setting, evaluate
from llava_token_reduction.toy.lmms_task import TASK_NAME
from llava_token_reduction.toy.scenes import QUESTION_KINDS


RUN_TIMEOUT = 300  # seconds for the lmms-eval runs together (each takes about 16-20 s alone)

# name -> (our setting, the --model_args beyond pretrained/device/dtype/stats_path)
SETTINGS = {
    "stock": (STOCK, ""),
    "trim": (Setting("TRIM adaptive", "trim", {}), ""),
}


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """lmms-eval's runs, started first, and `toy.evaluate`'s results, computed while they run."""
    python = support.lmms_eval_python()
    root = tmp_path_factory.mktemp("toy_lmms_eval")
    task = root / "task"
    assert main(["toy", "lmms-task", str(task), "--no-progress"]) == 0
    launches = {}
    for name, (setting, extra) in SETTINGS.items():
        model_args = (f"pretrained={ASSETS / setting.kind},device=cpu,dtype=float32,"
                      f"stats_path={root / f'stats_{name}.jsonl'}{extra}")
        launches[name] = ("llava_token_reduction", model_args, [TASK_NAME], 50, [])
    started = support.launch_lmms_eval(python, str(root), launches, task)
    try:
        ours = evaluate([setting for setting, _ in SETTINGS.values()], progress=False)
    finally:
        runs = support.collect_lmms_eval(started, RUN_TIMEOUT)
    for name, run in runs.items():
        run["stats"] = root / f"stats_{name}.jsonl"
        print(f"lmms-eval {name}: {run['seconds']:.1f} s")
    return runs, dict(zip(SETTINGS, ours))


@pytest.mark.parametrize("name", list(SETTINGS))
def test_lmms_eval_scores_equal_toy_eval(scored, name):
    runs, ours = scored
    run, result = completed(runs, name), ours[name]
    got = samples(run, TASK_NAME)
    assert sorted(got) == list(range(500))
    answers = {doc_id: record["filtered_resps"] for doc_id, record in got.items()}
    differing = [(i, answers[i], result.answers[i]) for i in range(500) if answers[i] != result.answers[i]]
    assert not differing, f"{len(differing)} answers differ (doc, lmms-eval, toy eval): {differing[:5]}"
    scores = json.load(open(run["results"]))["results"][TASK_NAME]
    assert scores["exact_match,none"] == pytest.approx(result.accuracy, abs=1e-12)
    by_kind = result.by_kind()
    for kind in QUESTION_KINDS:
        assert scores[f"exact_match_{kind},none"] == pytest.approx(by_kind[kind], abs=1e-12), kind


def test_trim_saw_the_same_image_tokens(scored):
    """The plugin's per-sample record of the tokens TRIM kept equals `toy eval`'s count per question: both
    score the image against the question alone."""
    runs, ours = scored
    records = [json.loads(line) for line in open(completed(runs, "trim")["stats"])]
    kept = {r["doc_id"]: r["image_tokens"] for r in records if r.get("kind") == "sample"}
    assert kept == dict(enumerate(ours["trim"].tokens))
    assert len(set(kept.values())) > 1  # a count that varies with the image and question
