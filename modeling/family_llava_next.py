"""The LLaVA-NeXT (anyres) family: how an image becomes crops and placeholders, and the released token layout.

Pure functions of image sizes, config values and tensors; they know nothing about the reduction method, which
only promises `tokens_per_crop` tokens per crop laid out `[CLS, dominant patches (raster), contextual]`
(docs/llava_next.md).

    image (h, w) -> select_best_resolution against image_grid_pinpoints -> canvas rows·crop x cols·crop
      -> crops: base (whole image squashed to one crop) + G = rows·cols grid crops, row-major
      -> stock placeholders N_i (base patches + unpadded canvas + one newline per unpadded row)
      -> reduced: (1 + G)·tokens_per_crop tokens per image, in the released layout (`released_layout`)

Shapes: `S = image_size // patch_size` patches per crop side, `d` dominant tokens per crop (CLS included), `c`
contextual tokens per crop, `D` feature width.
"""

import numbers
from dataclasses import dataclass

import torch
from transformers.image_processing_utils import select_best_resolution


@dataclass(frozen=True)
class NextImageLayout:
    """One image of a LLaVA-NeXT batch: its original size, its grid and its stock placeholder count."""

    index: int  # position of the image in the batch (in placeholder order)
    size: tuple[int, int]  # original (height, width)
    grid: tuple[int, int]  # (rows, cols) of grid crops
    placeholders: int  # the stock `LlavaNextProcessor`'s `<image>` count for this image

    @property
    def crops(self) -> int:
        """Crops through the vision tower: the base image plus the grid crops."""
        return 1 + self.grid[0] * self.grid[1]


def image_size_pairs(image_sizes) -> list[tuple[int, int]]:
    """`image_sizes` (a `[num_images, 2]` tensor, array or nested list of original (height, width)) as Python
    ints. Tensors go through `.tolist()` first: grid arithmetic on 0-d tensors gives wrong results."""
    if hasattr(image_sizes, "tolist"):
        image_sizes = image_sizes.tolist()
    if not isinstance(image_sizes, (list, tuple)):
        raise TypeError(
            f"`image_sizes` must be a [num_images, 2] tensor or list of (height, width), got {image_sizes!r}"
        )
    pairs = []
    for index, size in enumerate(image_sizes):
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise ValueError(f"`image_sizes` row {index} must be one (height, width) pair, got {size!r}")
        height, width = size
        for side in (height, width):
            if isinstance(side, bool) or not isinstance(side, numbers.Integral) or side < 1:
                raise ValueError(f"`image_sizes` row {index} must hold positive int sides, got {list(size)}")
        pairs.append((int(height), int(width)))
    return pairs


def anyres_grid(size: tuple[int, int], pinpoints, crop_size: int) -> tuple[int, int]:
    """(rows, cols) of grid crops for an image of original `size` (height, width): transformers' choice of canvas
    (`select_best_resolution`, both read as (height, width)) divided by the crop size. For small images this is
    transformers' grid, which the stock processor used to make the pixels."""
    canvas_height, canvas_width = select_best_resolution(list(size), [list(pair) for pair in pinpoints])
    return canvas_height // crop_size, canvas_width // crop_size


