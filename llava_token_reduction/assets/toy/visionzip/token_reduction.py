"""Pure tensor functions of the visual-token reductions.

Every function here takes and returns tensors and knows nothing about models, hooks or configs, so each
can be checked against the definitions in the project's docs/visionzip.md and docs/trim.md on their own. The pattern follows
NVIDIA's kvpress: a method is a small *scorer*; selecting (keep the best-scoring tokens in raster order)
and merging (fold what was dropped into a few extra tokens) are shared.

Shapes: `B` images, `N` vision tokens per image (CLS at index 0 when present), `D` vision width,
`H` attention heads of width `d`.
"""

import torch
import torch.nn.functional as F


# Scorers ---------------------------------------------------------------------------------------------


def cls_attention_scores(queries: torch.Tensor, keys: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's scorer: the CLS query's attention over all tokens, from one layer's projections.

    Only the CLS row of the attention map is computed (`O(H·N·d)`), so the vision tower can keep its
    sdpa/flash kernels and no `N × N` map is ever materialised.

    Args:
        queries: `[B, N, H*d]`, the layer's `q_proj` output (unscaled).
        keys: `[B, N, H*d]`, the layer's `k_proj` output.
        num_heads: `H`.

    Returns:
        `cls_attention`: `[B, N]` fp32, the CLS row's softmax probabilities summed over heads.
        `mean_keys`: `[B, N, d]` fp32, the keys averaged over heads (VisionZip's merge metric, not normalised).
    """
    batch, tokens, width = keys.shape
    head_dim = width // num_heads
    cls_query = queries[:, :1].float().view(batch, 1, num_heads, head_dim).transpose(1, 2)  # [B, H, 1, d]
    head_keys = keys.float().view(batch, tokens, num_heads, head_dim).transpose(1, 2)  # [B, H, N, d]
    cls_logits = (cls_query @ head_keys.transpose(-1, -2)).squeeze(2) * head_dim**-0.5  # [B, H, N]
    cls_attention = cls_logits.softmax(dim=-1).sum(dim=1)
    return cls_attention, head_keys.mean(dim=1)


# Selection -------------------------------------------------------------------------------------------


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


# Merging ---------------------------------------------------------------------------------------------


def contextual_target_positions(remaining: int, contextual_tokens: int, device=None) -> torch.Tensor:
    """VisionZip's merge targets: positions `0, step, 2*step, ...` (`step = max(1, R // C)`, first `C`) in the
    list of the `R` not-kept tokens."""
    step = max(1, remaining // contextual_tokens)
    return torch.arange(contextual_tokens, device=device) * step


def contextual_targets_and_owners(rest_keys: torch.Tensor, contextual_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where VisionZip's contextual merge puts each not-kept token (the merge without the arithmetic).

    Targets are a 1-D stride over the `R` remaining tokens (`step = max(1, R // C)`, first `C` positions);
    every other token (a *source*) belongs to the target whose normalised key is most similar (first
    maximum wins).

    Args:
        rest_keys: `[B, R, d]`, head-mean keys of the not-kept tokens in raster order.
        contextual_tokens: `C`, with `1 <= C <= R`.

    Returns:
        `target_mask`: `[R]` bool, True at the target positions (the same for every image).
        `owner`: `[B, R - C]` long, for each source in order, the index (`0..C-1`) of its target.
    """
    remaining = rest_keys.shape[1]
    target_mask = torch.zeros(remaining, dtype=torch.bool, device=rest_keys.device)
    target_mask[contextual_target_positions(remaining, contextual_tokens, rest_keys.device)] = True
    # The released code divides by the raw norm; a floor only matters for an all-zero key (NaN otherwise).
    unit_keys = F.normalize(rest_keys.float(), dim=-1, eps=1e-12)
    similarity = unit_keys[:, ~target_mask] @ unit_keys[:, target_mask].transpose(1, 2)  # [B, S, C]
    return target_mask, similarity.argmax(dim=-1)


def merge_into_contextual_tokens(
    rest_tokens: torch.Tensor, rest_keys: torch.Tensor, contextual_tokens: int
) -> torch.Tensor:
    """VisionZip's contextual merge of the tokens that were not kept.

    Each contextual token is `target + mean(members)` (a member-less target stays itself), with targets and
    members from `contextual_targets_and_owners`.

    Args:
        rest_tokens: `[B, R, D]`, the not-kept tokens in raster order.
        rest_keys: `[B, R, d]`, their head-mean keys (the similarity metric).
        contextual_tokens: `C`, with `0 <= C <= R`.

    Returns:
        `[B, C, D]` fp32 contextual tokens, in target order.
    """
    batch, remaining, width = rest_tokens.shape
    if contextual_tokens == 0:
        return rest_tokens.new_zeros(batch, 0, width, dtype=torch.float32)
    target_mask, owner = contextual_targets_and_owners(rest_keys.to(rest_tokens.device), contextual_tokens)
    tokens = rest_tokens.float()
    member_sum = tokens.new_zeros(batch, contextual_tokens, width)
    member_sum.scatter_add_(1, owner.unsqueeze(-1).expand(-1, -1, width), tokens[:, ~target_mask])
    member_count = tokens.new_zeros(batch, contextual_tokens).scatter_add_(1, owner, tokens.new_ones(owner.shape))
    return tokens[:, target_mask] + member_sum / member_count.clamp(min=1).unsqueeze(-1)


# Whole methods ---------------------------------------------------------------------------------------


def dominant_keep_mask(cls_attention: torch.Tensor, dominant_tokens: int) -> torch.Tensor:
    """VisionZip's dominant selection as a `[B, N]` bool mask: CLS (index 0, counted in the budget) plus the
    `dominant_tokens - 1` patches with the largest CLS attention."""
    batch, tokens = cls_attention.shape
    keep_mask = torch.zeros(batch, tokens, dtype=torch.bool, device=cls_attention.device)
    keep_mask[:, 0] = True  # CLS counts toward the dominant budget
    if dominant_tokens > 1:
        patch_indices = cls_attention[:, 1:].topk(dominant_tokens - 1, dim=-1).indices + 1
        keep_mask.scatter_(1, patch_indices, True)
    return keep_mask


def visionzip_assignment(
    cls_attention: torch.Tensor, mean_keys: torch.Tensor, dominant_tokens: int, contextual_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which token goes where in `visionzip_reduce`, without computing the tokens (for pictures and analysis).

    Args: as `visionzip_reduce` (no hidden states needed).

    Returns:
        `kept`: `[B, dominant_tokens]` ascending sequence positions of CLS and the dominant patches.
        `rest`: `[B, R]` ascending positions of the other tokens.
        `group`: `[B, R]` long, for each `rest` token the contextual token (`0..C-1`, target order) it is
            merged into (a target belongs to its own group); all `-1` when `contextual_tokens == 0`.
    """
    kept, rest = split_kept_and_rest(dominant_keep_mask(cls_attention, dominant_tokens))
    group = torch.full(rest.shape, -1, dtype=torch.long, device=rest.device)
    if contextual_tokens > 0:
        target_mask, owner = contextual_targets_and_owners(gather_tokens(mean_keys.to(rest.device), rest), contextual_tokens)
        group[:, target_mask] = torch.arange(contextual_tokens, device=rest.device)
        group[:, ~target_mask] = owner
    return kept, rest, group


def visionzip_reduce(
    hidden_states: torch.Tensor,
    cls_attention: torch.Tensor,
    mean_keys: torch.Tensor,
    dominant_tokens: int,
    contextual_tokens: int,
) -> torch.Tensor:
    """VisionZip on a batch of images from one vision layer.

    Keeps CLS plus the `dominant_tokens - 1` patches the CLS token attends to most (raster order), then
    appends `contextual_tokens` merged tokens (see `merge_into_contextual_tokens`).

    Args:
        hidden_states: `[B, N, D]`, the layer's output, CLS at index 0.
        cls_attention: `[B, N]`, CLS-row attention summed over heads (`cls_attention_scores`).
        mean_keys: `[B, N, d]`, head-mean keys of the same layer.
        dominant_tokens, contextual_tokens: the budget; `1 <= dominant`, `0 <= contextual`,
            `dominant + contextual <= N` (checked by the caller before the vision tower runs).

    Returns:
        `[B, dominant_tokens + contextual_tokens, D]` in `hidden_states.dtype`: CLS, dominant patches,
        contextual tokens.
    """
    device = hidden_states.device
    kept, rest = split_kept_and_rest(dominant_keep_mask(cls_attention.to(device), dominant_tokens))
    dominant = gather_tokens(hidden_states, kept)
    contextual = merge_into_contextual_tokens(
        gather_tokens(hidden_states, rest), gather_tokens(mean_keys.to(device), rest), contextual_tokens
    )
    return torch.cat([dominant, contextual.to(hidden_states.dtype)], dim=1)


# TRIM ------------------------------------------------------------------------------------------------


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
    low = min_tokens or 0
    high = num_patches if max_tokens is None else min(max_tokens, num_patches)
    bounded = [min(max(count, low), high) for count in counts]
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
    """TRIM on a batch of images (see docs/trim.md §1-§5).

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
