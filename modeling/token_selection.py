"""Selection helpers that more than one reduction method uses: pure tensor functions, no models or configs.

Selecting keeps the best-scoring tokens in raster order (so kept tokens keep their spatial order whatever the
score order was); the IQR rule counts the scores above the upper fence, and its optional bounds clamp the
counts. TRIM and PruMerge build on the IQR rule (it comes from PruMerge), VisionZip on the gathers. Only what
at least two methods need lives here: everything else is in the method's own `method_<name>.py`, so a
checkpoint ships only its method's code.

Shapes: `B` images (or crops), `N` tokens per image, `D` width.
"""

import torch


def top_k_in_raster_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices `[B, k]` of the `k` largest scores of each row, ascending (raster order), so the kept
    tokens keep their spatial order whatever the score order was."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def split_kept_and_rest(keep_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending indices of the kept and of the other positions of a `[B, N]` mask that keeps the same
    number of tokens in every row: `([B, k], [B, N - k])`."""
    batch = keep_mask.shape[0]
    kept = keep_mask.nonzero()[:, 1].view(batch, -1)
    rest = (~keep_mask).nonzero()[:, 1].view(batch, -1)
    return kept, rest


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`tokens[b, indices[b]]` for `[B, N, D]` tokens and `[B, k]` indices; differentiable in `tokens`."""
    return tokens.gather(1, indices.to(tokens.device).unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))



def iqr_outlier_counts(scores: torch.Tensor, multiplier: float = 1.5, batch_coupled: bool = False) -> list[int]:
    """How many patches each image keeps before bounds: the scores above the upper IQR fence.

    `fence = Q3 + multiplier * (Q3 - Q1)` with linear-interpolation quartiles (numpy's default), strict `>`,
    no lower fence. Per image (`batch_coupled=False`) the count is that image's outliers. Batch-coupled,
    the quartiles and the count are taken over all `B * N_p` scores at once and every image gets
    `int(N_p * outliers / (B * N_p))`, as the released code does.

    Args:
        scores: `[B, N_p]` scores (`trim_similarity_scores`).

    Returns:
        A list of `B` ints in `[0, N_p]`.
    """
    batch, patches = scores.shape
    values = scores.float().reshape(1, -1) if batch_coupled else scores.float()
    quartiles = torch.quantile(values, torch.tensor([0.25, 0.75], device=values.device), dim=-1)  # [2, rows]
    fence = quartiles[1] + multiplier * (quartiles[1] - quartiles[0])
    outliers = (values > fence.unsqueeze(-1)).sum(dim=-1).tolist()
    if batch_coupled:
        return [int(patches * outliers[0] / values.shape[-1])] * batch
    return [int(count) for count in outliers]


def bound_counts(counts: list[int], num_patches: int, min_tokens: int | None = None,
                 max_tokens: int | None = None) -> list[int]:
    """Per-image counts clamped to `[min_tokens or 0, min(max_tokens, num_patches)]` (a count of 0 stays 0 without a
    `min_tokens`): the optional bounds TRIM and PruMerge put on their IQR counts."""
    low = min_tokens or 0
    high = num_patches if max_tokens is None else min(max_tokens, num_patches)
    return [min(max(count, low), high) for count in counts]
