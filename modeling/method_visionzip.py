"""VisionZip's computation as pure tensor functions (docs/visionzip.md): the CLS attention row of one vision
layer picks the dominant tokens, and the rest are merged into a few contextual tokens.

Every function takes and returns tensors and knows nothing about models, model families or configs, so each is
checked on its own against an independent reference. The model side of the method (which vision states it reads,
the budget checks) is `method_visionzip_model.py`.

Shapes: `B` images (or crops), `N` vision tokens per image (CLS at index 0), `D` vision width, `H` attention heads
of width `d`.
"""

import torch
import torch.nn.functional as F

from .token_selection import gather_tokens, split_kept_and_rest


# Scorer ----------------------------------------------------------------------------------------------


def cls_attention_scores(
    queries: torch.Tensor, keys: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
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


# The whole method ------------------------------------------------------------------------------------


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
        rest_keys = gather_tokens(mean_keys.to(rest.device), rest)
        target_mask, owner = contextual_targets_and_owners(rest_keys, contextual_tokens)
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


