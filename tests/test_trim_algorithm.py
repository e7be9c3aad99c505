"""TRIM's tensor functions against the independent reference of `trim_reference.py` (ALGORITHMS.md §2)."""

import numpy as np
import pytest
import torch

from llava_token_reduction.modeling.method_trim import (
    bound_token_counts,
    select_with_mean_token,
    trim_reduce,
    trim_similarity_scores,
)
from llava_token_reduction.modeling.token_selection import iqr_outlier_counts
from trim_reference import reference_trim


def random_inputs(batch=3, patches=64, width=8, embed=16, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    P = torch.randn(batch, patches, width, generator=generator)
    Z = torch.randn(batch, patches, embed, generator=generator) * scale
    t = torch.randn(batch, embed, generator=generator) * scale
    return P, Z, t


def assert_matches_reference(P, Z, t, **options):
    names = {"negate": "negate_similarity", "multiplier": "iqr_multiplier", "coupled": "batch_coupled",
             "low": "min_tokens", "high": "max_tokens", "mean_token": "append_mean_token"}
    tokens, kept, scores = trim_reduce(P, Z, t, **{names[k]: v for k, v in options.items()})
    ref_tokens, ref_kept, ref_scores = reference_trim(P.numpy(), Z.numpy(), t.numpy(), **options)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-5, atol=1e-7)
    assert [k.tolist() for k in kept] == ref_kept
    for mine, ref in zip(tokens, ref_tokens):
        assert mine.dtype == torch.float32
        np.testing.assert_allclose(mine.numpy(), ref, rtol=1e-5, atol=1e-5)
    return tokens, kept


@pytest.mark.parametrize("negate", [True, False])
@pytest.mark.parametrize("coupled", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(negate, coupled, seed):
    P, Z, t = random_inputs(seed=seed, scale=0.6 + 0.3 * seed)
    tokens, kept = assert_matches_reference(P, Z, t, negate=negate, coupled=coupled)
    assert any(len(k) > 0 for k in kept)  # the case is not degenerate
    if coupled:
        assert len({len(k) for k in kept}) == 1  # one shared count


@pytest.mark.parametrize("options", [
    {"low": 5}, {"high": 3}, {"low": 2, "high": 2}, {"multiplier": 0.0}, {"multiplier": 3.0},
    {"mean_token": False}, {"coupled": True, "high": 4}, {"low": 64}, {"negate": False, "low": 10, "high": 20},
])
def test_matches_reference_with_options(options):
    P, Z, t = random_inputs(seed=5)
    assert_matches_reference(P, Z, t, **options)


def test_non_square_and_other_sizes_match_reference():
    P, Z, t = random_inputs(batch=2, patches=49, width=5, embed=7, seed=3)
    assert_matches_reference(P, Z, t)
    assert_matches_reference(P, Z, t, coupled=True)


def test_batch_equals_single_images_when_not_coupled():
    P, Z, t = random_inputs(batch=4, seed=7)
    batch_tokens, batch_kept, _ = trim_reduce(P, Z, t)
    for i in range(4):
        tokens, kept, _ = trim_reduce(P[i : i + 1], Z[i : i + 1], t[i : i + 1])
        assert torch.equal(kept[0], batch_kept[i])
        torch.testing.assert_close(tokens[0], batch_tokens[i], rtol=0, atol=0)


def test_batch_coupled_pools_the_quartiles():
    # Image 0 is peaked (many outliers), images 1-3 are flat-ish: pooled, one shared count
    P, Z, t = random_inputs(batch=4, seed=9)
    Z[1:] *= 0.01
    per_image = iqr_outlier_counts(trim_similarity_scores(Z, t), batch_coupled=False)
    pooled = iqr_outlier_counts(trim_similarity_scores(Z, t), batch_coupled=True)
    assert len(set(pooled)) == 1 and len(set(per_image)) > 1
    scores = trim_similarity_scores(Z, t).numpy().reshape(-1)
    q1, q3 = np.percentile(scores, [25, 75])
    assert pooled[0] == int(64 * int((scores > q3 + 1.5 * (q3 - q1)).sum()) / scores.size)


def test_quantiles_are_numpy_linear():
    values = torch.tensor([[0.1, 0.4, 0.2, 0.9, 0.3, 0.35, 5.0]])
    q1, q3 = np.percentile(values.numpy()[0], [25, 75])
    fence = q3 + 1.5 * (q3 - q1)
    assert iqr_outlier_counts(values) == [int((values.numpy()[0] > fence).sum())] == [1]


def test_strict_fence_and_no_lower_fence():
    # The upper fence equals the largest value exactly: strict ">" keeps nothing; tiny values never count.
    values = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0]])  # Q1 = Q3 = 1, fence = 1
    assert iqr_outlier_counts(values) == [0]


