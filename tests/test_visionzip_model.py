"""VisionZip inside the model: parity with an independent reference, sdpa kept, outputs, checkpoints.

The reference (tests/visionzip_reference.py) is written from ALGORITHMS.md §1.2 with plain loops over one image at a
time. It takes its attention maps from an *eager* copy of the vision tower (`output_attentions=True`) and recomputes the
keys as `k_proj(layer_norm1(layer input))`; it calls nothing from the code under test.
"""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText
from transformers.models.clip.modeling_clip import CLIPAttention

from conftest import assert_ships_only
from llava_token_reduction import (
    LlavaVisionZipConfig,
    LlavaVisionZipForConditionalGeneration,
    LlavaVisionZipModel,
)
from visionzip_reference import eager_tower_outputs, reference_projection, reference_visionzip


# Parity ----------------------------------------------------------------------------------------------

# (dominant, contextual, visionzip_layer): tiny images have 64 patches + CLS = 65 tokens.
PARITY_CASES = [
    pytest.param(10, 4, -2, id="10+4"),
    pytest.param(20, 6, -2, id="20+6"),
    pytest.param(1, 0, -2, id="cls-only"),
    pytest.param(65, 0, -2, id="all-65"),
    pytest.param(12, 0, -2, id="dominant-only"),
    pytest.param(40, 25, -2, id="rest-equals-contextual"),
    pytest.param(1, 7, -2, id="cls-plus-contextual"),
    pytest.param(16, 5, -1, id="last-layer"),
    pytest.param(16, 5, 0, id="first-layer-positive-index"),
]


@pytest.mark.parametrize("dominant, contextual, layer", PARITY_CASES)
def test_image_features_match_reference(make_visionzip_model, make_pixel_values, dominant, contextual, layer):
    model = make_visionzip_model(
        dominant_tokens=dominant, contextual_tokens=contextual, visionzip_layer=layer, image_seq_length=65
    )
    pixel_values = make_pixel_values(batch=3, seed=11)
    tower, outputs = eager_tower_outputs(model, pixel_values)

    with torch.no_grad():
        batched = model.model.get_image_features(pixel_values=pixel_values)
        singles = [model.model.get_image_features(pixel_values=pixel_values[i : i + 1]) for i in range(3)]

    budget = dominant + contextual
    assert batched.last_hidden_state.shape == (3, budget, model.config.vision_config.hidden_size)
    for image in range(3):
        expected, margin = reference_visionzip(tower, outputs, image, layer, dominant, contextual)
        # Scores and similarities agree to ~1e-7 between implementations; a margin 100x larger rules out ties.
        assert margin > 1e-5, f"test data too close to a tie (margin {margin}); change the seed"
        torch.testing.assert_close(batched.last_hidden_state[image], expected, atol=1e-5, rtol=1e-5)
        # The projected features are the projector applied to exactly those tokens. Against the reference
        # the tolerance is 1e-5 relative to the output scale: the tiny projector amplifies the ~1e-6
        # eager-vs-sdpa rounding of the tower ~20-fold (outputs reach ~25).
        own_projection = reference_projection(model, batched.last_hidden_state[image])
        torch.testing.assert_close(batched.pooler_output[image], own_projection, atol=1e-6, rtol=1e-6)
        expected_projected = reference_projection(model, expected)
        scale = max(1.0, expected_projected.abs().max().item())
        torch.testing.assert_close(batched.pooler_output[image], expected_projected, atol=1e-5 * scale, rtol=1e-5)
        # Batch rows equal single-image results.
        torch.testing.assert_close(singles[image].last_hidden_state[0], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(singles[image].pooler_output[0], expected_projected, atol=1e-5 * scale, rtol=1e-5)


def test_smaller_images_use_their_actual_token_count(make_visionzip_model, make_pixel_values):
    # 28px with patch 7: 16 patches + CLS = 17 tokens (positions interpolated); budget 6+4 leaves R = 11.
    model = make_visionzip_model(dominant_tokens=6, contextual_tokens=4)
    pixel_values = make_pixel_values(batch=2, size=28, seed=12)
    tower, outputs = eager_tower_outputs(model, pixel_values, interpolate_pos_encoding=True)
    assert outputs.hidden_states[-1].shape[1] == 17
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values, interpolate_pos_encoding=True)
    for image in range(2):
        expected, margin = reference_visionzip(tower, outputs, image, -2, 6, 4)
        assert margin > 1e-5
        torch.testing.assert_close(features.last_hidden_state[image], expected, atol=1e-5, rtol=1e-5)


