"""The `demo` command: stock LLaVA next to LLaVA with VisionZip and LLaVA with TRIM, on one image.

Without `--model` it needs nothing but this package: it runs the bundled toy (`toy/`, a tiny LLaVA trained on
synthetic shapes) on its held-out scene and question and prints the right answer and the toy's accuracy table
after the comparison (`demo_toy.ToyDemo`). With `--random` it builds a small LLaVA with random weights
(`tiny.DEMO_SHAPE`: 336-pixel images, 576 patches as in LLaVA-1.5, narrow layers) plus a random CLIP text
tower and `visual_projection` for TRIM, saves a VisionZip and a TRIM checkpoint of those weights with their
processors, loads the directories back through the Auto classes and compares them with stock LLaVA running
on the same weights. With `--model` it does the same for a real checkpoint: a stock llava-hf or VisionZip one
loads as VisionZip, and becomes TRIM through `convert trim` with the text tower of `--clip`; a TRIM checkpoint
is used as it is (VisionZip then shares its weights).

Every model gets the same processor output (the prompt with all of the image's placeholders; TRIM also gets
the CLIP-tokenised question); the reduced models shorten it themselves. Reported per model: image tokens the
language model sees and what they are made of, median time of the vision tower + projector (with the
reduction), of the language-model prefill alone and of a whole forward pass, plus a greedy answer.
"""

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from . import methods as registry
from .demo_measure import (  # noqa: F401 - re-exported: the demo's results and measured calls
    RANDOM_TRIM_NOTICE,
    RANDOM_WEIGHTS_NOTICE,
    DemoReport,
    Measurement,
    _measure,
    _Runner,
    crop_lines,
    made_of,
    splice_image_features,
    stock_twin,
)
from .demo_models import (  # noqa: F401 - _load_auto, save_random_checkpoints: re-exported
    LLAVA_1_5_CLIP,
    REDUCTIONS,
    _family_of,
    _load_auto,
    _load_checkpoint,
    _step,
    _towered,
    save_random_checkpoints,
)
from .demo_toy import ToyDemo
from .families import FAMILIES
from .inputs import DEFAULT_QUESTION, FLOAT_DTYPES, SAMPLE_IMAGE, chat_prompt, parse_dtype


