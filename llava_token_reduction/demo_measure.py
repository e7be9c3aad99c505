"""The measuring half of the `demo` command: what one model did with the demo input (`Measurement`), the
report table (`DemoReport`), and the timed calls (`_Runner`, `_measure`) on models that share their weights
with a stock LLaVA twin (`stock_twin`). `demo.py` builds or loads the models and calls these."""

import statistics
import time
from dataclasses import dataclass, field

from . import methods as registry
from .families import FAMILIES, family_of_model_type
from .shared_weights import twin


RANDOM_WEIGHTS_NOTICE = (
    "NOTE: this model has random weights (built locally, never trained), so its text is gibberish.\n"
    "      Token counts and timings are real; for real answers run `demo` (the trained toy) or\n"
    "      `demo --model llava-hf/llava-1.5-7b-hf --clip openai/clip-vit-large-patch14-336`."
)
RANDOM_TRIM_NOTICE = (
    "      TRIM's kept count comes from a random CLIP: it shows the mechanism, the number itself means nothing."
)

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
    image_lines: list[str] = field(default_factory=list)  # the image's crops and per-crop budgets (LLaVA-NeXT)

    def render(self) -> str:
        stock, reduced = self.measurements[0], self.measurements[1:]

        def row(label, value, text, change):
            before = value(stock)
            return (label, text(before), *(f"{text(value(m))} ({change(before, value(m))})" for m in reduced))

        rows = [
            row("image tokens per image", lambda m: m.image_tokens, str, _percent),
            ("  made of", stock.made_of, *(m.made_of for m in reduced)),
            row("sequence seen by the LM", lambda m: m.lm_sequence_length, str, _percent),
            row("vision tower + projector (ms)", lambda m: m.vision_ms, "{:.1f}".format, _speedup),
            row("LM prefill (ms)", lambda m: m.prefill_ms, "{:.1f}".format, _speedup),
            row("whole forward pass (ms)", lambda m: m.forward_ms, "{:.1f}".format, _speedup),
            row(f"generate up to {self.max_new_tokens} tokens (ms)", lambda m: m.generate_ms, "{:.0f}".format,
                _speedup),
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
            f"(in brackets: the change from {self.measurements[0].label})",
        ]
        out += self.image_lines
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


def model_family(model):
    """The model family (`families.ModelFamily`) of a stock or reduced `model`; LLaVA-1.5 when unknown."""
    return family_of_model_type(model.config.model_type) or FAMILIES["llava"]


def stock_twin(model):
    """The stock model of `model`'s family (`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`)
    on the weights of `model` (see `twin`): the "before" of the comparison at no extra memory."""
    return twin(model, model_family(model).stock_generation_class)


def crop_lines(layouts, measurements) -> list[str]:
    """For an image cut into crops (`layouts` of one image, LLaVA-NeXT): its grid, and each reduced model's
    per-crop budget next to the image's total (`measurements`: stock first)."""
    if not layouts:
        return []
    layout = layouts[0]
    (height, width), (rows, cols) = layout.size, layout.grid
    lines = [f"image: {height}x{width} px -> {rows}x{cols} grid, {layout.crops} crops (the base image + "
             f"{rows * cols} grid crops); {measurements[0].label}: {measurements[0].image_tokens} image tokens"]
    for measurement in measurements[1:]:
        per_crop = measurement.image_tokens // layout.crops
        lines.append(f"{measurement.label}: the budget is per crop: {per_crop} per crop x {layout.crops} crops = "
                     f"{measurement.image_tokens} tokens for this image")
    return lines


class _Runner:
    """The measured calls of one model on the demo input: vision tower + projector alone, language-model
    prefill alone (on the sequence this model's language model sees), a whole forward pass and a greedy
    generation, all from the same processor output."""

    def __init__(self, model, label: str, inputs, max_new_tokens: int, layouts=None):
        config = model.config
        self.model, self.label, self.inputs = model, label, inputs
        self.vision_kwargs = dict(
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        # The family's and the reduction's own per-image inputs (LLaVA-NeXT's image sizes, TRIM's CLIP rows) go
        # with the pixels.
        for name in (*model_family(model).side_inputs, *getattr(model, "image_side_input_names", ())):
            self.vision_kwargs[name] = inputs[name]
        self.generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
        output = self.vision()
        self.features = list(output.pooler_output)
        self.made_of = made_of(model, output, layouts)
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


def made_of(model, output, layouts=None) -> str:
    """What the first image's tokens are, from the config and the `get_image_features` output of `model`; with
    `layouts` (an image cut into crops), per crop."""
    found = registry.find_model_type(model.config.model_type)
    if layouts:
        crops = layouts[0].crops
        if found is None:
            return f"{crops} crops, all patches (padding removed) + row ends"
        return f"{crops} crops x ({found[0].describe_result(model.config, output)})"
    return found[0].describe_result(model.config, output) if found else "all patches"


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
