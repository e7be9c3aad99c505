"""Learned behaviour of the shipped toy model (llava_token_reduction/assets/toy): no training here.

The reference is the scenes' ground truth (tests/test_toy_scenes.py checks it against the pixels). Each
evaluation runs greedy `generate()` on held-out questions, the way `toy eval` does, in a second or two.
"""

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from llava_token_reduction.toy import ASSETS, toy_checkpoint
from llava_token_reduction.toy.evaluate import (
    STOCK,
    Setting,
    evaluate,
    visionzip_setting,
)
from llava_token_reduction.toy.evaluate import (
    test_split as held_out_split,
)
from llava_token_reduction.toy.scenes import chance_accuracy


QUESTIONS = 200  # of the 500 held-out ones: enough for the margins below, fast enough for the suite
# Measured on this subset with the shipped weights: stock 59.0% (count 85%, colour 72%), VisionZip 64+0 52.0%
# (88.5% of the answers stock's), 27+5 55.0%, 6+2 52.5%, TRIM adaptive 51.5%; chance 38%. On all 500: stock
# 57.4% (assets/toy/accuracy.md). The floors sit about two standard errors (3.5 points each) below.
STOCK_FLOOR = 0.52
MODERATE_DROP = 0.08  # VisionZip at half the tokens (27+5) may lose at most this much


@pytest.fixture(scope="module")
def split():
    return held_out_split()


@pytest.fixture(scope="module")
def results(split):
    settings = [STOCK, visionzip_setting(64, 0), visionzip_setting(27, 5), visionzip_setting(6, 2),
                Setting("TRIM adaptive", "trim", {})]
    with torch.no_grad():
        found = evaluate(settings, split=split, limit=QUESTIONS, progress=False)
    return {r.setting.label: r for r in found}


def test_shipped_checkpoints_are_small_float16_and_labelled_as_toys():
    total = 0
    for kind, model_type in (("llava", "llava"), ("visionzip", "llava_visionzip"), ("trim", "llava_trim"),
                             ("prumerge", "llava_prumerge")):
        directory = toy_checkpoint(kind)
        assert json.loads((directory / "config.json").read_text())["model_type"] == model_type
        weights = load_file(directory / "model.safetensors")
        assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float16}
        card = (directory / "README.md").read_text()
        assert "# TOY MODEL" in card and "synthetic" in card and "not LLaVA-1.5" in card
        total += sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    assert total < 8_000_000
    assert (ASSETS / "scene.png").is_file() and (ASSETS / "tuned" / "projector.safetensors").is_file()


def test_shipped_checkpoints_carry_no_code():
    """Inside the package the checkpoints load with the package's own classes: no copies of `modeling/` next to
    the weights (they would go stale) and no `auto_map` pointing at them."""
    for kind in ("llava", "visionzip", "trim", "prumerge"):
        directory = toy_checkpoint(kind)
        assert not list(directory.rglob("*.py")), kind
        for path in directory.rglob("*.json"):
            assert "auto_map" not in path.read_text(), path


def test_shipped_checkpoints_load_with_the_auto_classes_after_import(tmp_path):
    """In a fresh interpreter, offline, without trust_remote_code: `import llava_token_reduction` is all it takes."""
    import subprocess
    import sys

    script = """
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
import llava_token_reduction
from llava_token_reduction.toy import toy_checkpoint
for kind in ("llava", "visionzip", "trim", "prumerge"):
    model, info = AutoModelForImageTextToText.from_pretrained(
        toy_checkpoint(kind), dtype=torch.float32, output_loading_info=True)
    processor = AutoProcessor.from_pretrained(toy_checkpoint(kind))
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    print(kind, type(model).__name__, type(processor).__name__)
"""
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:4] == [
        "llava LlavaForConditionalGeneration LlavaProcessor",
        "visionzip LlavaVisionZipForConditionalGeneration LlavaProcessor",
        "trim LlavaTrimForConditionalGeneration LlavaTrimProcessor",
        "prumerge LlavaPruMergeForConditionalGeneration LlavaProcessor",
    ]


