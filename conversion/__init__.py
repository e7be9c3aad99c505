"""Converters from existing LLaVA checkpoints (stock transformers or the original LLaVA codebase, with an
optional CLIP checkpoint and projector file) to self-contained VisionZip / TRIM checkpoints, and the model
card renderer. Command line: `llava-token-reduction convert ...` or `python -m llava_token_reduction.conversion`.
"""

from .converter import ConversionRequest, ConversionResult, convert, convert_prumerge, convert_trim, convert_visionzip
from .errors import ConversionError
from .model_card import extract_python_snippets, render_model_card


__all__ = [
    "ConversionError", "ConversionRequest", "ConversionResult", "convert", "convert_visionzip", "convert_trim",
    "convert_prumerge",
    "render_model_card", "extract_python_snippets",
]
