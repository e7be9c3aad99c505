"""Batched generation and multiple-choice scoring of chat prompts on a (reduced) LLaVA, independent of any
harness: the lmms-eval plugin turns its requests into `ChatPrompt`s and calls `generate` / `loglikelihood`.

Batches are left-padded prompts from the checkpoint's own processor; the models give every row what it
gets alone (VisionZip always; TRIM with its default per-image decisions), so results do not depend on the
batch size. Besides the text, every generated row reports what its language model actually saw: the
image tokens kept (after the reduction) and the prompt length before and after it.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..modeling.processing_llava_trim import questions_from_conversation
from ..modeling.reduced_generation import PLAN_ATTRIBUTE
from .loading import LoadedModel


# Which text TRIM scores each image against (docs/trim.md §1; docs/evaluation.md):
#   user_turn  the whole user turn carrying the image, answer-format instructions included, as the released
#              TRIM evaluation passes the benchmark's question file (default);
#   no_format  the same without the answer-format sentences in ANSWER_FORMAT_SUFFIXES;
#   empty      no text at all (the count then depends on the image alone).
TRIM_QUESTION_CHOICES = ("user_turn", "no_format", "empty")
ANSWER_FORMAT_SUFFIXES = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Answer with the option letter from the given choices directly.",
    "Please answer yes or no.",
)

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class ChatPrompt:
    """One request: chat messages in transformers' format (content parts `{"type": "image", "image": PIL}` and
    `{"type": "text", "text": ...}`), the images in the order their parts appear."""

    messages: list[dict]
    images: list = field(default_factory=list)


@dataclass
class RowReport:
    """What the language model saw for one prompt."""

    images: int
    image_tokens: int                # image tokens kept, all images of the prompt, after the reduction
    image_placeholders: int          # image placeholders in the processor's prompt (the unreduced count)
    lm_tokens: int                   # prompt length the language model processed
    lm_tokens_unreduced: int         # the same prompt without the reduction
    output_tokens: int = 0


def prompt_from_text(context: str, images: list, image_token: str = "<image>") -> ChatPrompt:
    """A one-turn chat from a plain task context: images where the context has `image_token`s (when the
    counts agree), else all images first, as LLaVA's own evaluation places them."""
    pieces = context.split(image_token)
    content = []
    if len(pieces) - 1 == len(images) and images:
        for index, piece in enumerate(pieces):
            if piece.strip():
                content.append({"type": "text", "text": piece.strip()})
            if index < len(images):
                content.append({"type": "image", "image": images[index]})
    else:
        content = [{"type": "image", "image": image} for image in images]
        content.append({"type": "text", "text": " ".join(context.replace(image_token, " ").split())})
    return ChatPrompt(messages=[{"role": "user", "content": content}], images=list(images))


def strip_answer_format(text: str) -> str:
    for suffix in ANSWER_FORMAT_SUFFIXES:
        text = text.replace(suffix, " ")
    return " ".join(text.split())


def cut_at_stop_strings(text: str, until) -> str:
    """The text up to the first occurrence of any stop string."""
    for stop in until or ():
        if stop:
            position = text.find(stop)
            if position >= 0:
                text = text[:position]
    return text


