"""LlavaTrimModel / LlavaTrimForConditionalGeneration: module layout, parity of `get_image_features` with the
independent reference over TRIM's settings, input errors, loading stock LLaVA, the saved key layout, the fp32
scoring modules in half precision and under offloading. What every method does (batch == alone, remote code,
device_map, ...) is in tests/test_all_methods.py."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    CLIPTextModelWithProjection,
)

from conftest import assert_ships_only, save_checkpoint
from llava_token_reduction import (
    LlavaTrimForConditionalGeneration,
    LlavaTrimModel,
)
from llava_token_reduction.tiny import (
    TEST_SHAPE,
    build_trim_processor,
    clip_text_config,
)
from methods_under_test import method_model
from trim_reference import reference_features


QUESTIONS = ["what color is the car", "how many dogs are there", "", "is it raining in the picture"]


@pytest.fixture(scope="module")
def make_trim_model():
    def make(seed=0, **overrides) -> LlavaTrimForConditionalGeneration:
        # Default init gives near-uniform scores (IQR fences at near-ties); spread weights give clear margins.
        return method_model("trim", seed=seed, **overrides)

    return make


@pytest.fixture(scope="module")
def trim_model(make_trim_model):
    return make_trim_model()


@pytest.fixture(scope="module")
def processor():
    return build_trim_processor()


@pytest.fixture(scope="module")
def clip_inputs(processor):
    encoded = processor.clip_tokenizer(QUESTIONS, padding="max_length", truncation=True, max_length=77,
                                       return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


@pytest.fixture(scope="module")
def trim_checkpoint_dir(trim_model, processor, tmp_path_factory):
    return save_checkpoint(trim_model, processor, tmp_path_factory.mktemp("trim_checkpoint"))


def pixels(batch, seed=0):
    size = TEST_SHAPE.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_module_layout(trim_model):
    inner = trim_model.model
    assert isinstance(inner, LlavaTrimModel)
    assert isinstance(inner.clip_text_model, CLIPTextModelWithProjection)
    projection = inner.visual_projection
    assert isinstance(projection, torch.nn.Linear) and projection.bias is None
    assert (projection.in_features, projection.out_features) == (TEST_SHAPE.vision_hidden, TEST_SHAPE.projection_dim)
    assert hasattr(inner.vision_tower, "post_layernorm")
    assert trim_model.image_side_input_names == ("clip_input_ids", "clip_attention_mask")
    assert type(AutoModel.from_config(trim_model.config)) is LlavaTrimModel
    assert type(AutoModelForImageTextToText.from_config(trim_model.config)) is LlavaTrimForConditionalGeneration


@pytest.mark.parametrize("negate", [True, False])
@pytest.mark.parametrize("coupled", [False, True])
def test_features_match_reference(make_trim_model, clip_inputs, negate, coupled):
    model = make_trim_model(trim_negate_similarity=negate, trim_batch_coupled=coupled)
    ids, mask = clip_inputs
    pixel_values = pixels(4)
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixel_values, clip_input_ids=ids, clip_attention_mask=mask)
    expected, expected_kept = reference_features(
        model, {"pixel_values": pixel_values, "clip_input_ids": ids, "clip_attention_mask": mask})
    assert [k.tolist() for k in out.kept_indices] == expected_kept
    assert any(len(k) > 0 for k in expected_kept)
    for mine, ref in zip(out.pooler_output, expected):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    if coupled:
        assert len({len(k) for k in out.kept_indices}) == 1


def test_bounds_and_k_zero_at_model_level(make_trim_model, clip_inputs):
    ids, mask = clip_inputs
    model = make_trim_model(trim_min_tokens=3, trim_max_tokens=5)
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels(4), clip_input_ids=ids, clip_attention_mask=mask)
    assert all(3 <= len(k) <= 5 for k in out.kept_indices)
    assert [len(f) for f in out.pooler_output] == [len(k) + 1 for k in out.kept_indices]
    flat = make_trim_model(trim_iqr_multiplier=1e6)  # nothing clears the fence: K = 0 -> the mean token alone
    with torch.no_grad():
        out = flat.model.get_image_features(pixel_values=pixels(2), clip_input_ids=ids[:2],
                                            clip_attention_mask=mask[:2])
    assert [f.shape[0] for f in out.pooler_output] == [1, 1]
    everything = make_trim_model(trim_min_tokens=64)
    with torch.no_grad():
        out = everything.model.get_image_features(pixel_values=pixels(1), clip_input_ids=ids[:1])
    assert out.pooler_output[0].shape == (64, TEST_SHAPE.text_hidden)


@pytest.mark.parametrize("kwargs,message", [
    ({}, "`clip_input_ids`"),
    ({"clip_input_ids": torch.zeros(1, 77, dtype=torch.long)},
     "`clip_input_ids` must have one row per image: 2 images but 1 rows"),
    ({"clip_input_ids": torch.zeros(2, 80, dtype=torch.long)}, "at most 77 tokens"),
    ({"clip_input_ids": torch.zeros(77, dtype=torch.long)}, "2-D"),
    ({"clip_input_ids": torch.zeros(2, 77, dtype=torch.long), "clip_attention_mask": torch.ones(2, 5)},
     "`clip_attention_mask`"),
])
def test_clip_input_errors_before_compute(trim_model, kwargs, message):
    calls = []
    handles = [trim_model.model.vision_tower.register_forward_pre_hook(lambda *a: calls.append("vision")),
               trim_model.model.clip_text_model.register_forward_pre_hook(lambda *a: calls.append("text"))]
    try:
        with pytest.raises(ValueError, match=message):
            trim_model.model.get_image_features(pixel_values=pixels(2), **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []


def test_gradients_reach_the_projector(make_trim_model, clip_inputs):
    model = make_trim_model()
    ids, mask = clip_inputs
    out = model.model.get_image_features(pixel_values=pixels(2), clip_input_ids=ids[:2], clip_attention_mask=mask[:2])
    torch.cat(out.pooler_output).square().sum().backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_stock_llava_checkpoint_is_refused_before_random_clip_weights(stock_llava_dir):
    """A stock LLaVA checkpoint has no CLIP text tower: loading it into the TRIM class would initialise those
    weights randomly, so it is refused (issue 11; more in tests/test_conversion_checkpoint_fit.py)."""
    with pytest.raises(ValueError, match="convert trim"):
        LlavaTrimForConditionalGeneration.from_pretrained(
            stock_llava_dir, clip_text_config=clip_text_config(), projection_dim=TEST_SHAPE.projection_dim,
        )


def test_trim_checkpoint_round_trip_and_overrides(trim_model, trim_checkpoint_dir):
    loaded, info = AutoModelForImageTextToText.from_pretrained(trim_checkpoint_dir, output_loading_info=True)
    assert type(loaded) is LlavaTrimForConditionalGeneration
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    reference = trim_model.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in loaded.state_dict().items())
    # Saved keys: LLaVA's in the legacy llava-hf layout (transformers reverses its renames on save), the CLIP
    # modules (which no rename covers) under the inner model's prefix.
    keys = load_file(str(trim_checkpoint_dir / "model.safetensors")).keys()
    assert {"language_model.lm_head.weight", "multi_modal_projector.linear_1.weight"} <= set(keys)
    assert {"model.clip_text_model.text_projection.weight", "model.visual_projection.weight"} <= set(keys)
    capped = LlavaTrimForConditionalGeneration.from_pretrained(trim_checkpoint_dir, trim_max_tokens=2)
    assert capped.config.trim_max_tokens == 2
    with pytest.raises(ValueError, match="`trim_max_tokens`"):
        LlavaTrimForConditionalGeneration.from_pretrained(trim_checkpoint_dir, trim_max_tokens=0)


def test_checkpoint_ships_only_trim_code(trim_checkpoint_dir):
    """A TRIM checkpoint carries TRIM's files (its processor's included) and the shared ones, none of
    VisionZip's."""
    assert_ships_only(
        trim_checkpoint_dir,
        {"configuration_llava_trim.py", "modeling_llava_trim.py", "method_trim.py", "method_trim_model.py",
         "processing_llava_trim.py"},
        # VisionZip's functions and model side
        ("def visionzip_reduce", "def cls_attention_scores", "def merge_into_contextual_tokens",
         "class VisionZipReduction"),
    )


