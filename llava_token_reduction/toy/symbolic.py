"""The scene written as symbols on the patch grid: what the toy's language model is pretrained on.

A real LLaVA starts from a language model that has already learned to read and to reason; the toy has none.
Trained from nothing on the vision tower's features, its 3-layer Llama learned which answers each question kind
allows and how to count, but not to find the object a question names (57% held-out, docs/toy_model.md). So the
toy makes its own pretrained language model: it first learns the task on a *symbolic image* of every training
scene, 64 vectors laid out like the tower's 64 patch features, that say for each patch which colour and which
shape cover it and where it is. Then the tower's real features replace the symbols, in LLaVA's two stages
(`train.train_llava`): a fresh projector learns to map them into what the pretrained model reads, then projector
and language model train together.

The symbols come from the scene's description (its objects' colours, shapes and boxes), never from pixels, so
this stage teaches the language model the questions, not the images.
"""

from __future__ import annotations

import torch

from .scenes import COLORS, IMAGE_SIZE, SHAPES, Scene, object_patches


def symbol_width(patch_size: int = 14) -> int:
    """Entries of one patch's symbol vector: colours, shapes, then the row and the column one-hot."""
    grid = IMAGE_SIZE // patch_size
    return len(COLORS) + len(SHAPES) + 2 * grid


def symbolic_features(scenes: list[Scene] | tuple[Scene, ...], width: int, patch_size: int = 14) -> torch.Tensor:
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
