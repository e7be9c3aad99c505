"""Pure tensor functions of the visual-token reductions.

Every function here takes and returns tensors and knows nothing about models, hooks or configs, so each
can be checked against the definitions in the project's ALGORITHMS.md on its own. The pattern follows
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


def merge_into_contextual_tokens(
    rest_tokens: torch.Tensor, rest_keys: torch.Tensor, contextual_tokens: int
) -> torch.Tensor:
    """VisionZip's contextual merge of the tokens that were not kept.

    Targets are a 1-D stride over the remaining tokens (`step = max(1, R // C)`, first `C` positions);
    every other token joins the target whose normalised key is most similar (first maximum wins), and each
    contextual token is `target + mean(members)` (a member-less target stays itself).

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
    step = max(1, remaining // contextual_tokens)
    target_mask = torch.zeros(remaining, dtype=torch.bool, device=rest_tokens.device)
    target_mask[torch.arange(contextual_tokens, device=rest_tokens.device) * step] = True
    # The released code divides by the raw norm; a floor only matters for an all-zero key (NaN otherwise).
    unit_keys = F.normalize(rest_keys.float().to(rest_tokens.device), dim=-1, eps=1e-12)
    tokens = rest_tokens.float()
    similarity = unit_keys[:, ~target_mask] @ unit_keys[:, target_mask].transpose(1, 2)  # [B, S, C]
    owner = similarity.argmax(dim=-1)  # [B, S]
    member_sum = tokens.new_zeros(batch, contextual_tokens, width)
    member_sum.scatter_add_(1, owner.unsqueeze(-1).expand(-1, -1, width), tokens[:, ~target_mask])
    member_count = tokens.new_zeros(batch, contextual_tokens).scatter_add_(1, owner, tokens.new_ones(owner.shape))
    return tokens[:, target_mask] + member_sum / member_count.clamp(min=1).unsqueeze(-1)


# Whole methods ---------------------------------------------------------------------------------------


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
    batch, tokens, _ = hidden_states.shape
    device = hidden_states.device
    cls_attention = cls_attention.to(device)
    keep_mask = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    keep_mask[:, 0] = True  # CLS counts toward the dominant budget
    if dominant_tokens > 1:
        patch_indices = cls_attention[:, 1:].topk(dominant_tokens - 1, dim=-1).indices + 1
        keep_mask.scatter_(1, patch_indices, True)
    kept, rest = split_kept_and_rest(keep_mask)
    dominant = gather_tokens(hidden_states, kept)
    contextual = merge_into_contextual_tokens(
        gather_tokens(hidden_states, rest), gather_tokens(mean_keys.to(device), rest), contextual_tokens
    )
    return torch.cat([dominant, contextual.to(hidden_states.dtype)], dim=1)