def stock_placeholder_count(size: tuple[int, int], grid: tuple[int, int], patches_per_side: int, with_cls: bool) -> int:
    """The stock `LlavaNextProcessor`'s `<image>` count for one image, from the model's side.

    The base crop gives `S²` patches (plus CLS when the feature strategy is "full"); the grid canvas
    `rows·S x cols·S` is unpadded to the original aspect ratio (the band the processor padded is removed,
    rounding as transformers does) and contributes its area plus one newline token per remaining row.
    """
    height, width = size
    rows, cols = grid
    canvas_height, canvas_width = rows * patches_per_side, cols * patches_per_side
    if width / height > canvas_width / canvas_height:  # wider than the canvas: bands above and below
        scaled_height = int(round(height * (canvas_width / width), 7))
        canvas_height -= 2 * ((canvas_height - scaled_height) // 2)
    else:  # taller (or the same shape): bands left and right
        scaled_width = int(round(width * (canvas_height / height), 7))
        canvas_width -= 2 * ((canvas_width - scaled_width) // 2)
    base = patches_per_side**2 + (1 if with_cls else 0)
    return base + canvas_height * canvas_width + canvas_height


def image_layouts(image_sizes, config) -> list[NextImageLayout]:
    """Grid and stock placeholder count of every image, from `image_sizes` and a LLaVA-NeXT config
    (`image_grid_pinpoints`, `vision_config.image_size` / `patch_size`, `vision_feature_select_strategy`)."""
    crop_size = config.vision_config.image_size
    patches_per_side = crop_size // config.vision_config.patch_size
    with_cls = config.vision_feature_select_strategy == "full"
    layouts = []
    for index, size in enumerate(image_size_pairs(image_sizes)):
        grid = anyres_grid(size, config.image_grid_pinpoints, crop_size)
        placeholders = stock_placeholder_count(size, grid, patches_per_side, with_cls)
        layouts.append(NextImageLayout(index=index, size=size, grid=grid, placeholders=placeholders))
    return layouts


def image_placeholder_counts(image_sizes, config) -> list[int]:
    """Each image's stock placeholder count `N_i` (what the stock processor put in `input_ids`)."""
    return [layout.placeholders for layout in image_layouts(image_sizes, config)]


def reduced_token_counts(layouts: list[NextImageLayout], tokens_per_crop: int) -> list[int]:
    """Each image's token count after a per-crop reduction: `(1 + G_i) · tokens_per_crop`."""
    return [layout.crops * tokens_per_crop for layout in layouts]


def check_budget_fits(layouts: list[NextImageLayout], tokens_per_crop: int, budget: str) -> None:
    """Refuse, before any compute, an image whose reduced tokens `(1 + G_i) · tokens_per_crop` exceed its stock
    placeholders `N_i` (thin images have as few as one crop's patches). `budget` names the per-crop setting in
    the message, e.g. "dominant_tokens + contextual_tokens"."""
    for layout in layouts:
        needed = layout.crops * tokens_per_crop
        if needed > layout.placeholders:
            height, width = layout.size
            raise ValueError(
                f"image {layout.index} ({height}x{width} px, grid {layout.grid[0]}x{layout.grid[1]}, {layout.crops} "
                f"crops) has {layout.placeholders} image tokens, fewer than the {needed} that {budget} = "
                f"{tokens_per_crop} per crop gives it; the largest per-crop budget that fits this image is "
                f"{layout.placeholders // layout.crops}"
            )


def real_crops(pixel_values: torch.Tensor, layouts: list[NextImageLayout]) -> torch.Tensor:
    """The crops of all images in one `[sum(1 + G_i), C, H, W]` batch, the batch's padding crops dropped.

    `pixel_values` is the processor's `[num_images, max_crops, C, H, W]` (only the first `1 + G_i` crops of
    image `i` are real) or crops already concatenated, `[sum(1 + G_i), C, H, W]`.
    """
    counts = [layout.crops for layout in layouts]
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"`pixel_values` must be a tensor for LLaVA-NeXT, got {type(pixel_values).__name__}")
    if pixel_values.dim() == 5:
        if pixel_values.shape[0] != len(layouts) or pixel_values.shape[1] < max(counts, default=0):
            raise ValueError(
                f"`pixel_values` of shape {list(pixel_values.shape)} does not hold the crops of the {len(layouts)} "
                f"images in `image_sizes` (they need {counts} crops)"
            )
        return torch.cat([crops[:count] for crops, count in zip(pixel_values, counts)], dim=0)
    if pixel_values.dim() == 4:
        if pixel_values.shape[0] != sum(counts):
            raise ValueError(
                f"`pixel_values` holds {pixel_values.shape[0]} crops, but the {len(layouts)} images in `image_sizes` "
                f"have {sum(counts)} ({counts})"
            )
        return pixel_values
    raise ValueError(f"`pixel_values` must have 4 or 5 dimensions for LLaVA-NeXT, got shape {list(pixel_values.shape)}")


def released_order(
    kept_patches: torch.Tensor, grid: tuple[int, int], patches_per_side: int, contextual_tokens: int
) -> torch.Tensor:
    """Where each output token of one image comes from, as rows of its crops' tokens flattened crop-major.

    Args:
        kept_patches: `[1 + G, d - 1]` long, each crop's kept (non-CLS dominant) patch indices in `0..S²-1`,
            in the order the crop's dominant tokens are stored (raster order); from VisionZip's kept sequence
            positions `kept` `[1 + G, d]` (CLS at position 0) that is `kept[:, 1:] - 1`.
        grid: (rows, cols) with `rows · cols = G`.
        patches_per_side: `S`.
        contextual_tokens: `c`.

    Returns:
        `[(1 + G) · (d + c)]` long indices into `crop_tokens.reshape(-1, D)`: the base crop as is; the grid crops'
        dominant patches read row-major over the whole `rows·S x cols·S` canvas; the G grid CLS tokens; all grid
        contextual tokens, crop-major.
    """
    crops, patches = kept_patches.shape
    rows, cols = grid
    if crops != 1 + rows * cols:
        raise ValueError(f"a {rows}x{cols} grid needs {1 + rows * cols} crops, got kept patches of {crops}")
    device = kept_patches.device
    per_crop = 1 + patches + contextual_tokens  # [CLS, dominant patches, contextual]
    crop_start = torch.arange(1, crops, device=device) * per_crop  # first row of each grid crop
    cell = torch.arange(rows * cols, device=device)
    grid_patches = kept_patches[1:].to(device=device, dtype=torch.long)
    canvas_row = (cell // cols).unsqueeze(1) * patches_per_side + grid_patches // patches_per_side
    canvas_col = (cell % cols).unsqueeze(1) * patches_per_side + grid_patches % patches_per_side
    canvas_order = (canvas_row * (cols * patches_per_side) + canvas_col).flatten().argsort(stable=True)
    dominant_rows = (crop_start.unsqueeze(1) + 1 + torch.arange(patches, device=device)).flatten()[canvas_order]
    contextual_rows = crop_start.unsqueeze(1) + 1 + patches + torch.arange(contextual_tokens, device=device)
    return torch.cat(
        [torch.arange(per_crop, device=device), dominant_rows, crop_start, contextual_rows.flatten()]
    )


def released_layout(
    crop_tokens: torch.Tensor, kept_patches: torch.Tensor, grid: tuple[int, int], patches_per_side: int
) -> torch.Tensor:
    """One image's reduced crops `[1 + G, d + c, D]` (each `[CLS, dominant patches, contextual]`, `d - 1` kept
    patches per crop given by `kept_patches` `[1 + G, d - 1]`) as its `(1 + G) · (d + c)` tokens `[K, D]` in the
    released layout (`released_order`)."""
    crops, per_crop, width = crop_tokens.shape
    contextual = per_crop - 1 - kept_patches.shape[1]
    if kept_patches.shape[0] != crops or contextual < 0:
        raise ValueError(
            f"kept patches of shape {list(kept_patches.shape)} do not match reduced crops of shape "
            f"{list(crop_tokens.shape)}"
        )
    order = released_order(kept_patches, grid, patches_per_side, contextual).to(crop_tokens.device)
    return crop_tokens.reshape(crops * per_crop, width).index_select(0, order)


def released_layouts(
    crop_tokens: torch.Tensor, kept_patches: torch.Tensor, layouts: list[NextImageLayout], patches_per_side: int
) -> list[torch.Tensor]:
    """`released_layout` for every image of a batch whose crops (padding crops dropped, `real_crops`) were
    reduced together: `crop_tokens` `[sum(1 + G_i), d + c, D]`, `kept_patches` `[sum(1 + G_i), d - 1]`.
    Returns one `[(1 + G_i) · (d + c), D]` tensor per image, in image order."""
    counts = [layout.crops for layout in layouts]
    if crop_tokens.shape[0] != sum(counts) or kept_patches.shape[0] != sum(counts):
        raise ValueError(
            f"{crop_tokens.shape[0]} reduced crops for images that have {sum(counts)} ({counts})"
        )
    return [
        released_layout(tokens, patches, layout.grid, patches_per_side)
        for tokens, patches, layout in zip(crop_tokens.split(counts), kept_patches.split(counts), layouts)
    ]


__all__ = [
    "NextImageLayout",
    "anyres_grid",
    "check_budget_fits",
    "image_layouts",
    "image_placeholder_counts",
    "image_size_pairs",
    "real_crops",
    "reduced_token_counts",
    "released_layout",
    "released_layouts",
    "released_order",
    "stock_placeholder_count",
]
