"""Pure tensor bookkeeping that lets a prompt with full-size image placeholder runs carry fewer image tokens.

The stock LLaVA processor expands every `<image>` into `N` placeholder tokens (576 for LLaVA-1.5). After
reduction image `i` yields `k_i <= N` tokens. *Compaction* keeps the first `k_i` placeholders of each
image's run, drops the rest, and left-pads the rows back to one length. It is deterministic, so a later
call with the same history rebuilds exactly the prefix a KV cache already holds.

The bookkeeping runs on the host in numpy: it is a few integer operations on `[B, L]` ids whose cost is
per-call overhead, numpy's is a fraction of torch's, and on a GPU it costs one small copy each way.

Shapes: `B` rows, `L` full prompt length, `C` compact length.
"""

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ImageSpan:
    """One image's placeholder run in a row: `length` tokens starting at `start`."""

    start: int
    length: int


@dataclass
class CompactionPlan:
    """What a compacted batch keeps, row by row; stored on the KV cache for multi-turn continuation.

    Attributes:
        kept_tokens: per row, the token count kept for each image, in placeholder order.
        extra_padding: per row, the left padding compaction added to align rows.
        compact_ids: `[B, C']` the compact token ids the cache was built from (prompt and generated tokens),
            used to check that a continuation repeats the cached history.
    """

    kept_tokens: list[list[int]]
    extra_padding: list[int]
    compact_ids: torch.Tensor | None = field(default=None, repr=False)

    def repeat_rows(self, times: int) -> "CompactionPlan":
        """The plan of a batch whose rows were each repeated `times` times (beams, return sequences)."""
        return CompactionPlan(
            kept_tokens=[list(counts) for counts in self.kept_tokens for _ in range(times)],
            extra_padding=[pad for pad in self.extra_padding for _ in range(times)],
            compact_ids=None if self.compact_ids is None else self.compact_ids.repeat_interleave(times, dim=0),
        )


def placeholder_runs(input_ids: torch.Tensor, image_token_id: int) -> list[list[ImageSpan]]:
    """Per row of `[B, L]` ids, the maximal runs of `image_token_id`."""
    is_image = np.zeros((input_ids.shape[0], input_ids.shape[1] + 2), dtype=np.int8)
    is_image[:, 1:-1] = _host_array(input_ids) == image_token_id
    # +1 where a run starts, -1 just past where it ends; row-major order pairs each start with its end.
    rows, columns = np.nonzero(np.diff(is_image, axis=1))
    runs: list[list[ImageSpan]] = [[] for _ in range(input_ids.shape[0])]
    for row, start, end in zip(rows[0::2].tolist(), columns[0::2].tolist(), columns[1::2].tolist()):
        runs[row].append(ImageSpan(start, end - start))
    return runs


def split_runs(runs: list[ImageSpan], tokens_per_image: int) -> list[ImageSpan] | None:
    """Cut runs of glued placeholders (`<image><image>`) into per-image spans of `tokens_per_image`;
    None if some run is not a whole number of images at that size."""
    spans = []
    for run in runs:
        if run.length % tokens_per_image:
            return None
        spans.extend(ImageSpan(run.start + i * tokens_per_image, tokens_per_image) for i in range(run.length // tokens_per_image))
    return spans


def find_image_spans(
    input_ids: torch.Tensor,
    image_token_id: int,
    candidate_sizes: list[int],
    allowed_totals: set[int] | None = None,
) -> list[list[ImageSpan]]:
    """Per row, the placeholder span of every image, in order.

    Args:
        input_ids: `[B, L]`.
        candidate_sizes: placeholder counts one image may have, tried in order (the processor's full
            count first; a model with a fixed reduced count also accepts prompts already expanded to it).
        allowed_totals: when known, the image totals the prompt may hold; they decide between sizes that
            both divide the runs (e.g. 576 full placeholders vs 9 images of 64).

    Raises:
        ValueError: placeholders that are no whole number of images at any candidate size.
    """
    runs = placeholder_runs(input_ids, image_token_id)
    counts = [sum(run.length for run in row) for row in runs]
    for size in dict.fromkeys(candidate_sizes):
        spans = [split_runs(row, size) for row in runs]
        if any(row is None for row in spans):
            continue
        if allowed_totals is None or sum(len(row) for row in spans) in allowed_totals:
            return spans
    expectation = "" if allowed_totals is None else f" for {' or '.join(map(str, sorted(allowed_totals)))} image(s)"
    raise ValueError(
        f"The image placeholders in `input_ids` (token id {image_token_id}, counts per row {counts}) do not match"
        f"{expectation}: each image needs one run of {' or '.join(map(str, dict.fromkeys(candidate_sizes)))} "
        "placeholders, as the LLaVA processor expands `<image>`."
    )


def compact_rows(
    tensors: dict[str, torch.Tensor],
    spans: list[list[ImageSpan]],
    kept_tokens: list[list[int]],
    fill_values: dict[str, int],
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Drop the placeholders each image does not use and left-align the rows again.

    Args:
        tensors: `[B, L]` tensors to compact alike (`input_ids`, `attention_mask`, `labels`, ...).
        spans: per row, each image's placeholder span (`find_image_spans`).
        kept_tokens: per row, each image's kept count `k_i <= span.length`.
        fill_values: what the added left padding holds in each tensor (pad id, 0, -100, ...).

    Returns:
        The `[B, C]` compact tensors and, per row, the left padding added.
    """
    batch, length = next(iter(tensors.values())).shape
    keep = np.ones((batch, length), dtype=bool)
    for row, (row_spans, row_counts) in enumerate(zip(spans, kept_tokens)):
        for span, kept in zip(row_spans, row_counts):
            keep[row, span.start + kept : span.start + span.length] = False
    row_lengths = keep.sum(axis=1)
    compact_length = int(row_lengths.max()) if batch else 0
    padding = compact_length - row_lengths
    # Each kept token moves to its rank among the row's kept tokens, shifted right by the row's padding.
    kept_rows, kept_columns = np.nonzero(keep)
    destination = (keep.cumsum(axis=1) - 1 + padding[:, None])[kept_rows, kept_columns]
    compact = {}
    for name, tensor in tensors.items():
        source = _host_array(tensor)
        out = np.full((batch, compact_length), fill_values[name], dtype=source.dtype)
        out[kept_rows, destination] = source[kept_rows, kept_columns]
        compact[name] = torch.from_numpy(out).to(tensor.device)
    return compact, padding.tolist()


def _host_array(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's values as a host numpy array (no copy for CPU tensors)."""
    return tensor.detach().cpu().numpy()
