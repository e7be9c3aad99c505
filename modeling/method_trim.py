"""TRIM's computation as pure tensor functions (docs/trim.md §2-§5): patches scored by CLIP similarity to the
question, an IQR outlier count per image (or per batch), bounds, the kept patches plus the mean of the others.

Every function takes and returns tensors and knows nothing about models, model families or configs, so each is
checked on its own against an independent reference. The model side of the method (CLIP text tower, input
checks, which vision state it reads) is `method_trim_model.py`.

Shapes: `B` images (or crops), `N_p` patches per image (CLS excluded), `D` vision width, `E` CLIP joint size.
"""

import torch

from .token_selection import bound_counts, iqr_outlier_counts, top_k_in_raster_order


def trim_similarity_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor, negate: bool = True) -> torch.Tensor:
    """TRIM's scorer: softmax over patches of the raw dot product with the question, in fp32.

    Args:
        image_embeds: `[B, N_p, E]`, CLIP's vision head applied to the patch features
            (`visual_projection(post_layernorm(P))`), not normalised.
        text_embeds: `[B, E]`, the question's CLIP `text_embeds`, not normalised.
        negate: softmax of the negated dot product (the released TRIM code and checkpoints) instead of the
            plain one.

    Returns:
        `[B, N_p]` fp32 scores, each row summing to 1, on `image_embeds`' device.
    """
    logits = (image_embeds.float() @ text_embeds.float().to(image_embeds.device).unsqueeze(-1)).squeeze(-1)
    return (-logits if negate else logits).softmax(dim=-1)


def bound_token_counts(
    counts: list[int],
    num_patches: int,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    append_mean_token: bool = True,
) -> list[int]:
    """Apply `trim_min_tokens` / `trim_max_tokens` to per-image kept counts (the mean token not counted).

    A count of 0 is allowed when the mean token is appended (the image is then represented by the mean of
    all its patches alone); without the mean token it is raised to 1 so that every image yields a token.
    """
    bounded = bound_counts(counts, num_patches, min_tokens, max_tokens)
    if not append_mean_token:
        bounded = [max(count, 1) for count in bounded]
    return bounded


def select_with_mean_token(
    patch_features: torch.Tensor, scores: torch.Tensor, counts: list[int], append_mean_token: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keep each image's `counts[i]` best-scoring patches in raster order, then optionally the mean of the rest.

    Args:
        patch_features: `[B, N_p, D]`, the patch features `P` (pre-projector).
        scores: `[B, N_p]` selection scores.
        counts: kept patches per image, each in `[0, N_p]` (`bound_token_counts`).
        append_mean_token: append `mean(P[unselected])` last when at least one patch is unselected. With
            `counts[i] == N_p` nothing is unselected and no mean token is added; with `counts[i] == 0` the
            output is the mean of all patches alone.

    Returns:
        `(tokens, kept_indices)`: per image, the `[k_i (+1), D]` fp32 tokens and the `[k_i]` ascending indices of
        the kept patches (on the features' device). Tokens stay differentiable in `patch_features`; the
        selection itself carries no gradient.
    """
    batch, patches, _ = patch_features.shape
    device = patch_features.device
    tokens, kept_indices = [], []
    for image in range(batch):
        count = counts[image]
        if not 0 <= count <= patches:
            raise ValueError(f"kept token count must be in [0, {patches}], got {count} for image {image}")
        features = patch_features[image].float()
        indices = top_k_in_raster_order(scores[image : image + 1], count)[0].to(device)
        parts = [features[indices]]
        if append_mean_token and count < patches:
            unselected = torch.ones(patches, dtype=torch.bool, device=device)
            unselected[indices] = False
            parts.append(features[unselected].mean(dim=0, keepdim=True))
        tokens.append(torch.cat(parts, dim=0))
        kept_indices.append(indices)
    return tokens, kept_indices


def trim_reduce(
    patch_features: torch.Tensor,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    negate_similarity: bool = True,
    iqr_multiplier: float = 1.5,
    batch_coupled: bool = False,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    append_mean_token: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """TRIM on a batch of images (docs/trim.md §2-§5).

    Args:
        patch_features: `[B, N_p, D]` patch features `P` (CLS excluded).
        image_embeds: `[B, N_p, E]` CLIP joint-space patch embeddings `Z`.
        text_embeds: `[B, E]`, one question embedding per image.
        The rest mirror the `trim_*` config fields.

    Returns:
        `(tokens, kept_indices, scores)`: per-image `[k_i (+1), D]` fp32 tokens and `[k_i]` kept patch indices,
        and the `[B, N_p]` fp32 scores.
    """
    scores = trim_similarity_scores(image_embeds, text_embeds, negate=negate_similarity)
    counts = iqr_outlier_counts(scores, iqr_multiplier, batch_coupled=batch_coupled)
    counts = bound_token_counts(counts, patch_features.shape[1], min_tokens, max_tokens, append_mean_token)
    tokens, kept_indices = select_with_mean_token(patch_features, scores, counts, append_mean_token)
    return tokens, kept_indices, scores
