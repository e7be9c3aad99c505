"""The `show` command: a picture of what VisionZip or TRIM keeps of an image.

    show --image IMG --method visionzip [--model PATH] [--out PNG]
        left: the image as the model sees it (resized and cropped by its processor);
        right: the dominant patches outlined, every other patch tinted with the colour of the contextual
        token it is merged into (the target of each group marked with a dot).

    show --image IMG --method trim [--question TEXT] [--model PATH] [--out PNG]
        left: the image; right: TRIM's patch scores as a heat map over the image, the kept outliers outlined.

The selection comes from the model's own pieces and the pure functions of `modeling.token_reduction`
(`cls_attention_scores` + `visionzip_assignment`; TRIM's `get_image_features`, which returns kept indices and
scores), so the picture shows exactly what the model feeds its language model. Without `--model`, a small
LLaVA with RANDOM weights is built locally (`tiny.DEMO_SHAPE`, 576 patches like LLaVA-1.5): the picture is
then only an illustration of the layout, not of a trained model's choice; the PNG says so.
"""

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .inputs import DEFAULT_QUESTION, chat_prompt
from .methods import METHODS, get


OUTLINE = (0, 255, 255)  # kept patches
OUTLINE_WIDTH = 2
TINT_ALPHA = 0.5
HEAT_ALPHA = 0.65
HEADER_HEIGHT = 54
PANEL_TARGET = 504  # pixels per panel side, rounded down to whole patches
GAP = 8
DEMO_NOTICE = "RANDOM WEIGHTS (embedded demo model): the layout is real, the choice of patches is arbitrary"


# --------------------------------------------------------------------------------------------------------------
# Selection info (what each method keeps), from the model


@dataclass
class Selection:
    """Per-patch selection of one image. Patch indices are raster order over a `grid × grid` patch grid."""

    method: str
    grid: int
    kept: list  # kept patch indices (CLS excluded)
    group: list | None = None  # VisionZip: per patch, its contextual group (-1 when kept or no contextual tokens)
    targets: list | None = None  # VisionZip: the patch index of each contextual token's target, in order
    scores: list | None = None  # TRIM: per patch score
    tokens: int = 0  # image tokens the language model sees
    description: str = ""
    extra: dict = field(default_factory=dict)


def visionzip_selection(model, pixel_values) -> Selection:
    """Run the vision tower of a VisionZip model on one image and return which patch goes where."""
    import torch

    from .modeling.token_reduction import contextual_target_positions, visionzip_assignment

    config = model.config
    with torch.inference_mode():
        _, cls_attention, mean_keys = model.model.get_visionzip_layer_outputs(pixel_values[:1])
        kept, rest, group = visionzip_assignment(
            cls_attention, mean_keys, config.dominant_tokens, config.contextual_tokens
        )
    patches = cls_attention.shape[1] - 1
    grid = int(round(patches**0.5))
    per_patch = [-1] * patches
    for position, owner in zip(rest[0].tolist(), group[0].tolist()):
        per_patch[position - 1] = owner
    target_positions = contextual_target_positions(rest.shape[1], config.contextual_tokens) if config.contextual_tokens else []
    targets = [rest[0, int(index)].item() - 1 for index in target_positions]
    kept_patches = [position - 1 for position in kept[0].tolist() if position > 0]
    return Selection(
        method="visionzip", grid=grid, kept=kept_patches, group=per_patch, targets=targets,
        tokens=config.dominant_tokens + config.contextual_tokens,
        description=(
            f"VisionZip {config.dominant_tokens}+{config.contextual_tokens} = "
            f"{config.dominant_tokens + config.contextual_tokens} tokens of {patches + 1}: CLS + "
            f"{len(kept_patches)} dominant patches outlined, {config.contextual_tokens} contextual tokens "
            "(tint = merge group, dot = target)"
        ),
    )


def trim_selection(model, pixel_values, clip_input_ids, clip_attention_mask=None) -> Selection:
    """Run TRIM's `get_image_features` on one image and return its kept patches and scores."""
    import torch

    with torch.inference_mode():
        output = model.model.get_image_features(
            pixel_values=pixel_values[:1], clip_input_ids=clip_input_ids[:1],
            clip_attention_mask=None if clip_attention_mask is None else clip_attention_mask[:1],
        )
    scores = output.scores[0].float()
    kept = output.kept_indices[0].tolist()
    patches = scores.shape[0]
    grid = int(round(patches**0.5))
    tokens = int(output.pooler_output[0].shape[0])
    sign = "softmax(-<Z, t>)" if model.config.trim_negate_similarity else "softmax(<Z, t>)"
    return Selection(
        method="trim", grid=grid, kept=kept, scores=scores.tolist(), tokens=tokens,
        description=(
            f"TRIM: {len(kept)} of {patches} patches kept (outlined, IQR outliers of {sign})"
            f"{' + 1 mean token' if tokens > len(kept) else ''}; heat map = log score (bright = high)"
        ),
    )


