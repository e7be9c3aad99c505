"""The `demo` command: stock LLaVA next to LLaVA with VisionZip, on one image.

Without `--model` it needs nothing but this package: it builds a small LLaVA with random weights
(`tiny.DEMO_SHAPE`: 336-pixel images, 576 patches as in LLaVA-1.5, narrow layers), saves it as a VisionZip
checkpoint with its processor, loads that directory back through the Auto classes and compares it with stock
LLaVA running on the same weights. With `--model` it does the same for a real checkpoint (stock llava-hf or
VisionZip), loaded as VisionZip.

Both models get the same processor output (the prompt with all of the image's placeholders); the VisionZip
model shortens it itself. Reported per model: image tokens the language model sees, median time of the vision
tower + projector, of the language-model prefill alone and of a whole forward pass, plus a greedy answer.
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


SAMPLE_IMAGE = Path(__file__).resolve().parent / "assets" / "sample.png"
DEFAULT_QUESTION = "What is shown in this picture?"
VISIONZIP_FIELDS = ("dominant_tokens", "contextual_tokens", "visionzip_layer")
DTYPES = ("auto", "float32", "float16", "bfloat16")
RANDOM_WEIGHTS_NOTICE = (
    "NOTE: this model has random weights (built locally, never trained), so its text is gibberish.\n"
    "      Token counts and timings are real; run `demo --model llava-hf/llava-1.5-7b-hf` for real answers."
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="compare stock LLaVA and LLaVA with VisionZip on one image",
        description=(
            "Run stock LLaVA and LLaVA with VisionZip on the same image and prompt, and print image tokens, "
            "timings and the generated text of each. Without --model, a small LLaVA with random weights is "
            "built locally (no download): its timings are real, its text is gibberish."
        ),
    )
    parser.add_argument(
        "--model", metavar="PATH_OR_HUB_ID",
        help="a stock LLaVA checkpoint (e.g. llava-hf/llava-1.5-7b-hf) or a VisionZip one, loaded as VisionZip",
    )
    parser.add_argument("--dominant-tokens", type=int, metavar="N", help="VisionZip dominant tokens, CLS included (default: the checkpoint's, else 54)")
    parser.add_argument("--contextual-tokens", type=int, metavar="N", help="VisionZip merged tokens (default: the checkpoint's, else 10)")
    parser.add_argument("--device", help="device or device map, e.g. cpu, cuda, cuda:1, auto (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype; auto = bfloat16 on GPU, float32 on CPU")
    parser.add_argument(
        "--output", metavar="DIR",
        help="keep the VisionZip checkpoint (weights, code, processor) in DIR instead of a temporary directory",
    )
    parser.add_argument("--image", metavar="FILE", help="image to use (default: a bundled sample picture)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help=f"question about the image (default: {DEFAULT_QUESTION!r})")
    parser.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="tokens to generate (default: 20)")
    parser.add_argument(
        "--repeats", type=int, metavar="N",
        help="timed runs per measurement after one warm-up (default: 5, or 3 with --model)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the random weights, without --model (default: 0)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from .cli import CommandError

    if args.repeats is None:
        args.repeats = 3 if args.model else 5
    for name in ("max_new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    image_path = Path(args.image) if args.image else SAMPLE_IMAGE
    if not image_path.is_file():
        raise CommandError(f"image not found: {image_path}")
    report = run_demo(
        model=args.model, dominant_tokens=args.dominant_tokens, contextual_tokens=args.contextual_tokens,
        device=args.device, dtype=args.dtype, output=args.output, image=image_path, question=args.question,
        max_new_tokens=args.max_new_tokens, repeats=args.repeats, seed=args.seed,
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
    lm_sequence_length: int
    vision_ms: float
    prefill_ms: float
    forward_ms: float
    generate_ms: float
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
    before: Measurement
    after: Measurement
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        b, a = self.before, self.after
        rows = [
            ("image tokens per image", f"{b.image_tokens}", f"{a.image_tokens}", _percent(b.image_tokens, a.image_tokens)),
            ("sequence seen by the LM", f"{b.lm_sequence_length}", f"{a.lm_sequence_length}", _percent(b.lm_sequence_length, a.lm_sequence_length)),
            ("vision tower + projector (ms)", f"{b.vision_ms:.1f}", f"{a.vision_ms:.1f}", _speedup(b.vision_ms, a.vision_ms)),
            ("LM prefill (ms)", f"{b.prefill_ms:.1f}", f"{a.prefill_ms:.1f}", _speedup(b.prefill_ms, a.prefill_ms)),
            ("whole forward pass (ms)", f"{b.forward_ms:.1f}", f"{a.forward_ms:.1f}", _speedup(b.forward_ms, a.forward_ms)),
            (f"generate {self.max_new_tokens} tokens (ms)", f"{b.generate_ms:.0f}", f"{a.generate_ms:.0f}", _speedup(b.generate_ms, a.generate_ms)),
        ]
        header = ("", b.label, a.label, "change")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
        line = lambda cells: "  ".join(  # noqa: E731
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells)
        ).rstrip()
        out = []
        if self.random_weights:
            out += [RANDOM_WEIGHTS_NOTICE, ""]
        out += [
            f"model: {self.source}",
            f"device: {self.device}, dtype: {self.dtype}; prompt: {self.prompt_length} tokens from the processor; "
            f"times are medians of {self.repeats} runs after a warm-up",
            "",
            line(header),
            line(["-" * w for w in widths]),
            *(line(row) for row in rows),
            "",
            f"{b.label}: {b.text!r}",
            f"{a.label}: {a.text!r}",
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
) -> DemoReport:
    """Load (or build) the models, measure both and return the report. `status(text)` receives progress lines
    (default: stderr)."""
    import torch
    from PIL import Image

    status = status or _stderr_status
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _resolve_dtype(dtype, device)
    overrides = {
        name: value
        for name, value in (("dominant_tokens", dominant_tokens), ("contextual_tokens", contextual_tokens))
        if value is not None
    }
    notes = []
    with contextlib.ExitStack() as stack:
        if model is None:
            directory = output or stack.enter_context(tempfile.TemporaryDirectory(prefix="llava-visionzip-demo-"))
            with _step(status, "building a small LLaVA with random weights (576 patches per image)"):
                _save_random_checkpoint(directory, torch_dtype, seed, overrides)
            with _step(status, f"loading it back with AutoModelForImageTextToText from {directory}"):
                reduced, processor = _load_auto(directory, device, torch_dtype)
            notes.append(
                f"The checkpoint was kept in {directory}." if output
                else "The checkpoint was saved to a temporary directory and deleted; use --output DIR to keep it."
            )
            source = "small LLaVA with random weights, saved as a VisionZip checkpoint and reloaded"
        else:
            with _step(status, f"loading {model} as LLaVA with VisionZip"):
                reduced, processor = _load_as_visionzip(model, overrides, device, torch_dtype)
            if output:
                with _step(status, f"saving the VisionZip checkpoint and processor to {output}"):
                    reduced.save_pretrained(output)
                    processor.save_pretrained(output)
                notes.append(f"The VisionZip checkpoint was saved to {output}.")
            source = model
        reduced.eval()
        stock = stock_twin(reduced)
        config = reduced.config

        pil_image = Image.open(image).convert("RGB")
        prompt = _prompt(processor, question)
        inputs = processor(images=pil_image, text=prompt, return_tensors="pt").to(reduced.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(torch_dtype)
        placeholders = int((inputs["input_ids"] == config.image_token_id).sum())
        if placeholders == 0:
            raise ValueError(
                f"the processor put no image placeholders (token id {config.image_token_id}) in the prompt {prompt!r}"
            )

        label = f"VisionZip {config.dominant_tokens}+{config.contextual_tokens}"
        with torch.inference_mode(), _step(status, f"timing stock LLaVA and {label} ({repeats} runs each)"):
            runners = [
                _Runner(stock, "stock LLaVA", inputs, max_new_tokens), _Runner(reduced, label, inputs, max_new_tokens)
            ]
            before, after = _measure(runners, processor, repeats)
        return DemoReport(
            source=source, random_weights=model is None, device=str(reduced.device),
            dtype=str(torch_dtype).removeprefix("torch."), prompt_length=int(inputs["input_ids"].shape[1]),
            repeats=repeats, max_new_tokens=max_new_tokens, before=before, after=after, notes=notes,
        )


def _save_random_checkpoint(directory, torch_dtype, seed: int, overrides: dict) -> None:
    import torch

    from . import LlavaVisionZipConfig, LlavaVisionZipForConditionalGeneration
    from .tiny import DEMO_SHAPE, build_processor, llava_config_kwargs

    processor = build_processor(DEMO_SHAPE)
    config = LlavaVisionZipConfig(**llava_config_kwargs(DEMO_SHAPE, processor.tokenizer), **overrides)
    torch.manual_seed(seed)
    model = LlavaVisionZipForConditionalGeneration(config).to(torch_dtype)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def _load_auto(directory, device: str, torch_dtype):
    """Load a saved VisionZip checkpoint the way a user would: Auto classes with remote code allowed."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, info = AutoModelForImageTextToText.from_pretrained(
        directory, trust_remote_code=True, dtype=torch_dtype, device_map=device, output_loading_info=True
    )
    _check_loading_info(directory, info)
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    return model, processor