def test_stock_accuracy_is_far_above_chance(results, split):
    stock = results["stock LLaVA"]
    assert chance_accuracy(split.questions[:QUESTIONS]) < 0.45
    assert stock.accuracy >= STOCK_FLOOR
    assert stock.by_kind()["count"] >= 0.7 and stock.by_kind()["color"] >= 0.55  # chance: 33% and 20%
    assert set(stock.tokens) == {64}


def test_visionzip_at_the_full_budget_answers_like_stock(results):
    """64+0 feeds CLS + 63 patches where stock LLaVA feeds the 64 patches (CLS dropped): every patch token moves
    one position and one patch is replaced, so most answers agree (88.5% measured), not all."""
    stock, full = results["stock LLaVA"], results["VisionZip 64+0"]
    assert set(full.tokens) == {64}
    agreement = sum(a == b for a, b in zip(stock.answers, full.answers)) / len(stock.answers)
    assert agreement >= 0.82
    assert abs(full.accuracy - stock.accuracy) <= 0.1


def test_accuracy_does_not_collapse_at_moderate_budgets(results):
    stock = results["stock LLaVA"]
    assert set(results["VisionZip 27+5"].tokens) == {32}
    assert results["VisionZip 27+5"].accuracy >= stock.accuracy - MODERATE_DROP
    trim = results["TRIM adaptive"]
    assert 1 <= min(trim.tokens) and trim.mean_tokens < 32


def test_a_small_budget_loses_accuracy(results):
    """8 tokens of 64: 6.5 points lost on this subset (7.4 on all 500), a thin margin for a weak model."""
    assert results["VisionZip 6+2"].accuracy <= results["stock LLaVA"].accuracy - 0.04


def test_tuned_projector_ships_through_convert_and_gives_the_reported_accuracy(split, tmp_path):
    """The shipped projector (`toy tune`: `tune --trainable projector` at 6+2 on the train split) goes back into
    the stock checkpoint through `convert visionzip --projector`, as a user would ship it, and gives the
    accuracy its report states on all 500 held-out questions. (With this model tuning does not recover
    accuracy: 51.8% tuned against 50.0% untuned, within the noise; docs/toy_model.md.)"""
    from llava_token_reduction.conversion import convert_visionzip

    out = tmp_path / "tuned"
    convert_visionzip(toy_checkpoint("llava"), out, projector=str(ASSETS / "tuned" / "projector.safetensors"),
                      dominant_tokens=6, contextual_tokens=2, progress=False)
    shipped = load_file(toy_checkpoint("llava") / "model.safetensors")
    converted = load_file(out / "model.safetensors")
    key = "multi_modal_projector.linear_1.weight"
    assert not torch.equal(converted[key], shipped[key])  # the tuned projector went in
    tuned = evaluate([Setting("tuned", "tuned", {})], root=tmp_path, split=split, progress=False)[0]
    assert set(tuned.tokens) == {8}
    report = (ASSETS / "tuned" / "report.md").read_text()
    reported = float(re.search(r"^\| VisionZip 6\+2, tuned projector \| 8 \| ([\d.]+)%", report, re.M).group(1))
    assert f"{100 * tuned.accuracy:.1f}" == f"{reported:.1f}"


def test_the_shipped_accuracy_table_is_what_the_weights_give(results):
    """The table the demo prints (assets/toy/accuracy.md) was measured on all 500 held-out questions; its stock
    row must be reproduced by a fresh evaluation of the shipped weights."""
    table = (ASSETS / "accuracy.md").read_text()
    shipped = float(re.search(r"^\| stock LLaVA \| 64 \| ([\d.]+)%", table, re.M).group(1))
    fresh = evaluate([STOCK], progress=False)[0]
    assert f"{100 * fresh.accuracy:.1f}" == f"{shipped:.1f}"


@pytest.mark.parametrize("kind", ["llava", "visionzip", "trim", "prumerge"])
def test_model_card_snippet_runs_and_answers_with_a_task_word(kind, capsys):
    from llava_token_reduction.toy.scenes import COLORS, NUMBER_WORDS, SHAPES

    card = (toy_checkpoint(kind) / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    exec(compile(snippet, f"{kind}/README.md", "exec"), {})
    answer = capsys.readouterr().out.strip()
    assert answer in {*COLORS, *SHAPES, *NUMBER_WORDS.values(), "yes", "no", "left", "right"}
