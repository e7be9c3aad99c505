"""The functions of the toy held-out lmms-eval task (`llava-token-reduction toy lmms-task` copies this file into the
task folder as `toy_heldout_utils.py`, next to the task YAML that names them with `!function`).

It runs inside lmms-eval's process, so it needs nothing but the standard library: the task folder works with
any lmms-eval 0.7 environment. The score is `toy eval`'s: the greedy answer, stripped, equal to the one-word
answer; `exact_match_<kind>` is the same over the questions of one kind only.
"""

KINDS = ("color", "shape", "exists", "count", "side")  # the toy task's question kinds (toy/scenes.py)


def doc_to_visual(doc):
    """The question's scene, as the RGB image `toy eval` renders (PNG keeps every pixel)."""
    return [doc["image"].convert("RGB")]


def process_results(doc, results):
    """Per question: `exact_match` (1.0 or 0.0), and for every kind `exact_match_<kind>`, the same value on
    a question of that kind and None on the others (the kind's aggregation skips those)."""
    correct = float(results[0].strip() == doc["answer"])
    scores = {"exact_match": correct}
    for kind in KINDS:
        scores[f"exact_match_{kind}"] = correct if doc["kind"] == kind else None
    return scores


def mean_of_kind(items):
    """The mean over the questions of one kind: the items that are not None."""
    values = [item for item in items if item is not None]
    return sum(values) / len(values) if values else float("nan")
