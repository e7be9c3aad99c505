"""TRIM's scoring modules (CLIP text tower, `visual_projection`, the tower's `post_layernorm`) stay fp32 however
the model is put in half precision: `_from_config(dtype=...)`, `AutoModelForImageTextToText.from_config(...,
dtype=...)`, `model.to(dtype)`, `.half()`, `.bfloat16()` (as under `from_pretrained(dtype=...)`), and scoring
stays close to an fp32 reference."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

from llava_token_reduction import LlavaTrimConfig, LlavaTrimForConditionalGeneration
from llava_token_reduction.tiny import TEST_SHAPE, build_clip_tokenizer, method_config_kwargs
from methods_under_test import method_model


def _scoring_parameters(model):
    inner = model.model
    modules = (inner.clip_text_model, inner.visual_projection, inner.vision_tower.post_layernorm)
    return {f"{i}.{name}": p for i, m in enumerate(modules) for name, p in m.named_parameters()}


_BUILDS = {
    "_from_config": lambda config, dtype: LlavaTrimForConditionalGeneration._from_config(config, dtype=dtype),
    "AutoModelForImageTextToText.from_config": lambda config, dtype: AutoModelForImageTextToText.from_config(
        config, dtype=dtype
    ),
}
_CASTS = {
    ".to(dtype)": lambda model, dtype: model.to(dtype),
    ".to(device, dtype)": lambda model, dtype: model.to("cpu", dtype),
    ".half()/.bfloat16()": lambda model, dtype: model.half() if dtype == torch.float16 else model.bfloat16(),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("build", list(_BUILDS))
def test_from_config_in_half_precision_keeps_scoring_modules_fp32(build, dtype):
    model = _BUILDS[build](LlavaTrimConfig(**method_config_kwargs("trim")), dtype)
    assert {p.dtype for p in _scoring_parameters(model).values()} == {torch.float32}
    assert model.model.language_model.embed_tokens.weight.dtype == dtype
    assert model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.dtype == dtype
    assert model.model.multi_modal_projector.linear_1.weight.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cast", list(_CASTS))
def test_casting_the_model_keeps_scoring_modules_fp32_and_exact(cast, dtype):
    model = method_model("trim", spread=False)
    before = {name: p.detach().clone() for name, p in _scoring_parameters(model).items()}
    _CASTS[cast](model, dtype)
    after = _scoring_parameters(model)
    for name, value in before.items():
        assert after[name].dtype == torch.float32 and torch.equal(after[name], value), name
    assert model.model.language_model.embed_tokens.weight.dtype == dtype
    assert model.lm_head.weight.dtype == dtype
    model.float()  # and back: everything fp32 again
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_scores_of_a_bf16_cast_model_follow_the_fp32_model():
    model = method_model("trim")
    encoded = build_clip_tokenizer()(["what is in the picture", "a red car"], padding="max_length", max_length=77,
                                     return_tensors="pt")
    pixel_values = torch.randn(2, 3, TEST_SHAPE.image_size, TEST_SHAPE.image_size,
                               generator=torch.Generator().manual_seed(3))
    inputs = {"clip_input_ids": encoded["input_ids"], "clip_attention_mask": encoded["attention_mask"]}
    with torch.no_grad():
        inner = model.model
        # fp32 reference: ALGORITHMS.md §2.2 from the stock route (tower hidden states), not the code under test.
        patches = inner.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        image_embeds = inner.visual_projection(inner.vision_tower.post_layernorm(patches))
        text_embeds = inner.clip_text_model(input_ids=inputs["clip_input_ids"],
                                            attention_mask=inputs["clip_attention_mask"]).text_embeds
        reference = (-(image_embeds @ text_embeds.unsqueeze(-1)).squeeze(-1)).softmax(dim=-1)
        model.to(torch.bfloat16)
        half = inner.get_image_features(pixel_values=pixel_values.bfloat16(), **inputs)
    assert half.scores.dtype == torch.float32
    assert all(f.dtype == torch.bfloat16 and torch.isfinite(f).all() for f in half.pooler_output)
    # Only the bf16 vision tower's rounding remains (fp32 text tower and head): scores agree to a few percent.
    torch.testing.assert_close(half.scores, reference, rtol=0.05, atol=1e-4)