def prumerge_selection(model, pixel_values) -> Selection:
    """Run PruMerge's `get_image_features` on one image and return its kept patches, scores and (PruMerge+) the
    sampled patches, drawn as dots."""
    import torch

    with torch.inference_mode():
        output = model.model.get_image_features(pixel_values=pixel_values[:1])
    scores = output.scores[0].float()
    kept, outliers = output.kept_indices[0].tolist(), output.outlier_counts[0]
    patches = scores.shape[0]
    tokens = int(output.pooler_output[0].shape[0])
    label = "PruMerge+" if model.config.prumerge_plus else "PruMerge"
    sampled = f" + {len(kept) - outliers} sampled (dotted)" if model.config.prumerge_plus else ""
    return Selection(
        method="prumerge", grid=int(round(patches**0.5)), kept=kept, scores=scores.tolist(),
        targets=kept[outliers:] or None, tokens=tokens,
        description=(
            f"{label}: {outliers} outliers of the last layer's CLS attention{sampled} of {patches} patches kept "
            f"(outlined), each merged with its most similar patches{' + 1 extra token' if tokens > len(kept) else ''}"
            "; heat map = log attention"
        ),
    )


# --------------------------------------------------------------------------------------------------------------
# Drawing


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
        return (x + column * self.cell, y + row * self.cell, x + (column + 1) * self.cell - 1, y + (row + 1) * self.cell - 1)


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