class ReducedLlavaRunner:
    """Runs batches of `ChatPrompt`s on a loaded model."""

    def __init__(self, loaded: LoadedModel, device=None, trim_question: str = "user_turn"):
        if trim_question not in TRIM_QUESTION_CHOICES:
            raise ValueError(f"trim_question must be one of {', '.join(TRIM_QUESTION_CHOICES)}, got {trim_question!r}")
        self.model = loaded.model
        self.processor = loaded.processor
        self.method = loaded.method
        self.trim_question = trim_question
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # generate continues every row from its right end
        self.device = torch.device(device) if device is not None else self.model.device
        self.image_token_id = self.model.config.image_token_id

    # -- inputs ---------------------------------------------------------------------------------------

    def render(self, prompt: ChatPrompt) -> str:
        return self.processor.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)

    def questions(self, prompt: ChatPrompt) -> list[str]:
        """The text each image of `prompt` is scored against (methods that score the question only)."""
        if self.trim_question == "empty":
            return [""] * len(prompt.images)
        found = questions_from_conversation(prompt.messages, getattr(self.processor, "image_token", "<image>"))
        if found is None or len(found) != len(prompt.images):
            raise ValueError("cannot tell which text goes with each image of this prompt: give images as content parts")
        return [strip_answer_format(q) for q in found] if self.trim_question == "no_format" else found

    def encode(self, prompts: list[ChatPrompt], texts: list[str]):
        """Processor inputs for the rendered `texts` of `prompts`, padded on the left, on the model's device."""
        images = [image for prompt in prompts for image in prompt.images]
        extra = {}
        if self.method is not None and self.method.question_argument:
            extra[self.method.question_argument] = [self.questions(prompt) for prompt in prompts]
        inputs = self.processor(
            images=images or None, text=texts, padding=True, return_tensors="pt", **extra
        )
        return inputs.to(self.device, self.model.dtype)

    # -- generation -----------------------------------------------------------------------------------

    def generate(self, prompts: list[ChatPrompt], gen_kwargs: dict | None = None) -> list[tuple[str, RowReport]]:
        """Greedy (or sampled, if `temperature > 0`) answers, cut at `until`, with what each row's LM saw."""
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.pop("do_sample", False)) or temperature > 0
        options = dict(
            max_new_tokens=int(gen_kwargs.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            num_beams=int(gen_kwargs.pop("num_beams", 1) or 1),
            do_sample=do_sample,
            pad_token_id=(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                          else self.tokenizer.eos_token_id),
        )
        if do_sample:
            options["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        texts = [self.render(prompt) for prompt in prompts]
        inputs = self.encode(prompts, texts)
        output = self.model.generate(**inputs, **options, return_dict_in_generate=True)
        prompt_length = inputs["input_ids"].shape[1]
        new_tokens = output.sequences[:, prompt_length:]
        reports = self._reports(prompts, inputs, getattr(getattr(output, "cache", None), PLAN_ATTRIBUTE, None))
        eos = self._eos_ids()
        results = []
        for row, report in zip(new_tokens.tolist(), reports):
            length = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
            report.output_tokens = length
            text = self.tokenizer.decode(row[:length], skip_special_tokens=True)
            results.append((cut_at_stop_strings(text, until), report))
        return results

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return set(eos if isinstance(eos, (list, tuple)) else [eos])

    def _reports(self, prompts: list[ChatPrompt], inputs, plan) -> list[RowReport]:
        """Per row: the image placeholders of the processor's prompt, the tokens the reduction kept per image
        (from its plan on the returned cache; a stock model keeps every placeholder), and the LM's prompt length
        with and without the reduction. Counts come from the prompt itself, so any family's varying
        placeholder counts are fine."""
        placeholders = (inputs["input_ids"] == self.image_token_id).sum(-1).tolist()
        attended = inputs["attention_mask"].sum(-1).tolist()
        reports = []
        for row, prompt in enumerate(prompts):
            kept = list(plan.kept_tokens[row]) if plan is not None else None
            kept_total = sum(kept) if kept is not None else placeholders[row]
            reports.append(RowReport(
                images=len(prompt.images), image_tokens=kept_total, image_placeholders=placeholders[row],
                lm_tokens=attended[row] - placeholders[row] + kept_total, lm_tokens_unreduced=attended[row],
            ))
        return reports

    # -- multiple choice --------------------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihood(self, prompts: list[ChatPrompt], continuations: list[str]) -> list[tuple[float, bool]]:
        """Per prompt, the mean negative log-likelihood of its continuation after the rendered prompt (what
        the model's `labels` loss gives for that row alone) and whether greedy decoding would produce it."""
        contexts = [self.render(prompt) for prompt in prompts]
        texts = [context + continuation for context, continuation in zip(contexts, continuations)]
        lengths = [
            len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            - len(self.tokenizer(context, add_special_tokens=False)["input_ids"])
            for context, text in zip(contexts, texts)
        ]
        if min(lengths) < 1:
            raise ValueError("every continuation must add at least one token to its prompt")
        inputs = self.encode(prompts, texts)
        keep = max(lengths) + 1
        logits = self.model(**inputs, logits_to_keep=keep).logits.float()  # [B, keep, V]; rows end together
        targets = inputs["input_ids"][:, -keep + 1:].to(logits.device)
        results = []
        for row, length in enumerate(lengths):
            row_logits = logits[row, keep - 1 - length: keep - 1]
            row_targets = targets[row, targets.shape[1] - length:]
            loss = F.cross_entropy(row_logits, row_targets)
            greedy = bool((row_logits.argmax(-1) == row_targets).all())
            results.append((float(loss), greedy))
        return results
