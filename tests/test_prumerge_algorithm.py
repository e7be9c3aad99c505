"""PruMerge / PruMerge+ against the independent reference of `prumerge_reference.py` (ALGORITHMS.md §3), through
the model's `get_image_features` (sdpa tower) and through the tensor functions."""

import numpy as np
import pytest
import torch

from llava_token_reduction.modeling.method_prumerge import (
    MERGE_NEIGHBOURS,
    plus_sample_positions,
    prumerge_kept_indices,
    prumerge_merge,
)
from llava_token_reduction.modeling.vision_inputs import run_vision_tower
from llava_token_reduction.tiny import build_method_model
from prumerge_reference import last_layer_inputs, reference_prumerge


@pytest.fixture(scope="module")
def peaked_model(spread_vision_weights):
    """A random PruMerge model whose vision tower's CLS attention is peaked (some patches are outliers)."""
    model = build_method_model("prumerge", seed=0)
    spread_vision_weights(model.model.vision_tower, seed=3, qk_gain=6.0)
    return model


def _pixels(batch, seed=0):
    return torch.randn(batch, 3, 56, 56, generator=torch.Generator().manual_seed(seed))


def _features(model, pixel_values, **fields):
    previous = {name: getattr(model.config, name) for name in fields}
    for name, value in fields.items():
        setattr(model.config, name, value)
    try:
        with torch.no_grad():
            return model.model.get_image_features(pixel_values=pixel_values)
    finally:
        for name, value in previous.items():
            setattr(model.config, name, value)


def _unprojected_tokens(model, pixel_values, **fields):
    """The model's reduced tokens before the projector, through the seam the family's `get_image_features` calls
    (the tower under sdpa, then the method's `reduce_crops`)."""
    previous = {name: getattr(model.config, name) for name in fields}
    for name, value in fields.items():
        setattr(model.config, name, value)
    try:
        with torch.no_grad():
            _, states = run_vision_tower(model.model.vision_tower, pixel_values, model.model.vision_states_needed())
            return model.model.reduce_crops(states, torch.arange(len(pixel_values)), {}).tokens
    finally:
        for name, value in previous.items():
            setattr(model.config, name, value)


FIELD_SETS = [
    {},
    {"prumerge_plus": True},
    {"prumerge_batch_coupled": True},
    {"prumerge_plus": True, "prumerge_batch_coupled": True},
    {"prumerge_iqr_multiplier": 0.5, "prumerge_max_tokens": 5},
    {"prumerge_plus": True, "prumerge_min_tokens": 30},
    {"prumerge_iqr_multiplier": 50.0},  # no outliers: the extra token alone (PruMerge+: plus patch 0)
    {"prumerge_plus": True, "prumerge_iqr_multiplier": 50.0},
    {"prumerge_min_tokens": 64},  # every patch kept: no extra token
]


@pytest.mark.parametrize("fields", FIELD_SETS,
                         ids=lambda f: ",".join(f"{k[9:]}={v}" for k, v in f.items()) or "default")