DTYPES = ("auto", *FLOAT_DTYPES)
METHODS = ("both", *REDUCTIONS)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="compare stock LLaVA, LLaVA with VisionZip and LLaVA with TRIM on one image",
        description=(
            "Run stock LLaVA, LLaVA with VisionZip and LLaVA with TRIM on the same weights, image and prompt, and "
            "print image tokens, timings and the generated text of each. Without --model it runs the bundled toy "
            "(a tiny LLaVA trained here on synthetic shapes; no download) on a bundled scene and question, and "
            "prints the right answer and the toy's held-out accuracy table; with --random, a small LLaVA with "
            "random weights at LLaVA-1.5's image size (576 patches) instead: real timings, gibberish text."
        ),
    )
    parser.add_argument(
        "--model", metavar="PATH_OR_HUB_ID",
        help="a stock LLaVA checkpoint (e.g. llava-hf/llava-1.5-7b-hf), a VisionZip one or a TRIM one "
             "(default: the bundled toy's TRIM checkpoint)",
    )
    parser.add_argument(
        "--random", action="store_true",
        help="instead of the toy, build a small LLaVA with random weights at LLaVA-1.5's image size (576 patches): "
             "timings at that shape, gibberish text",
    )
    parser.add_argument(
        "--method", choices=METHODS, default="both",
        help="which reductions to run next to stock LLaVA (default: both, i.e. every one)",
    )
    towered = " or ".join(method.label for method in _towered(registry.METHODS.values()))
    parser.add_argument(
        "--clip", metavar="CLIP_SRC",
        help=f"with a stock LLaVA --model: the CLIP checkpoint of its vision tower, whose text tower {towered} "
             f"needs (e.g. {LLAVA_1_5_CLIP}); the model is converted with `convert` first. Not needed for a "
             f"{towered} checkpoint",
    )
    for method in registry.METHODS.values():
        for option in method.cli_options():
            option.add_to(parser)
    parser.add_argument("--device", help="device or device map, e.g. cpu, cuda, cuda:1, auto (default: cuda if "
                                         "available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weights dtype; auto = bfloat16 on GPU, float32 on CPU")
    parser.add_argument(
        "--output", metavar="DIR",
        help="keep the checkpoints (weights, code, processor) in DIR/METHOD ("
             + ", ".join(f"DIR/{name}" for name in REDUCTIONS) + ") instead of a temporary directory",
    )
    parser.add_argument("--image", metavar="FILE",
                        help="image to use (default: the toy's bundled scene; with --model or --random a bundled "
                             "sample picture)")
    parser.add_argument("--question",
                        help="question about the image (default: the toy's question about its scene; with --model "
                             f"or --random {DEFAULT_QUESTION!r})")
    parser.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="tokens to generate (default: 20)")
    parser.add_argument(
        "--repeats", type=int, metavar="N",
        help="timed runs per measurement after one warm-up (default: 5, or 3 with --model)",
    )
    parser.add_argument("--seed", type=int, metavar="N", help="seed of the random weights, with --random (default: 0)")
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="let --model's own Python code (auto_map entries) run when it is loaded; off by default: stock LLaVA, "
             "VisionZip and TRIM checkpoints load with this package's classes and need none",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from .cli import CommandError

    if args.repeats is None:
        args.repeats = 3 if args.model else 5
    for name in ("max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.random and args.model:
        raise CommandError("--random builds its own model with random weights; it does not go with --model")
    if args.seed is not None and not args.random:
        raise CommandError("--seed is the seed of the random weights; it goes with --random")
    if args.clip and not args.model:
        raise CommandError("--clip goes with --model (a stock LLaVA checkpoint to build TRIM from); the toy and "
                           "--random bring their own CLIP text tower")
    chosen = _chosen(args.method)
    if args.clip and not _towered(chosen):
        labels = "/".join(method.label for method in _towered(registry.METHODS.values()))
        names = "/".join(method.name for method in _towered(registry.METHODS.values()))
        raise CommandError(f"--clip is only used for {labels}; drop it or use --method {names}/both")
    for method in registry.METHODS.values():
        given = [option.flag for option in method.cli_options() if getattr(args, option.field, None) is not None]
        if given and method not in chosen:
            raise CommandError(f"{'/'.join(given)} set the {method.label} {_setting_word(method)}; use --method "
                               f"{method.name}/both")
    overrides = {field: value for method in chosen for field, value in method.overrides_from(args).items()}
    toy = None if args.model or args.random else ToyDemo.bundled()
    model = str(toy.checkpoint) if toy else args.model
    if toy:
        overrides = {**toy.overrides_for(chosen, overrides), **overrides}
    image_path = Path(args.image) if args.image else toy.image if toy else SAMPLE_IMAGE
    if not image_path.is_file():
        raise CommandError(f"image not found: {image_path}")
    question = args.question or (toy.question if toy else DEFAULT_QUESTION)
    report = run_demo(
        model=model, method=args.method, clip=args.clip, overrides=overrides, device=args.device,
        dtype=args.dtype, output=args.output,
        image=image_path, question=question, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
        seed=args.seed or 0, trust_remote_code=args.trust_remote_code,
    )
    print(report.render())
    if toy:
        print(toy.epilogue(asked_bundled=image_path == toy.image and question == toy.question))
    return 0


# --------------------------------------------------------------------------------------------------------------
# The demo


def run_demo(
    model: str | None = None,
    method: str = "both",
    clip: str | None = None,
    dominant_tokens: int | None = None,
    contextual_tokens: int | None = None,
    device: str | None = None,
    overrides: dict | None = None,
    dtype: str = "auto",
    output: str | os.PathLike | None = None,
    image: str | os.PathLike = SAMPLE_IMAGE,
    question: str = DEFAULT_QUESTION,
    max_new_tokens: int = 20,
    repeats: int = 5,
    seed: int = 0,
    status=None,
    trust_remote_code: bool = False,
) -> DemoReport:
    """Load (or build) the models, measure them and return the report. `method` is "both" (every registered
    method) or a registry name; `clip` is the CLIP checkpoint a method needing CLIP's text tower takes it from
    when `model` is a stock LLaVA. `overrides` are config fields of the chosen methods (their `options`);
    `dominant_tokens` / `contextual_tokens` are VisionZip's, kept for existing callers.
    `status(text)` receives progress lines (default: stderr). `trust_remote_code` lets `model`'s own code run;
    without it only this package's classes (registered with the Auto classes on import) are used."""
    import torch
    from PIL import Image

    choices = ("both", *registry.METHODS)
    if method not in choices:
        raise ValueError(f"method must be one of {', '.join(choices)}, got {method!r}")
    family = _family_of(model) if model is not None else FAMILIES["llava"]
    methods = _methods_for(method, family)
    status = status or _stderr_status
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = parse_dtype(dtype, device)
    legacy = {"dominant_tokens": dominant_tokens, "contextual_tokens": contextual_tokens}
    overrides = {**{name: value for name, value in legacy.items() if value is not None}, **(overrides or {})}
    chosen = tuple(registry.get(name) for name in methods)
    owners = {option.field: entry for entry in chosen for option in entry.options}
    for name, value in overrides.items():  # before anything is built or converted
        if name not in owners:
            raise ValueError(f"{name} is not a setting of {', '.join(e.label for e in chosen)}; the "
                             f"settings are {', '.join(sorted(owners))}")
        owners[name].classes(family.name).config_class.single_field_checks[name](value)
    notes = []
    with contextlib.ExitStack() as stack:
        temporary = tempfile.TemporaryDirectory(prefix="llava-token-reduction-demo-")
        directory = Path(output or stack.enter_context(temporary))
        if model is None:
            with _step(status, "building a small LLaVA with random weights (576 patches per image) and a CLIP text "
                               "tower"):
                save_random_checkpoints(directory, torch_dtype, seed, overrides, methods)
            loaded = {}
            for name in methods:
                with _step(status, f"loading it back with AutoModelForImageTextToText from {directory / name}"):
                    loaded[name] = _load_auto(directory / name, device, torch_dtype, trust_remote_code=False)
            checkpoints = "checkpoints" if len(methods) > 1 else "checkpoint"
            source = (f"small LLaVA with random weights, saved as {registry.labels_in_words(methods)} {checkpoints} "
                      "and reloaded")
        else:
            loaded = _load_checkpoint(
                model, methods, clip, overrides, device, torch_dtype, directory, bool(output), status, notes,
                trust_remote_code,
            )
            source = model
        written = [str(directory / name) for name in methods if (directory / name).is_dir()]
        if written:
            notes.append(
                f"The checkpoints were kept in {' and '.join(written)}." if output
                else "The checkpoints were saved to a temporary directory and deleted; use --output DIR to keep them."
            )

        pil_image = Image.open(image).convert("RGB")
        # A processor with side inputs (TRIM's CLIP rows) returns what the LLaVA processor does plus those rows:
        # one call of the processor of the method with the most side inputs serves every model.
        processor_of = max(methods, key=lambda name: len(registry.get(name).side_inputs))
        processor = loaded[processor_of][1]
        prompt = _prompt(processor, question)
        inputs = processor(images=pil_image, text=prompt, return_tensors="pt")
        first = loaded[methods[0]][0]
        inputs = inputs.to(first.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
        placeholders = int((inputs["input_ids"] == first.config.image_token_id).sum())
        if placeholders == 0:
            raise ValueError(
                f"the processor put no image placeholders (token id {first.config.image_token_id}) in the prompt "
                f"{prompt!r}"
            )

        # An image cut into crops (LLaVA-NeXT): its grid, for the per-crop budgets in the report.
        layouts = family.crop_layouts(inputs.get("image_sizes"), first.config)
        candidates = [(stock_twin(first), family.stock_label, None)]
        for name in methods:
            reduced = loaded[name][0].eval()
            candidates.append((reduced, _label(reduced), name))
        labels = ", ".join(label for _, label, _ in candidates)
        with torch.inference_mode(), _step(status, f"timing {labels} ({repeats} runs each)"):
            runners = [_Runner(m, label, _inputs_for(name, inputs), max_new_tokens, layouts)
                       for m, label, name in candidates]
            measurements = _measure(runners, processor, repeats)
        trim_question = None
        if any(registry.get(name).side_inputs for name in loaded) and hasattr(processor, "extract_questions"):
            trim_question = processor.extract_questions(prompt)[0]
        return DemoReport(
            source=source, random_weights=model is None, device=str(first.device),
            dtype=str(torch_dtype).removeprefix("torch."), prompt_length=int(inputs["input_ids"].shape[1]),
            repeats=repeats, max_new_tokens=max_new_tokens, measurements=measurements, trim_question=trim_question,
            notes=notes, image_lines=crop_lines(layouts, measurements),
        )


def _chosen(method: str) -> tuple:
    """The registry entries `--method` names ("both" is every one)."""
    return tuple(registry.METHODS.values()) if method == "both" else (registry.get(method),)


def _methods_for(method: str, family) -> tuple[str, ...]:
    """The registry names `--method` runs on a checkpoint of `family`: "both" is every method the family has; a
    method without classes there is refused naming those that have them."""
    if method == "both":
        return tuple(entry.name for entry in registry.methods_of_family(family.name))
    registry.get(method).classes(family.name)  # ValueError naming the family's methods
    return (method,)


def _setting_word(method) -> str:
    return "budget" if len(method.cli_options()) > 1 else "setting"


def _label(model) -> str:
    config = model.config
    found = registry.find_model_type(config.model_type)
    return found[0].describe(config) if found else config.model_type


def _inputs_for(name: str | None, inputs) -> dict:
    """The processor output minus the per-image inputs (the registry's `side_inputs`) of the other reductions:
    TRIM's CLIP rows go to TRIM only. `name` is a registry name, or None for stock LLaVA."""
    foreign = {key for other in registry.METHODS.values() if other.name != name for key in other.side_inputs}
    return {key: value for key, value in inputs.items() if key not in foreign}


def _prompt(processor, question: str) -> str:
    """The question in the processor's chat format (`inputs.chat_prompt`)."""
    return chat_prompt(processor, question)


def _stderr_status(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
