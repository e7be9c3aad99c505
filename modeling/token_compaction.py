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
        placeholder_counts: per row, each image's placeholder count in the prompt as given (what the
            processor emitted for it), so that a continuation sending only the new images still finds the
            cached images' runs.
        extra_padding: per row, the left padding compaction added to align rows.
        images_end: the compact column just past the last image token of any row; a continuation may rewind
            the cache to no earlier than this.
        compact_ids: `[B, C']` the compact token ids the cache was built from (prompt and generated tokens),
            used to check that a continuation repeats the cached history.
    """

    kept_tokens: list[list[int]]
    extra_padding: list[int]
    placeholder_counts: list[list[int]] | None = None
    images_end: int = 0
    compact_ids: torch.Tensor | None = field(default=None, repr=False)

    def repeat_rows(self, times: int) -> "CompactionPlan":
        """The plan of a batch whose rows were each repeated `times` times (beams, return sequences)."""
        return CompactionPlan(
            kept_tokens=[list(counts) for counts in self.kept_tokens for _ in range(times)],
            placeholder_counts=None if self.placeholder_counts is None else [
                list(counts) for counts in self.placeholder_counts for _ in range(times)
            ],
            extra_padding=[pad for pad in self.extra_padding for _ in range(times)],
            images_end=self.images_end,
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


def assign_image_spans(
    runs: list[list[ImageSpan]],
    leading_counts: list[list[int]],
    queued_counts: list[int],
) -> list[list[ImageSpan]] | None:
    """Cut each row's placeholder runs into one span per image, image by image with that image's count.

    Row `r` first takes the counts in `leading_counts[r]` (images it already holds, e.g. cached ones), then
    counts from the front of `queued_counts` (the images of the whole batch in placeholder order); a run of
    glued placeholders (`<image><image>`) takes as many images as it holds. None if the runs and the counts do
    not tile exactly (a run that ends inside an image, placeholders left without an image, or images left
    without placeholders).
    """
    queue = list(reversed(queued_counts))
    spans: list[list[ImageSpan]] = []
    for row_runs, leading in zip(runs, leading_counts):
        leading = list(reversed(leading))
        row_spans = []
        for run in row_runs:
            start, end = run.start, run.start + run.length
            while start < end:
                source = leading if leading else queue
                if not source or source[-1] <= 0 or start + source[-1] > end:
                    return None
                count = source.pop()
                row_spans.append(ImageSpan(start, count))
                start += count
        if leading:
            return None
        spans.append(row_spans)
    return None if queue else spans


def compact_rows(
    tensors: dict[str, torch.Tensor],
    spans: list[list[ImageSpan]],
    kept_tokens: list[list[int]],
    fill_values: dict[str, int],
) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Drop the placeholders each image does not use and left-align the rows again.

    Args:
        tensors: `[B, L]` tensors to compact alike (`input_ids`, `attention_mask`, `labels`, ...).
        spans: per row, each image's placeholder span (`assign_image_spans`).
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