# sdpa kept, no attention maps, hooks cleaned up ------------------------------------------------------


class _ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.shapes.extend(tuple(t.shape) for t in tree_flatten(result)[0] if isinstance(t, torch.Tensor))
        return result


def test_vision_tower_runs_sdpa_and_never_builds_attention_maps(visionzip_model, make_pixel_values):
    model = visionzip_model
    tower = model.model.vision_tower
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert tower.config._attn_implementation == "sdpa"

    attention_weights, attention_kwargs = [], []
    attention_modules = [module for module in tower.modules() if isinstance(module, CLIPAttention)]
    assert len(attention_modules) == model.config.vision_config.num_hidden_layers
    handles = [
        module.register_forward_hook(lambda _module, _args, output: attention_weights.append(output[1]))
        for module in attention_modules
    ] + [
        module.register_forward_pre_hook(lambda _m, _args, kwargs: attention_kwargs.append(dict(kwargs)),
                                         with_kwargs=True)
        for module in attention_modules
    ]
    pixel_values = make_pixel_values(batch=2, seed=3)
    tokens = model.config.vision_config.image_size // model.config.vision_config.patch_size
    tokens = tokens * tokens + 1
    try:
        with torch.no_grad(), _ShapeRecorder() as recorder:
            features = model.model.get_image_features(pixel_values=pixel_values)
    finally:
        for handle in handles:
            handle.remove()

    assert len(features.pooler_output) == 2
    # Layer -2 is read: the tower runs every layer but the last (its output would be thrown away).
    assert len(attention_weights) == len(attention_modules) - 1
    assert all(weights is None for weights in attention_weights)  # sdpa returns no weights
    assert attention_kwargs and not any(kwargs.get("output_attentions") for kwargs in attention_kwargs)
    assert features.attentions is None
    assert recorder.shapes, "the dispatch recorder saw no ops"
    square = [shape for shape in recorder.shapes if len(shape) >= 2 and shape[-2:] == (tokens, tokens)]
    assert not square, f"a tokens x tokens tensor was built: {square[:3]}"


def _hook_counts(model):
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


def _raise(*args, **kwargs):
    raise RuntimeError("deliberate failure")


@pytest.mark.parametrize("failing", ["chosen layer", "chosen layer's q_proj", "projector"])
def test_no_hooks_are_left_behind_also_when_forward_raises(make_visionzip_model, make_pixel_values, failing):
    # (The layer after the chosen one never runs: the tower stops at the layer VisionZip reads.)
    model = make_visionzip_model(spread=False)
    model.model.get_image_features(pixel_values=make_pixel_values())  # transformers installs its own hooks once
    before = _hook_counts(model)
    layers = model.model.vision_tower.encoder.layers
    module = {
        "chosen layer": layers[-2],
        "chosen layer's q_proj": layers[-2].self_attn.q_proj,
        "projector": model.model.multi_modal_projector,
    }[failing]
    module.forward = _raise
    with pytest.raises(RuntimeError, match="deliberate failure"):
        model.model.get_image_features(pixel_values=make_pixel_values())
    assert _hook_counts(model) == before
    del module.forward
    model.model.get_image_features(pixel_values=make_pixel_values())  # works again afterwards
    assert _hook_counts(model) == before


# Output structure ------------------------------------------------------------------------------------


def test_get_image_features_returns_one_tensor_per_image(visionzip_model, make_pixel_values):
    config = visionzip_model.config
    with torch.no_grad():
        features = visionzip_model.model.get_image_features(pixel_values=make_pixel_values(batch=3, seed=4))
    assert isinstance(features.pooler_output, (list, tuple)) and len(features.pooler_output) == 3
    for tensor in features.pooler_output:
        assert tensor.shape == (config.tokens_per_image, config.text_config.hidden_size)
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
    assert features.last_hidden_state.shape == (3, config.tokens_per_image, config.vision_config.hidden_size)
    # The outer model delegates to the inner one.
    with torch.no_grad():
        outer = visionzip_model.get_image_features(pixel_values=make_pixel_values(batch=3, seed=4))
    for a, b in zip(outer.pooler_output, features.pooler_output):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_list_of_images_equals_batched_tensor(visionzip_model, make_pixel_values):
    pixel_values = make_pixel_values(batch=2, seed=5)
    with torch.no_grad():
        batched = visionzip_model.model.get_image_features(pixel_values=pixel_values)
        listed = visionzip_model.model.get_image_features(pixel_values=[pixel_values[0], pixel_values[1]])
    assert len(listed.pooler_output) == 2
    for a, b in zip(listed.pooler_output, batched.pooler_output):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_gradients_reach_the_projector(make_visionzip_model, make_pixel_values):
    model = make_visionzip_model(spread=False)
    features = model.model.get_image_features(pixel_values=make_pixel_values())
    torch.stack(list(features.pooler_output)).sum().backward()
    for name, parameter in model.model.multi_modal_projector.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