def test_bf16_load_keeps_clip_modules_fp32(trim_checkpoint_dir, clip_inputs):
    model = LlavaTrimForConditionalGeneration.from_pretrained(trim_checkpoint_dir, dtype=torch.bfloat16).eval()
    inner = model.model
    for module in (inner.clip_text_model, inner.visual_projection, inner.vision_tower.post_layernorm):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert inner.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert inner.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16
    ids, mask = clip_inputs
    with torch.no_grad():
        out = inner.get_image_features(pixel_values=pixels(2).bfloat16(), clip_input_ids=ids[:2],
                                       clip_attention_mask=mask[:2])
        pooled = inner.vision_tower(pixels(1).bfloat16()).pooler_output  # the tower's own fp32 post_layernorm path
    assert out.scores.dtype == torch.float32 and torch.isfinite(pooled).all()
    assert all(f.dtype == torch.bfloat16 and torch.isfinite(f).all() for f in out.pooler_output)
    # A later .to(bfloat16) keeps them fp32 (tests/test_trim_precision.py); cast explicitly, module by module,
    # scoring still copes with half CLIP modules.
    model.to(torch.bfloat16)
    assert inner.visual_projection.weight.dtype == torch.float32
    for module in (inner.clip_text_model, inner.visual_projection, inner.vision_tower.post_layernorm):
        module.to(torch.bfloat16)
    assert inner.visual_projection.weight.dtype == torch.bfloat16
    with torch.no_grad():
        half = inner.get_image_features(pixel_values=pixels(2).bfloat16(), clip_input_ids=ids[:2],
                                        clip_attention_mask=mask[:2])
    assert all(torch.isfinite(f).all() for f in half.pooler_output) and half.scores.dtype == torch.float32


