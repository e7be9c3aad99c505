"""Unit tests of VisionZip's pure tensor functions (`modeling/token_reduction.py`) on hand-made tensors.

The expected values are worked out by hand from ALGORITHMS.md §1.2, so each test pins one rule of the
definition (CLS kept, raster order, stride targets, first-max owner, `target + mean(members)`, ...).
"""

import math

import pytest
import torch

from llava_token_reduction.modeling.method_visionzip import (
    cls_attention_scores,
    contextual_target_positions,
    merge_into_contextual_tokens,
    visionzip_reduce,
)
from llava_token_reduction.modeling.token_selection import gather_tokens, split_kept_and_rest, top_k_in_raster_order


def _tokens(rows: int, width: int = 3, batch: int = 1) -> torch.Tensor:
    """Token `i` of image `b` is `[100*b + 10*i, 100*b + 10*i + 1, ...]`: every row is recognisable."""
    base = torch.arange(batch).view(batch, 1, 1) * 100.0 + torch.arange(rows).view(1, rows, 1) * 10.0
    return base + torch.arange(width).view(1, 1, width)


# cls_attention_scores ---------------------------------------------------------------------------------


def test_cls_attention_scores_matches_per_head_softmax_loops():
    generator = torch.Generator().manual_seed(0)
    batch, tokens, heads, head_dim = 2, 7, 3, 4
    queries = torch.randn(batch, tokens, heads * head_dim, generator=generator)
    keys = torch.randn(batch, tokens, heads * head_dim, generator=generator)

    cls_attention, mean_keys = cls_attention_scores(queries, keys, num_heads=heads)

    assert cls_attention.shape == (batch, tokens) and cls_attention.dtype == torch.float32
    assert mean_keys.shape == (batch, tokens, head_dim) and mean_keys.dtype == torch.float32
    for b in range(batch):
        expected_scores = [0.0] * tokens
        expected_keys = torch.zeros(tokens, head_dim)
        for h in range(heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            q = queries[b, 0, cols]
            logits = [float(q @ keys[b, j, cols]) / math.sqrt(head_dim) for j in range(tokens)]
            top = max(logits)
            exps = [math.exp(v - top) for v in logits]
            for j in range(tokens):
                expected_scores[j] += exps[j] / sum(exps)
            expected_keys += keys[b, :, cols] / heads
        torch.testing.assert_close(cls_attention[b], torch.tensor(expected_scores), atol=1e-6, rtol=0)
        torch.testing.assert_close(mean_keys[b], expected_keys, atol=1e-6, rtol=0)
    # Summed over heads, each head's probabilities add up to 1.
    torch.testing.assert_close(cls_attention.sum(-1), torch.full((batch,), float(heads)))


def test_cls_attention_scores_uses_only_the_cls_query():
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(1, 5, 8, generator=generator)
    keys = torch.randn(1, 5, 8, generator=generator)
    changed = queries.clone()
    changed[:, 1:] = 1e3  # other queries are irrelevant to the CLS row
    first, _ = cls_attention_scores(queries, keys, num_heads=2)
    second, _ = cls_attention_scores(changed, keys, num_heads=2)
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_cls_attention_scores_runs_in_fp32_for_half_inputs():
    generator = torch.Generator().manual_seed(2)
    queries = torch.randn(1, 6, 8, generator=generator)
    keys = torch.randn(1, 6, 8, generator=generator)
    half_scores, half_keys = cls_attention_scores(queries.bfloat16(), keys.bfloat16(), num_heads=2)
    assert half_scores.dtype == torch.float32 and half_keys.dtype == torch.float32
    full_scores, _ = cls_attention_scores(queries.bfloat16().float(), keys.bfloat16().float(), num_heads=2)
    torch.testing.assert_close(half_scores, full_scores, atol=1e-6, rtol=0)


# Selection helpers ------------------------------------------------------------------------------------


def test_top_k_in_raster_order_returns_ascending_indices():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.05], [5.0, 1.0, 4.0, 2.0, 3.0]])
    assert top_k_in_raster_order(scores, 3).tolist() == [[1, 2, 3], [0, 2, 4]]