def test_k_zero_yields_only_the_mean_of_all_patches():
    P, Z, _ = random_inputs(batch=2, seed=4)
    t = torch.zeros(2, 16)  # every logit 0: flat scores, nothing above the fence
    tokens, kept, _ = trim_reduce(P, Z, t)
    for i in range(2):
        assert kept[i].numel() == 0 and tokens[i].shape == (1, 8)
        torch.testing.assert_close(tokens[i][0], P[i].mean(0))


def test_k_zero_without_mean_token_keeps_one_patch():
    P, Z, _ = random_inputs(batch=2, seed=4)
    tokens, kept, _ = trim_reduce(P, Z, torch.zeros(2, 16), append_mean_token=False)
    for i in range(2):
        assert tokens[i].shape == (1, 8) and kept[i].numel() == 1
        torch.testing.assert_close(tokens[i][0], P[i, kept[i][0]])


def test_k_all_patches_keeps_everything_in_order_and_no_mean_token():
    P, Z, t = random_inputs(batch=2, seed=6)
    tokens, kept, _ = trim_reduce(P, Z, t, min_tokens=64)
    for i in range(2):
        assert kept[i].tolist() == list(range(64))
        torch.testing.assert_close(tokens[i], P[i])


def test_every_image_yields_between_one_and_all_patches_never_nan():
    for seed in range(6):
        P, Z, t = random_inputs(batch=2, seed=seed, scale=seed)  # scale 0: flat scores
        for mean_token in (True, False):
            tokens, _, _ = trim_reduce(P, Z, t, append_mean_token=mean_token)
            for token_set in tokens:
                assert 1 <= len(token_set) <= 64 and torch.isfinite(token_set).all()


def test_bounds():
    assert bound_token_counts([0, 3, 40, 64], 64, min_tokens=2, max_tokens=10) == [2, 3, 10, 10]
    assert bound_token_counts([0, 5], 64) == [0, 5]
    assert bound_token_counts([0, 5], 64, append_mean_token=False) == [1, 5]
    assert bound_token_counts([7], 64, max_tokens=100) == [7]


def test_selection_order_is_raster_and_ties_deterministic():
    P = torch.arange(6 * 2, dtype=torch.float32).view(1, 6, 2)
    scores = torch.tensor([[0.1, 0.5, 0.1, 0.9, 0.2, 0.5]])
    tokens, kept = select_with_mean_token(P, scores, [3])
    assert kept[0].tolist() == [1, 3, 5]
    torch.testing.assert_close(tokens[0][-1], P[0, [0, 2, 4]].mean(0))


def test_scores_are_fp32_softmax_even_for_half_inputs():
    _, Z, t = random_inputs(seed=2)
    scores = trim_similarity_scores(Z.bfloat16(), t.bfloat16())
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores.sum(-1), torch.ones(3))
    plain = trim_similarity_scores(Z, t, negate=False)
    torch.testing.assert_close(plain, (Z @ t.unsqueeze(-1)).squeeze(-1).softmax(-1))


def test_kept_and_mean_tokens_carry_gradient():
    P, Z, t = random_inputs(batch=1, seed=1)
    P.requires_grad_(True)
    tokens, kept, _ = trim_reduce(P, Z, t)
    tokens[0].sum().backward()
    grad = P.grad[0, :, 0]
    assert len(kept[0]) > 0
    assert torch.all(grad[kept[0]] == 1)  # kept rows: identity
    unselected = torch.ones(64, dtype=torch.bool)
    unselected[kept[0]] = False
    torch.testing.assert_close(grad[unselected], torch.full((int(unselected.sum()),), 1 / float(unselected.sum())))
