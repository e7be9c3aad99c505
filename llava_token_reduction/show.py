"""The `show` command: a picture of what VisionZip or TRIM keeps of an image.

    show --image IMG --method visionzip [--model PATH] [--out PNG]
        left: the image as the model sees it (resized and cropped by its processor);
        right: the dominant patches outlined, every other patch tinted with the colour of the contextual
        token it is merged into (the target of each group marked with a dot).

    show --image IMG --method trim [--question TEXT] [--model PATH] [--out PNG]
        left: the image; right: TRIM's patch scores as a heat map over the image, the kept outliers outlined.

    show --image IMG --method visionzip --model LLAVA_NEXT_CHECKPOINT [--out PNG]
        every crop of the image drawn as above where it lies (`show_crops.py`): left the base crop, right the
        grid crops put together as the canvas the processor cut; the budget is per crop.

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

from .families import FAMILIES, family_of_model_type
from .inputs import DEFAULT_QUESTION, chat_prompt
from .methods import METHODS, get
from .show_draw import (  # noqa: F401 - re-exported: what the picture is made of
    GAP,
    HEADER_HEIGHT,
    OUTLINE,
    PANEL_TARGET,
    Layout,
    _group_colours,
    pixels_to_image,
    render,
)


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
    # An image cut into crops (LLaVA-NeXT): each crop's selection, the base crop first, then the grid crops
    # row-major (`grid` is then the patch grid of one crop, and `kept`/`group`/`targets` are the base crop's).
    crops: list | None = None


def _visionzip_crop(config, kept, rest, group, patches: int) -> Selection:
    """One crop's VisionZip selection from `visionzip_assignment`'s rows for it."""
    from .modeling.token_reduction import contextual_target_positions

    per_patch = [-1] * patches
    for position, owner in zip(rest.tolist(), group.tolist()):
        per_patch[position - 1] = owner
    contextual = config.contextual_tokens
    target_positions = contextual_target_positions(rest.shape[0], contextual) if contextual else []
    return Selection(
        method="visionzip", grid=int(round(patches**0.5)), group=per_patch,
        kept=[position - 1 for position in kept.tolist() if position > 0],
        targets=[rest[int(index)].item() - 1 for index in target_positions],
        tokens=config.dominant_tokens + contextual,
    )


def visionzip_selection(model, pixel_values, image_sizes=None) -> Selection:
    """Run the vision tower of a VisionZip model on one image and return which patch goes where. With
    `image_sizes` (LLaVA-NeXT), the image's crops are reduced as the model reduces them and the selection holds
    every crop's (`Selection.crops`)."""
    import torch

    from .modeling.token_reduction import visionzip_assignment

    config = model.config
    family_inputs = {} if image_sizes is None else {"image_sizes": image_sizes[:1]}
    with torch.inference_mode():
        _, cls_attention, mean_keys = model.model.get_visionzip_layer_outputs(pixel_values[:1], **family_inputs)
        kept, rest, group = visionzip_assignment(
            cls_attention, mean_keys, config.dominant_tokens, config.contextual_tokens
        )
    patches = cls_attention.shape[1] - 1
    crops = [_visionzip_crop(config, kept[i], rest[i], group[i], patches) for i in range(kept.shape[0])]
    per_crop = config.dominant_tokens + config.contextual_tokens
    what = (f"CLS + {len(crops[0].kept)} dominant patches outlined, {config.contextual_tokens} contextual tokens "
            "(tint = merge group, dot = target)")
    if image_sizes is None:
        crops[0].description = f"VisionZip {config.dominant_tokens}+{config.contextual_tokens} = {per_crop} tokens " \
                               f"of {patches + 1}: {what}"
        return crops[0]
    return Selection(
        method="visionzip", grid=crops[0].grid, kept=crops[0].kept, group=crops[0].group, targets=crops[0].targets,
        tokens=len(crops) * per_crop, crops=crops,
        description=(f"VisionZip {config.dominant_tokens}+{config.contextual_tokens} per crop x {len(crops)} crops "
                     f"(base image left, grid right) = {len(crops) * per_crop} tokens; in every crop {what}"),
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
    family = family_of_model_type(model_type)
    if family is not None:
        method.classes(family.name)  # a method without classes for the checkpoint's family: ValueError
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
    Layout)` (a `show_crops.CropsLayout` for an image cut into crops, a LLaVA-NeXT checkpoint's). `overrides` are
    config fields of the method (its `options`); `dominant_tokens` and
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
        raise ValueError(f"{method.label} has no setting {', '.join(foreign)}; its settings are "
                         f"{', '.join(sorted(owned))}")
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
    # The family's per-image inputs (LLaVA-NeXT's image sizes) and the method's (TRIM's question) go with the pixels.
    family = family_of_model_type(model.config.model_type) or FAMILIES["llava"]
    inputs_of = (*family.side_inputs, *method.side_inputs)
    selection = method.show_selection_function(model, pixel_values, **{name: inputs[name] for name in inputs_of})
    if method.side_inputs:  # the picture depends on the question
        selection.description += f'; question: "{question[:60]}"'
    mean, std = image_processor.image_mean, image_processor.image_std
    if selection.crops is not None:  # an image cut into crops: each crop where it lies
        from .show_crops import render_crops

        crop_grid = family.crop_layouts(inputs["image_sizes"][:1], model.config)[0].grid
        crops = [pixels_to_image(pixel_values[0][index:index + 1], mean, std) for index in range(len(selection.crops))]
        canvas, layout = render_crops(crops, selection, crop_grid, notice)
    else:
        canvas, layout = render(pixels_to_image(pixel_values, mean, std), selection, notice)
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