def test_split_kept_and_rest_gives_ascending_complements():
    mask = torch.tensor([[True, False, True, False, False], [False, True, False, False, True]])
    kept, rest = split_kept_and_rest(mask)
    assert kept.tolist() == [[0, 2], [1, 4]]
    assert rest.tolist() == [[1, 3, 4], [0, 2, 3]]


def test_gather_tokens_picks_rows_per_image_and_is_differentiable():
    tokens = _tokens(4, batch=2).requires_grad_(True)
    picked = gather_tokens(tokens, torch.tensor([[3, 0], [1, 2]]))
    torch.testing.assert_close(picked[0], tokens[0, [3, 0]])
    torch.testing.assert_close(picked[1], tokens[1, [1, 2]])
    picked.sum().backward()
    assert tokens.grad[0, :, 0].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert tokens.grad[1, :, 0].tolist() == [0.0, 1.0, 1.0, 0.0]


# merge_into_contextual_tokens -------------------------------------------------------------------------


def test_merge_is_target_plus_mean_of_members_with_stride_targets_and_tail():
    # R = 7, C = 2: step = 3, targets at list positions 0 and 3; sources 1, 2, 4, 5, 6.
    # Keys: the two targets point along e0 and e1. Sources 1, 5 lean to target 0, sources 2, 4, 6 to target 3
    # (6 is the tail after the last target and must still be assigned).
    keys = torch.tensor(
        [[1.0, 0.0], [2.0, 0.1], [0.1, 3.0], [0.0, 1.0], [0.2, 0.5], [0.7, 0.1], [0.0, 9.0]]
    ).unsqueeze(0)
    tokens = _tokens(7)
    merged = merge_into_contextual_tokens(tokens, keys, contextual_tokens=2)
    assert merged.shape == (1, 2, 3) and merged.dtype == torch.float32
    expected_0 = tokens[0, 0] + (tokens[0, 1] + tokens[0, 5]) / 2
    expected_1 = tokens[0, 3] + (tokens[0, 2] + tokens[0, 4] + tokens[0, 6]) / 3
    torch.testing.assert_close(merged[0], torch.stack([expected_0, expected_1]))


def test_merge_targets_use_floor_stride_and_only_the_first_c_positions():
    # R = 10, C = 3: step = 3 -> targets at 0, 3, 6 (not 9). Keys make every source its own direction except
    # that each leans to exactly one target, so the targets' identities show in the output.
    tokens = _tokens(10)
    keys = torch.zeros(1, 10, 3)
    keys[0, [0, 3, 6], [0, 1, 2]] = 1.0
    for source, target_axis in {1: 0, 2: 0, 4: 1, 5: 1, 7: 2, 8: 2, 9: 2}.items():
        keys[0, source, target_axis] = 1.0
        keys[0, source, (target_axis + 1) % 3] = 0.1
    merged = merge_into_contextual_tokens(tokens, keys, contextual_tokens=3)
    expected = torch.stack(
        [
            tokens[0, 0] + tokens[0, [1, 2]].mean(0),
            tokens[0, 3] + tokens[0, [4, 5]].mean(0),
            tokens[0, 6] + tokens[0, [7, 8, 9]].mean(0),
        ]
    )
    torch.testing.assert_close(merged[0], expected)


def test_merge_uses_cosine_not_dot_product():
    # R = 3, C = 2: step 1, targets at positions 0 and 1, source 2. Source 2 is closer in angle to target 1
    # (cosine 0.994 vs 0.707) but a raw dot product would prefer target 0 (10 vs 9).
    keys = torch.tensor([[10.0, 0.0], [5.0, 4.0], [1.0, 1.0]]).unsqueeze(0)
    tokens = _tokens(3)
    merged = merge_into_contextual_tokens(tokens, keys, contextual_tokens=2)
    torch.testing.assert_close(merged[0], torch.stack([tokens[0, 0], tokens[0, 1] + tokens[0, 2]]))


