"""Processor of LLaVA with TRIM: the stock LLaVA processor plus the CLIP-tokenised question of every image.

Shipped with TRIM checkpoints as remote code, so it imports only the standard library, numpy and transformers.

Which text is "the question" (docs/trim.md §1, evaluation semantics): the user text of the turn that
brought the image, without system prompt, role markers, image tokens or chat special tokens. In order of
preference it comes from

1. `clip_text=`, given by the caller: one string per prompt (used for every image of that prompt), one string
   per image, or a list per prompt with one string per image of that prompt;
2. `apply_chat_template(..., tokenize=True)`: the text parts of the message that carries each image;
3. the prompt string itself: split into turns at common role markers (LLaVA-1.5 `USER:`/`ASSISTANT:`,
   `### Human:`/`### Assistant:`, ChatML `<|im_start|>user`, Llama-2/Mistral `[INST]`/`[/INST]` with
   `<<SYS>>`, Llama-3 headers, Gemma `<start_of_turn>`, Phi `<|user|>`); each image takes the text of the
   user turn it sits in. Text before the first marker is a system prompt and is dropped (unless the first
   marker is an assistant one, as in `"<image>\\nWhat is it? ASSISTANT:"`); a prompt without any marker is
   all question. A role marker the user typed inside their own question ("What does ASSISTANT: mean?") is
   text, not a turn: a template alternates roles, so of a run of same-role markers only one is real. For
   other templates pass `clip_text=`.

An image whose turn has no text gets the empty question `""` (CLIP encodes BOS, EOS), so its token count
depends on the image alone. Every row is truncated and padded to 77 CLIP tokens.
"""

import re

import numpy as np
from transformers import LlavaProcessor
from transformers.image_utils import make_flat_list_of_images
from transformers.processing_utils import ProcessorMixin


CLIP_MAX_LENGTH = 77

# Role markers of common chat formats, as (regex, role). Text after a marker, up to the next one, has its role.
_ROLE_MARKERS = (
    (r"<\|im_start\|>[ \t]*user\b", "user"),
    (r"<\|im_start\|>[ \t]*assistant\b", "assistant"),
    (r"<\|im_start\|>[ \t]*system\b", "system"),
    (r"<\|start_header_id\|>[ \t]*user[ \t]*<\|end_header_id\|>", "user"),
    (r"<\|start_header_id\|>[ \t]*assistant[ \t]*<\|end_header_id\|>", "assistant"),
    (r"<\|start_header_id\|>[ \t]*system[ \t]*<\|end_header_id\|>", "system"),
    (r"<start_of_turn>[ \t]*user\b", "user"),
    (r"<start_of_turn>[ \t]*model\b", "assistant"),
    (r"<\|user\|>", "user"),
    (r"<\|assistant\|>", "assistant"),
    (r"<\|system\|>", "system"),
    (r"\[INST\]", "user"),
    (r"\[/INST\]", "assistant"),
    (r"<<SYS>>", "system"),
    (r"<</SYS>>", "user"),  # Llama-2: "[INST] <<SYS>> system <</SYS>> user text [/INST]"
    (r"\bUSER:", "user"),
    (r"\bASSISTANT:", "assistant"),
    (r"\bSYSTEM:", "system"),
    (r"(?:^|(?<=\n)|###[ \t]*)Human:", "user"),
    (r"(?:^|(?<=\n)|###[ \t]*)(?:Assistant|GPT):", "assistant"),
)
_ROLE_PATTERN = re.compile("|".join(f"(?P<r{i}>{pattern})" for i, (pattern, _) in enumerate(_ROLE_MARKERS)))
# Special tokens of chat formats that are not role markers: "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "###"...
_CHAT_SPECIALS = re.compile(r"<\|[^|<>\s]{1,40}\|>|<end_of_turn>|<start_of_turn>|(?:^|\s)###(?=\s|$)")


def _clean_question(text: str, remove: list[str]) -> str:
    for token in remove:
        text = text.replace(token, " ")
    text = _CHAT_SPECIALS.sub(" ", text)
    return " ".join(text.split())


def _role_of(match: re.Match) -> str:
    return _ROLE_MARKERS[int(match.lastgroup[1:])][1]


def _genuine_markers(matches: list[re.Match]) -> list[re.Match]:
    """Drop role markers that were typed inside a user's own text rather than written by the template.

    A template alternates roles, so a run of markers of one role holds at most one real marker: in a run of user
    markers the first opens the turn and the others sit in the user's text ("USER: Is USER: a name?"); in a run
    of other markers the last one closes the user turn before it and the others sit in that user's text
    ("USER: What does ASSISTANT: mean? ASSISTANT:").
    """
    genuine = []
    for index, match in enumerate(matches):
        role = _role_of(match)
        if role == "user":
            if index == 0 or _role_of(matches[index - 1]) != "user":
                genuine.append(match)
        elif index + 1 == len(matches) or _role_of(matches[index + 1]) != role:
            genuine.append(match)
    return genuine