def test_device_map_auto_with_disk_offload_bf16(trim_checkpoint_dir, clip_inputs, tmp_path):
    ids, mask = clip_inputs
    plain = LlavaTrimForConditionalGeneration.from_pretrained(trim_checkpoint_dir, dtype=torch.bfloat16).eval()
    offloaded = LlavaTrimForConditionalGeneration.from_pretrained(
        trim_checkpoint_dir, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": "60KB"},
        offload_folder=str(tmp_path / "offload"),
    ).eval()
    devices = {p.device.type for p in offloaded.parameters()}
    assert "meta" in devices  # really offloaded
    # Note: transformers 5.23 does not apply `_keep_in_fp32_modules_strict` to disk-offloaded weights (they load
    # in bf16 there); scoring copes with half CLIP modules and still computes logits/softmax/quantiles in fp32.
    with torch.no_grad():
        inputs = {"pixel_values": pixels(2).bfloat16(), "clip_input_ids": ids[:2], "clip_attention_mask": mask[:2]}
        expected = plain.model.get_image_features(**inputs)
        got = offloaded.model.get_image_features(**inputs)
    assert got.scores.dtype == torch.float32
    assert [k.tolist() for k in got.kept_indices] == [k.tolist() for k in expected.kept_indices]
    for mine, ref in zip(got.pooler_output, expected.pooler_output):
        assert mine.abs().sum() > 0  # not the zeros of meta-weight arithmetic
        torch.testing.assert_close(mine.cpu(), ref, rtol=0, atol=0)


def test_load_clip_text_weights_from_a_clip_model(make_trim_model):
    from transformers import CLIPConfig, CLIPModel

    model = make_trim_model()
    vision = model.config.vision_config
    clip = CLIPModel(CLIPConfig(text_config=clip_text_config().to_dict(), vision_config=vision.to_dict(),
                                projection_dim=TEST_SHAPE.projection_dim)).eval()
    model.model.load_clip_text_weights(clip.state_dict())
    ids = torch.randint(0, 100, (2, 77))
    with torch.no_grad():
        torch.testing.assert_close(model.model.clip_text_model(input_ids=ids).text_embeds,
                                   clip.get_text_features(input_ids=ids).pooler_output)
        torch.testing.assert_close(model.model.visual_projection.weight, clip.visual_projection.weight)
    partial = {k: v for k, v in clip.state_dict().items() if k != "visual_projection.weight"}
    with pytest.raises(ValueError, match="visual_projection.weight"):
        model.model.load_clip_text_weights(partial)


def test_question_embeds_skip_shared_padding_without_changing_them(trim_model, clip_inputs):
    ids, mask = clip_inputs
    calls = []
    handle = trim_model.model.clip_text_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            embeds = trim_model.model.get_question_embeds(ids, mask)
    finally:
        handle.remove()
    assert calls == [int(mask.sum(1).max())] and calls[0] < ids.shape[1]
    with torch.no_grad():
        padded = trim_model.model.clip_text_model(input_ids=ids, attention_mask=mask).text_embeds
    torch.testing.assert_close(embeds, padded, atol=1e-5, rtol=1e-5)
