"""The released LLaVA-NeXT layout of reduced crops, against a loop reference written from the layout's description
(docs/llava_next.md), on integer-valued features so that the exact order is checked."""

import random

import pytest
import torch

from llava_token_reduction.modeling.family_llava_next import (
    NextImageLayout,
    real_crops,
    released_layout,
    released_layouts,
    released_order,
)
from visionzip_reference import reference_layout


def crop_major(crop_ids):
    """The wrong order (each crop's tokens in turn), for the negative control."""
    return [token for crop in crop_ids for token in crop]


def integer_crops(crops, per_crop, width=3):
    """Crop `k`'s token `t` has every feature equal to `1000 k + t`: positions are readable from values."""
    ids = torch.arange(crops).unsqueeze(1) * 1000 + torch.arange(per_crop)
    return ids.unsqueeze(-1).expand(crops, per_crop, width).float(), ids.tolist()


def random_kept(crops, patches, side, rng):
    return torch.tensor([sorted(rng.sample(range(side * side), patches)) for _ in range(crops)])


def test_worked_example():
    """ALGORITHMS.md's example: 1x2 grid, 3 dominant (CLS + 2), 1 contextual, S = 24."""
    tokens, ids = integer_crops(3, 4)
    kept = torch.tensor([[5, 40], [2, 77], [7, 73]])  # the base crop's patches do not matter for the order
    out = released_layout(tokens, kept, (1, 2), 24)[:, 0].long().tolist()
    g0, g1 = 1000, 2000
    assert out == ids[0] + [g0 + 1, g1 + 1, g0 + 2, g1 + 2, g0, g1, g0 + 3, g1 + 3]
    assert out == reference_layout(ids, kept.tolist(), (1, 2), 24)
    assert out != crop_major(ids)


@pytest.mark.parametrize("grid", [(1, 2), (2, 1), (1, 3), (3, 1), (2, 2)])
@pytest.mark.parametrize("dominant,contextual,side", [(3, 1, 24), (54, 10, 24), (27, 5, 24), (10, 4, 8), (1, 3, 8),
                                                      (6, 0, 8), (65, 0, 8)])
def test_matches_the_reference(grid, dominant, contextual, side):
    rng = random.Random(hash((grid, dominant, contextual)) % 1000)
    crops = 1 + grid[0] * grid[1]
    tokens, ids = integer_crops(crops, dominant + contextual)
    kept = random_kept(crops, dominant - 1, side, rng)
    out = released_layout(tokens, kept, grid, side)
    assert out.shape == (crops * (dominant + contextual), 3)
    assert out[:, 0].long().tolist() == reference_layout(ids, kept.tolist(), grid, side)
    assert torch.equal(out[:, 0], out[:, 2])  # rows moved whole


@pytest.mark.parametrize("grid", [(1, 2), (2, 1), (1, 3), (3, 1), (2, 2)])
def test_crop_major_order_fails_the_reference(grid):
    """Negative control: the reference tells the released order from the naive one (whenever a grid crop keeps
    patches on more than one row, which the chosen patches guarantee)."""
    crops = 1 + grid[0] * grid[1]
    tokens, ids = integer_crops(crops, 3 + 1)
    kept = torch.tensor([[0, 30]] * crops)  # row 0 and row 1 of every crop (S = 24)
    reference = reference_layout(ids, kept.tolist(), grid, 24)
    assert crop_major(ids) != reference
    assert released_layout(tokens, kept, grid, 24)[:, 0].long().tolist() == reference


def test_order_is_a_permutation_and_keeps_the_base_crop():
    kept = random_kept(5, 9, 8, random.Random(0))
    order = released_order(kept, (2, 2), 8, 4)
    assert sorted(order.tolist()) == list(range(5 * 14))
    assert order[:14].tolist() == list(range(14))


def test_gradients_flow_through_the_layout():
    tokens = torch.randn(3, 6, 4, requires_grad=True)
    released_layout(tokens, random_kept(3, 3, 8, random.Random(1)), (1, 2), 8).sum().backward()
    assert torch.equal(tokens.grad, torch.ones_like(tokens))


def test_batched_images_with_padding_crops_dropped():
    """Three images with different grids in one processor-style batch: padding crops (filled with a sentinel)
    are dropped, the real crops of all images stay in one tensor, and each image gets its own layout."""
    grids = [(2, 2), (1, 2), (3, 1)]
    layouts = [NextImageLayout(index=i, size=(1, 1), grid=grid, placeholders=10**6) for i, grid in enumerate(grids)]
    counts = [layout.crops for layout in layouts]
    pixel_values = torch.full((3, max(counts), 3, 8, 8), -7.0)
    for image, count in enumerate(counts):
        pixel_values[image, :count] = torch.arange(count).float().view(count, 1, 1, 1) + 10 * image
    crops = real_crops(pixel_values, layouts)
    assert crops.shape[0] == sum(counts) and not (crops == -7.0).any()
    assert crops[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 20, 21, 22, 23]
    assert real_crops(crops, layouts) is crops  # already concatenated crops pass through

    dominant, contextual, side = 5, 2, 8
    tokens, ids = integer_crops(sum(counts), dominant + contextual)
    kept = random_kept(sum(counts), dominant - 1, side, random.Random(3))
    outputs = released_layouts(tokens, kept, layouts, side)
    start = 0
    for layout, output in zip(layouts, outputs):
        crop_ids = ids[start:start + layout.crops]
        expected = reference_layout(crop_ids, kept[start:start + layout.crops].tolist(), layout.grid, side)
        assert output[:, 0].long().tolist() == expected
        start += layout.crops


def test_shape_errors_are_clear():
    layouts = [NextImageLayout(index=0, size=(1, 1), grid=(2, 2), placeholders=10**6)]
    with pytest.raises(ValueError, match="need"):
        real_crops(torch.zeros(1, 3, 3, 8, 8), layouts)
    with pytest.raises(ValueError, match="have 5"):
        real_crops(torch.zeros(4, 3, 8, 8), layouts)
    with pytest.raises(ValueError, match="4 or 5 dimensions"):
        real_crops(torch.zeros(3, 8, 8), layouts)
    with pytest.raises(TypeError, match="pixel_values"):
        real_crops([torch.zeros(5, 3, 8, 8)], layouts)
    with pytest.raises(ValueError, match="needs 5 crops"):
        released_order(torch.zeros(3, 2, dtype=torch.long), (2, 2), 8, 1)
    with pytest.raises(ValueError, match="reduced crops"):
        released_layouts(torch.zeros(4, 4, 2), torch.zeros(4, 2, dtype=torch.long), layouts, 8)
