"""The drawing half of `show`: one crop's panels (tint per merge group or a score heat map), its marks (a dot
per target, an outline per kept patch), the header, and the LLaVA-1.5 picture (`render`: the image next to its
annotated copy). `show.py` computes the selections; `show_crops.py` places several crops (LLaVA-NeXT).

A selection is a `show.Selection` (`grid`, `kept`, `group`, `targets`, `scores`, `tokens`, `description`).
"""

from dataclasses import dataclass

import numpy as np


OUTLINE = (0, 255, 255)  # kept patches
OUTLINE_WIDTH = 2
TINT_ALPHA = 0.5
HEAT_ALPHA = 0.65
HEADER_HEIGHT = 54
PANEL_TARGET = 504  # pixels per panel side, rounded down to whole patches
GAP = 8


@dataclass
class Layout:
    """Where things are in the rendered PNG (for tests and callers)."""

    cell: int  # pixels per patch side
    grid: int
    left: tuple  # (x, y) of the image panel's top-left corner
    right: tuple  # (x, y) of the annotated panel's top-left corner

    def patch_box(self, patch: int, panel: str = "right") -> tuple:
        """`(x0, y0, x1, y1)` of a patch in a panel, inclusive corners."""
        x, y = self.right if panel == "right" else self.left
        row, column = divmod(patch, self.grid)
        return (x + column * self.cell, y + row * self.cell,
                x + (column + 1) * self.cell - 1, y + (row + 1) * self.cell - 1)


def pixels_to_image(pixel_values, image_mean, image_std) -> np.ndarray:
    """The model's input image back in `uint8` `[H, W, 3]` (undo the processor's normalisation)."""
    array = pixel_values[0].float().cpu().numpy().transpose(1, 2, 0)
    array = array * np.asarray(image_std, dtype=np.float32) + np.asarray(image_mean, dtype=np.float32)
    return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _group_colours(count: int) -> np.ndarray:
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors if count > 10 else colormaps["tab10"].colors
    return (np.asarray([palette[i % len(palette)] for i in range(max(count, 1))]) * 255.0).astype(np.float32)


def _heat_colours(values: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["inferno"](values)[..., :3] * 255.0).astype(np.float32)


def annotated_panels(image: np.ndarray, selection, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """`(image, annotated)` float arrays `[side, side, 3]` of one crop (`image`: `uint8 [H, W, 3]`, the model's
    input) at `cell` pixels per patch: the annotated one with the merge groups tinted or the scores as a heat map
    (the marks are `draw_marks`')."""
    from PIL import Image

    grid = selection.grid
    side = cell * grid
    base = np.asarray(Image.fromarray(image).resize((side, side), Image.BICUBIC), dtype=np.float32)
    overlay = base.copy()

    def patch_slice(patch):
        row, column = divmod(patch, grid)
        return slice(row * cell, (row + 1) * cell), slice(column * cell, (column + 1) * cell)

    # What is drawn follows what the selection carries (the registry's `show_picture` says it in words):
    # merge groups are tinted, scores become a heat map, targets get a dot, kept patches an outline.
    if selection.group is not None:
        colours = _group_colours(len(selection.targets or []))
        for patch, owner in enumerate(selection.group):
            if owner >= 0:
                rows, columns = patch_slice(patch)
                overlay[rows, columns] = (1 - TINT_ALPHA) * overlay[rows, columns] + TINT_ALPHA * colours[owner]
    if selection.scores is not None:
        # Softmax scores span orders of magnitude: colour by log score so the whole range shows.
        scores = np.log(np.clip(np.asarray(selection.scores, dtype=np.float64), 1e-30, None))
        span = scores.max() - scores.min()
        normalised = (scores - scores.min()) / span if span > 0 else np.zeros_like(scores)
        heat = _heat_colours(normalised.reshape(grid, grid))
        heat = np.kron(heat, np.ones((cell, cell, 1), dtype=np.float32))
        overlay = (1 - HEAT_ALPHA) * overlay + HEAT_ALPHA * heat
    return base, overlay


def as_picture(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8))


def draw_marks(draw, selection, box) -> None:
    """A dot on every target and an outline around every kept patch; `box(patch)` is the patch's `(x0, y0, x1,
    y1)` in the picture."""
    x0, _, x1, _ = box(0)
    radius = max(2, (x1 - x0 + 1) // 5)
    for target in selection.targets or []:
        x0, y0, x1, y1 = box(target)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(255, 255, 255), outline=(0, 0, 0))
    for patch in selection.kept:
        draw.rectangle(box(patch), outline=OUTLINE, width=OUTLINE_WIDTH)


def draw_header(draw, selection, notice: str | None) -> None:
    """The description, the token count and the notice (in red) above the panels."""
    from PIL import ImageFont

    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    lines = [selection.description, f"{selection.tokens} image tokens reach the language model"]
    if notice:
        lines.append(notice)
    for index, line in enumerate(lines):
        colour = (200, 0, 0) if notice and line == notice else (0, 0, 0)
        draw.text((GAP, 4 + 16 * index), line, fill=colour, font=font)


def render(image: np.ndarray, selection, notice: str | None = None):
    """Draw the selection over `image` (`uint8 [H, W, 3]`, the model's input). Returns `(PIL.Image, Layout)`."""
    from PIL import Image, ImageDraw

    cell = max(4, PANEL_TARGET // selection.grid)
    side = cell * selection.grid
    base, overlay = annotated_panels(image, selection, cell)
    canvas = Image.new("RGB", (2 * side + 3 * GAP, HEADER_HEIGHT + side + GAP), (255, 255, 255))
    layout = Layout(cell=cell, grid=selection.grid, left=(GAP, HEADER_HEIGHT), right=(2 * GAP + side, HEADER_HEIGHT))
    canvas.paste(as_picture(base), layout.left)
    canvas.paste(as_picture(overlay), layout.right)
    draw = ImageDraw.Draw(canvas)
    draw_marks(draw, selection, layout.patch_box)
    draw_header(draw, selection, notice)
    return canvas, layout