def render(image: np.ndarray, selection: Selection, notice: str | None = None):
    """Draw the selection over `image` (`uint8 [H, W, 3]`, the model's input). Returns `(PIL.Image, Layout)`."""
    from PIL import Image, ImageDraw, ImageFont

    grid = selection.grid
    cell = max(4, PANEL_TARGET // grid)
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

    width = 2 * side + 3 * GAP
    height = HEADER_HEIGHT + side + GAP
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    layout = Layout(cell=cell, grid=grid, left=(GAP, HEADER_HEIGHT), right=(2 * GAP + side, HEADER_HEIGHT))
    canvas.paste(Image.fromarray(base.round().astype(np.uint8)), layout.left)
    canvas.paste(Image.fromarray(np.clip(overlay, 0, 255).round().astype(np.uint8)), layout.right)
    draw = ImageDraw.Draw(canvas)
    if selection.targets:
        radius = max(2, cell // 5)
        for target in selection.targets or []:
            x0, y0, x1, y1 = layout.patch_box(target)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(255, 255, 255), outline=(0, 0, 0))
    for patch in selection.kept:
        draw.rectangle(layout.patch_box(patch), outline=OUTLINE, width=OUTLINE_WIDTH)
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
    return canvas, layout


# --------------------------------------------------------------------------------------------------------------
# Models and inputs


def build_demo_model(method, seed: int = 0, overrides: dict | None = None):
    """The embedded demo model of `method` (a registry name or entry; `tiny.DEMO_SHAPE`, random weights, the
    config's values replaced by `overrides`), its image processor and its processor."""
    from .tiny import DEMO_SHAPE, build_method_model, build_method_processor

    method = get(method) if isinstance(method, str) else method
    processor = build_method_processor(method, DEMO_SHAPE)
    model = build_method_model(method, DEMO_SHAPE, processor=processor, seed=seed, **(overrides or {}))
    return model, processor.image_processor, processor


def load_model(path: str, method, overrides: dict | None = None):
    """A checkpoint (stock LLaVA or one of ours) loaded as `method` with the load-time `overrides`, with its
    image processor and processor. A method that needs CLIP's text tower takes only its own checkpoints."""
    from transformers import AutoConfig

    from .loading import load_checkpoint

    method = get(method) if isinstance(method, str) else method
    model_type = AutoConfig.from_pretrained(path).model_type
    if method.needs_clip_text_tower and model_type != method.model_type:
        raise ValueError(
            f"{path} is a {model_type!r} checkpoint: {method.label} needs the CLIP text tower of a {method.label} "
            f"checkpoint (make one with `llava-token-reduction convert {method.name} SRC OUT --clip CLIP_SRC`)"
        )
    model, processor = load_checkpoint(path, method, overrides=overrides)
    return model.eval(), processor.image_processor, processor


def _check_out(out, method: str) -> None:
    """Refuse an output path PIL cannot write, before any model is built."""
    from PIL import Image

    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name, e.g. {path / f'show-{method}.png'}")
    extensions = Image.registered_extensions()
    if path.suffix.lower() not in extensions or extensions[path.suffix.lower()] not in Image.SAVE:
        raise ValueError(f"--out {out}: {path.suffix or 'no extension'} is not an image format PIL can write; "
                         "use .png (or .jpg, .webp)")


def show(image_path, method, question: str = DEFAULT_QUESTION, model_path=None, out="show.png",
         dominant_tokens=None, contextual_tokens=None, seed: int = 0, overrides: dict | None = None):
    """Render the picture for one image and method (a registry name or entry); returns `(path, Selection,
    Layout)`. `overrides` are config fields of the method (its `options`); `dominant_tokens` and
    `contextual_tokens` are VisionZip's, kept for existing callers and ignored by other methods."""
    import torch
    from PIL import Image

    method = get(method) if isinstance(method, str) else method
    _check_out(out, method.name)
    legacy = {"dominant_tokens": dominant_tokens, "contextual_tokens": contextual_tokens}
    owned = {option.field for option in method.options}
    overrides = {**{k: v for k, v in legacy.items() if v is not None and k in owned}, **(overrides or {})}
    foreign = sorted(set(overrides) - owned)
    if foreign:
        raise ValueError(f"{method.label} has no setting {', '.join(foreign)}; its settings are {', '.join(sorted(owned))}")
    if model_path:
        model, image_processor, processor = load_model(model_path, method, overrides)
        notice = None
    else:
        model, image_processor, processor = build_demo_model(method, seed, overrides)
        notice = DEMO_NOTICE
    picture = Image.open(image_path).convert("RGB")
    inputs = processor(images=picture, text=chat_prompt(processor, question), return_tensors="pt")
    missing = [name for name in method.side_inputs if name not in inputs]
    if missing:
        raise ValueError(f"the processor ({type(processor).__name__}) gives no {', '.join(missing)}, which "
                         f"{method.label} needs")
    dtype = next(model.model.vision_tower.parameters()).dtype
    pixel_values = torch.as_tensor(np.asarray(inputs["pixel_values"])).to(dtype)
    selection = method.show_selection_function(model, pixel_values, **{name: inputs[name] for name in method.side_inputs})
    if method.side_inputs:  # the picture depends on the question
        selection.description += f'; question: "{question[:60]}"'
    image = pixels_to_image(pixel_values, image_processor.image_mean, image_processor.image_std)
    canvas, layout = render(image, selection, notice)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out, selection, layout


# --------------------------------------------------------------------------------------------------------------
# Command line


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "show",
        help="draw which patches VisionZip or TRIM keeps of an image",
        description=(
            "Write a PNG of the image with the kept patches outlined: VisionZip's merged groups tinted per "
            "contextual token, or TRIM's score heat map with its kept outliers. Without --model a small demo "
            "model with RANDOM weights is used (the picture then shows the layout, not a trained choice)."
        ),
    )
    parser.add_argument("--image", required=True, metavar="IMG", help="the image")
    parser.add_argument("--method", required=True, choices=tuple(METHODS))
    asked = ", ".join(method.label for method in METHODS.values() if method.side_inputs)
    parser.add_argument("--question", default=DEFAULT_QUESTION,
                        help=f"the question ({asked} take it into account; default: {DEFAULT_QUESTION!r})")
    parser.add_argument("--model", metavar="PATH", help="a checkpoint: stock LLaVA or one of ours (a method that "
                                                        "needs CLIP's text tower takes only its own)")
    parser.add_argument("--out", metavar="PNG", default=None, help="output file (default: show-METHOD.png)")
    for method in METHODS.values():
        for option in method.cli_options():
            option.add_to(parser, help=f"{option.help} ({method.label} only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the demo model's random weights")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from .cli import CommandError

    if not Path(args.image).is_file():
        raise CommandError(f"image not found: {args.image}")
    out, selection, _ = show(
        args.image, args.method, question=args.question, model_path=args.model,
        out=args.out or f"show-{args.method}.png", overrides=METHODS[args.method].overrides_from(args), seed=args.seed,
    )
    if not args.model:
        print(DEMO_NOTICE)
    print(selection.description)
    print(f"Wrote {out}")
    return 0
