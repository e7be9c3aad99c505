"""The toy task: deterministic splits, answers that match the drawn pixels, LLaVA-like geometry."""

import numpy as np
import pytest

from llava_token_reduction.toy.scenes import (
    CELL,
    COLORS,
    IMAGE_SIZE,
    NUMBER_WORDS,
    QUESTION_KINDS,
    TEST_SEED,
    TRAIN_SEED,
    chance_accuracy,
    make_split,
    object_patches,
)


@pytest.fixture(scope="module")
def split():
    return make_split(TEST_SEED, 60)


def test_splits_are_deterministic_and_disjoint():
    first, again = make_split(TRAIN_SEED, 20), make_split(TRAIN_SEED, 20)
    assert first == again
    assert np.array_equal(np.asarray(first.scenes[3].render()), np.asarray(again.scenes[3].render()))
    test = make_split(TEST_SEED, 20)
    assert {s.noise_seed for s in first.scenes}.isdisjoint(s.noise_seed for s in test.scenes)
    assert first.scenes != test.scenes


def test_every_kind_appears_and_chance_is_low(split):
    kinds = {q.kind for q in split.questions}
    assert kinds == set(QUESTION_KINDS)
    assert 0.3 < chance_accuracy(split.questions) < 0.45


def test_answers_match_the_pixels(split):
    """Checked from the rendered image, not from the generator's bookkeeping: the centre pixel of the named
    object has the answer's colour; counts and sides follow the objects' pixels."""
    for question in split.questions:
        scene = split.scenes[question.image_index]
        pixels = np.asarray(scene.render()).astype(int)
        if question.kind == "color":
            item = scene.objects[question.target]
            assert item.shape in question.text
            centre = pixels[item.y + item.radius // 2, item.x]  # inside circles, squares and triangles alike
            assert np.abs(centre - np.array(COLORS[question.answer])).max() < 30
        elif question.kind == "count":
            assert question.answer == NUMBER_WORDS[len(scene.objects)]
        elif question.kind == "side":
            item = scene.objects[question.target]
            assert item.name in question.text
            box = pixels[item.y - item.radius:item.y + item.radius + 1, item.x - item.radius:item.x + item.radius + 1]
            column = np.where(np.abs(box - np.array(COLORS[item.color])).max(axis=2) < 30)[1] + item.x - item.radius
            assert len(column) > 20  # the object is drawn there
            assert (question.answer == "left") == (column.max() < IMAGE_SIZE / 2)
            assert (question.answer == "right") == (column.min() >= IMAGE_SIZE / 2)
        elif question.kind == "exists":
            present = any(item.name in question.text for item in scene.objects)
            assert question.answer == ("yes" if present else "no")


def test_geometry_is_llava_in_miniature(split):
    """112 px, 28-px patches: 16 patches; every object inside one of them, each in its own, drawn from the
    pixels (its colour is found in its patch and nowhere outside it), so dropping a patch can lose an object."""
    from llava_token_reduction.toy.train import TOY_SHAPE

    assert (TOY_SHAPE.image_size, TOY_SHAPE.patch_size, TOY_SHAPE.patches) == (IMAGE_SIZE, CELL, 16)
    for scene in split.scenes:
        pixels = np.asarray(scene.render()).astype(int)
        patches = [object_patches(item) for item in scene.objects]
        assert all(len(p) == 1 for p in patches) and len({p[0] for p in patches}) == len(patches)
        for item, (patch,) in zip(scene.objects, patches):
            row, col = divmod(patch, IMAGE_SIZE // CELL)
            mask = (np.abs(pixels - np.array(COLORS[item.color])).max(axis=2) < 30)
            inside = mask[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL].sum()
            others = [o for o in scene.objects if o.color == item.color]
            assert inside > 150  # drawn there, 19-25 px across
            if len(others) == 1:
                assert mask.sum() == inside  # and nowhere else


def test_captions_fit_clip_context():
    from llava_token_reduction.tiny import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    longest = max((s.caption() for s in make_split(TRAIN_SEED, 300).scenes), key=len)
    assert len(tokenizer(longest)["input_ids"]) <= 77


def test_contrastive_groups_differ_only_in_shape_colour_or_order():
    """Half of a CLIP batch is made of groups of a scene, its mirror image, one shape changed, one colour changed; the
    four captions differ, so telling them apart takes shapes and left-to-right order, not only colours."""
    from llava_token_reduction.toy.scenes import contrastive_group

    rng = np.random.default_rng(0)
    for index in range(60):
        scene, mirror, shape_changed, color_changed = contrastive_group(rng, noise_seed=index)
        if len(scene.objects) == 1:
            continue  # a single-object group (the next test)
        assert len({s.caption() for s in (scene, mirror, shape_changed, color_changed)}) == 4
        assert mirror.caption().split(", ") == scene.caption().split(", ")[::-1]
        assert [o.side for o in mirror.objects] == [("left", "right")[o.side == "left"] for o in scene.objects]
        for changed, attribute in ((shape_changed, "shape"), (color_changed, "color")):
            if [(o.x, o.y) for o in changed.objects] != [(o.x, o.y) for o in scene.objects]:
                continue  # no object could change: a fresh scene instead
            differing = [(a, b) for a, b in zip(scene.objects, changed.objects) if a != b]
            assert len(differing) == 1
            before, after = differing[0]
            assert getattr(before, attribute) != getattr(after, attribute)
            assert (before.x, before.y, before.radius) == (after.x, after.y, after.radius)
            assert len({o.name for o in changed.objects}) == len(changed.objects)


def test_single_object_groups_show_one_object_as_each_shape_and_in_another_colour():
    """Half of CLIP's groups: one object in one place, as circle, square and triangle and in a fourth colour,
    so that only the shape (or the colour) in that one patch tells the captions apart."""
    from llava_token_reduction.toy.scenes import SHAPES, contrastive_group

    rng = np.random.default_rng(0)
    singles = 0
    for index in range(40):
        group = contrastive_group(rng, noise_seed=index)
        if len(group[0].objects) != 1:
            continue
        singles += 1
        assert all(len(scene.objects) == 1 for scene in group)
        items = [scene.objects[0] for scene in group]
        assert {(o.x, o.y, o.radius) for o in items} == {(items[0].x, items[0].y, items[0].radius)}
        assert sorted(o.shape for o in items[:3]) == sorted(SHAPES) and len({o.color for o in items[:3]}) == 1
        assert items[3].shape == items[0].shape and items[3].color != items[0].color
        assert len({scene.caption() for scene in group}) == 4
    assert 10 < singles < 30