# Input errors ----------------------------------------------------------------------------------------


class _CallCounter:
    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, *args):
        self.calls += 1


@pytest.mark.parametrize(
    "pixel_values, error, message",
    [
        pytest.param(torch.zeros(3, 56, 56), ValueError, r"4 dims.*\(3, 56, 56\)", id="rank-3"),
        pytest.param(torch.zeros(1, 1, 3, 56, 56), ValueError, r"4 dims", id="rank-5"),
        pytest.param(torch.zeros(1, 4, 56, 56), ValueError, r"3 channels.*\(1, 4, 56, 56\)", id="channels"),
        pytest.param(torch.zeros(1, 3, 56, 56, dtype=torch.uint8), (TypeError, ValueError), r"floating", id="uint8"),
        pytest.param(torch.zeros(1, 3, 56, 56, dtype=torch.int64), (TypeError, ValueError), r"floating", id="int64"),
        pytest.param([], ValueError, r"non-empty list", id="empty-list"),
        pytest.param([torch.zeros(3, 56, 56), torch.zeros(3, 28, 28)], ValueError, r"one size", id="mixed-sizes"),
        pytest.param("pixels", TypeError, r"torch.Tensor", id="string"),
    ],
)
def test_bad_pixel_values_raise_before_the_tower_runs(visionzip_model, pixel_values, error, message):
    counter = _CallCounter(visionzip_model.model.vision_tower)
    try:
        with pytest.raises(error, match=message):
            visionzip_model.model.get_image_features(pixel_values=pixel_values)
    finally:
        counter.handle.remove()
    assert counter.calls == 0


@pytest.mark.parametrize(
    "size, budget, message",
    [
        # 21px -> 3x3 patches + CLS = 10 tokens < 14.
        pytest.param(21, (10, 4), r"contextual_tokens.*<= 0.*got 4", id="contextual-over-rest"),
        # 14px -> 2x2 patches + CLS = 5 tokens < 10 dominant.
        pytest.param(14, (10, 4), r"dominant_tokens.*<= 5.*got 10", id="dominant-over-tokens"),
    ],
)
def test_budget_larger_than_the_image_raises_before_the_tower_runs(
    make_visionzip_model, make_pixel_values, size, budget, message
):
    model = make_visionzip_model(dominant_tokens=budget[0], contextual_tokens=budget[1], spread=False)
    counter = _CallCounter(model.model.vision_tower)
    with pytest.raises(ValueError, match=message):
        model.model.get_image_features(pixel_values=make_pixel_values(size=size), interpolate_pos_encoding=True)
    assert counter.calls == 0


def test_budget_changed_after_construction_is_checked_before_compute(make_visionzip_model, make_pixel_values):
    model = make_visionzip_model(spread=False)
    model.config.dominant_tokens = 62  # each field valid alone; 62 + 4 exceeds the image's 65 tokens
    counter = _CallCounter(model.model.vision_tower)
    with pytest.raises(ValueError, match=r"contextual_tokens.*<= 3.*got 4"):
        model.model.get_image_features(pixel_values=make_pixel_values())
    model.config.contextual_tokens = 3  # 65 tokens fit the image but not the 64 placeholders
    with pytest.raises(ValueError, match=r"image_seq_length=64.*got 65"):
        model.model.get_image_features(pixel_values=make_pixel_values())
    assert counter.calls == 0


# Checkpoints (the remote-code round trip of every method: tests/test_all_methods.py) -------------------


def test_save_pretrained_writes_a_self_contained_checkpoint(visionzip_checkpoint_dir):
    files = set(os.listdir(visionzip_checkpoint_dir))
    assert "model.safetensors" in files
    with open(visionzip_checkpoint_dir / "config.json") as handle:
        saved = json.load(handle)
    assert saved["model_type"] == "llava_visionzip"
    assert (saved["dominant_tokens"], saved["contextual_tokens"], saved["visionzip_layer"]) == (10, 4, -2)
    auto_map = saved["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForImageTextToText"}
    for reference in auto_map.values():
        module = reference.split(".")[0]
        assert f"{module}.py" in files, f"{module}.py missing for auto_map entry {reference}"
    for name in files:
        if name.endswith(".py"):
            source = (visionzip_checkpoint_dir / name).read_text()
            for statement in re.findall(r"^\s*(?:from|import)\s+\S+", source, flags=re.MULTILINE):
                module = statement.split()[1]
                assert not module.startswith(("llava_token_reduction", "modeling", "configuration")), (name, statement)
                assert not module.startswith(".."), f"{name}: multi-dot relative import {statement!r}"
                if module.startswith("."):
                    assert f"{module[1:]}.py" in files, f"{name} imports {module} which was not shipped"


