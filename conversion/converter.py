"""Turn a LLaVA checkpoint into a checkpoint of one of the registry's methods that loads with remote code.

    SRC (stock transformers LLaVA | LLaVA-codebase `llava_llama`)   [--clip CLIPModel]   [--projector FILE]
      -> plan.py:  every tensor of the output, named as in our model, with where it comes from; the output dtype
                   and the method's config fields (its overrides and its conversion hook); CLIP vision == SRC's
      -> build.py: processor (+ image token, vocabulary growth), config, and a model on the meta device filled
                   with the planned tensors (cast to the output dtype), checked: every SRC tensor mapped, every
                   model tensor provided, shapes
      -> write.py: save_pretrained (sharded safetensors, config with auto_map, code files) + processor +
                   README.md, into a hidden temporary directory next to OUT (output_place.py); reload that
                   directory with AutoModelForImageTextToText / AutoProcessor and compare every tensor
      -> move it into place as OUT; optionally upload it

Nothing is ever left randomly initialised: a tensor the model has and no input provides is an error, as is
an input tensor with no place in the model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..methods import METHODS as REGISTRY
from ..progress import transformers_bars
from . import write
from .build import BuiltCheckpoint, build_checkpoint, build_model
from .errors import ConversionError
from .original_format import DEFAULT_CLIP
from .output_place import ConversionInterrupted, OutputPlacement, check_output, resolve_output
from .plan import DTYPES, METHODS, ConversionPlan, ConversionRequest, check_request, plan_conversion
from .write import push_to_hub


INCOMPLETE_MARKER = "CONVERSION_INCOMPLETE"


@dataclass
class ConversionResult:
    out: Path
    method: str
    parameters: int
    shards: int
    total_bytes: int
    dtype: torch.dtype
    source_format: str
    added: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pushed_to: str | None = None

    def summary(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        lines = [
            f"Wrote and verified {self.out} ({self.method}, from a {self.source_format} checkpoint)",
            f"  parameters: {self.parameters:,} ({dtype})",
            f"  weights:    {self.shards} safetensors shard(s); directory size {self.total_bytes:,} bytes",
        ]
        lines += [f"  added:      {item}" for item in self.added] or ["  added:      nothing"]
        lines += [f"  note:       {note}" for note in self.notes]
        if self.pushed_to:
            lines.append(f"  uploaded:   https://huggingface.co/{self.pushed_to}")
        return "\n".join(lines)


def _run(request: ConversionRequest) -> ConversionResult:
    """Plan, build, write into a staging directory, verify, move into place, upload."""
    check_request(request)
    check_output(resolve_output(request.out), request.overwrite)  # before anything is read
    plan = plan_conversion(request)
    built = build_checkpoint(plan)
    placement = OutputPlacement(plan.out, request.overwrite)
    staging = placement.create()
    try:
        (staging / INCOMPLETE_MARKER).write_text(
            "This directory is an unfinished conversion; it is not a checkpoint. It can be deleted.\n"
        )
        model = build_model(plan, built)
        written_notes = write.write_checkpoint(plan, built, model, staging)
        del model
        write.verify_checkpoint(plan, built, staging)
        (staging / INCOMPLETE_MARKER).unlink()
        result = _result(plan, built, written_notes, staging)
        placement.move_into_place()
    except KeyboardInterrupt:
        placement.clean_up()
        raise ConversionInterrupted(placement.interrupted_message()) from None
    except BaseException:
        placement.clean_up()
        raise
    result.out = plan.out
    if request.push_to_hub:
        try:
            write.push_to_hub(plan.out, request.push_to_hub, private=request.private)
        except KeyboardInterrupt:  # OUT is complete: do not let the caller report that nothing was written
            raise ConversionError(
                f"written and verified {plan.out}, but the upload to {request.push_to_hub} was interrupted"
            ) from None
        result.pushed_to = request.push_to_hub
    return result


def _result(plan: ConversionPlan, built: BuiltCheckpoint, written_notes: list[str], directory: Path):
    files = [p for p in directory.rglob("*") if p.is_file()]
    notes = [*plan.notes, *built.notes, *written_notes]
    if plan.dropped_buffers:
        notes.append(f"dropped {len(plan.dropped_buffers)} recomputed buffers of SRC (position_ids / inv_freq)")
    return ConversionResult(
        out=directory, method=plan.method.name, parameters=sum(math.prod(e.shape) for e in built.tensors.values()),
        shards=len(list(directory.glob("*.safetensors"))), total_bytes=sum(p.stat().st_size for p in files),
        dtype=plan.out_dtype, source_format=plan.format, added=[*plan.added, *built.added], notes=notes,
    )


def convert(request: ConversionRequest) -> ConversionResult:
    """Run one conversion; raises `ConversionError` (one-line message) when it cannot be done."""
    started = time.monotonic()
    with transformers_bars(request.progress):
        result = _run(request)
    result.notes.append(f"took {time.monotonic() - started:.1f} s")
    return result


def converter_for(method: str) -> Callable[..., ConversionResult]:
    """`convert_<method>(src, out, **options)`: the converter entry of a registered method (its registry
    `convert_function` may name this, or its own function)."""

    def convert_method(src: str, out: str, **options) -> ConversionResult:
        return convert(ConversionRequest(method=method, src=str(src), out=str(out), **options))

    convert_method.__name__ = convert_method.__qualname__ = f"convert_{method}"
    convert_method.__doc__ = f"Convert SRC into a {REGISTRY[method].label} checkpoint at OUT (see `ConversionRequest`)."
    return convert_method


convert_visionzip = converter_for("visionzip")
convert_trim = converter_for("trim")
convert_prumerge = converter_for("prumerge")


__all__ = [
    "ConversionRequest", "ConversionResult", "convert", "converter_for", "convert_visionzip", "convert_trim",
    "convert_prumerge", "push_to_hub", "DEFAULT_CLIP", "DTYPES", "METHODS", "INCOMPLETE_MARKER",
    "ConversionInterrupted",
]