def test_image_features_match_the_reference(peaked_model, fields):
    pixel_values = _pixels(4)
    output = _features(peaked_model, pixel_values, **fields)
    last_input, features, params = last_layer_inputs(peaked_model, pixel_values)
    options = dict(plus=fields.get("prumerge_plus", False), multiplier=fields.get("prumerge_iqr_multiplier", 1.5),
                   coupled=fields.get("prumerge_batch_coupled", False), low=fields.get("prumerge_min_tokens"),
                   high=fields.get("prumerge_max_tokens"))
    reference = reference_prumerge(last_input, features, params, **options)
    unprojected = _unprojected_tokens(peaked_model, pixel_values, **fields)
    projector = peaked_model.model.multi_modal_projector
    for image, (tokens, kept, scores) in enumerate(reference):
        ours = output.kept_indices[image].tolist()
        np.testing.assert_allclose(output.scores[image].numpy(), scores, rtol=1e-5, atol=1e-7)
        assert sorted(ours) == sorted(kept)
        # Same order, except where two attentions are equal to fp32 precision (the tail of "keep everything").
        for position, (mine, theirs) in enumerate(zip(ours, kept)):
            assert mine == theirs or abs(scores[mine] - scores[theirs]) < 1e-7, (position, mine, theirs)
        rows = [kept.index(index) for index in ours] + ([len(kept)] if len(tokens) > len(kept) else [])
        tokens = tokens[rows]
        np.testing.assert_allclose(unprojected[image].numpy(), tokens, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            expected = projector(torch.from_numpy(tokens).float())
        # Projected: the projector's two layers scale the 1e-5 of the tokens up to ~1e-4 (outputs up to ~10).
        np.testing.assert_allclose(output.pooler_output[image].numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    if fields in ({}, {"prumerge_plus": True}):  # the peaked tower has outliers, so the test selects something
        assert all(0 < count < 64 for count in output.outlier_counts)


def test_unprojected_tokens_match_the_reference_to_1e_5(peaked_model):
    pixel_values = _pixels(3, seed=5)
    last_input, features, params = last_layer_inputs(peaked_model, pixel_values)
    for plus in (False, True):
        reference = reference_prumerge(last_input, features, params, plus=plus)
        x = torch.from_numpy(features[:, 1:]).float()
        with torch.no_grad():
            layer = peaked_model.model.vision_tower.encoder.layers[-1]
            keys = layer.self_attn.k_proj(layer.layer_norm1(torch.from_numpy(last_input).float()))[:, 1:]
        for image, (tokens, kept, scores) in enumerate(reference):
            ours = prumerge_merge(x[image], keys[image], torch.from_numpy(scores).float(), torch.tensor(kept))
            np.testing.assert_allclose(ours.numpy(), tokens, rtol=1e-5, atol=1e-5)


def test_batch_equals_each_image_alone_unless_coupled(peaked_model):
    pixel_values = _pixels(4, seed=2)
    for plus in (False, True):
        batch = _features(peaked_model, pixel_values, prumerge_plus=plus)
        for image in range(4):
            alone = _features(peaked_model, pixel_values[image : image + 1], prumerge_plus=plus)
            assert batch.kept_indices[image].tolist() == alone.kept_indices[0].tolist()
            # sdpa picks other kernels for another batch size: ~1e-6 in the tower, ~1e-5 after the projector.
            torch.testing.assert_close(batch.pooler_output[image], alone.pooler_output[0], rtol=1e-4, atol=1e-4)
    coupled = _features(peaked_model, pixel_values, prumerge_batch_coupled=True)
    assert len(set(coupled.outlier_counts)) == 1  # one shared count
    alone_counts = [_features(peaked_model, pixel_values[i : i + 1]).outlier_counts[0] for i in range(4)]
    assert coupled.outlier_counts != alone_counts or len(set(alone_counts)) == 1


def test_plus_sample_generalises_the_released_rule():
    # Released, 576 patches: positions 0, s, 2s, ... below 575 with s = int(int(1 / ratio) / 3).
    assert plus_sample_positions(32, 576) == list(range(0, 575, int(int(576 / 32) / 3)))
    assert plus_sample_positions(32, 576)[-1] < 575
    assert plus_sample_positions(0, 576) == [0]  # ratio 0: the released code divides by zero
    assert plus_sample_positions(300, 576) == list(range(575))  # stride 0 in the released code: at least 1
    assert plus_sample_positions(4, 64) == list(range(0, 63, 5))  # the actual patch count, not 575


def test_kept_order_is_descending_attention_then_samples():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.05, 0.3, 0.6, 0.01, 0.02]])
    assert prumerge_kept_indices(scores, [3])[0].tolist() == [3, 6, 1]
    plus = prumerge_kept_indices(scores, [1], plus=True)[0].tolist()
    assert plus == [3] + [p for p in range(0, 8, int(int(9 / 1) / 3)) if p != 3]


def test_merge_uses_32_neighbours_and_raw_weights():
    generator = torch.Generator().manual_seed(0)
    x, keys = torch.randn(100, 6, generator=generator), torch.randn(100, 6, generator=generator)
    a = torch.rand(100, generator=generator)
    out = prumerge_merge(x, keys, a, torch.tensor([7]))
    unit = keys / keys.norm(dim=-1, keepdim=True)
    similarity = unit @ unit[7]
    similarity[7] = -2
    nearest = similarity.argsort(descending=True)[:MERGE_NEIGHBOURS]
    torch.testing.assert_close(out[0], x[7] + (a[nearest, None] * x[nearest]).sum(0))
    rest = torch.ones(100, dtype=torch.bool)
    rest[7] = False
    torch.testing.assert_close(out[1], (a[rest, None] * x[rest]).sum(0))  # not renormalised


def test_tokens_carry_gradient_and_no_nan(peaked_model):
    pixel_values = _pixels(2).requires_grad_(True)
    output = peaked_model.model.get_image_features(pixel_values=pixel_values)
    assert all(torch.isfinite(tokens).all() for tokens in output.pooler_output)
    sum(tokens.sum() for tokens in output.pooler_output).backward()
    assert pixel_values.grad is not None and pixel_values.grad.abs().sum() > 0


def test_needs_only_the_last_layers_input(peaked_model):
    # hs[-2] (the last layer's input, also the feature layer): the tower's last layer output is never read.
    assert peaked_model.model.vision_states_needed() == [3 - 1, 2]