def _turns(prompt: str) -> list[tuple[str, str]]:
    """`prompt` as `(role, text)` segments in order, split at the role markers."""
    matches = _genuine_markers(list(_ROLE_PATTERN.finditer(prompt)))
    if not matches:
        return [("user", prompt)]
    first_role = _role_of(matches[0])
    turns = [("user" if first_role == "assistant" else "system", prompt[: matches[0].start()])]
    for match, following in zip(matches, [*matches[1:], None]):
        role = _role_of(match)
        turns.append((role, prompt[match.end() : following.start() if following else len(prompt)]))
    return turns


def questions_from_prompt(prompt: str, image_token: str = "<image>", special_tokens: tuple[str, ...] = ()) -> list[str]:
    """The question of every image of `prompt`, in order: the cleaned text of the user turn holding the image.

    An image outside any user turn (e.g. before the first marker) takes the next user turn's text, or the
    previous one's if none follows.
    """
    remove = [image_token, *(token for token in special_tokens if token and token != image_token)]
    turns = _turns(prompt)
    user_texts = [_clean_question(text, remove) if role == "user" else None for role, text in turns]
    questions = []
    for index, (role, text) in enumerate(turns):
        for _ in range(text.count(image_token)):
            if role == "user":
                questions.append(user_texts[index])
                continue
            following = [q for q in user_texts[index + 1 :] if q is not None]
            preceding = [q for q in user_texts[:index] if q is not None]
            questions.append(following[0] if following else preceding[-1] if preceding else "")
    return questions


def _is_image_block(block) -> bool:
    return isinstance(block, dict) and block.get("type") in ("image", "image_url")


def questions_from_conversation(conversation: list[dict], image_token: str = "<image>") -> list[str] | None:
    """The question of every image block of a chat, in order: the text parts of the message holding it.
    None when the conversation places images in a way this cannot follow (image tokens inside string
    content), so that the rendered prompt is parsed instead."""
    questions = []
    for message in conversation:
        content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
        if content is None:
            continue
        if isinstance(content, str):
            if image_token in content:
                return None
            continue
        text = " ".join(
            block.get("text", "") for block in content if isinstance(block, dict) and block.get("type") == "text"
        )
        questions.extend([" ".join(text.split())] * sum(_is_image_block(block) for block in content))
    return questions


def refuse_language_tokenizer_as_clip(tokenizer, clip_tokenizer) -> None:
    """Raise `ValueError` when TRIM's CLIP tokenizer is the language model's tokenizer.

    That is what loading gives when a TRIM checkpoint lost its `clip_tokenizer/` subfolder (top-level files
    copied, a mirror without subfolders): transformers falls back to the root tokenizer with only a log line,
    and TRIM would then score patches against token ids from the wrong vocabulary."""
    if tokenizer is None or clip_tokenizer is None:
        return
    if clip_tokenizer is tokenizer or clip_tokenizer.get_vocab() == tokenizer.get_vocab():
        raise ValueError(
            "TRIM's CLIP tokenizer is the language model's tokenizer: the checkpoint's `clip_tokenizer/` subfolder "
            "is missing (copy it along with the top-level files, or re-run `convert trim`); the CLIP text tower "
            "cannot read the language model's token ids"
        )