def test_merge_tie_goes_to_the_first_target():
    # R = 4, C = 2: targets 0 and 2. Source 1 is exactly equally similar to both; source 3 too.
    keys = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [2.0, 2.0]]).unsqueeze(0)
    tokens = _tokens(4)
    merged = merge_into_contextual_tokens(tokens, keys, contextual_tokens=2)
    torch.testing.assert_close(
        merged[0], torch.stack([tokens[0, 0] + (tokens[0, 1] + tokens[0, 3]) / 2, tokens[0, 2]])
    )


def test_memberless_target_stays_itself():
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [0.8, 0.0]]).unsqueeze(0)  # targets 0, 2
    tokens = _tokens(4)
    merged = merge_into_contextual_tokens(tokens, keys, contextual_tokens=2)
    torch.testing.assert_close(merged[0, 1], tokens[0, 2])
    torch.testing.assert_close(merged[0, 0], tokens[0, 0] + (tokens[0, 1] + tokens[0, 3]) / 2)


def test_merge_with_as_many_targets_as_tokens_returns_them_unchanged():
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randn(2, 5, 4, generator=generator)
    keys = torch.randn(2, 5, 3, generator=generator)
    merged = merge_into_contextual_tokens(tokens, keys, contextual_tokens=5)
    torch.testing.assert_close(merged, tokens, atol=0, rtol=0)


def test_merge_with_zero_contextual_tokens_is_empty():
    merged = merge_into_contextual_tokens(_tokens(4, batch=2), torch.ones(2, 4, 2), contextual_tokens=0)
    assert merged.shape == (2, 0, 3)


def test_zero_keys_give_no_nan():
    tokens = _tokens(5)
    keys = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]).unsqueeze(0)
    # targets 0 and 2 (step 2); source 1 and 3 have zero keys (similarity 0 to both -> first target),
    # source 4 is closer to target 2 (target 0's zero key has similarity 0 with everything).
    merged = merge_into_contextual_tokens(tokens, keys, contextual_tokens=2)
    assert torch.isfinite(merged).all()
    expected = torch.stack([tokens[0, 0] + (tokens[0, 1] + tokens[0, 3]) / 2, tokens[0, 2] + tokens[0, 4]])
    torch.testing.assert_close(merged[0], expected)


def test_merge_batch_rows_are_independent():
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randn(3, 9, 4, generator=generator)
    keys = torch.randn(3, 9, 5, generator=generator)
    batched = merge_into_contextual_tokens(tokens, keys, contextual_tokens=3)
    for b in range(3):
        single = merge_into_contextual_tokens(tokens[b : b + 1], keys[b : b + 1], contextual_tokens=3)
        torch.testing.assert_close(batched[b : b + 1], single, atol=0, rtol=0)


# visionzip_reduce -------------------------------------------------------------------------------------


def test_reduce_keeps_cls_then_dominant_patches_in_raster_order_then_contextual():
    tokens = _tokens(8)
    # CLS has the lowest score and is still kept; patches 6, 2, 4 score highest (in that order).
    cls_attention = torch.tensor([[0.0, 0.1, 0.8, 0.2, 0.7, 0.15, 0.9, 0.05]])
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0], [9.0, 9.0], [1.0, 0.0], [9.0, 9.0], [0.0, 1.0], [9, 9], [0.1, 1.0]])
    reduced = visionzip_reduce(tokens, cls_attention, keys.unsqueeze(0), dominant_tokens=4, contextual_tokens=2)
    # keep = 0, 2, 4, 6; rest = 1, 3, 5, 7 (R=4, step 2): targets = rest[0]=1 and rest[2]=5,
    # sources 3 (-> target 1, same key) and 7 (-> target 5, nearer [0, 1]).
    expected = torch.stack(
        [tokens[0, 0], tokens[0, 2], tokens[0, 4], tokens[0, 6],
         tokens[0, 1] + tokens[0, 3], tokens[0, 5] + tokens[0, 7]]
    )
    assert reduced.shape == (1, 6, 3)
    torch.testing.assert_close(reduced[0], expected)


def test_reduce_ignores_the_cls_score_when_ranking_patches():
    tokens = _tokens(5)
    cls_attention = torch.tensor([[100.0, 0.1, 0.4, 0.3, 0.2]])  # CLS' own score must not take a patch slot
    reduced = visionzip_reduce(tokens, cls_attention, torch.ones(1, 5, 2), dominant_tokens=3, contextual_tokens=0)
    torch.testing.assert_close(reduced[0], tokens[0, [0, 2, 3]])


