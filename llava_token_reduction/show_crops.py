"""`show` for an image cut into crops (LLaVA-NeXT): every crop's selection drawn where the crop lies.

    header: what is kept, per crop and in all
    left:  the base crop (the whole image squashed to one crop), its selection drawn on it
    right: the grid crops put back together as the canvas the processor cut (the image resized, padded where it
           does not fill the canvas), each crop's selection drawn on its part of the canvas

A crop is drawn exactly as `show.render` draws a LLaVA-1.5 image (tint per merge group, dot on each target,
outline on each kept patch); only the placement differs. The crops come from `Selection.crops` (base first, then
the grid row-major, as the processor orders them).
"""

from dataclasses import dataclass

from .show_draw import GAP, HEADER_HEIGHT, PANEL_TARGET, annotated_panels, as_picture, draw_header, draw_marks


SEPARATOR = (255, 255, 255)  # the lines between grid crops


@dataclass
class CropsLayout:
    """Where every crop is in the rendered PNG (for tests and callers)."""

    cell: int  # pixels per patch side
    grid: int  # patches per crop side
    crop_grid: tuple  # (rows, cols) of grid crops
    origins: list  # (x, y) of each crop's top-left corner: the base crop, then the grid crops row-major

    def patch_box(self, crop: int, patch: int) -> tuple:
        """`(x0, y0, x1, y1)` of patch `patch` of crop `crop` (0 = the base crop), inclusive corners."""
        x, y = self.origins[crop]
        row, column = divmod(patch, self.grid)
        return (x + column * self.cell, y + row * self.cell,
                x + (column + 1) * self.cell - 1, y + (row + 1) * self.cell - 1)


def render_crops(images: list, selection, crop_grid: tuple, notice: str | None = None):
    """Draw every crop's selection (`selection.crops`, a `show.Selection`'s) on its crop (`images`: one
    `uint8 [H, W, 3]` per crop, the model's input, base first). Returns `(PIL.Image, CropsLayout)`."""
    from PIL import Image, ImageDraw

    rows, cols = crop_grid
    crops = selection.crops
    if crops is None or len(crops) != len(images) or len(crops) != 1 + rows * cols:
        raise ValueError(f"a {rows}x{cols} grid needs {1 + rows * cols} crop selections and images, got "
                         f"{None if crops is None else len(crops)} and {len(images)}")
    grid = selection.grid
    # The canvas is the larger panel: give it about two LLaVA-1.5 panels' width.
    cell = max(4, 2 * PANEL_TARGET // (grid * max(rows, cols)))
    side = cell * grid
    origins = [(GAP, HEADER_HEIGHT)]
    canvas_left = 2 * GAP + side
    origins += [(canvas_left + (j % cols) * side, HEADER_HEIGHT + (j // cols) * side) for j in range(rows * cols)]
    picture = Image.new("RGB", (canvas_left + cols * side + GAP, HEADER_HEIGHT + max(1, rows) * side + GAP),
                        (255, 255, 255))
    layout = CropsLayout(cell=cell, grid=grid, crop_grid=(rows, cols), origins=origins)
    draw = ImageDraw.Draw(picture)
    for index, (image, crop) in enumerate(zip(images, crops)):
        _, overlay = annotated_panels(image, crop, cell)
        picture.paste(as_picture(overlay), origins[index])
    for index in range(1, len(crops)):  # thin lines where the grid crops meet, under the marks
        x, y = origins[index]
        draw.rectangle((x, y, x + side - 1, y + side - 1), outline=SEPARATOR, width=1)
    for index, crop in enumerate(crops):
        draw_marks(draw, crop, lambda patch, index=index: layout.patch_box(index, patch))
    draw_header(draw, selection, notice)
    return picture, layout


__all__ = ["CropsLayout", "render_crops"]
