"""Reading original LLaVA-codebase checkpoints as they are published (liuhaotian/llava-v1.5-*, the released TRIM
checkpoints): their sentencepiece-only tokenizer and their `mm_vision_tower` paths (the TRIM setting spellings
are TRIM's conversion hook, `method_conversion.py`; docs/trim.md §10 describes the rules).
"""

import importlib
import json
import os
import warnings
from pathlib import Path

from .errors import ConversionError
from .sources import is_hub_id, looks_like_local_path


# The CLIP checkpoint of LLaVA-1.5's vision tower; used when an original checkpoint names an unknown local path.
DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"


# OpenAI's CLIP checkpoints LLaVA models are trained on, by the directory name training scripts give them.
OPENAI_CLIP_NAMES = ("clip-vit-large-patch14-336", "clip-vit-large-patch14", "clip-vit-base-patch16",
                     "clip-vit-base-patch32")


def vision_tower_fallback(reference: str) -> str:
    """The CLIP checkpoint to read for an original checkpoint's `mm_vision_tower`: the value itself when it is
    a directory here or a hub id that is not an OpenAI CLIP name under another owner; else the OpenAI CLIP of
    that directory name (`clip-vit-large-patch14-336`, `model/clip-vit-large-patch14-336`, `/data/.../clip-vit-
    large-patch14-336` -> `openai/clip-vit-large-patch14-336`), and LLaVA-1.5's CLIP for other local paths."""
    if Path(os.path.expanduser(reference)).is_dir():
        return reference
    name = reference.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    if name in OPENAI_CLIP_NAMES:
        return f"openai/{name}"
    if looks_like_local_path(reference) or not is_hub_id(reference):
        return DEFAULT_CLIP
    return reference


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def load_original_tokenizer(src_dir: Path, notes: list):
    """SRC's tokenizer as the LLaVA codebase used it, made to behave like llava-hf's converted one; what was
    changed is appended to `notes`.

    LLaVA-codebase saves ship the Llama sentencepiece `tokenizer.model` only. The codebase read it with the
    slow LlamaTokenizer in its legacy mode, which puts the `▁` word-start piece after every special token
    (`<image>\\n` is `<image> ▁ <0x0A>`, ids 32000, 29871, 13 in LLaVA-1.5), and llava-hf's tokenizer does
    the same; transformers 5 defaults to `legacy=False` and drops that piece, one token of drift per image.
    So `legacy=True` is set (unless SRC's tokenizer_config says otherwise) and written into the output.
    The codebase pads on the right for training; generation needs left padding, as llava-hf's tokenizer.
    """
    from transformers import AutoTokenizer

    settings = json.loads((src_dir / "tokenizer_config.json").read_text(encoding="utf-8")) if (
        src_dir / "tokenizer_config.json").is_file() else {}
    if not (src_dir / "tokenizer.json").is_file() and (src_dir / "tokenizer.model").is_file():
        missing = [name for name, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))
                   if not _importable(module)]
        if missing:
            raise ConversionError(
                f"SRC's tokenizer is a sentencepiece tokenizer.model only (as LLaVA-codebase checkpoints ship it); "
                f"reading it needs {' and '.join(missing)}: pip install {' '.join(missing)}"
            )
    legacy = settings.get("legacy", True)
    try:
        with warnings.catch_warnings():
            # transformers reads SRC's config.json here too; its LLaVA-codebase `rope_scaling: null` is the
            # source's business (the converted config drops it), not something the user must act on.
            warnings.filterwarnings("ignore", message="`rope_scaling` is deprecated", category=FutureWarning)
            tokenizer = AutoTokenizer.from_pretrained(src_dir, trust_remote_code=False, legacy=legacy,
                                                      padding_side="left")
    except Exception as error:  # noqa: BLE001
        raise ConversionError(f"SRC {src_dir} has no usable tokenizer files: {error}") from None
    tokenizer.init_kwargs["legacy"] = legacy  # saved, so that the output tokenises the same way
    if settings.get("padding_side", "left") != "left":
        notes.append(f"tokenizer padding side {settings['padding_side']!r} -> 'left' (batched generation)")
    return tokenizer


__all__ = ["DEFAULT_CLIP", "OPENAI_CLIP_NAMES", "load_original_tokenizer", "vision_tower_fallback"]