def test_reduce_cls_only_and_all_tokens():
    tokens = _tokens(6, batch=2)
    scores = torch.rand(2, 6, generator=torch.Generator().manual_seed(5))
    keys = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(6))
    cls_only = visionzip_reduce(tokens, scores, keys, dominant_tokens=1, contextual_tokens=0)
    torch.testing.assert_close(cls_only, tokens[:, :1], atol=0, rtol=0)
    everything = visionzip_reduce(tokens, scores, keys, dominant_tokens=6, contextual_tokens=0)
    torch.testing.assert_close(everything, tokens, atol=0, rtol=0)
    # CLS only + everything else as contextual tokens (R == C): the rest, unchanged, in raster order.
    all_contextual = visionzip_reduce(tokens, scores, keys, dominant_tokens=1, contextual_tokens=5)
    torch.testing.assert_close(all_contextual, tokens, atol=0, rtol=0)


def test_reduce_keeps_the_input_dtype_and_gradients():
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randn(2, 9, 4, generator=generator)
    scores = torch.rand(2, 9, generator=generator)
    keys = torch.randn(2, 9, 3, generator=generator)
    half = visionzip_reduce(tokens.bfloat16(), scores, keys, dominant_tokens=4, contextual_tokens=2)
    assert half.dtype == torch.bfloat16 and half.shape == (2, 6, 4)

    leaf = tokens.clone().requires_grad_(True)
    reduced = visionzip_reduce(leaf, scores, keys, dominant_tokens=4, contextual_tokens=2)
    reduced.sum().backward()
    # Every token reaches the output (kept, target or member), so every token gets a gradient.
    assert leaf.grad is not None and (leaf.grad != 0).all()


def test_reduce_batch_rows_equal_single_images():
    generator = torch.Generator().manual_seed(8)
    tokens = torch.randn(3, 12, 4, generator=generator)
    scores = torch.rand(3, 12, generator=generator)
    keys = torch.randn(3, 12, 3, generator=generator)
    batched = visionzip_reduce(tokens, scores, keys, dominant_tokens=5, contextual_tokens=3)
    for b in range(3):
        single = visionzip_reduce(tokens[b : b + 1], scores[b : b + 1], keys[b : b + 1], 5, 3)
        torch.testing.assert_close(batched[b : b + 1], single, atol=0, rtol=0)


@pytest.mark.parametrize("dominant, contextual", [(54, 10), (108, 20), (162, 30)])
def test_published_budgets_on_576_patches_have_the_documented_stride(dominant, contextual):
    # ALGORITHMS.md §1.3: with N = 577, R = 577 - dominant, step = R // contextual. Keys make every rest
    # token its own orthogonal-ish direction except sources, which copy the key of the nearest preceding
    # target, so each contextual token's membership reveals the stride.
    tokens_count = 577
    rest_count = tokens_count - dominant
    step = rest_count // contextual
    targets = [i * step for i in range(contextual)]
    rest_tokens = torch.arange(rest_count, dtype=torch.float32).view(1, rest_count, 1)
    directions = torch.eye(contextual)
    owner = [max(t for t in range(contextual) if targets[t] <= i) for i in range(rest_count)]
    rest_keys = directions[owner].unsqueeze(0)
    merged = merge_into_contextual_tokens(rest_tokens, rest_keys, contextual)
    for t in range(contextual):
        members = [i for i in range(rest_count) if owner[i] == t and i != targets[t]]
        expected = targets[t] + sum(members) / len(members)
        assert merged[0, t, 0].item() == pytest.approx(expected)


@pytest.mark.parametrize("remaining, contextual, step, last",
                         [(523, 10, 52, 468), (469, 20, 23, 437), (415, 30, 13, 377)])
def test_target_positions_match_the_published_budget_table(remaining, contextual, step, last):
    positions = contextual_target_positions(remaining, contextual).tolist()
    assert positions == list(range(0, last + 1, step)) and len(positions) == contextual
