"""Encoding a checked record into token ids and labels (the processor's chat template, or LLaVA-1.5's own
`llava-v1` format); only the assistant answers are targets. See `tuning/data.py`."""

from __future__ import annotations

from .common import PROMPT_FORMATS, DataError
from .records import IGNORE_INDEX, IMAGE_MARKER, LLAVA_V1_SYSTEM, Sample


# Encoding ------------------------------------------------------------------------------------------------------


class ConversationEncoder:
    """Turns a `Sample` into `input_ids` and `labels` (lists of ints) with full image placeholder runs.

    Args:
        processor: the checkpoint's processor (its tokenizer and, for `chat-template`, its chat template).
        image_seq_length: placeholders per image (`config.image_seq_length`, as the stock processor expands).
        image_token_id: the placeholder id (`config.image_token_id`).
        prompt_format: `chat-template`, `llava-v1`, or `auto` (the chat template when the processor has one).
        max_length: the longest sequence in tokens (with full placeholder runs); longer ones are cut at the end.
    """

    def __init__(self, processor, image_seq_length: int, image_token_id: int, prompt_format: str = "auto",
                 max_length: int = 2048, system_prompt: str | None = None):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        self.tokenizer = processor.tokenizer
        self.chat_template = getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if prompt_format == "auto":
            prompt_format = "chat-template" if self.chat_template else "llava-v1"
        if prompt_format == "chat-template" and not self.chat_template:
            raise ValueError("--prompt-format chat-template: the processor has no chat template; use llava-v1")
        self.processor = processor
        self.prompt_format = prompt_format
        self.image_seq_length = image_seq_length
        self.image_token_id = image_token_id
        self.max_length = max_length
        self.system_prompt = LLAVA_V1_SYSTEM if system_prompt is None else system_prompt
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no EOS token; answers need one to end")
        self.eos_id = eos
        bos = self.tokenizer.bos_token_id
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos_id = bos if bos is not None and probe and probe[0] == bos else None

    # segments: (text, is_target) -------------------------------------------------------------------------
    def segments(self, sample: Sample) -> list[tuple[str, bool]]:
        if self.prompt_format == "llava-v1":
            return self._llava_v1_segments(sample)
        return self._template_segments(sample)

    def _llava_v1_segments(self, sample: Sample) -> list[tuple[str, bool]]:
        segments = []
        context = self.system_prompt + " " if self.system_prompt else ""
        for (role, text), count in zip(sample.turns, sample.images_per_turn):
            if role == "user":
                context += "USER: " + (IMAGE_MARKER + "\n") * count + text + " ASSISTANT:"
            else:
                segments.append((context, False))
                segments.append((" " + text, True))
                context = ""  # the EOS that follows each answer is the separator
        return segments

    def _messages(self, sample: Sample) -> list[dict]:
        messages = []
        for (role, text), count in zip(sample.turns, sample.images_per_turn):
            content = [{"type": "image"} for _ in range(count)] + [{"type": "text", "text": text}]
            messages.append({"role": role, "content": content})
        return messages

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _template_segments(self, sample: Sample) -> list[tuple[str, bool]]:
        """Render growing prefixes; what a turn's answer adds to the prompt-with-generation-prompt is the target.
        Whitespace a template puts after an answer goes to the next context, so targets end with the answer."""
        messages = self._messages(sample)
        segments, rendered = [], ""
        for end in range(1, len(messages), 2):
            prompt = self._render(messages[:end], add_generation_prompt=True)
            full = self._render(messages[: end + 1], add_generation_prompt=False)
            if not prompt.startswith(rendered) or not full.startswith(prompt):
                raise DataError(
                    "the chat template does not render conversations prefix by prefix; use --prompt-format llava-v1"
                )
            answer = full[len(prompt):]
            trimmed = answer.rstrip()
            segments.append((prompt[len(rendered):], False))
            segments.append((trimmed, True))
            rendered = prompt + trimmed
        return segments

    # tokens ---------------------------------------------------------------------------------------------
    def _tokens(self, text: str) -> list[int]:
        ids = []
        for number, piece in enumerate(text.split(IMAGE_MARKER)):
            if number:
                ids.extend([self.image_token_id] * self.image_seq_length)
            if piece:
                ids.extend(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
        return ids

    def encode_full(self, sample: Sample) -> tuple[list[int], list[int]]:
        """Untruncated `input_ids` and `labels`."""
        input_ids = [] if self.bos_id is None else [self.bos_id]
        labels = [IGNORE_INDEX] * len(input_ids)
        for number, (text, is_target) in enumerate(self.segments(sample)):
            bos_text = self.tokenizer.bos_token
            if number == 0 and self.bos_id is not None and bos_text and text.startswith(bos_text):
                text = text[len(bos_text):]  # the template wrote BOS itself
            ids = self._tokens(text)
            if is_target and (not ids or ids[-1] != self.eos_id):  # a chat template may write the EOS itself
                ids = ids + [self.eos_id]
            input_ids.extend(ids)
            labels.extend(ids if is_target else [IGNORE_INDEX] * len(ids))
        return input_ids, labels

    def encode(self, sample: Sample) -> tuple[list[int], list[int]]:
        """`input_ids` and `labels`, cut to `max_length` (never inside an image's placeholders: `check` refuses
        such records)."""
        input_ids, labels = self.encode_full(sample)
        return input_ids[: self.max_length], labels[: self.max_length]

    def check(self, sample: Sample) -> str | None:
        """Why the sample cannot be trained on at `max_length`, or None."""
        try:
            input_ids, labels = self.encode_full(sample)
        except DataError as error:
            return str(error)
        placeholders = [i for i, token in enumerate(input_ids) if token == self.image_token_id]
        if len(placeholders) != self.image_seq_length * len(sample.images):
            return f"the text itself contains the image token; found {len(placeholders)} placeholders"
        if placeholders and placeholders[-1] >= self.max_length:
            return (f"too long: its image placeholders end at token {placeholders[-1] + 1}, beyond "
                    f"--max-length {self.max_length}")
        if all(label == IGNORE_INDEX for label in labels[: self.max_length]):
            return f"no answer token within --max-length {self.max_length}"
        return None


__all__ = ['ConversationEncoder']
