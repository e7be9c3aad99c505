"""The scene written as symbols on the patch grid: what a perfect vision tower could give the language model.

`toy lm-study --features symbolic` trains the toy's LLaVA stage on these instead of the frozen tower's output:
one vector per patch, laid out like the tower's patch features, that says, for each patch, which colour and which shape
cover it and where it is. They come from the scene's description (its objects' colours, shapes and boxes), not
from pixels, so a language model that cannot learn the task from them is what stops the toy, not its tower.
They are also a candidate pretraining input: a real LLaVA starts from a language model that has already learned
to read and reason, the toy from nothing (docs/toy_model.md, "Fourth pass").
"""

from __future__ import annotations

import torch

from .scenes import CELL, COLORS, IMAGE_SIZE, SHAPES, Scene, object_patches


def symbol_width(patch_size: int = CELL) -> int:
    """Entries of one patch's symbol vector: colours, shapes, then the row and the column one-hot."""
    grid = IMAGE_SIZE // patch_size
    return len(COLORS) + len(SHAPES) + 2 * grid


def symbolic_features(scenes: list[Scene] | tuple[Scene, ...], width: int, patch_size: int = CELL) -> torch.Tensor:
    """(scenes, patches, width) float32: for every patch (raster order, as the tower's features), 1 at its
    object's colour and shape when an object's box touches it (`scenes.object_patches`), 1 at its row and at its
    column; zeros elsewhere, up to `width` (the tower's width, so that the same projector reads both)."""
    grid = IMAGE_SIZE // patch_size
    needed = symbol_width(patch_size)
    if width < needed:
        raise ValueError(f"symbolic features need a width of at least {needed} ({len(COLORS)} colours, "
                         f"{len(SHAPES)} shapes, {grid} rows, {grid} columns), got {width}")
    colors, shapes = list(COLORS), list(SHAPES)
    rows_at, cols_at = len(colors) + len(shapes), len(colors) + len(shapes) + grid
    features = torch.zeros(len(scenes), grid * grid, width)
    patches = torch.arange(grid * grid)
    features[:, patches, rows_at + patches // grid] = 1
    features[:, patches, cols_at + patches % grid] = 1
    for index, scene in enumerate(scenes):
        for item in scene.objects:
            covered = object_patches(item, patch_size)
            features[index, covered, colors.index(item.color)] = 1
            features[index, covered, len(colors) + shapes.index(item.shape)] = 1
    return features