def test_checkpoint_ships_only_visionzip_code(visionzip_checkpoint_dir):
    """A VisionZip checkpoint carries VisionZip's files and the shared ones, none of TRIM's (the two methods
    share no function; one file per method)."""
    assert_ships_only(
        visionzip_checkpoint_dir,
        {"configuration_llava_visionzip.py", "modeling_llava_visionzip.py", "method_visionzip.py",
         "method_visionzip_model.py"},
        # TRIM's functions, its model side, its refusal of stock checkpoints
        ("def trim_reduce", "def select_with_mean_token", "def bound_token_counts", "class TrimReduction",
         "convert trim"),
    )


def test_local_classes_are_registered_with_the_auto_classes(visionzip_checkpoint_dir):
    config = AutoConfig.from_pretrained(visionzip_checkpoint_dir)
    assert type(config) is LlavaVisionZipConfig
    model = AutoModelForImageTextToText.from_config(config)
    assert type(model) is LlavaVisionZipForConditionalGeneration
    assert type(AutoModel.from_config(config)) is LlavaVisionZipModel
    assert LlavaVisionZipModel.config_class is LlavaVisionZipConfig
    assert LlavaVisionZipForConditionalGeneration.config_class is LlavaVisionZipConfig


# Loading a stock LLaVA checkpoint --------------------------------------------------------------------


def test_stock_llava_checkpoint_loads_every_weight(stock_llava_model, stock_llava_dir, make_pixel_values, tmp_path):
    model, info = LlavaVisionZipForConditionalGeneration.from_pretrained(
        stock_llava_dir, dominant_tokens=20, contextual_tokens=6, output_loading_info=True
    )
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert type(model.config) is LlavaVisionZipConfig
    assert (model.config.dominant_tokens, model.config.contextual_tokens) == (20, 6)

    expected = stock_llava_model.state_dict()
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name

    with torch.no_grad():
        features = model.eval().model.get_image_features(pixel_values=make_pixel_values(batch=2, seed=7))
    assert [tuple(t.shape) for t in features.pooler_output] == [(26, model.config.text_config.hidden_size)] * 2

    # Saved again, it is a VisionZip checkpoint that loads through the Auto classes with the same weights.
    model.save_pretrained(tmp_path)
    reloaded, reload_info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert type(reloaded) is LlavaVisionZipForConditionalGeneration
    assert not any(reload_info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), reload_info
    assert (reloaded.config.dominant_tokens, reloaded.config.contextual_tokens) == (20, 6)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_stock_llava_checkpoint_with_invalid_override_raises(stock_llava_dir):
    with pytest.raises(ValueError, match=r"dominant_tokens.*>= 1.*got 0"):
        LlavaVisionZipForConditionalGeneration.from_pretrained(stock_llava_dir, dominant_tokens=0)
    # Each value valid on its own, the sum too large for the 64 placeholders per image.
    with pytest.raises(ValueError, match=r"image_seq_length=64.*got 65"):
        LlavaVisionZipForConditionalGeneration.from_pretrained(stock_llava_dir, dominant_tokens=60, contextual_tokens=5)


# device_map / dtype ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_features(visionzip_checkpoint_dir, make_pixel_values):
    model = LlavaVisionZipForConditionalGeneration.from_pretrained(visionzip_checkpoint_dir).eval()
    pixel_values = make_pixel_values(batch=2, seed=8)
    with torch.no_grad():
        return pixel_values, model.model.get_image_features(pixel_values=pixel_values)


def _assert_same_features(model, plain_features):
    pixel_values, expected = plain_features
    with torch.no_grad():
        actual = model.model.get_image_features(pixel_values=pixel_values)
    assert len(actual.pooler_output) == len(expected.pooler_output)
    for a, b in zip(actual.pooler_output, expected.pooler_output):
        assert a.device.type != "meta"
        torch.testing.assert_close(a.cpu(), b, atol=1e-6, rtol=0)
    torch.testing.assert_close(actual.last_hidden_state.cpu(), expected.last_hidden_state, atol=1e-6, rtol=0)


