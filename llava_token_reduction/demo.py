"""The `demo` command: stock LLaVA next to LLaVA with VisionZip and LLaVA with TRIM, on one image.

Without `--model` it needs nothing but this package: it builds a small LLaVA with random weights
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
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .shared_weights import twin


SAMPLE_IMAGE = Path(__file__).resolve().parent / "assets" / "sample.png"
DEFAULT_QUESTION = "What is shown in this picture?"
DTYPES = ("auto", "float32", "float16", "bfloat16")
METHODS = ("both", "visionzip", "trim")
# Checkpoint subfolders of the demo's directory, in the order of the table's columns.
REDUCTIONS = ("visionzip", "trim")
LLAVA_1_5_CLIP = "openai/clip-vit-large-patch14-336"
RANDOM_WEIGHTS_NOTICE = (
    "NOTE: this model has random weights (built locally, never trained), so its text is gibberish.\n"
    "      Token counts and timings are real; for real answers run\n"
    "      `demo --model llava-hf/llava-1.5-7b-hf --clip openai/clip-vit-large-patch14-336`."
)
RANDOM_TRIM_NOTICE = (
    "      TRIM's kept count comes from a random CLIP: it shows the mechanism, the number itself means nothing."
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="compare stock LLaVA, LLaVA with VisionZip and LLaVA with TRIM on one image",
        description=(
            "Run stock LLaVA, LLaVA with VisionZip and LLaVA with TRIM on the same weights, image and prompt, and "
            "print image tokens, timings and the generated text of each. Without --model, a small LLaVA with "
            "random weights is built locally (no download): its timings are real, its text is gibberish."
        ),
    )
    parser.add_argument(
        "--model", metavar="PATH_OR_HUB_ID",
        help="a stock LLaVA checkpoint (e.g. llava-hf/llava-1.5-7b-hf), a VisionZip one or a TRIM one",
    )
    parser.add_argument(
        "--method", choices=METHODS, default="both",
        help="which reductions to run next to stock LLaVA (default: both)",
    )
    parser.add_argument(
        "--clip", metavar="CLIP_SRC",
        help=f"with a stock LLaVA --model: the CLIP checkpoint of its vision tower, whose text tower TRIM needs "
             f"(e.g. {LLAVA_1_5_CLIP}); the model is converted with `convert trim` first. Not needed for a TRIM "
             "checkpoint",
    )
    parser.add_argument("--dominant-tokens", type=int, metavar="N", help="VisionZip dominant tokens, CLS included (default: the checkpoint's, else 54)")
    parser.add_argument("--contextual-tokens", type=int, metavar="N", help="VisionZip merged tokens (default: the checkpoint's, else 10)")
    parser.add_argument("--device", help="device or device map, e.g. cpu, cuda, cuda:1, auto (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype; auto = bfloat16 on GPU, float32 on CPU")
    parser.add_argument(
        "--output", metavar="DIR",
        help="keep the checkpoints (weights, code, processor) in DIR/visionzip and DIR/trim instead of a "
             "temporary directory",
    )
    parser.add_argument("--image", metavar="FILE", help="image to use (default: a bundled sample picture)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help=f"question about the image (default: {DEFAULT_QUESTION!r})")
    parser.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="tokens to generate (default: 20)")
    parser.add_argument(
        "--repeats", type=int, metavar="N",
        help="timed runs per measurement after one warm-up (default: 5, or 3 with --model)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random weights, without --model (default: 0)")
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
    if args.clip and not args.model:
        raise CommandError("--clip goes with --model (a stock LLaVA checkpoint to build TRIM from); without --model "
                           "the demo builds its own CLIP text tower")
    if args.clip and args.method == "visionzip":
        raise CommandError("--clip is only used for TRIM; drop it or use --method trim/both")
    if args.method == "trim" and (args.dominant_tokens is not None or args.contextual_tokens is not None):
        raise CommandError("--dominant-tokens/--contextual-tokens set the VisionZip budget; use --method visionzip/both")
    image_path = Path(args.image) if args.image else SAMPLE_IMAGE
    if not image_path.is_file():
        raise CommandError(f"image not found: {image_path}")
    report = run_demo(
        model=args.model, method=args.method, clip=args.clip, dominant_tokens=args.dominant_tokens,
        contextual_tokens=args.contextual_tokens, device=args.device, dtype=args.dtype, output=args.output,
        image=image_path, question=args.question, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
        seed=args.seed, trust_remote_code=args.trust_remote_code,
    )
    print(report.render())
    return 0


# --------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Measurement:
    """What one model did with the demo input. Times are medians in milliseconds."""

    label: str
    image_tokens: int
    made_of: str
    lm_sequence_length: int
    vision_ms: float
    prefill_ms: float
    forward_ms: float
    generate_ms: float
    new_tokens: int
    text: str


@dataclass
class DemoReport:
    source: str
    random_weights: bool
    device: str
    dtype: str
    prompt_length: int
    repeats: int
    max_new_tokens: int
    measurements: list[Measurement]  # stock LLaVA first, then the reduced models
    trim_question: str | None = None
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        stock, reduced = self.measurements[0], self.measurements[1:]

        def row(label, value, text, change):
            return (label, text(value(stock)), *(f"{text(value(m))} ({change(value(stock), value(m))})" for m in reduced))

        rows = [
            row("image tokens per image", lambda m: m.image_tokens, str, _percent),
            ("  made of", stock.made_of, *(m.made_of for m in reduced)),
            row("sequence seen by the LM", lambda m: m.lm_sequence_length, str, _percent),
            row("vision tower + projector (ms)", lambda m: m.vision_ms, "{:.1f}".format, _speedup),
            row("LM prefill (ms)", lambda m: m.prefill_ms, "{:.1f}".format, _speedup),
            row("whole forward pass (ms)", lambda m: m.forward_ms, "{:.1f}".format, _speedup),
            row(f"generate up to {self.max_new_tokens} tokens (ms)", lambda m: m.generate_ms, "{:.0f}".format, _speedup),
            ("  tokens generated", *(str(m.new_tokens) for m in self.measurements)),
        ]
        header = ("", *(m.label for m in self.measurements))
        widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]
        line = lambda cells: "  ".join(  # noqa: E731
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells)
        ).rstrip()
        out = []
        if self.random_weights:
            out += [RANDOM_WEIGHTS_NOTICE, *([RANDOM_TRIM_NOTICE] if self.trim_question is not None else []), ""]
        out += [
            f"model: {self.source}",
            f"device: {self.device}, dtype: {self.dtype}; prompt: {self.prompt_length} tokens from the processor",
            f"times: medians of {self.repeats} run{'s' if self.repeats > 1 else ''} after a warm-up; "
            "(in brackets: the change from stock LLaVA)",
        ]
        if self.trim_question is not None:
            out.append(f"TRIM's question (scored with the CLIP text tower): {self.trim_question!r}")
        out += [
            "",
            line(header),
            line(["-" * w for w in widths]),
            *(line(cells) for cells in rows),
            "",
            *(f"{m.label}: {m.text!r}" for m in self.measurements),
        ]
        if self.notes:
            out += ["", *self.notes]
        return "\n".join(out)


def _percent(before: float, after: float) -> str:
    return f"{(after - before) / before * 100:+.1f}%" if before else ""


def _speedup(before: float, after: float) -> str:
    if before <= 0 or after <= 0:
        return ""
    return f"{before / after:.1f}x faster" if before >= after else f"{after / before:.1f}x slower"


# --------------------------------------------------------------------------------------------------------------
# The demo


def run_demo(
    model: str | None = None,
    method: str = "both",
    clip: str | None = None,
    dominant_tokens: int | None = None,
    contextual_tokens: int | None = None,
    device: str | None = None,
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
    """Load (or build) the models, measure them and return the report. `method` is "both", "visionzip" or
    "trim"; `clip` is the CLIP checkpoint TRIM takes its text tower from when `model` is a stock LLaVA.
    `status(text)` receives progress lines (default: stderr). `trust_remote_code` lets `model`'s own code run;
    without it only this package's classes (registered with the Auto classes on import) are used."""
    import torch
    from PIL import Image

    from . import LlavaVisionZipConfig

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    methods = REDUCTIONS if method == "both" else (method,)
    status = status or _stderr_status
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _resolve_dtype(dtype, device)
    overrides = {
        name: value
        for name, value in (("dominant_tokens", dominant_tokens), ("contextual_tokens", contextual_tokens))
        if value is not None
    }
    for name, value in overrides.items():  # before anything is built or converted
        LlavaVisionZipConfig.single_field_checks[name](value)
    notes = []
    with contextlib.ExitStack() as stack:
        directory = Path(output or stack.enter_context(tempfile.TemporaryDirectory(prefix="llava-token-reduction-demo-")))
        if model is None:
            with _step(status, "building a small LLaVA with random weights (576 patches per image) and a CLIP text tower"):
                save_random_checkpoints(directory, torch_dtype, seed, overrides, methods)
            loaded = {}
            for name in methods:
                with _step(status, f"loading it back with AutoModelForImageTextToText from {directory / name}"):
                    loaded[name] = _load_auto(directory / name, device, torch_dtype, trust_remote_code=False)
            source = "small LLaVA with random weights, saved as " + " and ".join(
                f"a {_NAMES[name]} checkpoint" for name in methods
            ) + " and reloaded"
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
        # A TRIM processor returns what the LLaVA processor does plus the CLIP rows: one call serves every model.
        processor = loaded["trim" if "trim" in loaded else methods[0]][1]
        prompt = _prompt(processor, question)
        inputs = processor(images=pil_image, text=prompt, return_tensors="pt")
        first = loaded[methods[0]][0]
        inputs = inputs.to(first.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
        placeholders = int((inputs["input_ids"] == first.config.image_token_id).sum())
        if placeholders == 0:
            raise ValueError(
                f"the processor put no image placeholders (token id {first.config.image_token_id}) in the prompt {prompt!r}"
            )

        candidates = [(stock_twin(first), "stock LLaVA", None)]
        for name in methods:
            reduced = loaded[name][0].eval()
            candidates.append((reduced, _label(reduced), name))
        labels = ", ".join(label for _, label, _ in candidates)
        with torch.inference_mode(), _step(status, f"timing {labels} ({repeats} runs each)"):
            runners = [_Runner(m, label, _inputs_for(name, inputs), max_new_tokens) for m, label, name in candidates]
            measurements = _measure(runners, processor, repeats)
        trim_question = None
        if "trim" in loaded and hasattr(processor, "extract_questions"):
            trim_question = processor.extract_questions(prompt)[0]
        return DemoReport(
            source=source, random_weights=model is None, device=str(first.device),
            dtype=str(torch_dtype).removeprefix("torch."), prompt_length=int(inputs["input_ids"].shape[1]),
            repeats=repeats, max_new_tokens=max_new_tokens, measurements=measurements, trim_question=trim_question,
            notes=notes,
        )


_NAMES = {"visionzip": "VisionZip", "trim": "TRIM"}


def _label(model) -> str:
    config = model.config
    if config.model_type == "llava_visionzip":
        return f"VisionZip {config.dominant_tokens}+{config.contextual_tokens}"
    return _NAMES.get(config.model_type.removeprefix("llava_"), config.model_type)


def _inputs_for(name: str | None, inputs) -> dict:
    """The processor output minus the per-image inputs (`image_side_input_names`) of the other reductions:
    TRIM's CLIP rows go to TRIM only. `name` is "visionzip", "trim" or None for stock LLaVA."""
    from . import LlavaTrimForConditionalGeneration, LlavaVisionZipForConditionalGeneration

    side_inputs = {"visionzip": LlavaVisionZipForConditionalGeneration.image_side_input_names,
                   "trim": LlavaTrimForConditionalGeneration.image_side_input_names}
    foreign = {key for other, keys in side_inputs.items() if other != name for key in keys}
    return {key: value for key, value in inputs.items() if key not in foreign}


def save_random_checkpoints(directory, torch_dtype, seed: int, overrides: dict, methods=REDUCTIONS) -> None:
    """Build one small LLaVA with random weights (and a random CLIP text tower + `visual_projection`) and save
    it into `directory/<method>` as the checkpoint of each method in `methods`, with its processor: the
    VisionZip checkpoint holds exactly the LLaVA weights of the TRIM one."""
    import torch

    from . import LlavaTrimConfig, LlavaTrimForConditionalGeneration, LlavaVisionZipForConditionalGeneration
    from .tiny import DEMO_SHAPE, build_trim_processor, trim_config_kwargs

    processor = build_trim_processor(DEMO_SHAPE)
    config = LlavaTrimConfig(**trim_config_kwargs(DEMO_SHAPE, processor.tokenizer, processor.clip_tokenizer))
    torch.manual_seed(seed)
    model = LlavaTrimForConditionalGeneration(config).to(torch_dtype)
    for name in methods:
        parts = (model, processor) if name == "trim" else (
            twin(model, LlavaVisionZipForConditionalGeneration, **overrides), llava_processor(processor)
        )
        for part in parts:
            part.save_pretrained(Path(directory) / name)


def _load_auto(directory, device: str, torch_dtype, trust_remote_code: bool = False):
    """Load a checkpoint through the Auto classes. Without `trust_remote_code` the checkpoint's own code never
    runs: importing this package registered our classes, which transformers then uses for our model types."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, info = AutoModelForImageTextToText.from_pretrained(
        directory, trust_remote_code=trust_remote_code, dtype=torch_dtype, device_map=device, output_loading_info=True
    )
    _check_loading_info(directory, info)
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=trust_remote_code)
    return model, processor


def _load_checkpoint(source: str, methods, clip, overrides: dict, device: str, torch_dtype, directory: Path,
                     keep: bool, status, notes: list, trust_remote_code: bool = False) -> dict:
    """The models of `methods` on the weights of `source`, each as (model, processor). A TRIM model (loaded, or
    converted from stock LLaVA with `clip`'s text tower) is the base the VisionZip model then shares; without
    TRIM, VisionZip loads from `source` directly. A converted TRIM checkpoint is written to `directory/trim`, and
    with `keep` the VisionZip one to `directory/visionzip`."""
    from transformers import PretrainedConfig

    from . import LlavaVisionZipForConditionalGeneration

    model_type = PretrainedConfig.get_config_dict(source)[0].get("model_type")
    if model_type not in ("llava", "llava_visionzip", "llava_trim"):
        raise ValueError(
            f"{source} has model_type {model_type!r}; the demo takes stock LLaVA ('llava'), VisionZip "
            "('llava_visionzip') or TRIM ('llava_trim') checkpoints"
        )
    needs_conversion = "trim" in methods and model_type != "llava_trim"
    if model_type == "llava_trim" and clip:
        raise ValueError(f"{source} is a TRIM checkpoint and carries its CLIP text tower already; drop --clip")
    if needs_conversion and model_type == "llava_visionzip":
        raise ValueError(
            f"{source} is a VisionZip checkpoint; TRIM is built from the stock LLaVA checkpoint it came from "
            "(--model LLAVA --clip CLIP_SRC), or use --method visionzip"
        )
    if needs_conversion and not clip:
        raise ValueError(
            f"TRIM needs the CLIP text tower of {source}'s vision tower, which a stock LLaVA checkpoint lacks: pass "
            f"--clip CLIP_SRC (for LLaVA-1.5: {LLAVA_1_5_CLIP}), or use --method visionzip"
        )

    loaded = {}
    if needs_conversion:
        from .conversion import convert_trim

        target = directory / "trim"
        with _step(status, f"converting {source} to TRIM with the CLIP text tower of {clip} (`convert trim`) into {target}"):
            result = convert_trim(source, target, clip=clip, progress=False, overwrite=True)
        notes += [f"convert trim: {note}" for note in result.notes if not note.startswith("took ")]
        source_of_trim = target
    else:
        source_of_trim = source
    if "trim" in methods or model_type == "llava_trim":
        with _step(status, f"loading {source_of_trim} with AutoModelForImageTextToText"):
            loaded["trim"] = _load_auto(source_of_trim, device, torch_dtype,
                                        trust_remote_code=trust_remote_code and not needs_conversion)
    if "visionzip" in methods:
        if "trim" in loaded:
            trim_model, trim_processor = loaded["trim"]
            loaded["visionzip"] = (
                twin(trim_model, LlavaVisionZipForConditionalGeneration, **overrides), llava_processor(trim_processor)
            )
        else:
            with _step(status, f"loading {source} as LLaVA with VisionZip"):
                loaded["visionzip"] = _load_as_visionzip(source, model_type, overrides, device, torch_dtype,
                                                         trust_remote_code)
    for name in [name for name in loaded if name not in methods]:
        del loaded[name]  # a TRIM checkpoint that only lent VisionZip its weights
    if "visionzip" in loaded and keep:
        target = directory / "visionzip"
        with _step(status, f"saving the VisionZip checkpoint and processor to {target}"):
            for part in loaded["visionzip"]:
                part.save_pretrained(target)
    return loaded


def _load_as_visionzip(source: str, model_type: str, overrides: dict, device: str, torch_dtype,
                       trust_remote_code: bool = False):
    from transformers import AutoProcessor

    from . import LlavaVisionZipForConditionalGeneration

    # The class loads a stock `llava` checkpoint without transformers' model-type warning (the documented use);
    # weights that fail to load are still caught by the loading-info check.
    model, info = LlavaVisionZipForConditionalGeneration.from_pretrained(
        source, dtype=torch_dtype, device_map=device, output_loading_info=True, **overrides
    )
    _check_loading_info(source, info)
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    return model, processor


def _check_loading_info(source, info: dict) -> None:
    """Refuse to time a model whose weights did not all load (they would be random)."""
    missing, unexpected = list(info.get("missing_keys", ())), list(info.get("unexpected_keys", ()))
    if missing or unexpected:
        raise ValueError(
            f"{source} did not load cleanly: {len(missing)} missing weights (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def llava_processor(processor):
    """A stock `LlavaProcessor` with the image processor, tokenizer and settings of `processor` (e.g. the
    LLaVA part of a `LlavaTrimProcessor`), for a VisionZip checkpoint of the same weights."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=processor.image_processor, tokenizer=processor.tokenizer, patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        num_additional_image_tokens=processor.num_additional_image_tokens, chat_template=processor.chat_template,
        image_token=processor.image_token,
    )


def stock_twin(model):
    """A stock `LlavaForConditionalGeneration` on the weights of `model` (see `twin`): the "before" of the
    comparison at no extra memory."""
    from transformers import LlavaForConditionalGeneration

    return twin(model, LlavaForConditionalGeneration)


class _Runner:
    """The measured calls of one model on the demo input: vision tower + projector alone, language-model
    prefill alone (on the sequence this model's language model sees), a whole forward pass and a greedy
    generation, all from the same processor output."""

    def __init__(self, model, label: str, inputs, max_new_tokens: int):
        config = model.config
        self.model, self.label, self.inputs = model, label, inputs
        self.vision_kwargs = dict(
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        # The reduction's own per-image inputs (TRIM's CLIP rows) go with the pixels.
        for name in getattr(model, "image_side_input_names", ()):
            self.vision_kwargs[name] = inputs[name]
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
        output = self.vision()
        self.features = list(output.pooler_output)
        self.made_of = made_of(model, output)
        self.embeds = splice_image_features(model, inputs["input_ids"], self.features)

    def vision(self):
        return self.model.model.get_image_features(pixel_values=self.inputs["pixel_values"], **self.vision_kwargs)

    def prefill(self):
        hidden = self.model.model.language_model(inputs_embeds=self.embeds, use_cache=False).last_hidden_state
        return self.model.lm_head(hidden[:, -1:])

    def forward(self):
        return self.model(**self.inputs, logits_to_keep=1).logits

    def generate(self):
        return self.model.generate(**self.inputs, **self.generate_kwargs)


def _measure(runners: list, processor, repeats: int) -> list[Measurement]:
    """Time every runner's calls, alternating between the runners on each repeat so that a change in machine
    load (other processes on a shared CPU) hits both models alike; report medians."""
    kinds = ("vision", "prefill", "forward", "generate")
    times = {(index, kind): [] for index in range(len(runners)) for kind in kinds}
    sequences = {}
    for repeat in range(1 + repeats):  # the first round is the warm-up
        for kind in kinds:
            for index, runner in enumerate(runners):
                start = _now()
                result = getattr(runner, kind)()
                elapsed = _now() - start
                if repeat:
                    times[index, kind].append(elapsed)
                if kind == "generate":
                    sequences[index] = result
    measurements = []
    for index, runner in enumerate(runners):
        prompt_length = runner.inputs["input_ids"].shape[1]
        new_tokens = sequences[index][0, prompt_length:]
        text = processor.decode(new_tokens, skip_special_tokens=True).strip()
        medians = {kind: statistics.median(times[index, kind]) * 1000 for kind in kinds}
        measurements.append(Measurement(
            label=runner.label, image_tokens=int(runner.features[0].shape[0]), made_of=runner.made_of,
            lm_sequence_length=int(runner.embeds.shape[1]), vision_ms=medians["vision"],
            prefill_ms=medians["prefill"], forward_ms=medians["forward"], generate_ms=medians["generate"],
            new_tokens=len(new_tokens), text=text,
        ))
    return measurements


def made_of(model, output) -> str:
    """What the first image's tokens are, from the config and the `get_image_features` output of `model`."""
    config = model.config
    kept = getattr(output, "kept_indices", None)
    if kept is not None:  # TRIM: an adaptive count of patches, then (usually) the mean of the others
        extra = len(output.pooler_output[0]) - len(kept[0])
        return f"{len(kept[0])} kept" + (f" + {extra} mean" if extra else "")
    if getattr(config, "dominant_tokens", None) is not None:
        return f"{config.dominant_tokens} dominant + {config.contextual_tokens} merged"
    return "all patches"


def splice_image_features(model, input_ids, features):
    """The language model's input for a one-prompt batch with one image: the prompt's embeddings with the run
    of image placeholders replaced by that image's features, however many there are. This is what either model
    feeds its language model, built here so that the prefill can be timed on its own."""
    import torch

    if input_ids.shape[0] != 1 or len(features) != 1:
        raise ValueError("the demo measures one prompt with one image")
    positions = (input_ids[0] == model.config.image_token_id).nonzero().flatten()
    first, last = int(positions[0]), int(positions[-1])
    if last - first + 1 != len(positions):
        raise ValueError("the image placeholders of the demo prompt are not one contiguous run")
    embed = model.get_input_embeddings()
    text = embed(input_ids)
    image = features[0].to(device=text.device, dtype=text.dtype)[None]
    return torch.cat([text[:, :first], image, text[:, last + 1:]], dim=1)


def _now() -> float:
    """`time.perf_counter()` after waiting for queued GPU work, so that GPU timings are real."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    if getattr(torch, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.synchronize()
    return time.perf_counter()


def _prompt(processor, question: str) -> str:
    """The question in the processor's chat format (LLaVA-1.5: "USER: <image>\\n... ASSISTANT:")."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", None) or "<image>"
    return f"USER: {image_token}\n{question} ASSISTANT:"


def _resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        on_gpu = not str(device).startswith(("cpu", "meta", "disk")) and (
            torch.cuda.is_available() or torch.backends.mps.is_available()
        )
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, name)


def _stderr_status(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _step(status, text: str):
    status(f"demo: {text} ...")
    start = time.perf_counter()
    yield
    status(f"demo:   done in {time.perf_counter() - start:.1f} s")