class LlavaTrimProcessor(LlavaProcessor):
    r"""
    [`LlavaProcessor`] plus a CLIP tokenizer for TRIM's question. `__call__` returns everything the LLaVA
    processor returns plus `clip_input_ids` and `clip_attention_mask`: one row per image (prompt by prompt, in
    placeholder order), truncated and padded to 77 tokens. See the module docstring for which text is used.

    Args:
        image_processor, tokenizer, patch_size, vision_feature_select_strategy, chat_template, image_token,
        num_additional_image_tokens: as [`LlavaProcessor`].
        clip_tokenizer ([`CLIPTokenizer`]):
            The tokenizer of the CLIP checkpoint of the vision tower. Saved in the `clip_tokenizer/` subfolder.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        clip_tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        **kwargs,
    ):
        # LlavaProcessor.__init__ would hand ProcessorMixin only two of the three sub-processors.
        self.patch_size = patch_size
        self.num_additional_image_tokens = num_additional_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = tokenizer.image_token if hasattr(tokenizer, "image_token") else image_token
        self.image_token_id = tokenizer.encode(self.image_token, add_special_tokens=False)[0]
        refuse_language_tokenizer_as_clip(tokenizer, clip_tokenizer)
        ProcessorMixin.__init__(self, image_processor, tokenizer, clip_tokenizer, chat_template=chat_template)

    @property
    def model_input_names(self) -> list[str]:
        names = list(dict.fromkeys([*self.tokenizer.model_input_names, *self.image_processor.model_input_names]))
        return [*names, "clip_input_ids", "clip_attention_mask"]

    # Questions --------------------------------------------------------------------------------------

    def extract_questions(self, text: str | list[str]) -> list[str]:
        """The question of every image of `text` (one prompt or a batch), prompt by prompt, image by image."""
        prompts = [text] if isinstance(text, str) else list(text)
        specials = tuple(getattr(self.tokenizer, "all_special_tokens", ()))
        return [q for prompt in prompts for q in questions_from_prompt(prompt, self.image_token, specials)]

    def _resolve_questions(self, prompts: list[str] | None, num_images: int, clip_text) -> list[str]:
        """One question per image, from `clip_text` when given, else from the prompts."""
        counts = [prompt.count(self.image_token) for prompt in prompts] if prompts is not None else [num_images]
        if clip_text is None:
            return self.extract_questions(prompts) if prompts is not None else [""] * num_images
        if isinstance(clip_text, str):
            clip_text = [clip_text]
        clip_text = list(clip_text)
        nested = any(isinstance(item, (list, tuple)) for item in clip_text)
        if nested:
            if len(clip_text) != len(counts) or any(
                not isinstance(item, (list, tuple)) or len(item) != count for item, count in zip(clip_text, counts)
            ):
                raise ValueError(
                    f"`clip_text` given as one list per prompt must match the images of each prompt "
                    f"({counts}), got lengths {[len(i) if isinstance(i, (list, tuple)) else 'str' for i in clip_text]}"
                )
            questions = [q for item in clip_text for q in item]
        elif len(clip_text) == len(counts) and len(clip_text) == num_images and any(c != 1 for c in counts):
            raise ValueError(
                f"`clip_text` has {len(clip_text)} strings, both the number of prompts and of images, but the "
                f"prompts hold {counts} images: pass one list per prompt (e.g. [[q1, q2], []]) to disambiguate"
            )
        elif len(clip_text) == len(counts):
            questions = [q for q, count in zip(clip_text, counts) for _ in range(count)]
        elif len(clip_text) == num_images:
            questions = clip_text
        else:
            raise ValueError(
                f"`clip_text` must hold one string per prompt ({len(counts)}) or one per image ({num_images}), "
                f"got {len(clip_text)}"
            )
        if not all(isinstance(q, str) for q in questions):
            raise ValueError("`clip_text` entries must be strings")
        return questions

    def _clip_encode(self, questions: list[str], return_tensors):
        if questions:
            encoded = self.clip_tokenizer(
                questions, padding="max_length", truncation=True, max_length=CLIP_MAX_LENGTH,
                return_tensors=return_tensors,
            )
            return encoded["input_ids"], encoded["attention_mask"]
        if return_tensors == "pt":
            import torch

            empty = torch.zeros((0, CLIP_MAX_LENGTH), dtype=torch.long)
            return empty, empty.clone()
        if return_tensors == "np":
            empty = np.zeros((0, CLIP_MAX_LENGTH), dtype=np.int64)
            return empty, empty.copy()
        return [], []

    # Calls ------------------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, videos=None, audio=None, clip_text=None, **kwargs):
        """[`LlavaProcessor.__call__`] plus `clip_input_ids` / `clip_attention_mask` (see the class docstring).

        Args:
            clip_text (`str`, `list[str]` or `list[list[str]]`, *optional*):
                The question(s) to score patches against, instead of extracting them from `text`: one string
                per prompt, one per image, or one list per prompt with one string per image of that prompt.
        """
        output = super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)
        prompts = None if text is None else ([text] if isinstance(text, str) else list(text))
        # Count from the prompts when there are any: `images` may still be URLs or paths here (the pipeline passes
        # chat images as given), which `make_flat_list_of_images` rejects.
        if prompts is not None:
            num_images = sum(prompt.count(self.image_token) for prompt in prompts)
        else:
            num_images = len(make_flat_list_of_images(images)) if images is not None else 0
        questions = self._resolve_questions(prompts, num_images, clip_text)
        return_tensors = kwargs.get("return_tensors")
        for group in ("text_kwargs", "common_kwargs"):
            return_tensors = return_tensors or (kwargs.get(group) or {}).get("return_tensors")
        output["clip_input_ids"], output["clip_attention_mask"] = self._clip_encode(questions, return_tensors)
        return output

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """[`ProcessorMixin.apply_chat_template`]; with `tokenize=True` each image's question is the text parts
        of the message that carries it (passed on as `clip_text`). A `clip_text` given by the caller wins."""
        processor_kwargs = dict(kwargs.get("processor_kwargs") or {})
        if kwargs.get("tokenize") and "clip_text" not in processor_kwargs and "clip_text" not in kwargs:
            if "images" not in processor_kwargs:
                batched = isinstance(conversation, (list, tuple)) and bool(conversation) and (
                    isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "content")
                )
                conversations = conversation if batched else [conversation]
                per_conversation = [questions_from_conversation(list(c), self.image_token) for c in conversations]
                if all(questions is not None for questions in per_conversation):
                    processor_kwargs["clip_text"] = per_conversation
                    kwargs["processor_kwargs"] = processor_kwargs
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)


LlavaTrimProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["LlavaTrimProcessor", "questions_from_prompt", "questions_from_conversation"]
