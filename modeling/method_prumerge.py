"""PruMerge's and PruMerge+'s computation as pure tensor functions (docs/prumerge.md): the CLS row of the last
vision layer's attention, an IQR outlier count per image (or per batch), the outliers in descending attention
order (PruMerge+ adds an evenly spaced sample of the grid), each kept patch merged with its most key-similar
patches weighted by their attention, plus one attention-weighted sum of the patches not kept.

Every function takes and returns tensors and knows nothing about models, model families or configs, so each is
checked on its own against an independent reference. The model side of the method (which vision states it reads,
the last layer's projections) is `method_prumerge_model.py`.

Shapes: `B` images (or crops), `N = N_p + 1` vision tokens per image (CLS at index 0), `N_p` patches, `D` vision
width (the projections are used whole: heads are not split).
"""

import torch
import torch.nn.functional as F

from .token_selection import bound_counts, iqr_outlier_counts


# The released merge adds each kept patch's 32 most key-similar patches (fewer when the grid has fewer others).
MERGE_NEIGHBOURS = 32


def prumerge_cls_attention(cls_query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The CLS query's attention over the patches, heads not split: `softmax(q_cls · kᵀ / sqrt(D))` over all `N`
    keys (CLS included), then the CLS column dropped (not renormalised). Only this row is computed.

    Args:
        cls_query: `[B, D]` or `[B, 1, D]`, the layer's `q_proj` output at CLS (unscaled).
        keys: `[B, N, D]`, the layer's `k_proj` output.

    Returns:
        `[B, N_p]` fp32.
    """
    query = cls_query.float().reshape(keys.shape[0], 1, keys.shape[-1])
    logits = (query @ keys.float().transpose(1, 2)).squeeze(1) * keys.shape[-1] ** -0.5  # [B, N]
    return logits.softmax(dim=-1)[:, 1:]


def plus_sample_positions(kept_count: int, num_patches: int) -> list[int]:
    """PruMerge+'s evenly spaced sample of the flattened grid, for an image keeping `kept_count` outliers.

    Released: `ratio = kept / N_p`, `stride = int(int(1 / ratio) / 3)`, positions `0, stride, ...` below 575.
    Generalised: below `N_p - 1` (575 for 576 patches: the last patch is never sampled), a stride of at least 1
    (ratios above 1/3 gave 0, a crash), and no outliers (ratio 0, a division by zero) samples position 0 alone,
    the limit of the rule as the ratio goes to 0.
    """
    if kept_count == 0:
        return [0] if num_patches > 1 else []
    stride = max(1, int(int(1 / (kept_count / num_patches)) / 3))
    return list(range(0, num_patches - 1, stride))


def prumerge_kept_indices(cls_attention: torch.Tensor, counts: list[int], plus: bool = False) -> list[torch.Tensor]:
    """Per image, the kept patch indices in output order: the `counts[i]` largest CLS attentions in descending
    order, then (PruMerge+) the sampled positions not already kept, ascending.

    Args:
        cls_attention: `[B, N_p]` (`prumerge_cls_attention`).
        counts: per image, the outliers kept (`iqr_outlier_counts`, then `bound_counts`).

    Returns:
        `B` long tensors `[M_i]` on `cls_attention`'s device.
    """
    patches = cls_attention.shape[1]
    kept = []
    for image, count in enumerate(counts):
        top = cls_attention[image].topk(count, sorted=True).indices
        if plus:
            chosen = set(top.tolist())
            extra = [p for p in plus_sample_positions(count, patches) if p not in chosen]
            top = torch.cat([top, torch.tensor(extra, dtype=torch.long, device=top.device)])
        kept.append(top)
    return kept


def prumerge_merge(
    patch_features: torch.Tensor, patch_keys: torch.Tensor, cls_attention: torch.Tensor, kept: torch.Tensor
) -> torch.Tensor:
    """One image's tokens: each kept patch plus its most key-similar other patches weighted by their CLS attention
    (`x_i + Σ a_j x_j`, not renormalised; `MERGE_NEIGHBOURS` of them, taken from all the other patches, kept or
    not, with their unmerged features), then one extra token `Σ a_j x_j` over the patches not kept (left out when
    every patch is kept: it would be a zero vector).

    Args:
        patch_features: `[N_p, D]`, the features `x` (CLS excluded).
        patch_keys: `[N_p, D]`, the last layer's keys of the patches (cosine similarity on the whole vector).
        cls_attention: `[N_p]`, the weights `a`.
        kept: `[M]` kept patch indices, in output order.

    Returns:
        `[M (+1), D]` fp32, differentiable in the features and weights (the selection carries no gradient).
    """
    features, weights = patch_features.float(), cls_attention.float()
    patches = features.shape[0]
    kept = kept.to(features.device)
    parts = []
    if len(kept):
        unit_keys = F.normalize(patch_keys.detach().float(), dim=-1)  # the choice of neighbours has no gradient
        similarity = unit_keys[kept] @ unit_keys.T  # [M, N_p]
        similarity[torch.arange(len(kept), device=features.device), kept] = float("-inf")  # never itself
        neighbours = similarity.topk(min(MERGE_NEIGHBOURS, patches - 1), dim=-1).indices  # [M, n]
        parts.append(features[kept] + (weights[neighbours].unsqueeze(-1) * features[neighbours]).sum(dim=1))
    if len(kept) < patches:
        rest = torch.ones(patches, dtype=torch.bool, device=features.device)
        rest[kept] = False
        parts.append((weights[rest].unsqueeze(-1) * features[rest]).sum(dim=0, keepdim=True))
    return torch.cat(parts, dim=0)


def prumerge_reduce(
    patch_features: torch.Tensor,
    patch_keys: torch.Tensor,
    cls_attention: torch.Tensor,
    plus: bool = False,
    iqr_multiplier: float = 1.5,
    batch_coupled: bool = False,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """PruMerge (or PruMerge+) on a batch of images (docs/prumerge.md).

    Args:
        patch_features: `[B, N_p, D]` features `x` (CLS excluded).
        patch_keys: `[B, N_p, D]` the last layer's keys of the patches.
        cls_attention: `[B, N_p]` (`prumerge_cls_attention`).
        The rest mirror the `prumerge_*` config fields.

    Returns:
        `(tokens, kept_indices, counts)`: per image the `[M_i (+1), D]` fp32 tokens, the `[M_i]` kept patch indices
        in output order, and the bounded outlier count (PruMerge+'s samples not included).
    """
    patches = cls_attention.shape[1]
    counts = iqr_outlier_counts(cls_attention, iqr_multiplier, batch_coupled=batch_coupled)
    counts = bound_counts(counts, patches, min_tokens, max_tokens)
    kept = prumerge_kept_indices(cls_attention, counts, plus=plus)
    tokens = [prumerge_merge(patch_features[i], patch_keys[i], cls_attention[i], kept[i]) for i in range(len(kept))]
    return tokens, kept, counts
