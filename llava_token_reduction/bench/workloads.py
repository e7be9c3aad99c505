"""What `bench` runs: the rows (stock LLaVA and each registered method's variants, per model family), the models
on one set of weights, and the inputs each row gets. The models are built or loaded in `builders`."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .. import methods as registry
from .families import FAMILIES, LLAVA, BenchFamily
from .shapes import BenchShape


SAMPLE_IMAGE = Path(__file__).resolve().parent.parent / "assets" / "sample.png"
DEFAULT_QUESTION = "What is shown in this picture? Describe the objects and their colours."
STOCK = "stock"


@dataclass(frozen=True)
class Method:
    """One row of the benchmark. `kind` is "stock" or the name of a registered reduction method
    (`llava_token_reduction.methods`); `overrides` are the config fields that make the row, as
    `(field, value)` pairs. `dominant_tokens` / `contextual_tokens` are VisionZip's budget spelled out, kept for
    callers that write `Method("visionzip-64", "visionzip", 54, 10)`; they join the overrides."""

    name: str
    kind: str
    dominant_tokens: int | None = None
    contextual_tokens: int | None = None
    overrides: tuple = ()

    @property
    def reduction(self):
        """The registry entry of the row's method; None for stock LLaVA."""
        return None if self.kind == STOCK else registry.get(self.kind)

    def config_overrides(self) -> dict:
        fields = dict(self.overrides)
        for name in ("dominant_tokens", "contextual_tokens"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        return fields


def default_methods(family: BenchFamily = LLAVA) -> tuple[Method, ...]:
    """Stock, then the default rows of every registered method `family` has classes for, in registry order
    (LLaVA-NeXT: VisionZip at its published per-crop budgets)."""
    return (
        Method(STOCK, STOCK),
        *(Method(variant.name, method.name, overrides=variant.overrides)
          for method in family.methods
          for variant in family.variants(method)),
    )


# The LLaVA-1.5 rows: stock LLaVA, then every registered method's default rows.
DEFAULT_METHODS = default_methods(LLAVA)


def build_models(base, methods, family: BenchFamily = LLAVA) -> dict:
    """One model per row, all on the weights of `base` (a stock model of `family`, or a model of a method that
    needs CLIP's text tower, which only that model carries). Rows of methods without the text tower get a twin
    of `base` (shared modules); a row of a text-tower method is `base` itself, with its overrides set on the
    config. A method `family` has no classes for is refused by name."""
    from ..shared_weights import twin

    models = {}
    for method in methods:
        reduction = method.reduction
        if reduction is None:
            model = twin(base, family.stock_class)
        elif reduction.needs_clip_text_tower:
            if not isinstance(base, family.generation_class(reduction)):
                raise ValueError(f"{reduction.label} needs a CLIP text tower: the base model is not a "
                                 f"{reduction.label} model")
            if any(model is base for model in models.values()):
                raise ValueError(f"only one row can use the base model itself; {method.name} would be a second")
            model = base
            for key, value in method.config_overrides().items():
                setattr(model.config, key, value)
        else:
            model = twin(base, family.generation_class(reduction), **method.config_overrides())
        model.generation_config.pad_token_id = getattr(base.config, "pad_token_id", None)
        models[method.name] = model.eval()
    return models


@dataclass
class Workload:
    """The models, their inputs and a description of where they came from. `make_inputs(images)` builds a
    batch of `len(images)` prompts, one image each (the question of the run), for every row; `batch` places it
    on the models' device and dtype."""

    shape: BenchShape
    models: dict
    inputs: dict  # method name -> generate kwargs (one image)
    random_weights: bool
    source: str
    notes: list = field(default_factory=list)
    make_inputs: Callable | None = None
    device: str = "cpu"
    dtype: str = "float32"
    image: object = None  # the picture `inputs` were made from (batches are made from it too)

    @property
    def family(self) -> BenchFamily:
        return FAMILIES[self.shape.family]

    def batch(self, images) -> dict:
        """Method name -> generate kwargs of a batch of `images`, on the models' device (pixels in their dtype)."""
        if self.make_inputs is None:
            raise ValueError("this workload has no processor to build batches with")
        rows = self.make_inputs(images)
        return {name: place_inputs(inputs, self.device, self.dtype) for name, inputs in rows.items()}


def place_inputs(inputs: dict, device: str, dtype: str) -> dict:
    """`inputs` on `device`, floating-point tensors (the pixels) in `dtype`."""
    import torch

    placed = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=getattr(torch, dtype) if value.is_floating_point() else None)
        placed[key] = value
    return placed


def fit_image(image, shape: BenchShape):
    """`image` resized to the shape's `input_image_size` (LLaVA-NeXT presets: 672x672, a 2x2 grid), else as is."""
    from PIL import Image

    if shape.input_image_size is None or image.size == tuple(shape.input_image_size):
        return image
    return image.resize(tuple(shape.input_image_size), Image.Resampling.BICUBIC)


def batch_images(image, count: int) -> list:
    """`count` different pictures made from `image` (flips, quarter turns, crops), deterministic, so that a
    batch is not `count` copies of one picture and an adaptive count (TRIM) can differ between its rows."""
    from PIL import Image

    width, height = image.size
    variants = [
        lambda im: im,
        lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        lambda im: im.transpose(Image.Transpose.ROTATE_180),
        lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        lambda im: im.crop((0, 0, width * 2 // 3, height * 2 // 3)),
        lambda im: im.crop((width // 3, 0, width, height * 2 // 3)),
        lambda im: im.crop((0, height // 3, width * 2 // 3, height)),
        lambda im: im.crop((width // 3, height // 3, width, height)),
    ]
    pictures = []
    for index in range(count):
        picture = variants[index % len(variants)](image)
        if index >= len(variants):  # past the eight variants: a quarter turn of them
            picture = picture.transpose(Image.Transpose.ROTATE_90)
        pictures.append(picture)
    return pictures


def _clip_rows(clip_tokenizer, question: str, images: int = 1):
    """The question as CLIP token rows (padded to CLIP's 77 positions), one per image: the per-image inputs of
    the methods that need CLIP's text tower."""
    encoded = clip_tokenizer(
        [question] * images, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    )
    return {"clip_input_ids": encoded["input_ids"], "clip_attention_mask": encoded["attention_mask"]}


def _prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


def _processed(processor, images, question: str) -> dict:
    """The stock processor's inputs of one prompt per image (left-padded by the tokenizer if they differ)."""
    images = list(images)
    return dict(processor(images=images, text=[_prompt(question)] * len(images), padding=True, return_tensors="pt"))


def _row_inputs(methods, stock_inputs: dict, side_inputs: dict) -> dict:
    """Per row: the processor's stock inputs plus the per-image inputs of the row's own method."""
    rows = {}
    for method in methods:
        wanted = method.reduction.side_inputs if method.reduction else ()
        rows[method.name] = {**stock_inputs, **{key: side_inputs[key] for key in wanted}}
    return rows


