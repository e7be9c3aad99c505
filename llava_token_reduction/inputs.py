"""What the tools (demo, show, tune; bench later) share about their inputs: the sample image, the default
question, the prompt built from a question, and the dtype names a user may give."""

from __future__ import annotations

from pathlib import Path


SAMPLE_IMAGE = Path(__file__).resolve().parent / "assets" / "sample.png"
DEFAULT_QUESTION = "What is shown in this picture?"
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def chat_prompt(processor, question: str) -> str:
    """One image and `question` as a user turn, through the processor's chat template when it has one; the
    LLaVA-1.5 conversation format ("USER: <image>\\n... ASSISTANT:") otherwise."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", None) or "<image>"
    return f"USER: {image_token}\n{question} ASSISTANT:"


def parse_dtype(name, device: str = "cpu", allowed=("auto", *FLOAT_DTYPES)):
    """The `torch.dtype` a user named: one of `allowed` ("float16", "torch.float16"), or a `torch.dtype`.
    "auto" is bfloat16 on an accelerator and float32 on the CPU (or a meta / disk placement). Anything else is
    a `ValueError` naming the choices."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    text = str(name).replace("torch.", "")
    if text not in allowed:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(allowed)}")
    if text == "auto":
        on_gpu = not str(device).startswith(("cpu", "meta", "disk")) and (
            torch.cuda.is_available() or torch.backends.mps.is_available()
        )
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, text)


__all__ = ["DEFAULT_QUESTION", "FLOAT_DTYPES", "SAMPLE_IMAGE", "chat_prompt", "parse_dtype"]
