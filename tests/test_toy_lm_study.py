"""`toy lm-study`: the symbolic image, the question-first prompt, the teacher-forced score against greedy
generation, and the command on a few steps."""

import pytest
import torch
from transformers.utils import logging as transformers_logging

from llava_token_reduction.cli import main
from llava_token_reduction.toy import ASSETS
from llava_token_reduction.toy.evaluate import load
from llava_token_reduction.toy.evaluate import test_split as held_out_split
from llava_token_reduction.toy.lm_study import ORDERS, first_answer_hits, study
from llava_token_reduction.toy.scenes import COLORS, SHAPES, Scene, SceneObject
from llava_token_reduction.toy.symbolic import symbol_width, symbolic_features
from llava_token_reduction.toy.train import TOY_CHAT_TEMPLATE, build_toy_processor, prompt_text, tower_features


def test_symbolic_features_mark_the_object_s_patches_and_every_patch_s_place():
    # A red triangle whose box spans x 20..44, y 60..84: columns 0-1 and rows 2-3 of the 28-px grid (a box
    # across cells, which the scenes never draw, to check every covered patch is marked); then the 14-px grid's
    # columns 1-3 and rows 4-6.
    scene = Scene((SceneObject("red", "triangle", 32, 72, 12),), (220, 220, 220), 0)
    colors, shapes = len(COLORS), len(SHAPES)
    for patch_size, grid, covered in ((28, 4, {row * 4 + col for row in (2, 3) for col in (0, 1)}),
                                      (14, 8, {row * 8 + col for row in (4, 5, 6) for col in (1, 2, 3)})):
        features = symbolic_features([scene], width=64, patch_size=patch_size)
        assert features.shape == (1, grid * grid, 64)
        for patch in range(grid * grid):
            row, col = divmod(patch, grid)
            expected = torch.zeros(64)
            expected[colors + shapes + row] = 1
            expected[colors + shapes + grid + col] = 1
            if patch in covered:
                expected[list(COLORS).index("red")] = 1
                expected[colors + SHAPES.index("triangle")] = 1
            assert torch.equal(features[0, patch], expected), (patch_size, patch)
    assert symbol_width() == 16 and symbol_width(14) == 24
    with pytest.raises(ValueError, match="width of at least 16"):
        symbolic_features([scene], width=12)


def test_the_toy_s_template_puts_the_question_before_the_image():
    processor = build_toy_processor()
    assert prompt_text(processor, "Is there a red circle?") == "USER: Is there a red circle? <image>\nASSISTANT:"
    processor.chat_template = ORDERS["image-first"]  # LLaVA-1.5's
    assert prompt_text(processor, "Is there a red circle?") == "USER: <image>\nIs there a red circle? ASSISTANT:"
    assert ORDERS["question-first"] == TOY_CHAT_TEMPLATE


def test_the_teacher_forced_score_is_greedy_generation_s_first_token():
    """On the shipped stock model: the score from cached tower features and the answer's labels agrees, question by
    question, with the first token `generate()` produces from the pixels."""
    split = held_out_split()
    questions = list(split.questions[:40])
    model, processor = load(ASSETS / "llava")
    features = tower_features(model, processor, split.scenes[:20], progress=False)
    hits = first_answer_hits(model, processor, questions, features)
    images = split.images()
    generated = []
    with torch.no_grad():
        for question in questions:
            inputs = processor(images=images[question.image_index], text=prompt_text(processor, question.text),
                               return_tensors="pt")
            token = model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1]
            answer = processor.tokenizer(" " + question.answer, add_special_tokens=False)["input_ids"][0]
            generated.append(int(token) == answer)
    assert hits == generated
    assert 0 < sum(hits) < len(hits)


def test_study_scores_on_schedule_and_refuses_bad_settings(tmp_path):
    rows = study(ASSETS, order="question-first", features="symbolic", steps=3, every=2, train_images=12,
                 progress=False)
    assert [row.step for row in rows] == [2, 3]
    assert set(rows[0].held_out) == {"all", "color", "shape", "exists", "count", "side"}
    assert all(0 <= value <= 1 for row in rows for value in (*row.train.values(), *row.held_out.values()))
    for kwargs, message in (({"order": "middle"}, "order must be one of question-first, image-first"),
                            ({"features": "pixels"}, "features must be one of tower, symbolic"),
                            ({"steps": 0}, "steps must be >= 1")):
        with pytest.raises(ValueError, match=message):
            study(ASSETS, progress=False, **kwargs)
    with pytest.raises(ValueError, match="no toy LLaVA checkpoint"):
        study(tmp_path, progress=False)


def test_the_command_prints_a_row_per_evaluation(capsys):
    assert main(["toy", "lm-study", "--features", "symbolic", "--steps", "2", "--every", "1", "--train-images", "12",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "Loading weights" not in captured.err  # --no-progress silences transformers' bars too...
    assert transformers_logging.is_progress_bar_enabled()  # ...for the command only
    assert "question-first, symbolic features, 2 steps" in out
    assert out.count("\n| 1 |") == 1 and out.count("\n| 2 |") == 1