@pytest.mark.parametrize("offloaded", [(), ("model.vision_tower", "model.multi_modal_projector")], ids=["cpu", "disk"])
def test_explicit_device_map_gives_the_same_features(visionzip_checkpoint_dir, plain_features, tmp_path, offloaded):
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.language_model": "cpu",
                  "lm_head": "cpu"}
    device_map.update({name: "disk" for name in offloaded})
    model = LlavaVisionZipForConditionalGeneration.from_pretrained(
        visionzip_checkpoint_dir, device_map=device_map, offload_folder=tmp_path / "offload"
    ).eval()
    _assert_same_features(model, plain_features)


def test_a_bfloat16_load_keeps_the_budget_and_cls_close_to_fp32(visionzip_checkpoint_dir, plain_features):
    model = LlavaVisionZipForConditionalGeneration.from_pretrained(visionzip_checkpoint_dir,
                                                                   dtype=torch.bfloat16).eval()
    assert model.model.vision_tower.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    pixel_values, expected = plain_features
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values)
    assert features.last_hidden_state.dtype == torch.bfloat16
    assert len(features.pooler_output) == 2
    for actual, reference in zip(features.pooler_output, expected.pooler_output):
        assert actual.dtype == torch.bfloat16 and actual.shape == reference.shape
        assert torch.isfinite(actual).all()
    # CLS is always the first token; it goes through no selection, so it stays close to fp32.
    torch.testing.assert_close(
        features.last_hidden_state[:, 0].float(), expected.last_hidden_state[:, 0], atol=0.1, rtol=0.05
    )


# Checkpoints saved before the method/family split ------------------------------------------------------


def test_checkpoints_saved_before_the_split_load_into_the_current_classes(run_isolated_python, tmp_path):
    """`tests/fixtures/pre_split_checkpoints.zip` holds tiny VisionZip and TRIM checkpoints whose remote code is the
    code as saved before VisionZip and TRIM got their own files (their auto_map names `modeling_llava_<method>.*`,
    their code ships `token_reduction.py`; zipped so that the old code stays an artefact, not a second copy of the
    source). With the package imported they load into its classes (also under `trust_remote_code=True`) with a
    clean report, and give the image features their own shipped code gives in a process without the package."""
    import zipfile

    from PIL import Image
    from transformers import AutoProcessor

    from llava_token_reduction import LlavaTrimForConditionalGeneration

    classes = {"visionzip": LlavaVisionZipForConditionalGeneration, "trim": LlavaTrimForConditionalGeneration}
    image = Image.fromarray(torch.randint(0, 256, (40, 56, 3), generator=torch.Generator().manual_seed(3),
                                          dtype=torch.uint8).numpy())
    saved = tmp_path / "pre_split"
    with zipfile.ZipFile(Path(__file__).parent / "fixtures" / "pre_split_checkpoints.zip") as archive:
        archive.extractall(saved)
    expected = {}
    for kind, cls in classes.items():
        directory = saved / kind
        assert json.loads((directory / "config.json").read_text())["auto_map"]["AutoModelForImageTextToText"] == (
            f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
        )
        assert (directory / "token_reduction.py").is_file()  # saved before the split
        for trust in (False, True):
            model, info = AutoModelForImageTextToText.from_pretrained(
                os.fspath(directory), dtype=torch.float32, trust_remote_code=trust, output_loading_info=True
            )
            assert type(model) is cls
            assert not {k: v for k, v in info.items() if k != "error_msgs" and v}, info
        processor = AutoProcessor.from_pretrained(os.fspath(directory))
        inputs = dict(processor(images=image, text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt"))
        feature_inputs = {k: v for k, v in inputs.items() if k in ("pixel_values", *model.image_side_input_names)}
        torch.save(feature_inputs, tmp_path / f"{kind}_inputs.pt")
        with torch.no_grad():
            expected[kind] = list(model.eval().model.get_image_features(**feature_inputs).pooler_output)

    run_isolated_python(
        f"""
        import torch
        from transformers import AutoModelForImageTextToText

        for kind, directory in {{k: {os.fspath(saved)!r} + "/" + k for k in ("visionzip", "trim")}}.items():
            model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32, trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            inputs = torch.load(kind + "_inputs.pt")
            with torch.no_grad():
                features = list(model.eval().model.get_image_features(**inputs).pooler_output)
            torch.save(features, kind + "_features.pt")
        """,
        tmp_path,
    )
    for kind, features in expected.items():
        shipped = torch.load(tmp_path / f"{kind}_features.pt")
        assert len(shipped) == len(features) == 1
        torch.testing.assert_close(features[0], shipped[0], rtol=0, atol=0)