def _load_as_visionzip(source: str, overrides: dict, device: str, torch_dtype):
    from transformers import AutoProcessor, PretrainedConfig

    from . import LlavaVisionZipForConditionalGeneration

    model_type = PretrainedConfig.get_config_dict(source)[0].get("model_type")
    if model_type not in ("llava", "llava_visionzip"):
        raise ValueError(
            f"{source} has model_type {model_type!r}; the demo takes stock LLaVA ('llava') or VisionZip "
            "('llava_visionzip') checkpoints"
        )
    # Loading a `llava` checkpoint into the VisionZip class is intended, so transformers' warning about the
    # differing model type is silenced; weights that fail to load are still caught by the loading-info check.
    quiet = _transformers_errors_only() if model_type == "llava" else contextlib.nullcontext()
    with quiet:
        model, info = LlavaVisionZipForConditionalGeneration.from_pretrained(
            source, dtype=torch_dtype, device_map=device, output_loading_info=True, **overrides
        )
    _check_loading_info(source, info)
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    return model, processor


@contextlib.contextmanager
def _transformers_errors_only():
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(previous)


def _check_loading_info(source, info: dict) -> None:
    """Refuse to time a model whose weights did not all load (they would be random)."""
    missing, unexpected = list(info.get("missing_keys", ())), list(info.get("unexpected_keys", ()))
    if missing or unexpected:
        raise ValueError(
            f"{source} did not load cleanly: {len(missing)} missing weights (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def stock_twin(model):
    """A stock `LlavaForConditionalGeneration` that shares every module (and so every weight) with `model`,
    a LLaVA subclass: the "before" of the comparison at no extra memory."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    fields = model.config.to_dict()
    for name in (*VISIONZIP_FIELDS, "model_type", "auto_map", "architectures", "transformers_version"):
        fields.pop(name, None)
    config = LlavaConfig(**fields)
    config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        twin = LlavaForConditionalGeneration(config)
    twin.model.vision_tower = model.model.vision_tower
    twin.model.multi_modal_projector = model.model.multi_modal_projector
    twin.model.language_model = model.model.language_model
    twin.lm_head = model.lm_head
    twin.generation_config = model.generation_config
    leftovers = [name for name, tensor in [*twin.named_parameters(), *twin.named_buffers()] if tensor.is_meta]
    if leftovers and not any(tensor.is_meta for tensor in model.parameters()):
        raise RuntimeError(f"stock twin has modules that are not shared with the model: {leftovers[:3]}")
    return twin.eval()


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
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
        self.features = list(self.vision())
        self.embeds = splice_image_features(model, inputs["input_ids"], self.features)

    def vision(self):
        return self.model.model.get_image_features(
            pixel_values=self.inputs["pixel_values"], **self.vision_kwargs
        ).pooler_output

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
        text = processor.decode(sequences[index][0, prompt_length:], skip_special_tokens=True).strip()
        medians = {kind: statistics.median(times[index, kind]) * 1000 for kind in kinds}
        measurements.append(Measurement(
            label=runner.label, image_tokens=int(runner.features[0].shape[0]),
            lm_sequence_length=int(runner.embeds.shape[1]), vision_ms=medians["vision"],
            prefill_ms=medians["prefill"], forward_ms=medians["forward"], generate_ms=medians["generate"], text=text,
        ))
    return measurements


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
